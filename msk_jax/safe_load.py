"""Loading pickles and PyTorch checkpoints that come from elsewhere without running their code.

A pickle names the functions and classes that rebuild its objects, and unpickling calls them:
a file fetched from a third-party link (HowTo100M's `caption.pickle`, EAO's evaluation pickles,
a copied feature store's `captions.pickle`) could run anything when read with `pickle.load`.
`load` reads pickles through an unpickler that resolves only the types the data formats hold:

- builtin containers and values: dict, list, tuple, set, frozenset, str, bytes, bytearray, int,
  float, complex, bool, None (these need no lookup), and `collections.OrderedDict`;
- numpy arrays (any dtype, object arrays included: their elements are unpickled under the same
  rules), numpy scalars and dtypes, in the layouts numpy 1.x and 2.x write (protocols 0-5);
- `_codecs.encode`, with which protocol 2 stores bytes (numpy arrays' buffers among them).

Anything else (a pandas object, a function, a class of another program) stops the load with an
`UnsafePickleError` naming the file and the type (`module.name`). None of the formats msk_jax
reads needs pandas: captions are dicts of numpy arrays and lists of strings, evaluation pickles
lists of dicts of numpy arrays and strings.

`load_torch_checkpoint` reads a `.pth` file with `torch.load(weights_only=True)`: tensors and
plain containers, and numpy's arrays, scalars and dtypes.
"""

from __future__ import annotations

import _compat_pickle
import collections
import importlib
import io
import pickle
import re
from typing import Any, BinaryIO

import numpy as np

from msk_jax.data.features import DataError

ALLOWED_SUMMARY = "builtin containers, numbers, strings, bytes and numpy arrays"


class UnsafePickleError(DataError):
    """A pickle (or checkpoint) that names a type outside the allowed ones; says which file and
    which type, and nothing of it has been run."""

    def __init__(self, path: str, name: str):
        super().__init__(str(path), f"holds a '{name}', refused: unpickling it could run code (a pickle may hold "
                                    f"only {ALLOWED_SUMMARY})", "disallowed type")
        self.name = name


def _numpy_attribute(module: str, name: str):
    """numpy's `module.name`, whichever of numpy.core (1.x) / numpy._core (2.x) holds it."""
    for candidate in (module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"numpy has no {module}.{name}")


_NUMPY_GLOBALS = [(core, module, name) for core in ("numpy.core", "numpy._core")
                  for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                       ("numeric", "_frombuffer"))]

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex, ("builtins", "slice"): slice,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): None,  # resolved on use (below)
    **{(f"{core}.{module}", name): None for core, module, name in _NUMPY_GLOBALS},
}
# numpy's dtype classes (numpy.dtypes.Float64DType, ...), which numpy >= 1.25 may name.
_DTYPE_CLASS = re.compile(r"[A-Za-z0-9]+DType")


class RestrictedUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` that resolves only `ALLOWED_GLOBALS` (and numpy's dtype classes);
    any other global raises `UnsafePickleError` naming `source` before anything is called."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        # Python 2 names (protocols 0-2), mapped as pickle.Unpickler(fix_imports=True) maps them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in ALLOWED_GLOBALS:
            value = ALLOWED_GLOBALS[key]
            if value is not None:
                return value
            if module == "_codecs":
                import _codecs
                return _codecs.encode
            return _numpy_attribute(module, name)
        if module == "numpy.dtypes" and _DTYPE_CLASS.fullmatch(name):
            value = getattr(np.dtypes, name, None)
            if isinstance(value, type) and issubclass(value, np.dtype):
                return value
        raise UnsafePickleError(self.source, f"{module}.{name}")

    def persistent_load(self, pid):
        raise UnsafePickleError(self.source, f"persistent id {str(pid)[:40]!r}")


def load(file: BinaryIO, source: str) -> Any:
    """The object pickled in the open binary `file` (named `source` in errors), read under the
    rules above."""
    return RestrictedUnpickler(file, str(source)).load()


def loads(data: bytes, source: str) -> Any:
    """`load` from bytes."""
    return load(io.BytesIO(data), source)


def load_path(path: str) -> Any:
    """`load` of a local file or a URL (gs://...)."""
    from msk_jax import storage

    with storage.open_read(path) as f:
        return load(f, path)


def _torch_numpy_globals() -> list:
    """numpy's array, scalar and dtype globals for torch's allow-list, under the names numpy 1.x
    and 2.x pickle them with (a checkpoint's metrics, e.g. `monitor_best`, may be numpy scalars)."""
    entries: list = [np.ndarray, np.dtype]
    for core, module, name in _NUMPY_GLOBALS:
        entries.append((_numpy_attribute(f"{core}.{module}", name), f"{core}.{module}.{name}"))
    entries += sorted({type(np.dtype(code)) for code in "?bhilqpBHILQPefdgFDGSUVOMm"}, key=lambda t: t.__name__)
    return entries


def load_torch_checkpoint(path: str):
    """A PyTorch checkpoint read with `torch.load(map_location="cpu", weights_only=True)`:
    tensors, plain containers and numbers (torch's own allow-list) and numpy arrays, scalars and
    dtypes; EAO's `model_best.pth` holds those only ('state_dict', 'optimizer', 'config' as a
    dict, 'epoch', 'step', 'monitor_best'). Any other type raises `UnsafePickleError` naming the
    file and the type."""
    import torch

    from msk_jax import storage

    try:
        with torch.serialization.safe_globals(_torch_numpy_globals()):
            return torch.load(storage.local_or_buffer(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"[Uu]nsupported class ([\w.]+)", str(err))
        if found:
            raise UnsafePickleError(path, found.group(1)) from None
        raise
