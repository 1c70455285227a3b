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

The domain is chosen at run time (``lax.cond``) per group of problems solved together; the
native CPU kernel is chosen in one place, :func:`_native_backend`.

:func:`multi_sinkhorn` is the one entry, for one (N, K) problem or a (P, N, K) stack; how many
problems of a stack are solved together is its `problems_at_once` argument (the training step
reads it from the config). Under ``jax.vmap`` a custom batching rule turns the vmapped axis into
a stack. :func:`multi_sinkhorn_assignment` gives the full K x N x K tensor of small problems (the
original's output, for parity checks and the notebook). The dense solver written from the
definition, which the tests compare against, is :mod:`msk_jax.multisk_reference`.

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
                  native=False):
    """Multi-SK with float32 scaling; same outputs as :func:`_solve_log`.

    Valid when :func:`_logit_spread` <= LINEAR_MAX_LOGIT_SPREAD (the caller checks). In JAX,
    one iteration is one elementwise pass that updates x in place (reading x and the kernel),
    one that forms x * kernel, and four matrix-vector products for the row and column sums.
    native=True (chosen by :func:`_native_backend`): on CPU the iterations run as the native
    custom call (:mod:`msk_jax.kernels`), one pass per iteration (the required group only, no
    `tol`); on other platforms the JAX loop. last_rows: only the last rows of the group matrices.
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

    if native:
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
"""The native kernel's working matrices are allocated as (ceil(N / 16), K, 16): room for its
blocks of 16 rows (with AVX-512) or of 8 (without)."""


def _native_solve(scores, c, shifts, *, weight_b, inv_eps, gap, count_b, count_o, num_iters,
                  last_rows):
    """:func:`_solve_linear` (required group, no tol) as the native CPU custom call
    (:mod:`msk_jax.kernels`): (required group's last_rows rows (last_rows, K), marginal error).

    shifts: (3,) top, gap_top, exp(gap_top). The call takes the exponentials itself and keeps
    its two working matrices in a blocked layout; they are outputs of the call (so XLA
    allocates them and counts them in the memory analysis) and are then dropped. Under vmap
    the call receives the whole group of problems and spreads it over XLA's CPU thread pool.
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
                              num_iters=np.int64(num_iters), last_rows=np.int64(last_rows))
    return final, error


# --- dispatch: the one fast path, for one problem and for a stack ------------------------------

DOMAINS = ("auto", "linear", "log")
"""auto: the linear domain where it is safe (:data:`LINEAR_MAX_LOGIT_SPREAD`), else the log domain."""

BACKENDS = ("auto", "jax", "native")
"""How the linear domain iterates: auto (the native CPU kernel where :func:`_native_backend`
allows it, else JAX), jax (the JAX loop: the path on GPU/TPU), native (the CPU kernel, an error
where it cannot run)."""


class _Settings(NamedTuple):
    """The static settings of one solve (hashable: a jit static argument)."""

    eps: float
    num_iters: int
    num_required: int
    tol: float | None
    domain: str
    backend: str
    last_rows: int | None
    all_groups: bool  # every slot group's matrices (the assignment tensor), not only the required


def _native_backend(num_rows: int, s: _Settings) -> bool:
    """Whether the linear domain runs in the native CPU kernel: the one place this is decided.

    The kernel computes the required group without early stopping; with backend "auto" it takes
    problems of at least NATIVE_MIN_ROWS rows when it is built (on CPU hosts; the call itself
    still falls back to the JAX loop on other platforms)."""
    eligible = s.tol is None and not s.all_groups
    if s.backend == "jax":
        return False
    if s.backend == "native":
        if not eligible:
            raise ValueError("Multi-SK: backend='native' solves for the target without `tol`; "
                             "use backend='auto' or 'jax' with tol or for the assignment tensor.")
        if not kernels.multisk_available():
            raise ValueError("Multi-SK: backend='native' needs the native CPU kernel, which is not "
                             "available here (MSK_JAX_NATIVE=0, no C++ compiler, a failed build "
                             "(logged), or not a CPU backend).")
        return True
    return eligible and num_rows >= NATIVE_MIN_ROWS and kernels.multisk_available()


def _solve(scores, s: _Settings, domain: str):
    """One (N, K) problem in the given domain ("linear" or "log"): its output -- the (N, K)
    target (the last `last_rows` rows only if set), or the (K, N, K) assignment tensor if
    s.all_groups -- the iteration count and the marginal error."""
    args = (s.eps, s.num_iters, s.num_required, s.tol, s.all_groups, s.last_rows)
    if domain == "log":
        finals, iters, error = _solve_log(scores, *args)
    else:
        finals, iters, error = _solve_linear(scores, *args, native=_native_backend(scores.shape[0], s))
    if s.all_groups:  # the group matrices broadcast to their slots
        groups = slot_groups(scores.shape[-1], s.num_required)
        return finals[np.repeat(np.arange(len(groups)), [g.count for g in groups])], iters, error
    # Each required slot's row sums to 1 after the final renormalisation; their sum is R * A.
    return minmax_normalize_rows(s.num_required * finals[-1]), iters, error


def _solve_group(group, s: _Settings):
    """A (G, N, K) group of problems solved together (vmapped), in one domain for the group: the
    linear one if it is safe for all of them. Under vmap the branch stays a real branch; the
    (rare) log-domain fallback of "auto" solves the group one problem at a time, to keep its
    working memory at one problem's."""
    if s.domain != "auto":
        return jax.vmap(lambda p: _solve(p, s, s.domain))(group)
    groups = slot_groups(group.shape[-1], s.num_required)
    safe = jnp.all(jax.vmap(lambda p: _logit_spread(p, s.eps, groups))(group) <= LINEAR_MAX_LOGIT_SPREAD)
    return jax.lax.cond(safe, jax.vmap(lambda p: _solve(p, s, "linear")),
                        functools.partial(jax.lax.map, lambda p: _solve(p, s, "log")), group)


def _solve_stack(stack, s: _Settings, problems_at_once: int | None):
    """:func:`_solve` for a (P, N, K) stack, `problems_at_once` problems at a time (``lax.map``
    over the groups, a smaller last group for the rest; None: all at once), holding one group's
    working memory."""
    problems = stack.shape[0]
    size = problems if problems_at_once is None else min(problems_at_once, problems)
    whole = problems - problems % size
    results = []
    if whole:
        grouped = stack[:whole].reshape(whole // size, size, *stack.shape[1:])
        out = jax.lax.map(lambda g: _solve_group(g, s), grouped)
        results.append(jax.tree.map(lambda a: a.reshape(whole, *a.shape[2:]), out))
    if whole < problems:
        results.append(_solve_group(stack[whole:], s))
    if len(results) == 1:
        return results[0]
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *results)


def minmax_normalize_rows(x: jax.Array) -> jax.Array:
    """(x - row min) / (row max - row min) along the last axis; a constant row maps to 0."""
    lo = jnp.min(x, axis=-1, keepdims=True)
    hi = jnp.max(x, axis=-1, keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("s", "problems_at_once"))
def _run(stack, s: _Settings, problems_at_once: int | None):
    """The jitted solve of a (P, N, K) stack: (MultiSKResult with a leading P, or the (P, K, N, K)
    assignment tensors if s.all_groups; whether the scores held NaN)."""
    out, iters, error = _solve_stack(jnp.asarray(stack, jnp.float32), s, problems_at_once)
    return (out if s.all_groups else MultiSKResult(out, iters, error)), jnp.isnan(stack).any()


def _solve_batched(stack, s: _Settings, problems_at_once: int | None):
    """:func:`_run` that also batches: under ``jax.vmap`` the vmapped axes join the stack (so a
    vmap solves its problems `problems_at_once` at a time, each in its own domain group and
    with its own early stop, not as a select over both domains)."""
    def run(stack):
        return _run(stack, s, problems_at_once)

    wrapped = jax.custom_batching.custom_vmap(run)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, stack):
        del in_batched  # the stack is the only argument, so it is batched
        out, has_nan = run(stack.reshape(-1, *stack.shape[2:]))
        out = jax.tree.map(lambda a: a.reshape(axis_size, -1, *a.shape[1:]), out)
        return (out, jnp.broadcast_to(has_nan, (axis_size,))), (jax.tree.map(lambda _: True, out), True)

    # No gradient flows into the targets; stopping it here keeps autodiff away from the custom
    # batching rule (which does not support reverse mode).
    return wrapped(jax.lax.stop_gradient(stack))


def _checked(has_nan) -> None:
    """Raises if the scores had NaN. Under an outer jit the flag is abstract and NaN cannot be
    detected; it then propagates into the targets."""
    if not isinstance(has_nan, jax.core.Tracer) and bool(jnp.any(has_nan)):
        raise ValueError("Multi-SK: scores contain NaN.")


def _settings(scores, eps, num_iters, required_fraction, tol, domain, backend, last_rows,
              problems_at_once, all_groups=False) -> _Settings:
    """Validated static settings of a call (the errors name the argument and what it must be)."""
    shape = jnp.shape(scores)
    if len(shape) not in (2, 3):
        raise ValueError(f"Multi-SK: scores must be (N samples, K anchors) or a stack (P, N, K), "
                         f"got shape {shape}.")
    n, k = shape[-2:]
    if n < 1 or k < 1 or (len(shape) == 3 and shape[0] < 1):
        raise ValueError(f"Multi-SK: need at least one problem, sample and anchor, got shape {shape}.")
    if not float(eps) > 0:
        raise ValueError(f"Multi-SK: eps must be > 0, got {eps}.")
    if int(num_iters) < 0:
        raise ValueError(f"Multi-SK: num_iters must be >= 0, got {num_iters}.")
    if domain not in DOMAINS:
        raise ValueError(f"Multi-SK: domain must be one of {DOMAINS}, got {domain!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"Multi-SK: backend must be one of {BACKENDS}, got {backend!r}.")
    if last_rows is not None and not 1 <= int(last_rows) <= n:
        raise ValueError(f"Multi-SK: last_rows must be in [1, N={n}], got {last_rows}.")
    if problems_at_once is not None and int(problems_at_once) < 1:
        raise ValueError(f"Multi-SK: problems_at_once must be >= 1 (or None: all), got {problems_at_once}.")
    settings = _Settings(
        eps=float(eps), num_iters=int(num_iters), num_required=num_required_slots(k, required_fraction),
        tol=None if tol is None or tol <= 0 else float(tol), domain=domain, backend=backend,
        last_rows=None if last_rows is None else int(last_rows), all_groups=all_groups)
    if domain != "log":
        _native_backend(n, settings)  # backend="native" where it cannot run: the error now
    return settings


def multi_sinkhorn(scores: jax.Array, *, eps: float, num_iters: int, required_fraction: float,
                   tol: float | None = None, last_rows: int | None = None,
                   problems_at_once: int | None = None, domain: str = "auto",
                   backend: str = "auto") -> MultiSKResult:
    """Multi-SK training targets (the original's `calculate_sk`) of one problem or a stack.

    Args:
      scores: (N, K) similarities of N samples to K anchors, or a (P, N, K) stack of P such
        problems (cast to float32; no gradient). A stack gives every field a leading P.
      eps: temperature of the initial assignment exp(w * S / eps); > 0.
      num_iters: number of Sinkhorn iterations (the original runs exactly this many).
      required_fraction: R = int(K * required_fraction) required slots, 1 <= R <= K.
      The paper's values live in configs/howto.py (`objective.sinkhorn`).
      tol: if set (> 0), stop early once the marginal error falls to <= tol.
      last_rows: if set, `target` holds only the last `last_rows` samples' targets (the batch
        rows of the training step, where the queue rows' targets are not used). The solve is
        unchanged (the min-max normalisation is per row); only the output is smaller.
      problems_at_once: how many problems of a stack are solved together (vmapped; the rest one
        group after the other, holding one group's working memory); None: all at once. The
        training step takes it from `objective.sinkhorn.problems_at_once` (measured in
        BENCHMARKS.md). A group runs in the log domain if any of its problems needs it, and
        until all stop when `tol` is set (each result still records its own iteration count).
      domain: "auto", "linear" or "log" (:data:`DOMAINS`); backend: "auto", "jax" or "native"
        (:data:`BACKENDS`). The defaults choose per problem; the others pin a path (benchmarks,
        tests).

    The settings are static Python numbers (a new value compiles anew). Jit-able, and vmap-able:
    a vmap joins the stack.
    """
    settings = _settings(scores, eps, num_iters, required_fraction, tol, domain, backend, last_rows,
                         problems_at_once)
    single = jnp.ndim(scores) == 2
    result, has_nan = _solve_batched(scores[None] if single else scores, settings, problems_at_once)
    _checked(has_nan)
    return jax.tree.map(lambda a: a[0], result) if single else result


def multi_sinkhorn_assignment(scores: jax.Array, *, eps: float, num_iters: int, required_fraction: float,
                              tol: float | None = None, domain: str = "auto") -> jax.Array:
    """The full (K slots, N samples, K anchors) assignment tensor of Multi-SK (the original's
    `multi_sinkhorn`) of one (N, K) problem: a broadcast of the solver's per-weight matrices
    (the same solve as :func:`multi_sinkhorn`, in JAX). O(K^2 N) memory: small problems."""
    if jnp.ndim(scores) != 2:
        raise ValueError(f"Multi-SK: scores must be (N samples, K anchors), got shape {jnp.shape(scores)}.")
    settings = _settings(scores, eps, num_iters, required_fraction, tol, domain, "jax", None, None,
                         all_groups=True)
    tensor, has_nan = _solve_batched(scores[None], settings, None)
    _checked(has_nan)
    return tensor[0]
