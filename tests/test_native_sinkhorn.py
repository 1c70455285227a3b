"""The native CPU Multi-SK kernel computes what the JAX solvers compute.

The kernel (msk_jax/kernels/multisk_cpu.cc) is built with the system C++ compiler; the CI
script installs one. Every test here compares it with the pure-JAX loop, the log-domain solver
or the golden outputs of the original code.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from msk_jax import kernels, sinkhorn
from msk_jax.multisk_reference import random_cosine_scores
from tests.paper_config import PAPER_SK

pytestmark = pytest.mark.skipif(not kernels.multisk_available(),
                                reason="no C++ compiler: the native Multi-SK kernel is not built")


def _required_group(scores, fraction=0.5, iters=20, eps=0.07, native=True, last_rows=None):
    """The required slots' matrix after the final renormalisation (before the min-max)."""
    r = sinkhorn.num_required_slots(scores.shape[-1], fraction)

    @jax.jit
    def solve(s):
        final, iterations, error = sinkhorn._solve(s, eps, iters, r, None, "linear", all_groups=False,
                                                   last_rows=last_rows, native=native)
        return final[-1], iterations, error

    return solve(scores)


@pytest.fixture
def always_native(monkeypatch):
    """Every problem size goes to the native kernel."""
    monkeypatch.setattr(sinkhorn, "NATIVE_MIN_ROWS", 1)
    jax.clear_caches()
    yield
    jax.clear_caches()


# N: a multiple of 16, one that is not (padding rows), and one split among threads; K: the
# unrolled 64 and the generic path; one slot group (R = K) and two.
@pytest.mark.parametrize("n,k,fraction", [(272, 64, 0.5), (301, 24, 0.25), (1000, 64, 0.5),
                                          (261, 8, 1.0)])
def test_native_kernel_matches_the_jax_loop(rng, always_native, n, k, fraction):
    scores = random_cosine_scores(rng, n, k)
    native, native_iters, native_error = _required_group(scores, fraction)
    loop, loop_iters, loop_error = _required_group(scores, fraction, native=False)
    log, _, _ = jax.jit(lambda s: sinkhorn._solve(s, 0.07, 20, sinkhorn.num_required_slots(k, fraction), None,
                                                  "log", all_groups=False))(scores)
    np.testing.assert_allclose(native, loop, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(native, log[-1], rtol=2e-5, atol=1e-7)
    assert int(native_iters) == int(loop_iters) == 20
    np.testing.assert_allclose(native_error, loop_error, rtol=1e-2, atol=5e-6)  # rounding level


def test_native_last_rows_and_targets(rng, always_native):
    scores = random_cosine_scores(rng, 300, 64)
    full, _, _ = _required_group(scores)
    last, _, _ = _required_group(scores, last_rows=37)
    np.testing.assert_array_equal(last, full[-37:])
    target = sinkhorn.multi_sinkhorn(scores, **PAPER_SK).target
    expected = sinkhorn.minmax_normalize_rows(32 * full)
    np.testing.assert_allclose(target, expected, atol=1e-6)


@pytest.fixture
def rng():
    return np.random.default_rng(1)


def test_native_batched_equals_single_problems(rng, always_native):
    stack = np.stack([random_cosine_scores(rng, 280, 64) for _ in range(5)])  # pairs + a single
    batched = sinkhorn.multi_sinkhorn_batched(stack, **PAPER_SK, last_rows=20)
    for p in range(5):
        single = sinkhorn.multi_sinkhorn(stack[p], **PAPER_SK)
        np.testing.assert_allclose(batched.target[p], single.target[-20:], atol=1e-6)
        np.testing.assert_allclose(batched.marginal_error[p], single.marginal_error, rtol=1e-3)


def test_native_kernel_reproduces_the_golden_multisk_cases(golden_dir, always_native):
    data = np.load(os.path.join(golden_dir, "multisk.npz"))
    for i in range(int(data["n_cases"])):
        eps, iters, fraction, _ = data[f"case{i}_params"]
        target = sinkhorn.multi_sinkhorn(data[f"case{i}_scores"], eps=float(eps), num_iters=int(iters),
                                         required_fraction=float(fraction)).target
        np.testing.assert_allclose(target, data[f"case{i}_calculate_sk"], atol=1e-4, err_msg=f"case {i}")


def test_production_size_uses_the_kernel_and_agrees(rng):
    scores = random_cosine_scores(rng, 2000, 64)
    lowered = jax.jit(lambda s: sinkhorn.multi_sinkhorn(s, **PAPER_SK).target).lower(scores).as_text()
    assert kernels.MULTISK_TARGET in lowered
    native, _, _ = _required_group(scores)
    loop, _, _ = _required_group(scores, native=False)
    np.testing.assert_allclose(native, loop, rtol=2e-5, atol=1e-7)


def test_small_problems_stay_in_jax(rng):
    scores = random_cosine_scores(rng, sinkhorn.NATIVE_MIN_ROWS - 1, 16)
    lowered = jax.jit(lambda s: sinkhorn.multi_sinkhorn(s, **PAPER_SK).target).lower(scores).as_text()
    assert kernels.MULTISK_TARGET not in lowered


def test_disabled_or_unbuildable_kernel_falls_back(tmp_path):
    code = ("import numpy as np; from msk_jax import kernels, sinkhorn;"
            "from msk_jax.multisk_reference import random_cosine_scores;"
            "s = random_cosine_scores(np.random.default_rng(0), 400, 16);"
            "r = sinkhorn.multi_sinkhorn(s, eps=0.07, num_iters=20, required_fraction=0.5); assert not kernels.multisk_available();"
            "assert np.isfinite(np.asarray(r.target)).all(); print('fallback ok')")
    env = dict(os.environ, MSK_JAX_CACHE_DIR=str(tmp_path))
    for extra in ({"MSK_JAX_NATIVE": "0"}, {"CXX": "false", "PATH": "/nonexistent"}):
        done = subprocess.run([sys.executable, "-c", code], env=env | extra, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "fallback ok" in done.stdout
    assert "no C++ compiler" in done.stderr
