"""The golden files as the checks see them: a view that serves a file's inputs only, and the
outputs the checks recompute from them."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from msk_jax.data.feature_store import numpy_dtype


@dataclasses.dataclass(frozen=True)
class Output:
    """One recomputed output, compared with the golden key of the same name."""

    key: str
    value: np.ndarray
    atol: float | None = None  # pass if max |got - expected| <= atol
    rtol: float | None = None  # pass if max |got - expected| / |expected| <= rtol
    # pass if max |got - expected| <= max_rtol * max |expected| (a tolerance relative to the array's scale)
    max_rtol: float | None = None


class GoldenInputs:
    """Read-only view of a golden .npz that only serves input keys."""

    def __init__(self, npz, is_input: Callable[[str], bool], name: str, features_dtype: str = "float32"):
        self._npz, self._is_input, self._name = npz, is_input, name
        self._features_dtype = features_dtype

    def __getitem__(self, key: str) -> np.ndarray:
        if not self._is_input(key):
            raise KeyError(f"{self._name}: '{key}' is an expected output, not an input.")
        if key not in self._npz.files:
            raise KeyError(f"{self._name}: missing input '{key}'.")
        value = self._npz[key]
        if self._features_dtype != "float32" and re.fullmatch(r"(step\d+/)?input/(video|audio)", key):
            value = value.astype(numpy_dtype(self._features_dtype)).astype(value.dtype)
        return value

    def keys(self) -> list[str]:
        return [k for k in self._npz.files if self._is_input(k)]


def matches(*patterns: str) -> Callable[[str], bool]:
    compiled = [re.compile(p) for p in patterns]
    return lambda key: any(p.fullmatch(key) for p in compiled)


def prefixed(inputs: GoldenInputs, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: inputs[k] for k in inputs.keys() if k.startswith(prefix)}
