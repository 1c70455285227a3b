"""Environment variables msk_jax reads (all optional).

``MSK_JAX_CACHE_DIR``  where built things are kept: the demo corpus and the native kernels
                       (default ``~/.cache/msk_jax``).
``MSK_JAX_NATIVE``     0 turns the native CPU kernels off (:mod:`msk_jax.kernels`).
``MSK_JAX_TCMALLOC``   0 stops the command-line tools restarting with tcmalloc
                       (:mod:`msk_jax.allocator`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping

_OFF = ("0", "false", "off", "no")


def switched_on(name: str) -> bool:
    """An on/off switch that defaults to on: off when set to 0, false, off or no."""
    return os.environ.get(name, "1").strip().lower() not in _OFF


def cache_dir() -> Path:
    """``$MSK_JAX_CACHE_DIR``, else ``~/.cache/msk_jax``."""
    return Path(os.environ.get("MSK_JAX_CACHE_DIR", Path.home() / ".cache" / "msk_jax"))


@contextlib.contextmanager
def setting(variables: Mapping[str, str]) -> Iterator[None]:
    """Sets environment variables for the `with` block (and the processes started in it), then
    puts back each one's previous value, or removes it where it was unset."""
    previous = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
