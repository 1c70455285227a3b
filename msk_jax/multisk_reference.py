"""Multi-SK written from the paper's definition: the reference the fast solver is checked against.

For N samples and K anchors with similarities S (N, K), R = int(K * required_fraction) required
slots of weight 1 and K - R optional slots of weight 0.25 give the K x N x K tensor

    A[m, n, k] = exp(w_m S[n, k] / eps), divided by its total,

and each of `num_iters` iterations scales it (sums damped by + 1e-5, as the original does) so that
(a) over samples, every slot and anchor hold c_k = N / K (clamped at >= 1, renormalised to N),
(b) over slots, every sample and anchor hold 1, and (c) over anchors, every slot and sample
hold 1. The target is the sum over the required slots after a last exact (c), min-max
normalised per sample. This module builds that tensor and nothing cleverer: the tests compare
`msk_jax.sinkhorn` with it (float64 numpy), and `msk_jax.bench` times it as the dense baseline
(float32, jitted). Its constants are written here from the definition, not taken from the
solver, so that a wrong constant there cannot hide.
"""

from __future__ import annotations

import numpy as np

OPTIONAL_WEIGHT, REQUIRED_WEIGHT, DAMPING = 0.25, 1.0, 1e-5


def _anchor_marginal(n: int, k: int) -> np.ndarray:
    c = np.maximum(np.full(k, n / k), 1.0)
    return c / c.sum() * n


def dense_multi_sinkhorn(scores, eps: float, num_iters: int, required_fraction: float, xp=np):
    """(tensor (K, N, K), target (N, K)) of one problem. `xp=np` computes in the scores' float64
    numpy; `xp=jax.numpy` in JAX (jit it with the settings static; the iterations run in a
    `fori_loop`)."""
    n, k = scores.shape
    r = int(k * required_fraction)
    weights = np.where(np.arange(k) < k - r, OPTIONAL_WEIGHT, REQUIRED_WEIGHT).astype(np.float64)
    c = _anchor_marginal(n, k)
    if xp is not np:
        weights, c = xp.asarray(weights, scores.dtype), xp.asarray(c, scores.dtype)
    a = xp.exp(weights[:, None, None] * scores[None] / eps)
    a = a / xp.sum(a)

    def iteration(_, a):
        a = a * (c[None, None, :] / (xp.sum(a, axis=1, keepdims=True) + DAMPING))  # (a) anchors
        a = a / (xp.sum(a, axis=0, keepdims=True) + DAMPING)                      # (b) slots
        return a / (xp.sum(a, axis=2, keepdims=True) + DAMPING)                   # (c) samples

    if xp is np:
        for i in range(num_iters):
            a = iteration(i, a)
    else:
        import jax

        a = jax.lax.fori_loop(0, num_iters, iteration, a)
    a = a / xp.sum(a, axis=2, keepdims=True)
    summed = xp.sum(a[k - r:], axis=0)
    lo, hi = xp.min(summed, axis=1, keepdims=True), xp.max(summed, axis=1, keepdims=True)
    return a, (summed - lo) / (hi - lo)


def random_cosine_scores(rng: np.random.Generator, n: int, k: int, problems: int | None = None,
                         dim: int = 16) -> np.ndarray:
    """Cosine similarities (N, K), or (problems, N, K), of random unit vectors to random unit
    anchors, float32: the test and benchmark inputs."""
    lead = () if problems is None else (problems,)
    x = rng.normal(size=lead + (n, dim))
    z = rng.normal(size=lead + (k, dim))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return np.einsum("...nd,...kd->...nk", x, z).astype(np.float32)
