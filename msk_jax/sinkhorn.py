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
work per iteration. Two implementations compute the same numbers:

* the linear domain (the fast path): plain float32 scaling with shifted exponentials. The
  ``exp`` is taken once, after subtracting the largest logit; the total mass (the original's
  first normalisation) is kept exactly as a scale factor, so the damping ``+ 1e-5`` acts in the
  original scale. The second group is stored as the first one times a fixed kernel and
  row/column scalings, so an iteration is one elementwise pass that updates one N x K matrix in
  place, one that forms its product with the kernel, and four matrix-vector products for the
  row and column sums; see :func:`_solve_linear`. On CPU, problems of at least
  :data:`NATIVE_MIN_ROWS` rows run these iterations in a native kernel instead
  (:mod:`msk_jax.kernels`, ``multisk_cpu.cc``): the same float32 expressions, one fused pass
  over the matrices per iteration.
* the log domain (the fallback): ``logsumexp`` for every sum, the damping reproduced as
  ``logaddexp(lse, log 1e-5)``. It is exact for any score magnitude and any eps > 0, and used
  when the spread of the logits ``w * S / eps`` exceeds :data:`LINEAR_MAX_LOGIT_SPREAD`, where
  float32 scaling would underflow.

The choice is made per problem at run time (``lax.cond``); under ``jax.vmap`` a custom batching
rule keeps that a real branch per problem (see :func:`_per_problem`).
:func:`multi_sinkhorn_batched` solves a stack of problems in pairs, for the two CPU cores.

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

from msk_jax import kernels

DAMPING = 1e-5
"""Added to every Sinkhorn denominator, as in the original implementation."""

OPTIONAL_SLOT_WEIGHT = 0.25
REQUIRED_SLOT_WEIGHT = 1.0

LINEAR_MAX_LOGIT_SPREAD = 50.0
"""The linear-domain solver runs when the logits w * S / eps of a problem span at most this
(max - min over both slot weights; cosine similarities do at eps >= 0.04); wider problems use the
log domain. The working values then stay above exp(-50) ~ 2e-22, far from float32's smallest
normal number (1.2e-38 ~ exp(-87)); measured, the linear domain stays as accurate as the log
domain up to spreads of about 80 and breaks down near 100 (BENCHMARKS.md)."""

NATIVE_MIN_ROWS = 256
"""Problems with at least this many rows use the native CPU kernel (:mod:`msk_jax.kernels`)
where it is available; below, the JAX loop is as fast (measured: 0.27 vs 0.28 ms at N = 48,
0.55 vs 0.56 ms at N = 300; 0.84 vs 0.96 ms at N = 576; BENCHMARKS.md)."""

_HIGHEST = jax.lax.Precision.HIGHEST


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


def _validate(scores, eps: float, num_iters: int, batched: bool = False) -> None:
    shape = jnp.shape(scores)
    if batched:
        if len(shape) != 3 or shape[0] < 1:
            raise ValueError(f"Multi-SK: a batch of scores must be (P >= 1 problems, N samples, "
                             f"K anchors), got shape {shape}.")
        shape = shape[1:]
    if len(shape) != 2:
        raise ValueError(f"Multi-SK: scores must be (N samples, K anchors), got shape {shape}.")
    n, k = shape
    if n < 1 or k < 1:
        raise ValueError(f"Multi-SK: need at least one sample and one anchor, got shape {shape}.")
    if not float(eps) > 0:
        raise ValueError(f"Multi-SK: eps must be > 0, got {eps}.")
    if int(num_iters) < 0:
        raise ValueError(f"Multi-SK: num_iters must be >= 0, got {num_iters}.")


# --- log domain (the fallback; exact for any scores and eps) ------------------------------------

def _damped_log_sum(log_x: jax.Array, axis: int) -> jax.Array:
    """log(sum(exp(log_x), axis) + DAMPING), kept as a broadcastable dimension."""
    lse = jax.nn.logsumexp(log_x, axis=axis, keepdims=True)
    return jnp.logaddexp(lse, jnp.float32(math.log(DAMPING)))


def _log_marginal_error(log_a: jax.Array, log_counts: jax.Array, log_c: jax.Array) -> jax.Array:
    """Largest violation of the three marginals of the (implicit) K x N x K tensor."""
    col = jnp.exp(jax.nn.logsumexp(log_a, axis=1))  # (G, K), target c_k
    slot = jnp.exp(jax.nn.logsumexp(log_a + log_counts, axis=0))  # (N, K), target 1
    row = jnp.exp(jax.nn.logsumexp(log_a, axis=2))  # (G, N), target 1
    c = jnp.exp(log_c)
    return jnp.maximum(jnp.max(jnp.abs(col - c) / c),
                       jnp.maximum(jnp.max(jnp.abs(slot - 1.0)), jnp.max(jnp.abs(row - 1.0))))


def _solve_log(scores, eps, num_iters, num_required, tol, all_groups=True, last_rows=None):
    """Multi-SK in the log domain. Returns the per-group matrices (G, N, K) after the final
    renormalisation over anchors (linear scale; only the last rows if `last_rows`), the
    iteration count and the final marginal error."""
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
        def body(carry):
            log_a, i = carry
            return iteration(log_a), i + 1

        log_a, iters = jax.lax.while_loop(lambda carry: carry[1] < num_iters, body,
                                          (log_a, jnp.int32(0)))
        error = _log_marginal_error(log_a, log_counts, log_c)
    else:
        def cond(carry):
            _, i, err = carry
            return (i < num_iters) & (err > tol)

        def body(carry):
            log_a, i, _ = carry
            log_a = iteration(log_a)
            return log_a, i + 1, _log_marginal_error(log_a, log_counts, log_c)

        log_a, iters, error = jax.lax.while_loop(
            cond, body, (log_a, jnp.int32(0), jnp.float32(jnp.inf)))

    if not all_groups:
        log_a = log_a[-1:]
    if last_rows is not None:
        log_a = log_a[:, n - last_rows:]
    log_a = log_a - jax.nn.logsumexp(log_a, axis=2, keepdims=True)  # final, undamped
    return jnp.exp(log_a), iters, error


# --- linear domain (the fast path) --------------------------------------------------------------

class _LinearState(NamedTuple):
    """The group matrices after step (c), in factored form (all float32).

    Base group (the first slot weight):   A_b[n, k] = x[n, k] * r_b[n]
    Other group (if two slot weights):    A_o[n, k] = x[n, k] * kernel[n, k] * u[k] * r_o[n]

    x holds the base group after step (b); the row scalings r of step (c) are applied lazily.
    The other group differs from the base one by a fixed elementwise kernel (step (b) rescales
    both groups by the same factor, steps (a) and (c) by vectors), so it needs no N x K state of
    its own. col_* (K,) and row_* (N,) are the column and row sums of A_b and A_o.
    """

    x: jax.Array
    u: jax.Array
    r_b: jax.Array
    r_o: jax.Array
    col_b: jax.Array
    col_o: jax.Array
    row_b: jax.Array
    row_o: jax.Array


def _logit_spread(scores, eps, groups) -> jax.Array:
    """max - min of the logits w * S / eps over all slot weights."""
    smax, smin = jnp.max(scores), jnp.min(scores)
    tops = [g.weight * smax / jnp.float32(eps) for g in groups]
    bottoms = [g.weight * smin / jnp.float32(eps) for g in groups]
    return functools.reduce(jnp.maximum, tops) - functools.reduce(jnp.minimum, bottoms)


def _solve_linear(scores, eps, num_iters, num_required, tol, all_groups=True, last_rows=None,
                  native=True):
    """Multi-SK with float32 scaling; same outputs as :func:`_solve_log`.

    Valid when :func:`_logit_spread` <= LINEAR_MAX_LOGIT_SPREAD (the caller checks). In JAX,
    one iteration is one elementwise pass that updates x in place (reading x and the kernel),
    one that forms x * kernel, and four matrix-vector products for the row and column sums. On
    CPU, with the native kernel available (:mod:`msk_jax.kernels`), the iterations run as a
    custom call that makes one pass per iteration instead (the required group only, no `tol`).
    last_rows: return only the last rows of the group matrices. native=False: always the JAX loop.
    """
    n, k = scores.shape
    groups = slot_groups(k, num_required)
    base, other = groups[0], (groups[1] if len(groups) > 1 else None)
    c = jnp.asarray(anchor_marginal(n, k))
    damping = jnp.float32(DAMPING)
    count_b = jnp.float32(base.count)
    count_o = jnp.float32(other.count if other else 0)
    ones_k = jnp.ones((k,), jnp.float32)

    def matvec(m, v):  # (N, K) @ (K,): sums over anchors
        return jnp.dot(m, v, precision=_HIGHEST)

    def vecmat(v, m):  # (N,) @ (N, K): sums over samples
        return jnp.dot(v, m, precision=_HIGHEST)

    # The initial tensor exp(w S / eps) / total mass, with the exponentials shifted by the largest
    # logit: A_b = x / total and A_o = x * exp((w_o - w_b) S / eps) / total. The second factor is
    # split into a kernel <= 1 and a scalar; the scalars, and 1 / total, go into the row
    # scalings, so the damping of the first step (a) acts on the original's values.
    smax, smin = jnp.max(scores), jnp.min(scores)
    inv_eps = jnp.float32(1.0 / eps)
    top = functools.reduce(jnp.maximum, [g.weight * smax * inv_eps for g in groups])
    x = jnp.exp(base.weight * scores * inv_eps - top)
    kernel = gap = gap_top = None
    if other is not None:
        gap = (other.weight - base.weight) * inv_eps
        gap_top = jnp.maximum(gap * smax, gap * smin)
        kernel = jnp.exp(gap * scores - gap_top)

    def initial_state(x) -> _LinearState:
        sum_b = matvec(x, ones_k)
        if other is None:
            r_b = jnp.full((n,), 1.0 / (count_b * jnp.sum(sum_b)), jnp.float32)
            return _LinearState(x, ones_k, r_b, r_b, vecmat(r_b, x), vecmat(r_b, x),
                                sum_b * r_b, sum_b * r_b)
        weighted = x * kernel
        sum_o = matvec(weighted, ones_k)
        total = count_b * jnp.sum(sum_b) + count_o * jnp.exp(gap_top) * jnp.sum(sum_o)
        r_b = jnp.full((n,), 1.0 / total, jnp.float32)
        r_o = jnp.full((n,), jnp.exp(gap_top) / total, jnp.float32)
        return _LinearState(x, ones_k, r_b, r_o, vecmat(r_b, x), vecmat(r_o, weighted),
                            sum_b * r_b, sum_o * r_o)

    def iteration(s: _LinearState) -> _LinearState:
        alpha_b = c / (s.col_b + damping)                        # (a) per group and anchor
        a_b = s.x * (s.r_b[:, None] * alpha_b)                   # base group after (a)
        if other is None:
            x = a_b / (count_b * a_b + damping)                  # (b)
        else:
            # The other group after (a) is a_b * kernel * u * ratio_n, with u and ratio_n the
            # ratios of the two groups' column and row scalings.
            u = s.u * ((s.col_b + damping) / (s.col_o + damping))
            ratio_n = s.r_o / s.r_b
            slots = count_b + count_o * (kernel * u) * ratio_n[:, None]
            x = a_b / (a_b * slots + damping)                    # (b): one factor for both groups
        # (c), applied lazily: row scalings r, and the row and column sums it leaves.
        sum_b = matvec(x, ones_k)
        r_b = 1.0 / (sum_b + damping)
        row_b, col_b = sum_b * r_b, vecmat(r_b, x)
        if other is None:
            return _LinearState(x, s.u, r_b, r_b, col_b, col_b, row_b, row_b)
        weighted = x * kernel
        sum_o = matvec(weighted, u) * ratio_n
        r_o = ratio_n / (sum_o + damping)
        row_o, col_o = sum_o / (sum_o + damping), vecmat(r_o, weighted) * u
        return _LinearState(x, u, r_b, r_o, col_b, col_o, row_b, row_o)

    def group_matrices(s: _LinearState) -> list[jax.Array]:
        """The group matrices after step (c)."""
        matrices = [s.x * s.r_b[:, None]]
        if other is not None:
            matrices.append(s.x * kernel * (s.u * s.r_o[:, None]))
        return matrices

    def marginal_error(s: _LinearState) -> jax.Array:
        col = jnp.maximum(jnp.max(jnp.abs(s.col_b - c) / c), jnp.max(jnp.abs(s.col_o - c) / c))
        row = jnp.maximum(jnp.max(jnp.abs(s.row_b - 1.0)), jnp.max(jnp.abs(s.row_o - 1.0)))
        counts = [count_b, count_o]
        slot = sum(count * m for count, m in zip(counts, group_matrices(s)))
        return jnp.maximum(jnp.maximum(col, row), jnp.max(jnp.abs(slot - 1.0)))

    def jax_loop(state):
        return _linear_loop(state, iteration, marginal_error, num_iters, tol)

    def finish(state):
        # Final renormalisation over anchors (undamped), by the row sums the state carries.
        finals = [m / row[:, None] for m, row in zip(group_matrices(state), [state.row_b, state.row_o])]
        finals = jnp.stack(finals if all_groups else finals[-1:])
        return finals if last_rows is None else finals[:, n - last_rows:]

    if (native and tol is None and not all_groups and n >= NATIVE_MIN_ROWS
            and kernels.multisk_available()):
        def on_cpu(scores):  # the native kernel takes the exponentials itself
            shifts = jnp.stack([top, gap_top, jnp.exp(gap_top)] if other else
                               [top, jnp.float32(0), jnp.float32(1)]).astype(jnp.float32)
            inv_eps32 = np.float32(1.0 / eps)
            final, error = _native_solve(
                scores, c, shifts, weight_b=base.weight, inv_eps=inv_eps32,
                gap=np.float32(other.weight - base.weight) * inv_eps32 if other else 0.0,
                count_b=base.count, count_o=other.count if other else 0, num_iters=num_iters,
                last_rows=n if last_rows is None else last_rows)
            return final[None], jnp.int32(num_iters), error

        def elsewhere(_):
            state, iters, error = jax_loop(initial_state(x))
            return finish(state), iters, error

        return jax.lax.platform_dependent(scores, cpu=on_cpu, default=elsewhere)
    state, iters, error = jax_loop(initial_state(x))
    return finish(state), iters, error


def _linear_loop(state, iteration, marginal_error, num_iters, tol):
    """The linear-domain iterations in a while loop: (state, iterations, marginal error)."""
    if tol is None:
        state, iters = jax.lax.while_loop(lambda carry: carry[1] < num_iters,
                                          lambda carry: (iteration(carry[0]), carry[1] + 1),
                                          (state, jnp.int32(0)))
        error = marginal_error(state)
    else:
        def body(carry):
            s, i, _ = carry
            s = iteration(s)
            return s, i + 1, marginal_error(s)

        state, iters, error = jax.lax.while_loop(
            lambda carry: (carry[1] < num_iters) & (carry[2] > tol), body,
            (state, jnp.int32(0), jnp.float32(jnp.inf)))
    return state, iters, error


_ROW_BLOCK = 16
"""Rows per block of the native kernel's working layout, (ceil(N / 16), K, 16)."""


def _native_solve(scores, c, shifts, *, weight_b, inv_eps, gap, count_b, count_o, num_iters,
                  last_rows):
    """:func:`_solve_linear` (required group, no tol) as the native CPU custom call
    (:mod:`msk_jax.kernels`): (required group's last_rows rows (last_rows, K), marginal error).

    shifts: (3,) top, gap_top, exp(gap_top). The call takes the exponentials itself and keeps
    its two working matrices in a blocked layout; they are outputs of the call (so XLA
    allocates them and counts them in the memory analysis) and are then dropped. Under vmap
    the call receives the whole batch and solves its problems on parallel threads.
    """
    n, k = scores.shape
    blocks = (n + _ROW_BLOCK - 1) // _ROW_BLOCK
    work = jax.ShapeDtypeStruct((blocks, k, _ROW_BLOCK), jnp.float32)
    call = jax.ffi.ffi_call(
        kernels.MULTISK_TARGET,
        (work, work, jax.ShapeDtypeStruct((last_rows, k), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)),
        vmap_method="broadcast_all")
    _, _, final, error = call(scores, c, shifts, weight_b=np.float32(weight_b), inv_eps=np.float32(inv_eps),
                              gap=np.float32(gap), count_b=np.float32(count_b), count_o=np.float32(count_o),
                              num_iters=np.int64(num_iters), last_rows=np.int64(last_rows),
                              threads=np.int64(kernels.threads()))
    return final, error


# --- dispatch -----------------------------------------------------------------------------------

def _solve(scores, eps, num_iters, num_required, tol, method="auto", all_groups=True, last_rows=None,
           native=True):
    """The group matrices after the final renormalisation -- (G, N, K), or (1, N, K) for the
    required slots only if not all_groups; the last `last_rows` rows only if set -- the
    iteration count and the marginal error.
    method: "auto" (linear domain where safe, else log), "linear" or "log". native=False: the
    linear domain in JAX even where the native CPU kernel is available."""
    scores = jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
    args = (eps, num_iters, num_required, tol, all_groups, last_rows)
    if method == "linear":
        return _solve_linear(scores, *args, native=native)
    if method == "log":
        return _solve_log(scores, *args)
    groups = slot_groups(scores.shape[1], num_required)
    safe = _logit_spread(scores, eps, groups) <= LINEAR_MAX_LOGIT_SPREAD
    return jax.lax.cond(safe, lambda s: _solve_linear(s, *args, native=native), lambda s: _solve_log(s, *args),
                        scores)


def _per_problem(fn):
    """fn on one (N, K) problem; under jax.vmap, a sequential lax.map over the problems.

    The solver branches per problem (linear or log domain) and may stop early; a plain vmap
    would turn the branch into a select that runs both solvers, and run every problem until the
    slowest stops. Mapping keeps the branches real and the working memory at one problem's.
    """
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _map_rule(axis_size, in_batched, scores):
        del axis_size, in_batched  # only the scores are an argument, so they are batched
        out = jax.lax.map(fn, scores)
        return out, jax.tree.map(lambda _: True, out)

    # No gradient flows into the targets; stopping it here keeps autodiff away from the
    # custom batching rule (which does not support reverse mode).
    return lambda scores: wrapped(jax.lax.stop_gradient(scores))


def minmax_normalize_rows(x: jax.Array) -> jax.Array:
    """(x - row min) / (row max - row min); a constant row maps to 0."""
    lo = jnp.min(x, axis=1, keepdims=True)
    hi = jnp.max(x, axis=1, keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), 0.0)


_STATIC = ("eps", "num_iters", "num_required", "tol", "method")


def _target_one(scores, eps, num_iters, num_required, tol, method, last_rows=None) -> MultiSKResult:
    final, iters, error = _solve(scores, eps, num_iters, num_required, tol, method,
                                 all_groups=False, last_rows=last_rows)
    required = final[-1]
    # Each required slot's row sums to 1 after the final renormalisation; their sum is R * A.
    return MultiSKResult(minmax_normalize_rows(num_required * required), iters, error)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _target(scores, eps, num_iters, num_required, tol, method="auto") -> MultiSKResult:
    solve = functools.partial(_target_one, eps=eps, num_iters=num_iters, num_required=num_required,
                              tol=tol, method=method)
    return _per_problem(solve)(scores), _has_nan(scores)


_PAIR = 2
"""multi_sinkhorn_batched solves the problems in pairs: one pair's kernels are twice as large,
which XLA on CPU spreads over two cores (a single problem's mostly run on one)."""


def _target_group(scores, eps, num_iters, num_required, tol, method, last_rows) -> MultiSKResult:
    """:func:`_target_one` for a (G, N, K) group of problems, vmapped; one domain for the group
    (the linear one if it is safe for all of them), so that the branch stays a real branch."""
    settings = dict(eps=eps, num_iters=num_iters, num_required=num_required, tol=tol,
                    last_rows=last_rows)
    if method != "auto":
        return jax.vmap(functools.partial(_target_one, method=method, **settings))(scores)
    groups = slot_groups(scores.shape[-1], num_required)
    safe = jnp.all(jax.vmap(lambda s: _logit_spread(s, eps, groups))(scores)
                   <= LINEAR_MAX_LOGIT_SPREAD)
    # The (rare) log-domain fallback solves the group one problem at a time, to keep its
    # working memory at one problem's.
    return jax.lax.cond(
        safe, jax.vmap(functools.partial(_target_one, method="linear", **settings)),
        functools.partial(jax.lax.map, functools.partial(_target_one, method="log", **settings)),
        scores)


@functools.partial(jax.jit, static_argnames=_STATIC + ("last_rows",))
def _target_batched(scores, eps, num_iters, num_required, tol, method="auto",
                    last_rows=None) -> MultiSKResult:
    scores = jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
    solve = functools.partial(_target_group, eps=eps, num_iters=num_iters,
                              num_required=num_required, tol=tol, method=method,
                              last_rows=last_rows)
    return map_in_pairs(solve, scores), _has_nan(scores)


def map_in_pairs(solve_group, stack):
    """solve_group over a (P, ...) stack, two problems at a time (``lax.map`` over pairs; an
    odd last problem alone). solve_group takes a (G, ...) group and returns a pytree of (G, ...)
    arrays; the result stacks them back to (P, ...)."""
    problems = stack.shape[0]
    paired = problems - problems % _PAIR
    results = []
    if paired:
        pairs = jax.lax.map(solve_group, stack[:paired].reshape(paired // _PAIR, _PAIR, *stack.shape[1:]))
        results.append(jax.tree.map(lambda a: a.reshape(paired, *a.shape[2:]), pairs))
    if paired < problems:
        results.append(solve_group(stack[paired:]))
    if len(results) == 1:
        return results[0]
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *results)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _assignment(scores, eps, num_iters, num_required, tol, method="auto") -> jax.Array:
    groups = slot_groups(scores.shape[1], num_required)
    slot_to_group = np.repeat(np.arange(len(groups)), [g.count for g in groups])

    def solve(scores):
        final, _, _ = _solve(scores, eps, num_iters, num_required, tol, method, all_groups=True)
        return final[slot_to_group]

    return _per_problem(solve)(scores), _has_nan(scores)


def _has_nan(scores) -> jax.Array:
    return jnp.isnan(scores).any()


def _checked(outputs):
    """The solver's output, after raising if the scores had NaN. Under an outer jit the flag is
    abstract and NaN cannot be detected; it then propagates (and the flag is dropped)."""
    result, has_nan = outputs
    if not isinstance(has_nan, jax.core.Tracer) and bool(has_nan):
        raise ValueError("Multi-SK: scores contain NaN.")
    return result


def _settings(scores, eps, num_iters, required_fraction, tol, batched=False) -> dict:
    _validate(scores, eps, num_iters, batched)
    return dict(eps=float(eps), num_iters=int(num_iters),
                num_required=num_required_slots(jnp.shape(scores)[-1], required_fraction),
                tol=None if tol is None or tol <= 0 else float(tol))


def multi_sinkhorn(scores: jax.Array, *, eps: float, num_iters: int, required_fraction: float,
                   tol: float | None = None) -> MultiSKResult:
    """Multi-SK training target for one (N, K) similarity matrix (the original's `calculate_sk`).

    Args:
      scores: (N, K) similarities of N samples to K anchors (cast to float32; no gradient).
      eps: temperature of the initial assignment exp(w * S / eps); > 0 (the paper: 0.07).
      num_iters: number of Sinkhorn iterations (the original runs exactly this many; the paper 20).
      required_fraction: R = int(K * required_fraction) required slots, 1 <= R <= K (the paper 0.5).
      The paper's values live in configs/howto.py (`objective.sinkhorn`).
      tol: if set (> 0), stop early once the marginal error falls to <= tol.

    The settings are static Python numbers (a new value compiles anew). Jit-able and
    vmap-able over a leading stack of problems: a vmap solves the problems one after the other,
    with the results of single calls bit for bit; :func:`multi_sinkhorn_batched` is faster.
    """
    return _checked(_target(scores, **_settings(scores, eps, num_iters, required_fraction, tol)))


def multi_sinkhorn_batched(scores: jax.Array, *, eps: float, num_iters: int, required_fraction: float,
                           tol: float | None = None, last_rows: int | None = None) -> MultiSKResult:
    """:func:`multi_sinkhorn` for a (P, N, K) stack of problems; every field gets a leading P.

    The same numbers as ``jax.vmap(multi_sinkhorn)`` up to float32 rounding, faster on CPU: the
    problems are solved in pairs, one pair after the other (``lax.map``), holding the working
    memory of one pair at a time. A pair runs in the log domain if either problem needs it, and
    until both stop when ``tol`` is set (each result still records its own iteration count).

    last_rows: if set, ``target`` holds only the targets of the last ``last_rows`` samples of
      each problem, (P, last_rows, K) -- the batch rows, in the training step, where the queue
      rows' targets are not used. The solve is unchanged (the min-max normalisation is per row);
      only the output is smaller.
    """
    settings = _settings(scores, eps, num_iters, required_fraction, tol, batched=True)
    if last_rows is not None and not 1 <= int(last_rows) <= jnp.shape(scores)[1]:
        raise ValueError(f"Multi-SK: last_rows must be in [1, N={jnp.shape(scores)[1]}], got {last_rows}.")
    return _checked(_target_batched(scores, **settings, last_rows=None if last_rows is None else int(last_rows)))


def multi_sinkhorn_assignment(scores: jax.Array, *, eps: float, num_iters: int, required_fraction: float,
                              tol: float | None = None) -> jax.Array:
    """The full (K slots, N samples, K anchors) assignment tensor of Multi-SK (the original's
    `multi_sinkhorn`), a broadcast of the per-weight matrices. O(K^2 N) memory: small problems."""
    return _checked(_assignment(scores, **_settings(scores, eps, num_iters, required_fraction, tol)))
