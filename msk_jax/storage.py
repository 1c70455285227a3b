"""Paths on the local disk or in a bucket (``gs://bucket/...``), read and written one way.

Every path a user gives msk_jax (the work directory, data paths, checkpoints, output folders)
goes through this module, which is built on etils ``epath`` (the path library orbax uses), so a
``gs://`` URL works wherever a local path does. Buckets are reached with gcsfs; its standard
environment variables apply (``STORAGE_EMULATOR_HOST`` points it at a local emulator, as the
tests do). Byte ranges of bucket objects (`RangeReader`, the feature store's reads) go through
TensorStore's kvstore when it is installed (``TENSORSTORE_GCS_HTTP_URL`` points it at an
emulator), fsspec's gcsfs otherwise. Local caches (the demo corpus, compiled kernels) are not user paths and stay local.

Objects in a bucket cannot be appended to or renamed cheaply, so:
- `write_atomic` writes a whole file at once (on disk a temporary file of a unique name, fsynced
  and renamed, the folder fsynced; one upload, which appears whole or not at all, in a bucket);
- `AppendableFile` appends on disk and, in a bucket, keeps the file's bytes and uploads them
  whole at `flush` (metric logs: small, and flushed at log and checkpoint steps).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import importlib.util
import io
import mmap
import os
import tempfile
from typing import ClassVar

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for URLs with a scheme (gs://, s3://, ...), False for local paths."""
    return "://" in os.fspath(path)


def path(p: PathLike) -> epath.Path:
    """An epath.Path for a local path (made absolute) or a URL."""
    p = os.fspath(p)
    return epath.Path(p if is_remote(p) else os.path.abspath(p))


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a string, for local paths and URLs alike."""
    return os.fspath(path(base).joinpath(*parts))


def exists(p: PathLike) -> bool:
    return path(p).exists()


def isdir(p: PathLike) -> bool:
    return path(p).is_dir()


def listdir(p: PathLike) -> list[str]:
    """Names in a folder ([] when it does not exist)."""
    folder = path(p)
    if not folder.is_dir():
        return []
    return sorted(child.name for child in folder.iterdir())


def refresh(p: PathLike) -> None:
    """Forgets cached listings under a bucket path (gcsfs caches them for the life of the
    process), so a folder that another process writes to is listed afresh."""
    if is_remote(p):
        import fsspec

        fs_class = type(fsspec.core.url_to_fs(os.fspath(p))[0])
        for fs in list(getattr(fs_class, "_cache", {}).values()) or [fs_class()]:
            fs.invalidate_cache()  # every instance: epath and orbax hold their own


def move(src: PathLike, dst: PathLike) -> None:
    """Renames a file or folder. In a bucket (no real folders: every object is copied, then
    deleted) the destination's parent need not exist."""
    if is_remote(src):
        import fsspec

        fs, source = fsspec.core.url_to_fs(os.fspath(src))
        fs.copy(source, fsspec.core.url_to_fs(os.fspath(dst))[1], recursive=True)
        fs.rm(source, recursive=True)
        return
    os.replace(os.path.abspath(src), os.path.abspath(dst))


def size(p: PathLike) -> int:
    """A file's (an object's) size in bytes."""
    if is_remote(p):
        import fsspec

        fs, name = fsspec.core.url_to_fs(os.fspath(p))
        return int(fs.size(name))
    return os.path.getsize(p)


def makedirs(p: PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def open_read(p: PathLike, text: bool = False):
    """A file object for reading. Bucket objects are read through a 4 MiB buffer, so small
    reads (word by word, line by line) do not each become a request."""
    if not is_remote(p):
        return open(p, "r" if text else "rb", newline="" if text else None)
    raw = path(p).open("rb")
    buffered = io.BufferedReader(raw, buffer_size=4 << 20)
    return io.TextIOWrapper(buffered, encoding="utf-8", newline="") if text else buffered


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def local_or_buffer(p: PathLike):
    """What `np.load` / `zipfile` read fastest: the local path itself, or a bucket object's bytes
    in memory (one download instead of many ranged reads)."""
    return io.BytesIO(read_bytes(p)) if is_remote(p) else os.fspath(p)


def write_atomic(p: PathLike, data: bytes | str) -> None:
    """Writes a whole file so that readers see the old or the new content, never a part, and a
    crash after it returns loses neither.

    On disk: a temporary file of a unique name (`mkstemp`, in the target's folder: one file
    system, so the rename is atomic; several hosts may write into a shared folder, and containers
    share process ids), fsynced, renamed over the target, then the folder fsynced (the rename
    itself is then durable). The temporary file is removed on any error. In a bucket: one upload,
    which appears complete or not at all."""
    data = data.encode() if isinstance(data, str) else data
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(p):
        target.write_bytes(data)
        return
    folder = os.fspath(target.parent)
    descriptor, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # what `open` gives a new file (mkstemp: 0600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)


def fsync_folder(folder: PathLike) -> None:
    """Makes the entries of a local folder (a rename, a new or removed file) durable. File systems
    that cannot sync a folder (some network ones refuse it) are left as they are."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


@functools.cache
def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it (setting it to read
    it would briefly apply to files other threads create)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class AppendableFile:
    """A file that grows by appends: appended on disk; in a bucket, held in memory and uploaded
    whole at `flush`, since objects cannot be appended to. Existing content is kept (a resumed
    run continues the same file)."""

    def __init__(self, p: PathLike):
        self.path, self.remote = os.fspath(p), is_remote(p)
        target = path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self._content = bytearray(target.read_bytes() if target.exists() else b"")
            self._uploaded = len(self._content)
        else:
            self._file = open(self.path, "ab")

    def write(self, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        if self.remote:
            self._content += data
        else:
            self._file.write(data)

    def flush(self) -> None:
        """Makes what was written durable (in a bucket: uploads the file when it grew)."""
        if not self.remote:
            self._file.flush()
        elif self._uploaded != len(self._content):
            path(self.path).write_bytes(bytes(self._content))
            self._uploaded = len(self._content)

    def close(self) -> None:
        self.flush()
        if not self.remote:
            self._file.close()


# Clients of `RangeReader` for objects in a bucket. TensorStore's kvstore (C++ HTTP on its own
# threads) costs a worker about half the CPU per ranged GET of gcsfs/aiohttp (BENCHMARKS.md,
# "Input path at HowTo100M sizes"), so "auto" takes it for gs:// whenever it is installed.
RANGE_CLIENTS = ("auto", "tensorstore", "fsspec")


def range_client(p: PathLike, client: str = "auto") -> str:
    """The client `RangeReader` reads `p`'s byte ranges with: "local" (a memory map) for local
    paths; for a URL `client`, or with "auto" "tensorstore" for gs:// (when installed) and
    "fsspec" (gcsfs for gs://) otherwise. A local emulator that only gcsfs is pointed at (STORAGE_EMULATOR_HOST
    without TENSORSTORE_GCS_HTTP_URL) keeps gcsfs, so that both never read different buckets."""
    if client not in RANGE_CLIENTS:
        raise ValueError(f"range reads: client '{client}', expected one of {', '.join(RANGE_CLIENTS)}.")
    p = os.fspath(p)
    if not is_remote(p):
        return "local"
    google = p.startswith("gs://")
    if client == "tensorstore" and not google:
        raise ValueError(f"range reads: the tensorstore client reads gs:// URLs, not '{p}'.")
    if client != "auto":
        return client
    emulator_for_gcsfs_only = os.environ.get("STORAGE_EMULATOR_HOST") and not os.environ.get("TENSORSTORE_GCS_HTTP_URL")
    if google and not emulator_for_gcsfs_only and _tensorstore_installed():
        return "tensorstore"
    return "fsspec"


@functools.cache
def _tensorstore_installed() -> bool:
    return importlib.util.find_spec("tensorstore") is not None


class _FsspecObject:
    """An object read through fsspec (gcsfs for gs://): ranged GETs on its event loop."""

    def __init__(self, p: str):
        import fsspec  # optional: only bucket paths need it

        self.fs, self.name = fsspec.core.url_to_fs(p)
        self.path = p

    def get(self, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.name, start=start, end=end)

    def start(self, spans: list[tuple[int, int]]):
        """Futures of the spans' bytes, all requested at once, and what cancels those not answered."""
        return _start_gets(self.fs, [(self.name, start, end) for start, end in spans])


class _KvObject:
    """An object of a gs:// bucket read through TensorStore's kvstore: each ranged GET is a
    TensorStore future, answered on TensorStore's own threads."""

    _stores: ClassVar[dict[tuple[str, str], object]] = {}  # (bucket, endpoint) -> the opened kvstore, per process

    def __init__(self, p: str):
        import tensorstore  # optional: only bucket paths need it

        bucket, _, self.key = p[len("gs://"):].partition("/")
        endpoint = os.environ.get("TENSORSTORE_GCS_HTTP_URL", "")  # read when a store is opened
        store = self._stores.get((bucket, endpoint))
        if store is None:
            store = self._stores[bucket, endpoint] = tensorstore.KvStore.open(
                {"driver": "gcs", "bucket": bucket}).result()
        self.store, self.path = store, p

    def get(self, start: int, end: int) -> bytes:
        return _KvRead(self.store.read(self.key, byte_range=slice(start, end)), self.path, start, end).result()

    def start(self, spans: list[tuple[int, int]]):
        reads = _KvReads(_KvRead(self.store.read(self.key, byte_range=slice(start, end)), self.path, start, end)
                         for start, end in spans)
        return list(reads), reads


class _KvRead:
    """One TensorStore read: `result()` is its bytes, or an OSError naming the object."""

    def __init__(self, future, p: str, start: int, end: int):
        self.future, self.path, self.span = future, p, (start, end)

    def result(self) -> bytes:
        try:
            read = self.future.result()
        except (ValueError, RuntimeError) as err:  # TensorStore's errors: out of range, refused, cancelled
            raise OSError(f"{self.path}: the read of bytes [{self.span[0]}, {self.span[1]}) failed: {err}") from None
        if read.state != "value":
            raise FileNotFoundError(f"{self.path}: no such object")
        return read.value

    def cancel(self) -> None:
        self.future.cancel()


class _KvReads(list):
    def cancel(self) -> None:
        for read in self:
            read.cancel()


class RangeReader:
    """Reads byte ranges of files: through a read-only memory map on disk (no copy: the bytes are
    read where they are used), ranged GETs in a bucket (`client`: see `range_client`). `read`
    reads one range (one request); `read_ranges` starts many at once, ranges of a file that
    overlap or lie within `max_gap` bytes of each other fetched as one (reading the gap costs
    less than a request when it is small: `max_gap` is that threshold). Counts the bytes it
    fetched, gaps included (`bytes_read`), and the requests (`requests`; on disk, the merged
    ranges). Each process makes its own (it pickles as a fresh one)."""

    def __init__(self, max_gap: int = 64 << 10, client: str = "auto"):
        if client not in RANGE_CLIENTS:
            raise ValueError(f"range reads: client '{client}', expected one of {', '.join(RANGE_CLIENTS)}.")
        self.max_gap, self.client = max_gap, client
        self._files: dict[str, object] = {}
        self.bytes_read = 0
        self.requests = 0

    def _handle(self, p: str):
        """A memoryview of the file's map (disk), or the object's client (bucket)."""
        handle = self._files.get(p)
        if handle is None:
            kind = range_client(p, self.client)
            if kind == "local":
                with open(p, "rb") as f:
                    handle = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            else:
                handle = _KvObject(p) if kind == "tensorstore" else _FsspecObject(p)
            self._files[p] = handle
        return handle

    def read(self, p: str, offset: int, length: int):
        """`length` bytes at `offset` of `p` (bytes, or a read-only memoryview of a local file)."""
        handle = self._handle(p)
        if isinstance(handle, memoryview):
            data = handle[offset:offset + length]
        else:
            data = handle.get(offset, offset + length)
        _check_length(p, offset, length, len(data))
        self.bytes_read += length
        self.requests += 1
        return data

    def read_ranges(self, ranges: list[tuple[str, int, int]]) -> PendingRanges:
        """Starts reading every (path, offset, length) of `ranges` and returns at once: in a
        bucket every request is in flight together, on disk the ranges are views of the map.
        `pending[i]` is range i's bytes (a read-only memoryview), waited for when first asked;
        a failed request raises there."""
        order = sorted(range(len(ranges)), key=lambda i: (ranges[i][0], ranges[i][1]))
        merged: list[list] = []          # [path, start, end] of each request
        where = [(-1, 0)] * len(ranges)  # (request, offset in it) of each range
        for i in order:
            p, offset, length = ranges[i]
            if length <= 0:
                continue
            last = merged[-1] if merged else None
            if last is not None and last[0] == p and offset <= last[2] + self.max_gap:
                last[2] = max(last[2], offset + length)
            else:
                merged.append(last := [p, offset, offset + length])
            where[i] = (len(merged) - 1, offset - last[1])
        self.requests += len(merged)
        self.bytes_read += sum(end - start for _, start, end in merged)
        requests: list = [None] * len(merged)
        remote: dict[int, tuple[object, list]] = {}  # id(object's client) -> (client, [request])
        for r, (p, start, end) in enumerate(merged):
            handle = self._handle(p)
            if isinstance(handle, memoryview):
                if end > len(handle):
                    _check_length(p, start, end - start, max(0, len(handle) - start))
                requests[r] = handle[start:end]
            else:
                remote.setdefault(id(handle), (handle, []))[1].append(r)
        started = []
        for handle, numbers in remote.values():
            futures, task = handle.start([(merged[r][1], merged[r][2]) for r in numbers])
            started.append(task)
            for r, future in zip(numbers, futures):
                requests[r] = future
        return PendingRanges(ranges, merged, where, requests, started)

    def close(self) -> None:
        self._files.clear()  # maps are unmapped when no array views them any more

    def __getstate__(self):
        return {"max_gap": self.max_gap, "client": self.client}

    def __setstate__(self, state):
        self.__init__(**state)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _check_length(p: str, offset: int, length: int, got: int) -> None:
    if got != length:
        raise OSError(f"{p}: read {got} of {length} bytes at offset {offset}; truncated?")


def _start_gets(fs, gets: list[tuple[str, int, int]]):
    """Starts the ranged GETs [(object path, start, end)] together on the filesystem's event loop
    (gcsfs's async API; one hand-over to its thread for all of them). Returns a future of each
    one's bytes, set as each is answered, and the future of them all (cancel it to stop them);
    for a filesystem without an event loop, functions that read them (and None)."""
    if not getattr(fs, "async_impl", False):
        return [functools.partial(fs.cat_file, path, start=start, end=end) for path, start, end in gets], None

    futures = [concurrent.futures.Future() for _ in gets]

    async def get(future, path, start, end):
        if not future.set_running_or_notify_cancel():
            return  # cancelled before it started
        try:
            future.set_result(await fs._cat_file(path, start=start, end=end))
        except asyncio.CancelledError:
            future.set_exception(OSError(f"{path}: the read of [{start}, {end}) was cancelled"))
            raise
        except Exception as err:  # raised where the bytes are asked for
            future.set_exception(err)

    async def get_all():
        await asyncio.gather(*(get(f, *g) for f, g in zip(futures, gets)))

    return futures, asyncio.run_coroutine_threadsafe(get_all(), fs.loop)


class PendingRanges:
    """The ranges of one `RangeReader.read_ranges` call: `pending[i]` waits for the request that
    holds range i and returns its bytes (a read-only memoryview)."""

    def __init__(self, ranges, merged, where, requests, started=()):
        self._ranges, self._merged, self._where, self._requests = ranges, merged, where, requests
        self._started = [task for task in started if task is not None]

    def __len__(self) -> int:
        return len(self._ranges)

    def _request(self, r: int) -> memoryview:
        data = self._requests[r]
        if not isinstance(data, memoryview):
            p, start, end = self._merged[r]
            data = data.result() if hasattr(data, "result") else data()
            _check_length(p, start, end - start, len(data))
            data = self._requests[r] = memoryview(data).toreadonly()
        return data

    def __getitem__(self, i: int) -> memoryview:
        r, offset = self._where[i]
        length = self._ranges[i][2]
        if r < 0:
            return memoryview(b"")
        return self._request(r)[offset:offset + length]

    def cancel(self) -> None:
        """Stops the requests not yet answered (their ranges then raise OSError)."""
        for task in self._started:
            task.cancel()
