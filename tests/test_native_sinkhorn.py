"""The native CPU Multi-SK kernel computes what the JAX solvers compute.

The kernel (msk_jax/kernels/multisk_cpu.cc) is built with the system C++ compiler; the CI
script installs one. Every test here compares it with the pure-JAX loop, the log-domain solver
or the golden outputs of the original code.
"""

import filecmp
import os
import shutil
import stat
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


PLANTED = r"""
#include <cstdio>
// Leaves a file behind when loaded: the proof that a process ran this library's code.
__attribute__((constructor)) static void planted() {
  if (std::FILE* f = std::fopen("%s", "w")) std::fclose(f);
}
"""


@pytest.fixture
def planted_library(tmp_path):
    """(library, path of the file it writes when loaded): a library whose constructor writes the
    file, shown to do so when loaded (in another process)."""
    ran = tmp_path / "planted_ran"
    (tmp_path / "planted.cc").write_text(PLANTED % ran)
    library = tmp_path / "planted.so"
    subprocess.run([kernels._compiler(), "-shared", "-fPIC", str(tmp_path / "planted.cc"), "-o", str(library)],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(library)!r})"], check=True, timeout=60)
    assert ran.exists()
    ran.unlink()
    return library, ran


@pytest.fixture
def copying_compiler(tmp_path):
    """(compiler, log): a stand-in compiler that 'builds' by copying this process's kernel library
    to its -o path and logs that path (the real build takes seconds)."""
    built = kernels.build(kernels._compiler())
    log = tmp_path / "compiler.log"
    compiler = tmp_path / "c++"
    compiler.write_text("#!/bin/sh\nwhile [ $# -gt 1 ]; do if [ \"$1\" = -o ]; then out=\"$2\"; fi; shift; done\n"
                        f"echo \"$out\" >> {log}\ncp {built} \"$out\"\n")
    compiler.chmod(0o755)
    return str(compiler), log


def test_a_library_in_a_folder_others_can_write_is_never_loaded(tmp_path, planted_library, copying_compiler):
    """A cache folder every user can write to (mode 777) holding a library under the kernel's
    name: the library is not loaded; the kernel is built into this user's own subfolder (mode
    700), one warning says so, and the kernel solves."""
    planted, ran = planted_library
    compiler, compiler_log = copying_compiler
    cache = tmp_path / "shared_cache"
    cache.mkdir()
    cache.chmod(0o777)
    target = cache / kernels.library_name(compiler)
    shutil.copy(planted, target)
    code = textwrap.dedent("""
        import numpy as np
        from msk_jax import kernels, sinkhorn
        from msk_jax.multisk_reference import random_cosine_scores
        assert kernels.multisk_available()
        s = random_cosine_scores(np.random.default_rng(0), 300, 16)
        native = sinkhorn.multi_sinkhorn(s, eps=0.07, num_iters=20, required_fraction=0.5, backend="native")
        loop = sinkhorn.multi_sinkhorn(s, eps=0.07, num_iters=20, required_fraction=0.5, backend="jax")
        np.testing.assert_allclose(native.target, loop.target, atol=2e-5)
        print("kernel ok")
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MSK_JAX_CACHE_DIR=str(cache), CXX=compiler),
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert not ran.exists()  # the planted code never ran
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernel ok" in done.stdout
    private = cache / f"kernels-{os.getuid()}"
    [built_at] = compiler_log.read_text().split()
    assert os.path.dirname(built_at) == str(private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert (private / target.name).is_file()
    warnings = [line for line in done.stderr.splitlines() if "not writable by this user alone" in line]
    assert len(warnings) == 1 and str(cache) in warnings[0] and str(private) in warnings[0]


def test_a_library_others_can_write_is_built_again(tmp_path, monkeypatch, planted_library, copying_compiler):
    """In a folder only this user can write to, a library file under the kernel's name that
    others can write (mode 666) is built over, not returned; a sound one is reused."""
    planted, _ = planted_library
    compiler, compiler_log = copying_compiler
    cache = tmp_path / "cache"
    monkeypatch.setenv("MSK_JAX_CACHE_DIR", str(cache))
    cache.mkdir(mode=0o700)
    target = cache / kernels.library_name(compiler)
    shutil.copy(planted, target)
    target.chmod(0o666)
    assert kernels.build(compiler) == target
    assert not filecmp.cmp(target, planted, shallow=False)  # built again, over the planted file
    assert stat.S_IMODE(target.stat().st_mode) & 0o022 == 0
    assert kernels.build(compiler) == target
    assert len(compiler_log.read_text().split()) == 1  # the second call reused it
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700


def test_cache_folders_are_made_private(tmp_path, monkeypatch, copying_compiler):
    compiler, _ = copying_compiler
    monkeypatch.setenv("MSK_JAX_CACHE_DIR", str(tmp_path / "new" / "cache"))
    assert kernels.build(compiler).parent == tmp_path / "new" / "cache"
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "cache").st_mode) == 0o700
