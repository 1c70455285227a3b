"""The command-line tools restart with tcmalloc when it is installed (and only then)."""

import os
import subprocess
import sys

import pytest

from msk_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("from msk_jax import allocator; allocator.use_tcmalloc(); import os; "
         "print('loaded' if allocator.tcmalloc_loaded() else 'absent', os.environ.get('LD_PRELOAD', '-'))")


def _probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MSK_JAX_TCMALLOC_RESTARTED")}
    done = subprocess.run([sys.executable, "-c", PROBE], env=base | env, cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc is not installed")
def test_restarts_with_tcmalloc_preloaded():
    status, preload = _probe()
    assert status == "loaded" and "tcmalloc" in preload


def test_disabled_or_missing_library_changes_nothing():
    assert _probe(MSK_JAX_TCMALLOC="0") == ["absent", "-"]
    assert _probe(JAX_PLATFORMS="cuda") == ["absent", "-"]  # GPU and TPU hosts: never preloaded
    # No library found (find_library searches the loader cache; an empty LD_LIBRARY_PATH and a
    # name that does not exist stand in for a machine without tcmalloc).
    code = ("from msk_jax import allocator; allocator._LIBRARIES = ('msk_jax_no_such_allocator',); "
            "allocator.use_tcmalloc(); print(allocator.tcmalloc_loaded())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    assert done.stdout.strip() == "False"


def test_accelerator_hosts_are_recognised(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert allocator.accelerator_host()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not allocator.accelerator_host()
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(allocator, "ACCELERATOR_PLUGINS", ("json",))  # an importable stand-in for a plugin
    assert allocator.accelerator_host()
    monkeypatch.setattr(allocator, "ACCELERATOR_PLUGINS", ("msk_jax_no_such_plugin",))
    assert not allocator.accelerator_host()
