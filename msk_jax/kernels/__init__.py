"""Native CPU kernels, compiled on first use and registered as XLA custom calls.

`multisk_cpu.cc` holds the Multi-SK linear-domain iterations as one fused pass per iteration, on
XLA's CPU thread pool. It is a backend of :func:`msk_jax.sinkhorn.multi_sinkhorn` (chosen there
in one place); the pure-JAX loop stays the path on GPU/TPU and wherever the kernel is
unavailable. It is built with the system C++ compiler (``$CXX`` or
``g++``/``c++``) against the XLA FFI headers that ship with jaxlib, into
:func:`msk_jax.environment.cache_dir` (``$MSK_JAX_CACHE_DIR``, default ``~/.cache/msk_jax``), keyed by a hash of the source, the
compiler flags, the jaxlib version and the CPU, so a rebuild happens only when one of them
changes. Concurrent processes build to private files and rename atomically.

``MSK_JAX_NATIVE=0`` turns the kernels off (the pure-JAX path runs instead); if no compiler is
found or the build fails, a warning says why and the pure-JAX path runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

from msk_jax import environment

MULTISK_TARGET = "msk_multisk_linear"
"""Name of the Multi-SK custom call (CPU)."""

_SOURCE = Path(__file__).with_name("multisk_cpu.cc")
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-pthread")

log = logging.getLogger(__name__)


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """The CPU model and flags (-march=native builds for this CPU only)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
        return "\n".join(wanted)
    except OSError:
        return platform.processor() or platform.machine()


def build(compiler: str) -> Path:
    """Compiles multisk_cpu.cc (if not cached) and returns the shared library's path."""
    import jaxlib

    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([
        _SOURCE.read_text(), " ".join(_FLAGS), compiler, jaxlib.__version__, _cpu_signature(),
    ]).encode()).hexdigest()[:16]
    out_dir = environment.cache_dir()
    library = out_dir / f"multisk_cpu-{key}.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    command = [compiler, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", tmp]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"building {_SOURCE.name} failed ({' '.join(command)}): " + "\n".join(errors[:10]))
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


@functools.cache
def multisk_available() -> bool:
    """Builds (once per process) and registers the Multi-SK CPU kernel; False if unavailable.

    Only where JAX computes on the CPU (on GPU/TPU hosts the solver runs on the accelerator)."""
    if not environment.switched_on("MSK_JAX_NATIVE") or jax.default_backend() != "cpu":
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("msk_jax: no C++ compiler found (set $CXX or install g++); Multi-SK runs its "
                    "pure-JAX loop on CPU, about 3x slower at the production size.")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build(compiler)))
        jax.ffi.register_ffi_target(MULTISK_TARGET, jax.ffi.pycapsule(library.MskMultiSKLinear),
                                    platform="cpu")
    except Exception as error:  # noqa: BLE001 -- any failure falls back to the JAX path
        log.warning("msk_jax: the native Multi-SK kernel is unavailable (%s); using the pure-JAX loop.", error)
        return False
    return True
