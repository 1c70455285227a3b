"""The documented path of msk_jax's `howto` configuration (`--config=configs/howto.py[:variant]`).

The definitions live in `msk_jax/configs/howto.py`, installed with the package; this file loads them,
so the path works from the repository root (the package installed, or run from there).
"""

from msk_jax.configs.howto import *  # noqa: F401,F403
from msk_jax.configs.howto import get_config  # noqa: F401
