"""Shared test fixtures: the golden folder and a float64 dense Multi-SK written from the spec."""

import os

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.environ.get("MSK_GOLDEN_DIR", os.path.join(REPO_ROOT, "..", "shared", "golden"))


@pytest.fixture(scope="session")
def golden_dir():
    if not os.path.isdir(GOLDEN_DIR):
        pytest.skip(f"golden folder not found at {GOLDEN_DIR} (set MSK_GOLDEN_DIR)")
    return GOLDEN_DIR


def dense_multi_sinkhorn(scores, eps, num_iters, required_fraction):
    """Straightforward float64 K x N x K Multi-SK, step by step as the reference describes."""
    scores = np.asarray(scores, np.float64)
    n, k = scores.shape
    r = int(k * required_fraction)
    w = np.ones(k)
    w[: k - r] = 0.25
    q = np.exp(w[:, None, None] * scores[None] / eps)
    q /= q.sum()
    c = np.ones(k) / k * n
    c = np.maximum(c, 1.0)
    c = c / c.sum() * n
    a = q
    for _ in range(num_iters):
        a = a * (c[None, None, :] / (a.sum(axis=1, keepdims=True) + 1e-5))
        a = a / (a.sum(axis=0, keepdims=True) + 1e-5)
        a = a / (a.sum(axis=2, keepdims=True) + 1e-5)
    a = a / a.sum(axis=2, keepdims=True)
    summed = a[-r:].sum(axis=0)
    lo, hi = summed.min(axis=1, keepdims=True), summed.max(axis=1, keepdims=True)
    return a, (summed - lo) / (hi - lo)


def random_cosine_scores(rng, n, k, dim=16):
    x = rng.normal(size=(n, dim))
    z = rng.normal(size=(k, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return (x @ z.T).astype(np.float32)
