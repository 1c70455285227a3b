"""Multi-Assignment Sinkhorn-Knopp (Multi-SK): the targets of the anchor consistency loss.

Given the cosine similarities S (N samples x K anchors), Multi-SK builds a K x N x K tensor
A[m, n, k] = exp(w_m * S[n, k] / eps) over K "slots" m, normalises it to unit total mass, and
alternates three projections for a fixed number of iterations:

  (a) for every (slot m, anchor k):  sum over samples n   -> c_k = N / K  (uniform anchor prior)
  (b) for every (sample n, anchor k): sum over slots m    -> 1
  (c) for every (slot m, sample n):  sum over anchors k   -> 1

Every denominator is damped, ``sum + 1e-5``, exactly as in the original implementation. After a
final renormalisation over anchors, the training target is the sum of the last R slots (those
with weight 1.0; the first K - R have weight 0.25), min-max normalised per sample.

Slots with equal weight receive identical updates in every step, so they stay identical: the
tensor is determined by one N x K matrix per *distinct* slot weight (two here, with
multiplicities K - R and R). The solver iterates on those matrices only -- O(N K) memory and
work per iteration -- and in the log domain, so any score magnitude and any eps > 0 give finite
results. The damping is reproduced exactly in log space as ``logaddexp(lse, log 1e-5)``.

Where the original would overflow float32 (``exp(w S / eps) = inf``, e.g. scores > 6 at
eps = 0.07) it clamps infinities to the largest finite entry; this solver instead computes the
exact, overflow-free value. A row whose target is constant (min == max, where the original
divides 0 by 0) gets a target of 0 instead of NaN.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DAMPING = 1e-5
"""Added to every Sinkhorn denominator, as in the original implementation."""

OPTIONAL_SLOT_WEIGHT = 0.25
REQUIRED_SLOT_WEIGHT = 1.0


class SlotGroup(NamedTuple):
    """Slots that share one weight: they hold identical N x K matrices."""

    weight: float
    count: int


class MultiSKResult(NamedTuple):
    """Output of :func:`multi_sinkhorn`.

    target: (N, K) training target, rows min-max normalised to [0, 1].
    iterations: int32 scalar, how many Sinkhorn iterations ran.
    marginal_error: float32 scalar, the largest violation of the three marginal constraints
      after the last iteration (relative for the anchor marginal N / K, absolute for the other two).
    """

    target: jax.Array
    iterations: jax.Array
    marginal_error: jax.Array


def num_required_slots(num_anchors: int, required_fraction: float) -> int:
    """R = int(K * required_fraction), as the original computes it; validated."""
    required = int(num_anchors * required_fraction)
    if not 1 <= required <= num_anchors:
        raise ValueError(
            f"Multi-SK: required_fraction={required_fraction} with K={num_anchors} anchors gives "
            f"R=int(K*fraction)={required} required slots; R must be in [1, K].")
    return required


def slot_groups(num_anchors: int, num_required: int) -> tuple[SlotGroup, ...]:
    """The distinct slot weights in slot order: K - R optional slots, then R required ones."""
    groups = []
    if num_anchors - num_required > 0:
        groups.append(SlotGroup(OPTIONAL_SLOT_WEIGHT, num_anchors - num_required))
    groups.append(SlotGroup(REQUIRED_SLOT_WEIGHT, num_required))
    return tuple(groups)


def anchor_marginal(num_samples: int, num_anchors: int) -> np.ndarray:
    """Column target c_k: the uniform prior N / K, clamped at >= 1 and renormalised to sum N.

    Computed in float32 with the original's sequence of operations.
    """
    prior = np.ones(num_anchors, np.float32) / np.float32(num_anchors)
    prior = prior * np.float32(num_samples)
    prior = np.maximum(prior, np.float32(1.0))
    prior = prior / prior.sum(dtype=np.float32)
    return (prior * np.float32(num_samples)).astype(np.float32)


def _validate(scores, eps: float, num_iters: int) -> None:
    if scores.ndim != 2:
        raise ValueError(f"Multi-SK: scores must be (N samples, K anchors), got shape {scores.shape}.")
    n, k = scores.shape
    if n < 1 or k < 1:
        raise ValueError(f"Multi-SK: need at least one sample and one anchor, got shape {scores.shape}.")
    if not float(eps) > 0:
        raise ValueError(f"Multi-SK: eps must be > 0, got {eps}.")
    if int(num_iters) < 0:
        raise ValueError(f"Multi-SK: num_iters must be >= 0, got {num_iters}.")
    # Under jit the scores are abstract and NaN cannot be detected here; it then propagates.
    if not isinstance(scores, jax.core.Tracer) and bool(jnp.isnan(scores).any()):
        raise ValueError("Multi-SK: scores contain NaN.")


def _damped_log_sum(log_x: jax.Array, axis: int) -> jax.Array:
    """log(sum(exp(log_x), axis) + DAMPING), kept as a broadcastable dimension."""
    lse = jax.nn.logsumexp(log_x, axis=axis, keepdims=True)
    return jnp.logaddexp(lse, jnp.float32(math.log(DAMPING)))


def _marginal_error(log_a: jax.Array, log_counts: jax.Array, log_c: jax.Array) -> jax.Array:
    """Largest violation of the three marginals of the (implicit) K x N x K tensor."""
    col = jnp.exp(jax.nn.logsumexp(log_a, axis=1))  # (G, K), target c_k
    slot = jnp.exp(jax.nn.logsumexp(log_a + log_counts, axis=0))  # (N, K), target 1
    row = jnp.exp(jax.nn.logsumexp(log_a, axis=2))  # (G, N), target 1
    c = jnp.exp(log_c)
    return jnp.maximum(jnp.max(jnp.abs(col - c) / c),
                       jnp.maximum(jnp.max(jnp.abs(slot - 1.0)), jnp.max(jnp.abs(row - 1.0))))


def _solve(scores, eps, num_iters, num_required, tol):
    """Runs the Multi-SK iterations; returns the per-group log matrices (G, N, K) after the
    final renormalisation over anchors, the iteration count and the final marginal error."""
    scores = jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
    n, k = scores.shape
    groups = slot_groups(k, num_required)
    weights = jnp.array([g.weight for g in groups], jnp.float32)[:, None, None]
    log_counts = jnp.log(jnp.array([g.count for g in groups], jnp.float32))[:, None, None]
    log_c = jnp.log(jnp.asarray(anchor_marginal(n, k)))

    logits = weights * scores[None] / jnp.float32(eps)  # (G, N, K)
    log_a = logits - jax.nn.logsumexp(logits + log_counts)  # unit total mass over all K slots

    def iteration(log_a):
        log_a = log_a + log_c - _damped_log_sum(log_a, axis=1)             # (a) anchors: c_k
        log_a = log_a - _damped_log_sum(log_a + log_counts, axis=0)         # (b) slots: 1
        return log_a - _damped_log_sum(log_a, axis=2)                       # (c) samples: 1

    if tol is None:
        def cond(carry):
            return carry[1] < num_iters

        def body(carry):
            log_a, i = carry
            return iteration(log_a), i + 1

        log_a, iters = jax.lax.while_loop(cond, body, (log_a, jnp.int32(0)))
        error = _marginal_error(log_a, log_counts, log_c)
    else:
        def cond(carry):
            _, i, err = carry
            return (i < num_iters) & (err > tol)

        def body(carry):
            log_a, i, _ = carry
            log_a = iteration(log_a)
            return log_a, i + 1, _marginal_error(log_a, log_counts, log_c)

        log_a, iters, error = jax.lax.while_loop(
            cond, body, (log_a, jnp.int32(0), jnp.float32(jnp.inf)))

    log_a = log_a - jax.nn.logsumexp(log_a, axis=2, keepdims=True)  # final, undamped
    return log_a, iters, error


def minmax_normalize_rows(x: jax.Array) -> jax.Array:
    """(x - row min) / (row max - row min); a constant row maps to 0."""
    lo = jnp.min(x, axis=1, keepdims=True)
    hi = jnp.max(x, axis=1, keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), 0.0)


_STATIC = ("eps", "num_iters", "num_required", "tol")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _target(scores, eps, num_iters, num_required, tol) -> MultiSKResult:
    log_a, iters, error = _solve(scores, eps, num_iters, num_required, tol)
    # Each required slot's row sums to 1 after the final renormalisation; their sum is R * A.
    target = minmax_normalize_rows(num_required * jnp.exp(log_a[-1]))
    return MultiSKResult(target, iters, error)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _assignment(scores, eps, num_iters, num_required, tol) -> jax.Array:
    log_a, _, _ = _solve(scores, eps, num_iters, num_required, tol)
    groups = slot_groups(scores.shape[1], num_required)
    slot_to_group = np.repeat(np.arange(len(groups)), [g.count for g in groups])
    return jnp.exp(log_a)[slot_to_group]


def _settings(scores, eps, num_iters, required_fraction, tol) -> dict:
    _validate(scores, eps, num_iters)
    return dict(eps=float(eps), num_iters=int(num_iters),
                num_required=num_required_slots(scores.shape[1], required_fraction),
                tol=None if tol is None or tol <= 0 else float(tol))


def multi_sinkhorn(scores: jax.Array, *, eps: float = 0.07, num_iters: int = 20,
                   required_fraction: float = 0.5, tol: float | None = None) -> MultiSKResult:
    """Multi-SK training target for one (N, K) similarity matrix (the original's `calculate_sk`).

    Args:
      scores: (N, K) similarities of N samples to K anchors (cast to float32; no gradient).
      eps: temperature of the initial assignment exp(w * S / eps); > 0.
      num_iters: number of Sinkhorn iterations (the original runs exactly this many).
      required_fraction: R = int(K * required_fraction) required slots, 1 <= R <= K.
      tol: if set (> 0), stop early once the marginal error falls to <= tol.

    The settings are static Python numbers (a new value compiles anew). Jit-able and
    vmap-able over a leading stack of problems.
    """
    return _target(scores, **_settings(scores, eps, num_iters, required_fraction, tol))


def multi_sinkhorn_assignment(scores: jax.Array, *, eps: float = 0.07, num_iters: int = 20,
                              required_fraction: float = 0.5,
                              tol: float | None = None) -> jax.Array:
    """The full (K slots, N samples, K anchors) assignment tensor of Multi-SK (the original's
    `multi_sinkhorn`), a broadcast of the per-weight matrices. O(K^2 N) memory: small problems."""
    return _assignment(scores, **_settings(scores, eps, num_iters, required_fraction, tol))
