"""retrieval.npz: the zero-shot retrieval metrics (R@k, MedR, MeanR) of similarity matrices."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from msk_jax import retrieval
from msk_jax.parity.golden import GoldenInputs, Output


def check_retrieval(inputs: GoldenInputs) -> Iterable[Output]:
    for i in range(int(inputs["n_cases"])):
        complete = int(inputs[f"case{i}_complete"])
        metrics = retrieval.retrieval_metrics(inputs[f"case{i}_sims"], complete if complete >= 0 else None)
        for name in retrieval.METRIC_NAMES:
            yield Output(f"case{i}_{name}", np.asarray(metrics[name]), atol=1e-6)
