"""The documented path of msk_jax's `bench` configuration (`--config=configs/bench.py[:variant]`).

The definitions live in `msk_jax/configs/bench.py`, installed with the package; this file loads them,
so the path works from the repository root (the package installed, or run from there).
"""

from msk_jax.configs.bench import *  # noqa: F401,F403
from msk_jax.configs.bench import get_config  # noqa: F401
