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

Sizes are bounded before anything is allocated: the constructors a pickle may call with a size
(`bytearray(n)`, `numpy.ndarray(shape)`, numpy's `_reconstruct`) may allocate at most
`allocation_limit(file size)` bytes, since a 30-byte pickle could otherwise ask for terabytes;
arrays whose bytes the file holds are bounded by the file itself. A file that is not a pickle, or
a broken one, is one `DataError` naming the file, whatever the parser met.

`load_npz` reads arrays of an `.npz` file with the same care: each member's declared size and its
`.npy` header (shape and dtype) are checked against each other and against a bound before
anything is inflated, so a zip bomb or a forged header is refused by name; object arrays are
refused (they are pickles).

`load_torch_checkpoint` reads a `.pth` file with `torch.load(weights_only=True)` (torch 2.6 or
newer: older releases run code from such files despite `weights_only`): tensors and plain
containers, and numpy's arrays, scalars and dtypes.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import importlib
import io
import math
import os
import pickle
import re
import sys
import threading
import zipfile
from typing import Any, BinaryIO

import numpy as np

from msk_jax import storage
from msk_jax.errors import DataError

ALLOWED_SUMMARY = "builtin containers, numbers, strings, bytes and numpy arrays"


class UnsafePickleError(DataError):
    """A pickle (or checkpoint) that names a type outside the allowed ones; says which file and
    which type, and nothing of it has been run."""

    def __init__(self, path: str, name: str):
        name = name.encode("unicode_escape").decode("ascii")[:120]  # one line, whatever the file holds
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


def allocation_limit(file_bytes: int) -> int:
    """The most bytes a pickle of `file_bytes` bytes may have its constructors allocate beyond
    what it holds: what legitimate files need (numpy rebuilds an array from an empty one and the
    bytes in the file) with a wide margin."""
    return (1 << 20) + 4 * max(0, int(file_bytes))


class TooLargeError(DataError):
    """A file that declares (or would make) more data than the bound its reader sets; nothing of
    that size was allocated."""

    def __init__(self, path: str, problem: str):
        super().__init__(str(path), problem, "too large")


def _nbytes(shape, dtype) -> int:
    """Bytes of an array of `shape` and `dtype` (either as a constructor was given them), or -1
    when they do not describe one."""
    try:
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if not all(isinstance(d, int) for d in dims):
            return -1
        return math.prod(max(0, d) for d in dims) * np.dtype(dtype).itemsize
    except (TypeError, ValueError, OverflowError):
        return -1


class Refused:
    """What stands in a pickle's data for a value that was too large to make (`load(...,
    in_place=True)`): the readers of one entry of a many-entry file (a video's caption) then
    refuse that entry alone, with `problem`."""

    def __init__(self, problem: str):
        self.problem = problem

    def __setstate__(self, state):  # the state of the array it stands for is not kept
        pass

    def __repr__(self) -> str:
        return f"<refused: {self.problem}>"


class _Restrictions:
    """What both unpicklers below resolve and bound: only `ALLOWED_GLOBALS` (and numpy's dtype
    classes); any other global raises `UnsafePickleError` naming `source` before anything is
    called. The constructors that take a size allocate at most `limit` bytes each: beyond it, a
    `TooLargeError`, or with `in_place` a `Refused` in the value's place."""

    def __init__(self, file: BinaryIO, source: str, limit: int, in_place: bool = False):
        super().__init__(file)
        self.source, self.limit, self.in_place = source, limit, in_place

    def _refused(self, size: int, what: str) -> Refused | None:
        if size <= self.limit:
            return None
        problem = (f"asks for a {what} of {size:,} bytes, more than a pickle of its size may make "
                   f"({self.limit:,}); refused before allocating it")
        if self.in_place:
            return Refused(problem)
        raise TooLargeError(self.source, problem)

    def _bytearray(self, *args):
        if args and isinstance(args[0], int):
            refused = self._refused(args[0], "bytearray")
            if refused is not None:
                return refused
        return bytearray(*args)

    def _ndarray(self, shape=(), dtype=float, *args, **kwargs):
        if not args and not kwargs.get("buffer"):  # no buffer: the array is allocated here
            refused = self._refused(_nbytes(shape, dtype), "numpy array")
            if refused is not None:
                return refused
        return np.ndarray(shape, dtype, *args, **kwargs)

    def _reconstructor(self, module: str, name: str):
        reconstruct = _numpy_attribute(module, name)

        def bounded(subtype, shape, dtype):
            refused = self._refused(_nbytes(shape, dtype), "numpy array")
            if refused is not None:
                return refused
            # numpy's pickles name the array type, which resolves to the bounded constructor
            subtype = np.ndarray if subtype == self._ndarray else subtype
            return reconstruct(subtype, shape, dtype)
        return bounded

    def find_class(self, module: str, name: str):
        # Python 2 names (protocols 0-2), mapped as pickle.Unpickler(fix_imports=True) maps them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in ALLOWED_GLOBALS:
            if key == ("builtins", "bytearray"):
                return self._bytearray
            if key == ("numpy", "ndarray"):
                return self._ndarray
            value = ALLOWED_GLOBALS[key]
            if value is not None:
                return value
            if module == "_codecs":
                import _codecs
                return _codecs.encode
            if name == "_reconstruct":
                return self._reconstructor(module, name)
            return _numpy_attribute(module, name)
        if module == "numpy.dtypes" and _DTYPE_CLASS.fullmatch(name):
            value = getattr(np.dtypes, name, None)
            if isinstance(value, type) and issubclass(value, np.dtype):
                return value
        raise UnsafePickleError(self.source, f"{module}.{name}")

    def persistent_load(self, pid):
        raise UnsafePickleError(self.source, f"persistent id {str(pid)[:40]!r}")


class RestrictedUnpickler(_Restrictions, pickle.Unpickler):
    """The restrictions on CPython's C unpickler (fast: large files)."""


class _CheckedUnpickler(_Restrictions, pickle._Unpickler):
    """The restrictions on the pure-Python unpickler, which keeps its memo in a dict and reads every
    length-prefixed value from the file as it comes: a forged memo index or length costs nothing.
    (The C unpickler grows its memo array to the largest index a PUT names, touching 8 bytes per
    index, so a few bytes can ask for gigabytes.) About six times slower: used for files up to
    `CHECKED_BYTES`."""


# Pickles up to this size are read by the pure-Python unpickler (every size bounded by the file);
# larger ones, e.g. HowTo100M's caption file, by the C one, whose memo indices are not bounded.
CHECKED_BYTES = 64 << 20


def _size(file: BinaryIO) -> int | None:
    try:
        here = file.tell()
        end = file.seek(0, os.SEEK_END)
        file.seek(here)
        return end - here
    except (AttributeError, OSError, ValueError):
        return None


def load(file: BinaryIO, source: str, *, in_place: bool = False) -> Any:
    """The object pickled in the open binary `file` (named `source` in errors), read under the
    rules above. Anything that is not such a pickle (another format, a truncated or corrupt
    file, a disallowed type, a size beyond the bound) raises a `DataError` naming `source`;
    with `in_place`, a value beyond the size bound is a `Refused` instead, for its reader to
    refuse that entry alone."""
    size = _size(file)
    limit = allocation_limit(size if size is not None else 64 << 20)
    unpickler = _CheckedUnpickler if size is not None and size <= CHECKED_BYTES else RestrictedUnpickler
    try:
        return unpickler(file, str(source), limit, in_place).load()
    except DataError:
        raise
    except MemoryError:
        raise TooLargeError(source, "needs more memory than this machine has; not a pickle of data?") from None
    except Exception as err:  # a parser meets every kind of error on arbitrary bytes
        raise DataError(str(source), f"cannot be read as a pickle of data ({type(err).__name__}: "
                                     f"{_first_line(err)}); truncated or another format?", "unreadable") from None


def _first_line(err: BaseException, width: int = 160) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:width]


# NumPy parses each array header with `ast.literal_eval`; CPython before 3.11.8 and 3.12.2 can
# fail ("AST constructor recursion depth mismatch", gh-106905) when two threads do that at once,
# so loader threads take turns there (they share one interpreter lock anyway; worker processes
# do not need this).
_AST_LOCK = threading.Lock() if sys.version_info < (3, 11, 8) or (3, 12) <= sys.version_info < (3, 12, 2) \
    else contextlib.nullcontext()

# The most bytes one array of an npz file may hold unless its reader says otherwise: three times
# a 12-hour video's log-mel at 100 frames/s (40 bins, float32), far above any HowTo100M file.
MAX_ARRAY_BYTES = int(os.environ.get("MSK_JAX_MAX_ARRAY_BYTES", 2 << 30))
_CHUNK = 16 << 20


def _read_npy(member, path: str, key: str, declared: int, max_bytes: int) -> np.ndarray:
    """One `.npy` member of an npz, its header checked against the member's declared size and
    `max_bytes` before the data is read."""
    where = f"{path} [{key}]"
    try:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not read here")
        with _AST_LOCK:
            shape, fortran, dtype = read_header(member)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        raise DataError(where, f"is not a valid .npy array ({_first_line(err)})", "unreadable") from None
    if dtype.hasobject:
        raise DataError(where, f"holds Python objects (dtype {dtype}), not numbers; refused (loading them runs "
                               "pickle)", "bad dtype")
    nbytes = _nbytes(shape, dtype)
    header = member.tell()
    if nbytes != declared - header:
        raise DataError(where, f"declares {shape} {dtype} ({nbytes:,} bytes) but holds {declared - header:,} bytes; "
                               "corrupt or forged", "unreadable")
    if nbytes > max_bytes:
        raise TooLargeError(where, f"holds {nbytes:,} bytes ({shape} {dtype}), more than the {max_bytes:,} this "
                                   "file may hold; refused before reading it")
    # Grown as the data arrives, not allocated at the declared size: a header that promises more
    # than the file holds costs only what it holds.
    data = bytearray()
    while len(data) < nbytes:
        chunk = member.read(min(_CHUNK, nbytes - len(data)))
        if not chunk:
            raise DataError(where, f"ends after {len(data):,} of {nbytes:,} bytes; truncated?", "unreadable")
        data += chunk
    array = np.frombuffer(data, dtype)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def load_npz(path: str, keys: tuple[str, ...] | None = None, *, max_bytes: int | None = None,
             required: bool = True) -> dict[str, np.ndarray]:
    """Arrays of the `.npz` file at `path` (a local path or a URL): `keys` (all when None; with
    `required`, a missing one is a `DataError`), each at most `max_bytes` (default
    `MAX_ARRAY_BYTES`). Every problem (not a zip, a corrupt member, an object array, a size
    beyond the bound, a forged header) is a `DataError` naming the file; nothing larger than the
    bound is ever allocated."""
    max_bytes = MAX_ARRAY_BYTES if max_bytes is None else max_bytes
    try:
        with zipfile.ZipFile(storage.local_or_buffer(path)) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()
                       if info.filename.endswith(".npy")}
            wanted = list(members) if keys is None else list(keys)
            arrays = {}
            for key in wanted:
                info = members.get(key)
                if info is None:
                    if required:
                        raise DataError(path, f"has no key '{key}' (keys: {sorted(members)})", "bad file")
                    continue
                if info.file_size > max_bytes + 4096:
                    raise TooLargeError(f"{path} [{key}]", f"declares {info.file_size:,} bytes, more than the "
                                        f"{max_bytes:,} this file may hold; refused before inflating it")
                with archive.open(info) as member:
                    arrays[key] = _read_npy(member, path, key, info.file_size, max_bytes)
            return arrays
    except DataError:
        raise
    except MemoryError:
        raise TooLargeError(path, "needs more memory than this machine has") from None
    except Exception as err:  # zipfile and zlib meet every kind of error on arbitrary bytes
        raise DataError(path, f"cannot be read as an npz file ({type(err).__name__}: {_first_line(err)}); "
                              "truncated or another format?", "unreadable") from None


def loads(data: bytes, source: str) -> Any:
    """`load` from bytes."""
    return load(io.BytesIO(data), source)


def load_path(path: str) -> Any:
    """`load` of a local file or a URL (gs://...)."""
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


    version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if version < (2, 6):
        raise DataError(path, f"needs torch 2.6 or newer to be read safely (torch {torch.__version__} runs code "
                              "from .pth files even with weights_only=True, CVE-2025-32434): "
                              "pip install 'torch>=2.6'", "old torch")
    try:
        with torch.serialization.safe_globals(_torch_numpy_globals()):
            return torch.load(storage.local_or_buffer(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"[Uu]nsupported class ([\w.]+)", str(err))
        if found:
            raise UnsafePickleError(path, found.group(1)) from None
        raise
