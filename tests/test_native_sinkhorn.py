"""The native CPU Multi-SK kernel computes what the JAX solvers compute.

The kernel (msk_jax/kernels/multisk_cpu.cc) is built with the system C++ compiler; the CI
script installs one. Every test here compares it with the pure-JAX loop, the log-domain solver
or the golden outputs of the original code.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from msk_jax import kernels, sinkhorn
from msk_jax.multisk_reference import random_cosine_scores
from tests.paper_config import PAPER_SK

pytestmark = pytest.mark.skipif(not kernels.multisk_available(),
                                reason="no C++ compiler: the native Multi-SK kernel is not built")


def _solve(scores, fraction=0.5, backend="native", domain="linear", **options):
    return sinkhorn.multi_sinkhorn(scores, eps=0.07, num_iters=20, required_fraction=fraction,
                                   domain=domain, backend=backend, **options)


@pytest.fixture
def rng():
    return np.random.default_rng(1)


# N: a multiple of 16, one that is not (padding rows), and one cut into several chunks; K: the
# unrolled 64 and the generic path.
@pytest.mark.parametrize("n,k,fraction", [(272, 64, 0.5), (301, 24, 0.25), (1000, 64, 0.5)])
def test_native_kernel_matches_the_jax_loop(rng, n, k, fraction):
    scores = random_cosine_scores(rng, n, k)
    native = _solve(scores, fraction)
    loop = _solve(scores, fraction, backend="jax")
    log = _solve(scores, fraction, domain="log", backend="auto")
    np.testing.assert_allclose(native.target, loop.target, atol=2e-5)
    np.testing.assert_allclose(native.target, log.target, atol=2e-5)
    assert int(native.iterations) == int(loop.iterations) == 20
    np.testing.assert_allclose(native.marginal_error, loop.marginal_error, rtol=1e-2, atol=5e-6)  # rounding level


def test_native_kernel_with_one_slot_group(rng):
    # R = K: every slot has the same weight, and the required matrix converges to 1/K in every
    # entry, so the min-max target is rounding noise in either solver; the marginals are not.
    scores = random_cosine_scores(rng, 261, 8)
    native, loop = _solve(scores, 1.0), _solve(scores, 1.0, backend="jax")
    np.testing.assert_allclose(native.marginal_error, loop.marginal_error, rtol=1e-2, atol=5e-6)
    assert 0 < float(native.marginal_error) < 1e-2
    assert np.isfinite(np.asarray(native.target)).all()


def test_native_last_rows_and_targets(rng):
    scores = random_cosine_scores(rng, 300, 64)
    full = _solve(scores).target
    np.testing.assert_array_equal(_solve(scores, last_rows=37).target, full[-37:])


def test_native_stack_equals_single_problems_to_the_bit(rng):
    # Chunks are summed in row order whoever computes them: grouping changes nothing.
    stack = np.stack([random_cosine_scores(rng, 600, 64) for _ in range(5)])
    singles = [_solve(stack[p]) for p in range(5)]
    for at_once in (2, None):  # pairs and a single, and all five in one call
        batched = _solve(stack, last_rows=20, problems_at_once=at_once)
        for p in range(5):
            np.testing.assert_array_equal(batched.target[p], singles[p].target[-20:])
            np.testing.assert_array_equal(batched.marginal_error[p], singles[p].marginal_error)


def test_native_kernel_reproduces_the_golden_multisk_cases(golden_dir):
    data = np.load(os.path.join(golden_dir, "multisk.npz"))
    for i in range(int(data["n_cases"])):
        eps, iters, fraction, _ = data[f"case{i}_params"]
        target = sinkhorn.multi_sinkhorn(data[f"case{i}_scores"], eps=float(eps), num_iters=int(iters),
                                         required_fraction=float(fraction), backend="native").target
        np.testing.assert_allclose(target, data[f"case{i}_calculate_sk"], atol=1e-4, err_msg=f"case {i}")


def test_production_size_uses_the_kernel_and_agrees(rng):
    scores = random_cosine_scores(rng, 2000, 64)
    lowered = jax.jit(lambda s: sinkhorn.multi_sinkhorn(s, **PAPER_SK).target).lower(scores).as_text()
    assert kernels.MULTISK_TARGET in lowered
    auto = sinkhorn.multi_sinkhorn(scores, **PAPER_SK)
    np.testing.assert_allclose(auto.target, _solve(scores, backend="jax").target, atol=2e-5)


def test_small_problems_stay_in_jax(rng):
    scores = random_cosine_scores(rng, sinkhorn.NATIVE_MIN_ROWS - 1, 16)
    lowered = jax.jit(lambda s: sinkhorn.multi_sinkhorn(s, **PAPER_SK).target).lower(scores).as_text()
    assert kernels.MULTISK_TARGET not in lowered
    forced = jax.jit(lambda s: _solve(s).target).lower(scores).as_text()
    assert kernels.MULTISK_TARGET in forced


def test_native_backend_refuses_what_it_cannot_solve(rng):
    scores = random_cosine_scores(rng, 300, 16)
    with pytest.raises(ValueError, match="without `tol`"):
        _solve(scores, tol=1e-3)


def test_disabled_or_unbuildable_kernel_falls_back(tmp_path):
    code = textwrap.dedent("""
        import numpy as np
        from msk_jax import kernels, sinkhorn
        from msk_jax.multisk_reference import random_cosine_scores
        s = random_cosine_scores(np.random.default_rng(0), 400, 16)
        r = sinkhorn.multi_sinkhorn(s, eps=0.07, num_iters=20, required_fraction=0.5)
        assert not kernels.multisk_available()
        assert np.isfinite(np.asarray(r.target)).all()
        try:
            sinkhorn.multi_sinkhorn(s, eps=0.07, num_iters=20, required_fraction=0.5, backend="native")
        except ValueError as error:
            assert "not available" in str(error), error
        else:
            raise AssertionError("backend='native' ran without the kernel")
        print("fallback ok")
        """)
    env = dict(os.environ, MSK_JAX_CACHE_DIR=str(tmp_path))
    for extra in ({"MSK_JAX_NATIVE": "0"}, {"CXX": "false", "PATH": "/nonexistent"}):
        done = subprocess.run([sys.executable, "-c", code], env=env | extra, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "fallback ok" in done.stdout
    assert "no C++ compiler" in done.stderr
