"""Properties of the Multi-SK solver that hold independently of the golden files."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msk_jax import sinkhorn
from msk_jax.multisk_reference import dense_multi_sinkhorn, random_cosine_scores
from tests.paper_config import PAPER_SK


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("n,k,fraction,eps,iters", [(37, 8, 0.5, 0.07, 20), (20, 12, 0.25, 0.05, 7),
                                                    (5, 16, 0.75, 0.1, 3)])
def test_matches_dense_float64_solver(rng, n, k, fraction, eps, iters):
    scores = random_cosine_scores(rng, n, k)
    dense, dense_target = dense_multi_sinkhorn(scores, eps, iters, fraction)
    settings = dict(eps=eps, num_iters=iters, required_fraction=fraction)
    tensor = sinkhorn.multi_sinkhorn_assignment(scores, **settings)
    result = sinkhorn.multi_sinkhorn(scores, **settings)
    assert tensor.shape == (k, n, k)
    np.testing.assert_allclose(tensor, dense, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(result.target, dense_target, atol=2e-5)
    assert int(result.iterations) == iters


def test_marginals_after_many_iterations(rng):
    scores = random_cosine_scores(rng, 48, 8)
    settings = dict(eps=0.5, num_iters=2000, required_fraction=0.5)
    result = sinkhorn.multi_sinkhorn(scores, **settings)
    tensor = np.asarray(sinkhorn.multi_sinkhorn_assignment(scores, **settings), np.float64)
    assert float(result.marginal_error) < 1e-3
    np.testing.assert_allclose(tensor.sum(axis=1), 48 / 8, rtol=1e-3)  # per slot and anchor
    np.testing.assert_allclose(tensor.sum(axis=0), 1.0, atol=1e-3)  # per sample and anchor
    np.testing.assert_allclose(tensor.sum(axis=2), 1.0, atol=1e-5)  # per slot and sample


def test_few_iterations_leave_a_marginal_error(rng):
    scores = random_cosine_scores(rng, 48, 8)
    few = sinkhorn.multi_sinkhorn(scores, eps=0.07, num_iters=1, required_fraction=0.5)
    many = sinkhorn.multi_sinkhorn(scores, eps=0.07, num_iters=50, required_fraction=0.5)
    assert float(few.marginal_error) > float(many.marginal_error)


def test_required_slots_sum_to_r_before_minmax(rng):
    scores = random_cosine_scores(rng, 30, 16)
    tensor = sinkhorn.multi_sinkhorn_assignment(scores, eps=0.07, num_iters=20, required_fraction=0.25)
    r = int(16 * 0.25)
    np.testing.assert_allclose(np.asarray(tensor[-r:]).sum(axis=(0, 2)), r, rtol=1e-5)
    # Slots of equal weight are identical.
    np.testing.assert_array_equal(tensor[0], tensor[16 - r - 1])
    np.testing.assert_array_equal(tensor[16 - r], tensor[-1])


def test_target_is_minmax_normalised(rng):
    target = np.asarray(sinkhorn.multi_sinkhorn(random_cosine_scores(rng, 25, 8), **PAPER_SK).target)
    np.testing.assert_allclose(target.min(axis=1), 0.0, atol=1e-7)
    np.testing.assert_allclose(target.max(axis=1), 1.0, atol=1e-6)


def test_permutation_equivariance(rng):
    scores = random_cosine_scores(rng, 40, 8)
    target = np.asarray(sinkhorn.multi_sinkhorn(scores, **PAPER_SK).target)
    rows, cols = rng.permutation(40), rng.permutation(8)
    np.testing.assert_allclose(sinkhorn.multi_sinkhorn(scores[rows], **PAPER_SK).target, target[rows], atol=1e-5)
    np.testing.assert_allclose(sinkhorn.multi_sinkhorn(scores[:, cols], **PAPER_SK).target, target[:, cols], atol=1e-5)


@pytest.mark.parametrize("scale,eps", [(1e3, 1e-3), (1e6, 0.07), (-1e4, 1e-3), (1.0, 1e-6)])
def test_finite_on_extreme_inputs(rng, scale, eps):
    scores = rng.uniform(0, 1, size=(30, 8)).astype(np.float32) * np.float32(scale)
    result = sinkhorn.multi_sinkhorn(scores, eps=eps, num_iters=20, required_fraction=0.5)
    target = np.asarray(result.target)
    assert np.all(np.isfinite(target))
    assert target.min() >= 0 and target.max() <= 1
    assert np.isfinite(float(result.marginal_error))


def test_constant_rows_give_zero_target():
    result = sinkhorn.multi_sinkhorn(np.zeros((6, 4), np.float32), **PAPER_SK)
    np.testing.assert_array_equal(result.target, 0.0)


def test_vmap_equals_loop(rng):
    stack = np.stack([random_cosine_scores(rng, 24, 8) for _ in range(3)])
    solve = functools.partial(sinkhorn.multi_sinkhorn, eps=0.07, num_iters=20, required_fraction=0.5)
    batched = jax.vmap(solve)(jnp.asarray(stack))
    for i in range(3):
        single = solve(stack[i])
        np.testing.assert_allclose(batched.target[i], single.target, atol=1e-6)
        np.testing.assert_allclose(batched.marginal_error[i], single.marginal_error, rtol=1e-4)


@pytest.mark.parametrize("problems_at_once", [1, 2, None])
def test_stack_equals_single_problems(rng, problems_at_once):
    stack = np.stack([random_cosine_scores(rng, 24, 8) for _ in range(5)])
    batched = sinkhorn.multi_sinkhorn(stack, **{**PAPER_SK, "problems_at_once": problems_at_once}, last_rows=6)
    assert batched.target.shape == (5, 6, 8) and batched.iterations.shape == (5,)
    for i in range(5):
        single = sinkhorn.multi_sinkhorn(stack[i], **PAPER_SK)
        np.testing.assert_allclose(batched.target[i], single.target[-6:], atol=1e-6)
        np.testing.assert_allclose(batched.marginal_error[i], single.marginal_error, rtol=1e-4)


def test_domains_agree_and_a_wide_spread_falls_back_to_the_log_domain(rng):
    scores = random_cosine_scores(rng, 30, 8)
    linear = sinkhorn.multi_sinkhorn(scores, **PAPER_SK, domain="linear").target
    log = sinkhorn.multi_sinkhorn(scores, **PAPER_SK, domain="log").target
    np.testing.assert_allclose(linear, log, atol=1e-5)
    # At eps = 1e-3 the logits span ~10^3: the linear domain would underflow, "auto" does not.
    settings = dict(eps=1e-3, num_iters=20, required_fraction=0.5)
    auto = sinkhorn.multi_sinkhorn(scores, **settings).target
    np.testing.assert_allclose(auto, sinkhorn.multi_sinkhorn(scores, **settings, domain="log").target, atol=1e-6)
    forced_linear = np.asarray(sinkhorn.multi_sinkhorn(scores, **settings, domain="linear").target)
    assert not np.allclose(forced_linear, auto, atol=1e-3)  # NaN or wrong: why "auto" switches


def test_jit_equals_eager(rng):
    scores = random_cosine_scores(rng, 24, 8)
    solve = functools.partial(sinkhorn.multi_sinkhorn, eps=0.07, num_iters=20, required_fraction=0.5)
    np.testing.assert_allclose(jax.jit(solve)(scores).target, solve(scores).target, atol=1e-6)


def test_tolerance_stops_early_and_vmaps(rng):
    stack = np.stack([random_cosine_scores(rng, 24, 8) for _ in range(2)])
    solve = functools.partial(sinkhorn.multi_sinkhorn, eps=0.5, num_iters=500, required_fraction=0.5, tol=1e-3)
    result = solve(stack[0])
    assert 0 < int(result.iterations) < 500
    assert float(result.marginal_error) <= 1e-3
    batched = jax.vmap(solve)(jnp.asarray(stack))
    assert int(batched.iterations[0]) == int(result.iterations)
    np.testing.assert_allclose(batched.target[0], result.target, atol=1e-6)


def test_no_gradient_flows(rng):
    scores = jnp.asarray(random_cosine_scores(rng, 10, 4))
    grad = jax.grad(lambda s: jnp.sum(sinkhorn.multi_sinkhorn(s, **PAPER_SK).target * s))(scores)
    # Only the explicit factor s contributes: d/ds sum(stop_gradient(t) * s) = t.
    np.testing.assert_allclose(grad, sinkhorn.multi_sinkhorn(scores, **PAPER_SK).target, atol=1e-6)


@pytest.mark.parametrize("shape,kwargs,message", [
    ((10, 8), dict(required_fraction=0.1), "R must be in"),
    ((10, 8), dict(required_fraction=1.5), "R must be in"),
    ((0, 8), {}, "at least one problem, sample and anchor"),
    ((0, 10, 8), {}, "at least one problem, sample and anchor"),
    ((10, 8), dict(eps=0.0), "eps must be > 0"),
    ((10, 8), dict(eps=-1.0), "eps must be > 0"),
    ((2, 10, 8, 1), {}, "must be"),
    ((3, 10, 8), dict(problems_at_once=0), "problems_at_once must be >= 1"),
    ((10, 8), dict(last_rows=11), "last_rows must be in"),
    ((10, 8), dict(domain="exact"), "domain must be one of"),
    ((10, 8), dict(backend="gpu"), "backend must be one of"),
])
def test_invalid_settings_raise(shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sinkhorn.multi_sinkhorn(np.zeros(shape, np.float32), **{**PAPER_SK, **kwargs})


def test_nan_scores_raise():
    scores = np.zeros((5, 4), np.float32)
    scores[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn.multi_sinkhorn(scores, **PAPER_SK)
