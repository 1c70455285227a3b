"""Native CPU kernels, compiled on first use and registered as XLA custom calls.

`multisk_cpu.cc` holds the Multi-SK linear-domain iterations as one fused pass per iteration, on
XLA's CPU thread pool. It is a backend of :func:`msk_jax.sinkhorn.multi_sinkhorn` (chosen there
in one place); the pure-JAX loop stays the path on GPU/TPU and wherever the kernel is
unavailable. It is built with the system C++ compiler (``$CXX`` or
``g++``/``c++``) against the XLA FFI headers that ship with jaxlib, into
:func:`msk_jax.environment.cache_dir` (``$MSK_JAX_CACHE_DIR``, default ``~/.cache/msk_jax``), keyed by a hash of the source, the
compiler flags, the jaxlib version and the CPU, so a rebuild happens only when one of them
changes. Concurrent processes build to private files and rename atomically.

A library is code this process runs, so it is loaded only from a folder that no one else can
write to: one owned by the current user and not group- or world-writable, holding a file with
the same two properties (a file failing them is built again over). Where the cache folder fails
them (a shared cache), the kernel is built in the subfolder ``kernels-<uid>`` made for this user
(mode 700), else in a new temporary folder, and a warning names the folder it skipped. Cache
folders are made with mode 700.

``MSK_JAX_NATIVE=0`` turns the kernels off (the pure-JAX path runs instead); if no compiler is
found or the build fails, a warning says why and the pure-JAX path runs.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
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


def _owned_and_unshared(path: Path, directory: bool) -> bool:
    """Whether only the current user can change `path`: owned by them, not group- or
    world-writable, and (for a file) a regular file, not a link to one elsewhere."""
    if not hasattr(os, "getuid"):  # no POSIX owners and modes: nothing to check against
        return True
    try:
        info = os.stat(path) if directory else os.lstat(path)
    except OSError:
        return False
    kind = stat.S_ISDIR if directory else stat.S_ISREG
    return kind(info.st_mode) and info.st_uid == os.getuid() and info.st_mode & 0o022 == 0


_SKIPPED: set[Path] = set()  # cache folders already warned about in this process


def _kernel_dir() -> Path:
    """The folder to build into and load from: the cache folder when only this user can write to
    it, else this user's own subfolder of it, else a new temporary folder (warned about once)."""
    cache = environment.cache_dir()
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass
    if _owned_and_unshared(cache, directory=True):
        return cache
    folder = cache / f"kernels-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        pass
    if not _owned_and_unshared(folder, directory=True):
        folder = Path(tempfile.mkdtemp(prefix="msk_jax_kernels_"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if cache not in _SKIPPED:
        _SKIPPED.add(cache)
        log.warning("msk_jax: %s is not writable by this user alone (another user could plant code there); "
                    "the native Multi-SK kernel is built and loaded in %s instead.", cache, folder)
    return folder


def library_name(compiler: str) -> str:
    """The file name of the kernel built by `compiler`: a hash of everything the build depends on."""
    import jaxlib

    key = hashlib.sha256("\0".join([
        _SOURCE.read_text(), " ".join(_FLAGS), compiler, jaxlib.__version__, _cpu_signature(),
    ]).encode()).hexdigest()[:16]
    return f"multisk_cpu-{key}.so"


def build(compiler: str) -> Path:
    """Compiles multisk_cpu.cc (unless a library only this user can change is there) and returns
    the shared library's path."""
    include = jax.ffi.include_dir()
    out_dir = _kernel_dir()
    library = out_dir / library_name(compiler)
    if _owned_and_unshared(library, directory=False):
        return library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    command = [compiler, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", tmp]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"building {_SOURCE.name} failed ({' '.join(command)}): " + "\n".join(errors[:10]))
        os.chmod(tmp, 0o700)  # the linker makes its output with the umask's mode, maybe group-writable
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
