"""Retrieval metrics on hand-made cases: perfect, reversed, ties, missing items, bad input."""

import numpy as np
import pytest

from msk_jax.retrieval import match_ranks, retrieval_metrics


def test_perfect_retrieval():
    m = retrieval_metrics(np.eye(20))
    assert m["R1"] == m["R5"] == m["R10"] == m["R50"] == 100.0
    assert m["MedR"] == m["MeanR"] == 1.0
    assert m["geometric_mean_R1-R5-R10"] == pytest.approx(100.0)


def test_ranks_count_strictly_higher_items():
    sims = np.array([[0.1, 0.9, 0.5],
                     [0.3, 0.2, 0.1],
                     [0.0, 0.0, 0.7]])
    np.testing.assert_array_equal(match_ranks(sims), [2, 1, 0])
    m = retrieval_metrics(sims)
    assert m["R1"] == pytest.approx(100 / 3)
    assert m["MedR"] == 2.0 and m["MeanR"] == 2.0


def test_ties_are_averaged():
    sims = np.array([[0.5, 0.5, 0.5, 0.1],   # tied with 2 others: positions 0,1,2 -> 1.0
                     [0.9, 0.4, 0.4, 0.0],   # one higher, one tie: positions 1,2 -> 1.5
                     [0.0, 0.0, 1.0, 1.0],   # tie at the top: 0.5, not an R@1 hit
                     [0.0, 0.0, 0.0, 2.0]])
    np.testing.assert_allclose(match_ranks(sims), [1.0, 1.5, 0.5, 0.0])
    m = retrieval_metrics(sims)
    assert m["R1"] == 25.0
    assert m["MedR"] == pytest.approx(np.median([1.0, 1.5, 0.5, 0.0]) + 1)


def test_tie_straddling_k_counts_as_hit():
    sims = np.zeros((6, 6))
    sims[0, 1:5] = 1.0  # query 0's match has 4 items above it -> rank 4: inside R@5
    sims[0, 5] = 0.0    # tied with the match: rank 4.5, still < 5
    assert match_ranks(sims)[0] == 4.5
    assert retrieval_metrics(sims[:1])["R5"] == 100.0


def test_missing_items_count_as_misses():
    sims = np.eye(8)
    m = retrieval_metrics(sims, complete_dataset_size=10)
    assert m["R1"] == 80.0
    assert m["MedR"] == 1.0  # over the queries present
    assert retrieval_metrics(sims, complete_dataset_size=-1)["R1"] == 100.0


def test_zero_recall_gives_zero_geometric_mean():
    sims = np.ones((3, 3)) - np.eye(3)
    assert retrieval_metrics(sims)["geometric_mean_R1-R5-R10"] == 0.0


@pytest.mark.parametrize("sims,kwargs,message", [
    (np.zeros((3, 2)), {}, "at least as many items"),
    (np.zeros(3), {}, "queries, items"),
    (np.zeros((0, 3)), {}, "no queries"),
    (np.array([[np.nan, 0.0], [0.0, 1.0]]), {}, "NaN"),
    (np.eye(4), {"complete_dataset_size": 3}, "smaller"),
])
def test_bad_input_raises(sims, kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(sims, **kwargs)
