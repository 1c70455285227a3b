"""The configurations, installed with the package: `howto.py` (the paper and its variants) and
`bench.py` (the benchmarks' shapes).

The command-line tools take `--config=configs/howto.py[:variant]`, the documented path. From the
repository root that is the file `configs/howto.py`, which loads this package's; from any other
directory a `--config` file that does not exist but is named like one of these (e.g.
`configs/howto.py:demo`, `howto.py`) is read from here (:func:`resolve_argv`).
"""

from __future__ import annotations

import importlib
import os

import ml_collections

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
NAMES = ("howto", "bench")


def path(name: str) -> str:
    """The file of packaged configuration `name` ("howto" or "bench")."""
    if name not in NAMES:
        raise ValueError(f"unknown configuration '{name}'; choose from {', '.join(NAMES)}.")
    return os.path.join(DIRECTORY, f"{name}.py")


def get_config(name: str = "howto", variant: str | None = None) -> ml_collections.ConfigDict:
    """The packaged configuration `name` with `variant` (e.g. get_config("howto", "demo"))."""
    path(name)  # checks the name
    return importlib.import_module(f"msk_jax.configs.{name}").get_config(variant)


def resolve(value: str) -> str:
    """A `--config` value with its file made absolute: unchanged if the file exists, else the
    packaged configuration of the same file name (the `:variant` suffix kept)."""
    file, sep, variant = value.partition(":")
    if os.path.exists(file):
        return value
    name = os.path.basename(file).removesuffix(".py")
    if name in NAMES:
        return path(name) + sep + variant
    return value


def resolve_argv(argv: list[str], flag: str = "config") -> list[str]:
    """`argv` with every `--<flag>=FILE[:variant]` / `--<flag> FILE[:variant]` resolved (see
    :func:`resolve`), so the tools run from any directory."""
    out, take_next = [], False
    for arg in argv:
        if take_next:
            out.append(resolve(arg))
            take_next = False
        elif arg.startswith(f"--{flag}="):
            out.append(f"--{flag}=" + resolve(arg.split("=", 1)[1]))
        elif arg == f"--{flag}":
            out.append(arg)
            take_next = True
        else:
            out.append(arg)
    return out
