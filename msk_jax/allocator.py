"""tcmalloc for CPU runs: the command-line tools restart themselves with it preloaded.

XLA on CPU allocates and frees its large buffers every step. With glibc's malloc, each step
touches fresh pages: the cpu-bench train step takes 133,000 page faults and 0.25 s of kernel
time per step; with tcmalloc, 222 and 0.004 s once the first steps have run, and the step
took 0.96 s instead of 1.16 s (BENCHMARKS.md). :func:`use_tcmalloc`, called first by the
command-line entries of ``msk_jax.main``, ``msk_jax.evaluate`` and ``msk_jax.bench`` (never by
library code), re-runs the same command (``os.execve``, same process id) with ``LD_PRELOAD`` set
to tcmalloc when the library is installed (Debian/Ubuntu: ``apt-get install
libtcmalloc-minimal4``) and not loaded yet, on CPU hosts only: it was measured to help there,
and where JAX runs on a GPU or TPU (an accelerator plugin is installed, or ``JAX_PLATFORMS``
names another platform) nothing changes. ``MSK_JAX_TCMALLOC=0`` turns it off.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import sys

from msk_jax import environment

_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
_RESTARTED = "MSK_JAX_TCMALLOC_RESTARTED"


def find_tcmalloc() -> str | None:
    """The tcmalloc shared library's name as the dynamic loader finds it, or None."""
    for name in _LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


# JAX's accelerator plugins: with one installed, JAX runs on that GPU or TPU by default.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def accelerator_host() -> bool:
    """Whether JAX will run on an accelerator here (decided without importing JAX)."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").lower().split(",") if p.strip()]
    if platforms:
        return platforms[0] != "cpu"
    return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def tcmalloc_loaded() -> bool:
    """Whether tcmalloc is mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            return "tcmalloc" in maps.read()
    except OSError:
        return False


def use_tcmalloc() -> None:
    """Restarts this command with tcmalloc preloaded, if it is installed and not loaded yet.

    Call it first thing in a command-line entry point (before threads or files are opened).
    It restarts at most once, and not at all on non-Linux systems, on accelerator hosts or when
    disabled.
    """
    if not environment.switched_on("MSK_JAX_TCMALLOC") or not sys.platform.startswith("linux") or os.environ.get(_RESTARTED):
        return
    if accelerator_host():
        return
    if tcmalloc_loaded():
        return
    library = find_tcmalloc()
    if library is None:
        return
    preload = os.environ.get("LD_PRELOAD")
    env = dict(os.environ, LD_PRELOAD=f"{library}:{preload}" if preload else library, **{_RESTARTED: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
