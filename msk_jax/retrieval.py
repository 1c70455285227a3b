"""Zero-shot retrieval metrics: R@1/5/10/50, median and mean rank, geometric mean of R@1/5/10.

The similarity matrix is (queries x items) and query i's match is item i (the diagonal). The rank
of the match counts the items scored strictly higher; items scored exactly as high as the match
share the tied positions, and the match gets their average (ties broken by averaging, as in the
original evaluation). Recalls are percentages over ``complete_dataset_size`` when given (queries
missing from the matrix count as misses), else over the number of queries; MedR and MeanR are
1-based and taken over the queries present.
"""

from __future__ import annotations

import math

import numpy as np

RECALL_LEVELS = (1, 5, 10, 50)
METRIC_NAMES = ("R1", "R5", "R10", "R50", "MedR", "MeanR", "geometric_mean_R1-R5-R10")


def match_ranks(sims: np.ndarray) -> np.ndarray:
    """0-based rank of each query's match (the diagonal), ties averaged."""
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"retrieval: similarities must be (queries, items), got shape {sims.shape}.")
    num_queries, num_items = sims.shape
    if num_queries == 0:
        raise ValueError("retrieval: the similarity matrix has no queries.")
    if num_queries > num_items:
        raise ValueError(f"retrieval: {num_queries} queries but only {num_items} items; query i's "
                         "match is item i, so there must be at least as many items as queries.")
    if np.isnan(sims).any():
        raise ValueError("retrieval: the similarity matrix contains NaN.")
    match = np.diagonal(sims)[:, None]
    higher = np.sum(sims > match, axis=1)
    tied = np.sum(sims == match, axis=1)  # includes the match itself
    return higher + (tied - 1) / 2.0


def geometric_mean(values) -> float:
    """Geometric mean; 0 when any value is 0."""
    values = np.asarray(values, np.float64)
    if np.any(values <= 0):
        return 0.0
    return float(math.exp(np.mean(np.log(values))))


def metrics_from_ranks(ranks: np.ndarray, complete_dataset_size: int | None = None) -> dict[str, float]:
    """The metrics of 0-based match ranks (see module docstring)."""
    ranks = np.asarray(ranks, np.float64)
    denominator = len(ranks)
    if complete_dataset_size is not None and complete_dataset_size >= 0:
        if complete_dataset_size < len(ranks):
            raise ValueError(f"retrieval: complete_dataset_size={complete_dataset_size} is smaller "
                             f"than the {len(ranks)} queries present.")
        denominator = complete_dataset_size
    # R@1 counts rank exactly 0 (a match tied with another item has rank >= 0.5); R@k, k > 1,
    # counts ranks below k, so a tie straddling k counts in (as in the original).
    hits = {k: np.sum(ranks == 0) if k == 1 else np.sum(ranks < k) for k in RECALL_LEVELS}
    metrics = {f"R{k}": 100.0 * float(hits[k]) / denominator for k in RECALL_LEVELS}
    metrics["MedR"] = float(np.median(ranks)) + 1.0
    metrics["MeanR"] = float(np.mean(ranks)) + 1.0
    metrics["geometric_mean_R1-R5-R10"] = geometric_mean([metrics["R1"], metrics["R5"], metrics["R10"]])
    return metrics


def retrieval_metrics(sims: np.ndarray, complete_dataset_size: int | None = None) -> dict[str, float]:
    """Zero-shot retrieval metrics of a (queries x items) similarity matrix, match on the diagonal.

    complete_dataset_size: the full dataset's size when some items are missing from `sims`
    (e.g. 1000 for MSR-VTT 1k-A with 968 clips present); None or a negative value for none.
    """
    return metrics_from_ranks(match_ranks(sims), complete_dataset_size)
