"""The work directory's lease: one training at a time writes a work directory.

A training holds `<workdir>/lease.json` while it runs: the host, the process id (and, where
Linux tells it, that process's start time, so that a reused pid is not taken for the holder),
when the lease was taken and when it was last refreshed, and a random token. A background thread
refreshes it every `refresh_seconds`; the training removes it when it ends. A second training of
the same work directory stops with one line naming the holder (host, pid, since when).

A lease is stale, and the next training takes it over with a one-line warning, when its holder's
process is gone (a holder on this host) or when it was not refreshed for `stale_seconds` (any
host: a holder on another host cannot be asked). A holder whose lease was taken over learns it
at its next refresh (`lost`), and the training stops.

Two trainings that start together cannot both take the lease. On disk the lease is read and
replaced under an exclusive lock of the work directory (`flock`, released by the kernel however
the holder ends) and written to a temporary file renamed over it. In a bucket (gs://) every write
is conditional on the object's generation, as Cloud Storage offers it: a new lease only where
none exists (generation 0), a refresh, take-over or release only of the generation that was
read; of two hosts that race, one write fails (HTTP 412) and that host reads the winner's lease.
Other remote file systems get plain writes (no such guarantee). Multi-host runs: process 0
holds the lease for all (`msk_jax.train`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
import threading
import time
import uuid

from msk_jax import storage

NAME = "lease.json"
REFRESH_SECONDS = 30.0
STALE_SECONDS = 300.0  # ten refreshes missed: the holder is gone or hung


class LeaseError(RuntimeError):
    """The work directory is leased by another training, or its lease cannot be written."""


class _Conflict(Exception):
    """A conditional write found another generation of the lease than the one it was based on."""


def _now() -> float:
    return time.time()


def _process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat; None
    where there is no /proc): with the pid, it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


def _alive(pid: int, start: str | None) -> bool:
    """Whether the process `pid` (started at `start`, when known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    if start is not None:
        current = _process_start(pid)
        if current is not None and current != start:
            return False
    return True


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def describe(holder: dict) -> str:
    """'host H, pid P, since T, refreshed N s ago'."""
    text = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    if isinstance(holder.get("since"), (int, float)):
        text += f", since {_when(holder['since'])}"
    if isinstance(holder.get("refreshed"), (int, float)):
        text += f", refreshed {_duration(_now() - holder['refreshed'])} ago"
    return text


def stale_reason(holder: dict | None, stale_seconds: float) -> str | None:
    """Why a lease no longer holds (None while it does)."""
    if not isinstance(holder, dict) or not isinstance(holder.get("refreshed"), (int, float)):
        return "it cannot be read"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _alive(holder["pid"], holder.get("pid_start")):
            return f"its process {holder['pid']} is gone"
    age = _now() - holder["refreshed"]
    if age > stale_seconds:
        return f"it was not refreshed for {_duration(age)} (more than {_duration(stale_seconds)})"
    return None


# --- where the lease lives -------------------------------------------------------------------------

class _LocalFile:
    """The lease on a local (or mounted) file system: read and replaced under an exclusive
    `flock` of the work directory; written to a temporary file that is renamed over it."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, NAME)

    @contextlib.contextmanager
    def locked(self):
        descriptor = os.open(self.folder, os.O_RDONLY)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            except OSError as err:  # a file system without flock (some network ones): unlocked
                if err.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def read(self):
        """(content or None, version); the version is unused on disk (the lock orders writers)."""
        try:
            with open(self.path, "rb") as f:
                return f.read(), None
        except FileNotFoundError:
            return None, None

    def write(self, data: bytes, version, create: bool):
        descriptor, tmp = tempfile.mkstemp(prefix=f".{NAME}.", dir=self.folder)
        try:
            with os.fdopen(descriptor, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return None

    def delete(self, version) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _GCSObject:
    """The lease as a Cloud Storage object, every write conditional on its generation."""

    def __init__(self, folder: str):
        import fsspec

        self.fs, path = fsspec.core.url_to_fs(storage.join(folder, NAME))
        self.bucket, self.key, _ = self.fs.split_path(path)
        self.path = storage.join(folder, NAME)

    @contextlib.contextmanager
    def locked(self):
        yield  # the generations order the writers

    def read(self):
        try:
            headers, body = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None, None
        return body, headers.get("x-goog-generation")

    def write(self, data: bytes, version, create: bool):
        from urllib.parse import quote

        condition = "0" if create else version
        try:
            result = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o",
                                  uploadType="media", name=self.key, ifGenerationMatch=condition,
                                  headers={"Content-Type": "application/octet-stream"}, data=data, json_out=True)
        except FileExistsError as err:  # 412: another generation is there now
            raise _Conflict() from err
        except FileNotFoundError as err:  # a refresh of a lease someone removed
            raise _Conflict() from err
        return str(result.get("generation")) if isinstance(result, dict) else None

    def delete(self, version) -> None:
        with contextlib.suppress(FileNotFoundError, FileExistsError):  # gone, or no longer ours
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=version)


class _OtherRemote(_GCSObject):
    """A remote file system without generations: plain reads and writes."""

    def __init__(self, folder: str):
        self.path = storage.join(folder, NAME)

    def read(self):
        return (storage.read_bytes(self.path), None) if storage.exists(self.path) else (None, None)

    def write(self, data: bytes, version, create: bool):
        storage.path(self.path).write_bytes(data)

    def delete(self, version) -> None:
        with contextlib.suppress(FileNotFoundError):
            storage.path(self.path).unlink()


def _store(workdir: str):
    if not storage.is_remote(workdir):
        return _LocalFile(workdir)
    if os.fspath(workdir).startswith("gs://"):
        return _GCSObject(workdir)
    return _OtherRemote(workdir)


# --- the lease -------------------------------------------------------------------------------------

class Lease:
    """This process's lease of a work directory (`acquire`)."""

    def __init__(self, workdir: str, stale_seconds: float = STALE_SECONDS, refresh_seconds: float = REFRESH_SECONDS):
        self.workdir, self.stale_seconds, self.refresh_seconds = workdir, stale_seconds, refresh_seconds
        self._store = _store(workdir)
        self.path = self._store.path
        now = _now()
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "since": now, "refreshed": now, "token": uuid.uuid4().hex}
        self._version = None
        self.lost: str | None = None  # set when another training took the lease over
        self._released = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, workdir: str, warn=None, **options) -> "Lease":
        """Takes the lease of `workdir` (taking over a stale one, with `warn(message)`), or raises
        LeaseError naming the training that holds it. Starts refreshing it."""
        lease = cls(workdir, **options)
        lease._take(warn or (lambda message: None))
        lease._start_refreshing()
        return lease

    def _encoded(self) -> bytes:
        return (json.dumps(self.holder, indent=1) + "\n").encode()

    def _take(self, warn) -> None:
        for _ in range(5):  # a conflict means another start wrote in between: read again
            try:
                with self._store.locked():
                    data, version = self._store.read()
                    if data is None:
                        self._version = self._store.write(self._encoded(), None, create=True)
                        return
                    holder = _parse(data)
                    if isinstance(holder, dict) and holder.get("token") == self.holder["token"]:
                        self._version = version  # ours (a write whose answer was lost, then retried)
                        return
                    reason = stale_reason(holder, self.stale_seconds)
                    if reason is None:
                        raise LeaseError(
                            f"{self.workdir} is in use by another training: {describe(holder)} (lease {self.path}); "
                            f"stop that one first, or train into another --workdir (a lease not refreshed for "
                            f"{_duration(self.stale_seconds)} is taken over).")
                    self._version = self._store.write(self._encoded(), version, create=False)
                    shown = describe(holder) if isinstance(holder, dict) else "unreadable"
                    warn(f"took over the lease of {self.workdir} from a training that no longer holds it "
                         f"({shown}): {reason}.")
                    return
            except _Conflict:
                continue
            except LeaseError:
                raise
            except Exception as err:  # noqa: BLE001 - any storage failure (OSError, a bucket's HTTP error)
                raise LeaseError(f"cannot write the lease {self.path}: {_cause(err)}") from None
        raise LeaseError(f"{self.workdir}: the lease {self.path} kept changing while it was being taken; "
                         "another training is starting there.")

    def refresh(self) -> None:
        """Writes the lease again with the current time; sets `lost` (and stops refreshing) when
        another training has taken it over. Storage errors pass (the next refresh tries again)."""
        with self._lock:
            if self.lost is not None or self._released:
                return
            try:
                with self._store.locked():
                    data, version = self._store.read()
                    holder = _parse(data) if data is not None else None
                    ours = isinstance(holder, dict) and holder.get("token") == self.holder["token"]
                    if data is not None and not ours:
                        self.lost = (f"the lease of {self.workdir} was taken over by another training "
                                     f"({describe(holder) if isinstance(holder, dict) else 'unreadable'})")
                        self._stop.set()
                        return
                    self.holder["refreshed"] = _now()
                    self._version = self._store.write(self._encoded(), version, create=data is None)
            except _Conflict:
                pass  # changed in between: the next refresh reads who holds it
            except Exception:  # noqa: BLE001 - a storage hiccup: the next refresh tries again
                pass

    def check(self) -> None:
        """Raises LeaseError when the lease was lost to another training."""
        if self.lost is not None:
            raise LeaseError(f"{self.lost}; this run stops so that two trainings do not write {self.workdir}.")

    def _start_refreshing(self) -> None:
        def loop():
            while not self._stop.wait(self.refresh_seconds):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="msk-lease-refresh", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops refreshing and removes the lease if it is still this process's."""
        self._stop.set()
        with self._lock:
            if self.lost is not None or self._released:
                return
            self._released = True
            with contextlib.suppress(Exception):  # best effort: a lease left behind is taken over later
                with self._store.locked():
                    data, version = self._store.read()
                    holder = _parse(data) if data is not None else None
                    if isinstance(holder, dict) and holder.get("token") == self.holder["token"]:
                        self._store.delete(version)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _cause(err: BaseException) -> str:
    """An error's words on one line (the operating system's for an OSError with a number)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return " ".join(str(err).split()) or type(err).__name__


def _parse(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def holder_of(workdir: str) -> dict | None:
    """The lease of `workdir` as its file holds it (None when there is none or it cannot be read)."""
    data, _ = _store(workdir).read()
    return _parse(data) if data is not None else None
