"""Checkpoints of the whole training state, with Orbax, on disk or in a bucket.

A checkpoint holds the arrays of the train state (parameters, optimiser state, BatchNorm
statistics, EMA parameters, feature queues and their fill, step) and a JSON item with the
input pipeline position and the configuration. Orbax writes each checkpoint to a temporary
folder and renames it when complete (in a bucket: marks it complete), so a crash mid-save never
leaves a half checkpoint that would be restored; the last `keep` checkpoints are kept. On
multi-host runs every process calls `save`; only process 0 writes the metadata.

A save returns once the checkpoint is committed, so a save that fails (no space, a read-only
folder, no permission, a bucket error) stops the run at the step it was made for
(`SaveError`, one line naming the cause and the last good checkpoint), its temporary folder
removed and the echoes of Orbax's background writes not shown. Orbax would otherwise report it
only at the next save, the steps between trained with no checkpoint. In a local folder a save
is refused before it starts when the folder cannot take a new entry (read-only, no permission)
or when its free space is below the size of the last checkpoint.

Resuming is safe: `restore_latest` compares the checkpoint's stored configuration with the
run's and refuses (`IncompatibleCheckpointError`, listing the fields) when they differ in
anything that changes the state's shapes or meaning; a checkpoint that cannot be read is named
and the next older one is used.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from msk_jax import storage
from msk_jax.sharding import to_host
from msk_jax.train_step import TrainState


def open_manager(directory: str, **options) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over `directory` for msk_jax's two items: the state's arrays
    and the JSON metadata (training writes through it; evaluation reads through it)."""
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read, or does not fit the configured model."""


class IncompatibleCheckpointError(CheckpointError):
    """The work directory's checkpoint was trained with a configuration this run cannot continue."""


class SaveError(CheckpointError):
    """A checkpoint could not be written (or would not fit); the run stops at that step."""


def state_arrays(state: TrainState) -> dict[str, Any]:
    """The parts of a TrainState that are saved (its static fields are rebuilt from the config)."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "queues": state.queues, "ema_params": state.ema_params}


# Items a checkpoint may hold that no part of the state uses: read (and dropped) when present, never compared.
UNUSED_ITEMS = ("rng",)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(stored: dict, current: dict, allowed: tuple[str, ...] = ()) -> list[str]:
    """'field: old -> new' for every field (outside `allowed`) that differs between two
    configurations given as JSON-style dicts."""
    old, new = _flatten(stored), _flatten(current)
    missing = "(absent)"
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in allowed or key.split(".")[0] in allowed:
            continue
        if old.get(key, missing) != new.get(key, missing):
            lines.append(f"{key}: {json.dumps(old.get(key, missing))} -> {json.dumps(new.get(key, missing))}")
    return lines


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def shape_differences(stored: Any, template: Any) -> list[str]:
    """'path: stored shape -> template shape' for arrays (or array metadata) whose shapes differ,
    or that exist on one side only."""
    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
        return {"/".join(map(_key_name, k)): tuple(v.shape) for k, v in leaves if hasattr(v, "shape")}

    old, new = shapes(stored), shapes(template)
    lines = [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return lines


def _describe_failure(err: BaseException, what: str) -> str:
    """What could not be read: the deepest cause of an Orbax/TensorStore error when it names the
    file (e.g. 'Error reading "params.x/0.0" in OCDBT database at local file
    ".../checkpoints/8/state/": ...'), else `what` (the item being read, e.g. the step's `meta`
    folder) with the error's type and first line (e.g. a JSON decode error of a truncated file)."""
    causes = [err]
    while causes[-1].__cause__ is not None and len(causes) < 10:
        causes.append(causes[-1].__cause__)
    for cause in reversed(causes):
        text = str(cause).strip()
        if text:
            first = text.splitlines()[0][:400]
            if os.path.dirname(what) in first:  # names a file of the step
                return first
            return f"{what}: {type(cause).__name__}: {first}"
    return f"{what}: {type(err).__name__}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class _FailedReadEchoes(logging.Filter):
    """The echoes of a checkpoint read that failed, dropped.

    When one array of a checkpoint cannot be read, Orbax's other pending reads of that
    checkpoint still finish (in TensorStore's threads), some while the failure is still being
    raised and some long after the restore gave up, and each reports to a closed event loop:
    asyncio logs "Task exception was never retrieved" (with a traceback) when the task is
    collected, and callbacks raise "Event loop is closed" through `sys.unraisablehook`. The
    failure itself is reported once, by `restore_latest`.

    Installed when the first restore attempt starts (`reading`) and kept (late echoes come after
    the restore), and narrow: a log record is dropped only when it is such an echo and names the
    folder being read or one whose read failed (or Orbax's own reader); an unraisable only when
    it is a closed loop's or an Orbax read's, and only during a restore attempt or after a failed
    read. Everything else passes unchanged."""

    def __init__(self):
        super().__init__()
        self.folders: set[str] = set()  # whose read failed
        self.active: str | None = None  # being read
        self.previous_hook = None
        self.last_echo = 0.0

    def _dropped(self) -> bool:
        self.last_echo = time.monotonic()
        return True

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "never retrieved" not in message:
            return True
        text = message + (repr(record.exc_info[1]) if record.exc_info and record.exc_info[1] is not None else "")
        folders = self.folders | ({self.active} if self.active else set())
        echo = "reading array index" in text or "orbax" in text or any(f in text for f in folders)
        return not (echo and self._dropped())

    def hook(self, unraisable) -> None:
        if ((self.active or self.folders)
                and ((isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value))
                     or "_read_array_index_and_device_put" in repr(unraisable.object))):
            self._dropped()
            return
        self.previous_hook(unraisable)

    def reading(self, folder: str | None) -> None:
        """A restore attempt of `folder` (a step's folder) starts (None: it ended)."""
        if self.previous_hook is None:
            self.previous_hook = sys.unraisablehook
            sys.unraisablehook = self.hook
            logging.getLogger("asyncio").addFilter(self)
        self.active = None if folder is None else str(folder).rstrip("/")

    def failed(self, folder: str, settle_seconds: float = 0.25, max_wait_seconds: float = 5.0) -> None:
        """A read of `folder` failed: from now on its echoes are dropped. Waits until the other
        pending reads have reported (none for `settle_seconds`, at most `max_wait_seconds`), so
        that they do not overlap the next read."""
        self.folders.add(str(folder).rstrip("/"))
        self.last_echo = start = time.monotonic()
        while time.monotonic() - start < max_wait_seconds:
            gc.collect()  # pending reads' tasks and coroutines report when collected
            if time.monotonic() - self.last_echo >= settle_seconds:
                break
            time.sleep(settle_seconds / 5)


_ECHOES = _FailedReadEchoes()


class _SaveEchoes(logging.Filter):
    """The echoes of a checkpoint save that failed, dropped: Orbax's background threads log the
    failure of each of their writes (with tracebacks), TensorStore's callbacks print "Event loop
    is closed" tracebacks for writes that end after Orbax closed its loop, asyncio reports every
    write nobody waited for ("Task exception was never retrieved"), and Python warns of the
    writes that never started ("coroutine ... was never awaited"), some after the run has
    stopped. The failure itself is reported once, by `Checkpointer.save`.

    While a save runs, what Orbax logs at WARNING or above is held back; a save that succeeds
    lets it through, one that fails drops it. From a failed save on, log records and
    unraisables that name its folder (or are asyncio's unretrieved Orbax tasks), closed-loop
    tracebacks and unawaited-coroutine warnings are dropped too. Everything else passes
    unchanged."""

    LOGGERS = ("absl", "asyncio", "orbax")

    def __init__(self):
        super().__init__()
        self.saving: str | None = None  # the folder being saved
        self.held: list[logging.LogRecord] = []
        self.failed: set[str] = set()  # folders whose save failed
        self.previous_hook = self.previous_excepthook = None

    def _install(self) -> None:
        if self.previous_hook is None:
            self.previous_hook, self.previous_excepthook = sys.unraisablehook, sys.excepthook
            sys.unraisablehook, sys.excepthook = self.hook, self.excepthook
            for name in self.LOGGERS:
                logging.getLogger(name).addFilter(self)

    @staticmethod
    def _text(record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info and record.exc_info[1] is not None else None
        if exc is None:
            return record.getMessage()
        return record.getMessage() + "".join(traceback.format_exception(exc))

    def _echo_of_failure(self, text: str) -> bool:
        return any(f in text for f in self.failed) or ("never retrieved" in text and "orbax" in text.lower())

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Waiting for previous save to complete"):
            return False  # the wait it reports is `save`'s own, on purpose
        text = self._text(record)
        if self.failed and self._echo_of_failure(text):
            return False
        if self.saving is not None and record.levelno >= logging.WARNING and (
                "orbax" in record.pathname or self.saving in text or "never retrieved" in text):
            self.held.append(record)
            return False
        return True

    def _closed_loop(self, exc) -> bool:
        """A write of a save reporting to the event loop Orbax closed (during or after a failed save)."""
        return ((self.saving is not None or bool(self.failed)) and isinstance(exc, RuntimeError)
                and "Event loop is closed" in str(exc))

    def hook(self, unraisable) -> None:
        exc = unraisable.exc_value
        if self._closed_loop(exc) or (self.failed and self._echo_of_failure(repr(exc))):
            return
        self.previous_hook(unraisable)

    def excepthook(self, exc_type, exc, tb) -> None:
        """TensorStore's callbacks print what they raise through `sys.excepthook`."""
        if self._closed_loop(exc):
            return
        self.previous_excepthook(exc_type, exc, tb)

    def start(self, folder: str) -> None:
        self._install()
        self.saving, self.held = folder.rstrip("/"), []

    def succeeded(self) -> None:
        held, self.saving, self.held = self.held, None, []
        for record in held:  # what a successful save logged still shows
            logging.getLogger(record.name).handle(record)

    def failure(self, directory: str, step: int) -> None:
        """The save of `step` into `directory` failed: its echoes are dropped from now on."""
        self.failed.add(storage.join(directory, f"{step}.orbax-checkpoint-tmp"))
        self.failed.add(storage.join(directory, str(step)))
        self.saving, self.held = None, []
        # Its writes that never started are collected unawaited, at the latest when the process ends.
        warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


_SAVE_ECHOES = _SaveEchoes()

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_HTTP_STATUS = re.compile(r"HTTP response code: (\d{3})|\b(?:status|code)[^0-9a-z]{0,3}(\d{3})\b", re.IGNORECASE)
_HTTP_MEANING = {401: "not authenticated", 403: "permission denied", 404: "no such bucket or object",
                 409: "conflict", 412: "precondition failed", 429: "too many requests"}


def describe_write_failure(err: BaseException) -> str:
    """The cause of a failed write, short: the operating system's words for its error number
    ("No space left on device", "Read-only file system", "Permission denied") wherever in the
    chain it is, a bucket's HTTP status with its meaning, else the first line of the deepest
    error."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen and len(chain) < 10:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno and e.strerror:
            return e.strerror
        match = _OS_ERROR_CODE.search(str(e))
        if match:
            return os.strerror(int(match.group(1)))
    for e in chain:
        match = _HTTP_STATUS.search(str(e))
        if match:
            status = int(match.group(1) or match.group(2))
            meaning = _HTTP_MEANING.get(status, "server error" if status >= 500 else "refused")
            return f"{meaning} (HTTP {status}: {str(e).splitlines()[0].split(' with body')[0][:200]})"
    for e in reversed(chain):
        text = str(e).strip()
        if text:
            return f"{type(e).__name__}: {text.splitlines()[0][:300]}"
    return type(chain[0]).__name__


def folder_size(folder: str) -> int:
    """The bytes a local folder takes on its disk (allocated blocks, where the system tells them)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            blocks = getattr(stat, "st_blocks", None)
            total += blocks * 512 if blocks is not None else stat.st_size
    return total


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


_RESTORED, _UNREADABLE, _TRANSIENT, _INCOMPATIBLE = 0, 1, 2, 3

# Storage errors that may pass: timeouts, throttling, server errors, dropped connections (as
# TensorStore, gcsfs and the operating system word them).
_TRANSIENT_TEXT = re.compile(
    r"DEADLINE_EXCEEDED|UNAVAILABLE|RESOURCE_EXHAUSTED|timed out|timeout|connection (reset|aborted|refused|closed)"
    r"|reset by peer|broken pipe|temporar|too many requests|service unavailable|bad gateway|internal server error"
    r"|(status|code|http)[^0-9a-z]{0,12}(429|5\d\d)\b", re.IGNORECASE)


def is_transient(err: BaseException) -> bool:
    """Whether a read failure may pass on a retry (a storage hiccup, not a broken file)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, (TimeoutError, ConnectionError)) or _TRANSIENT_TEXT.search(str(err)):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def agree(value: int) -> list[int]:
    """Every process's `value`, in process order (the same list on every process)."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.array([value], np.int64))).ravel()]


def _indices(statuses: list[int], status: int) -> str:
    return ", ".join(str(i) for i, s in enumerate(statuses) if s == status)


def _who_failed(step: int, statuses: list[int], count: int) -> str:
    if count == 1:
        return f"step {step}"
    return f"step {step} (unreadable on process(es) {_indices(statuses, _UNREADABLE) or _indices(statuses, _TRANSIENT)})"


class Checkpointer:
    """Periodic and final checkpoints in `<workdir>/checkpoints` (a local folder or a URL).

    A read that fails is tried `read_attempts` times in all when the error may pass (with
    backoff from `backoff_seconds`, doubling), twice otherwise."""

    def __init__(self, workdir: str, keep: int = 3, read_attempts: int = 5, backoff_seconds: float = 1.0,
                 clean_partial: bool = False, resumable: tuple[str, ...] = ()):
        """clean_partial: remove the temporary folders of saves that never finished (only a
        process that holds the work directory's lease may: another training may be saving).
        resumable: the configuration fields a resumed run may change (the config file declares
        them, e.g. `configs/howto.py`'s RESUMABLE_CHANGES); any other difference refuses the
        checkpoint."""
        self.resumable = tuple(resumable)
        self.read_attempts, self.backoff_seconds = max(2, read_attempts), backoff_seconds
        self.directory = storage.join(workdir, "checkpoints")
        self.manager = open_manager(self.directory, max_to_keep=keep, create=True,
                                    cleanup_tmp_directories=clean_partial)
        self.save_failed = False
        self._size: int | None = None  # of the last checkpoint on a local disk (what the next one needs)
        self._sized_step: int | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, meta: dict, force: bool = False) -> bool:
        """Saves the state's step and returns once it is committed (False when the manager's
        policy skips the step). Raises SaveError, the run's last good checkpoint named, when it
        would not fit or could not be written; the partial save is removed then."""
        step = int(to_host(state.step))
        self._check_space(step)
        _SAVE_ECHOES.start(self.directory)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_arrays(state)), meta=ocp.args.JsonSave(meta)), force=force)
            self.manager.wait_until_finished()  # the result of this save, before training goes on
        except Exception as err:  # noqa: BLE001 - any failure of the save is reported as one
            self._failed(step, err)
        _SAVE_ECHOES.succeeded()
        if saved:
            self._size, self._sized_step = None, step  # measured when the next save asks
        return bool(saved)

    def resume_note(self, failed_step: int | None = None) -> str:
        """Where a rerun continues from (the newest committed checkpoint other than `failed_step`)."""
        steps = [s for s in self.manager.all_steps() if s != failed_step]
        if not steps:
            return "no checkpoint was saved before it: a rerun starts from step 0"
        return f"the last good checkpoint is step {max(steps)}, from which a rerun resumes once that is fixed"

    def _needed(self) -> int | None:
        """The size of the last checkpoint on a local disk (what a new one takes), None elsewhere."""
        if storage.is_remote(self.directory):
            return None
        if self._size is None:
            step = self._sized_step if self._sized_step is not None else self.latest_step()
            if step is None:
                return None
            self._size, self._sized_step = folder_size(os.path.join(self.directory, str(step))), step
        return self._size

    def _check_space(self, step: int) -> None:
        """Refuses a save into a local folder that cannot take a new entry (read-only, no
        permission, a full disk: Orbax would fail while making the step's folder, and its
        background threads would then wait minutes for that folder before the process could
        end), or whose free space cannot hold the checkpoint. Multi-host: every process refuses
        when any does (the others would wait for it in the save)."""
        problem = None
        if not storage.is_remote(self.directory):
            probe = os.path.join(self.directory, f".{step}.write-probe-{os.getpid()}")
            try:
                os.mkdir(probe)
                os.rmdir(probe)
            except OSError as err:
                problem = (f"the checkpoint of step {step} cannot be written to {self.directory}: "
                           f"{describe_write_failure(err)}")
        needed = self._needed() if problem is None else None
        if needed:
            try:
                stat = os.statvfs(self.directory)
            except OSError:
                stat = None
            free = stat.f_bavail * stat.f_frsize if stat is not None else None
            if free is not None and free < needed:
                problem = (f"no space for the checkpoint of step {step} in {self.directory}: {_megabytes(free)} free, "
                           f"a checkpoint takes {_megabytes(needed)} (step {self._sized_step}'s)")
        if jax.process_count() > 1:
            refused = agree(int(problem is not None))
            if any(refused) and problem is None:
                problem = (f"the checkpoint of step {step} cannot be saved on process(es) "
                           f"{', '.join(str(i) for i, r in enumerate(refused) if r)} (their messages say why)")
        if problem is not None:
            raise SaveError(f"{problem}; {self.resume_note()}.")

    def _failed(self, step: int, err: BaseException) -> None:
        """Reports a failed save as one SaveError, after removing what it left."""
        self.save_failed = True
        _SAVE_ECHOES.failure(self.directory, step)
        cause = describe_write_failure(err)
        left = self._remove_partial(step)
        raise SaveError(f"the checkpoint of step {step} could not be written to {self.directory}: {cause}; "
                        f"{self.resume_note(step)}." + (f" (Could not remove {left}.)" if left else "")) from None

    def _remove_partial(self, step: int) -> str | None:
        """Removes the failed save's temporary folder (process 0; its writes may still be ending,
        so it is removed until it stays gone). Returns what could not be removed."""
        if jax.process_index() != 0:
            return None
        prefix = f"{step}.orbax-checkpoint-tmp"
        remote = storage.is_remote(self.directory)
        left = []
        for attempt in range(20):
            storage.refresh(self.directory)
            left = [storage.join(self.directory, n) for n in storage.listdir(self.directory) if n.startswith(prefix)]
            if not left:
                return None
            for folder in left:
                try:
                    if remote:
                        import fsspec

                        fs, name = fsspec.core.url_to_fs(folder)
                        fs.rm(name, recursive=True)
                    else:
                        shutil.rmtree(folder)
                except (OSError, ValueError):
                    pass
            time.sleep(0.05 * (attempt + 1))
        return ", ".join(left)

    def _item(self, step: int, name: str) -> epath.Path:
        return storage.path(self.directory) / str(step) / name

    def read_meta(self, step: int) -> dict:
        """The step's JSON metadata. Read by this process alone (no barrier with the others),
        as is the state in `restore`, so that a read failing on one process cannot leave the
        others waiting in a collective: `restore_latest` compares the results afterwards."""
        folder = self._item(step, "meta")
        if not folder.exists():
            raise FileNotFoundError(f"{folder} does not exist")
        return dict(ocp.JsonCheckpointHandler().restore(folder, args=ocp.args.JsonRestore()))

    def restore(self, template: TrainState, step: int | None = None,
                stored: dict | None = None, meta: dict | None = None) -> tuple[TrainState, dict]:
        """Restores into the structure, dtypes and shardings of `template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_arrays(template))
        stored = (self._stored_tree(step) if stored is None else stored) or {}
        for name in UNUSED_ITEMS:
            if name in stored:
                abstract[name] = jax.ShapeDtypeStruct(stored[name].shape, stored[name].dtype,
                                                      sharding=template.step.sharding)
        meta = self.read_meta(step) if meta is None else meta
        handler = ocp.StandardCheckpointHandler()
        try:
            restored = handler.restore(self._item(step, "state"), args=ocp.args.StandardRestore(abstract))
        finally:
            handler.close()
        arrays = {k: v for k, v in restored.items() if k not in UNUSED_ITEMS}
        return template.replace(**arrays), meta

    def _stored_tree(self, step: int) -> dict | None:
        """The saved state's array metadata (shapes, dtypes), None when it cannot be read."""
        try:
            metadata = ocp.StandardCheckpointHandler().metadata(self._item(step, "state"))
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore reports it
            return None
        return None if metadata is None else getattr(metadata, "tree", metadata)

    def restore_latest(self, template: TrainState, config: dict,
                       warn: Callable[[str], None] | None = None) -> tuple[TrainState, dict, int] | None:
        """(state, meta, step) from the newest checkpoint that every process can read, None
        without any. All processes take the same decision (they agree on each step tried).

        Each process tries the newest step not yet tried by any: a storage error that may pass
        (a timeout, a 5xx, a reset connection) is retried with backoff, any other failure once
        more on a fresh read; then the processes compare results. All read it: every process
        resumes from it. One could not: all try the next older step. Only after the agreement
        does process 0 move the newer, unreadable steps aside (`<workdir>/unreadable_checkpoints/`).

        Raises IncompatibleCheckpointError when the checkpoint's configuration (or its arrays'
        shapes) differ from `config` (a JSON-style dict) in what the state depends on;
        CheckpointError when checkpoints exist but none can be read, or when storage errors
        outlast the retries (nothing is moved then). Each process reports its own failed reads
        through `warn` (default: stderr); process 0 reports the decision."""
        warn = warn or _warn
        me, count = jax.process_index(), jax.process_count()
        prefix = f"process {me}: " if count > 1 else ""
        local_steps = self.all_steps()
        failed, newest_tried = [], None
        while True:
            untried = [s for s in local_steps if newest_tried is None or s < newest_tried]
            step = max(agree(untried[-1] if untried else -1))  # the newest any process lists
            if step < 0:
                break
            newest_tried = step
            status, result = self._try_restore(step, template, config)
            statuses = agree(status)
            if all(s == _RESTORED for s in statuses):
                if failed:
                    moved = self._move_aside([s for s in self.all_steps() if s > step])  # process 0 moves
                    if me == 0:
                        warn(f"resuming from step {step}, the newest checkpoint in {self.directory} that every "
                             f"process can read; the newer ones were moved to {moved}.")
                state, meta = result
                return state, meta, step
            failed.append(_who_failed(step, statuses, count))
            if status == _INCOMPATIBLE:
                raise result
            if _INCOMPATIBLE in statuses:
                raise IncompatibleCheckpointError(
                    f"process {statuses.index(_INCOMPATIBLE)} found the checkpoint at step {step} in {self.directory} "
                    "trained with another configuration (its message names the fields).")
            if _TRANSIENT in statuses:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory}: storage errors on process(es) "
                    f"{_indices(statuses, _TRANSIENT)} outlasted {self.read_attempts} attempts"
                    + (f" ({result})" if status == _TRANSIENT else "") + "; nothing was moved. Run again when "
                    "the storage answers.")
            if status == _UNREADABLE:
                warn(f"{prefix}checkpoint step {step}: {result}; trying the previous one.")
            elif me == 0:
                warn(f"checkpoint {failed[-1]}; trying the previous one.")
        if failed:
            raise CheckpointError(f"no checkpoint in {self.directory} can be read by every process, so the run does "
                                  "not start from scratch over them: " + "; ".join(failed)
                                  + ". Remove the broken step folders to start again, or use a new --workdir.")
        return None

    def _try_restore(self, step: int, template: TrainState, config: dict):
        """(status, result): (_RESTORED, (state, meta)), (_INCOMPATIBLE, the error), or
        (_UNREADABLE / _TRANSIENT, what failed) after the retries."""
        folder = storage.join(self.directory, str(step))
        try:
            return self._read_with_retries(step, folder, template, config)
        finally:
            _ECHOES.reading(None)

    def _read_with_retries(self, step: int, folder: str, template: TrainState, config: dict):
        for attempt in range(1, self.read_attempts + 1):
            what = storage.join(folder, "meta")
            _ECHOES.reading(folder)
            try:
                meta = self.read_meta(step)
                stored = self._check_compatible(step, meta, config, template)
                what = storage.join(folder, "state")
                return _RESTORED, self.restore(template, step, stored, meta)
            except IncompatibleCheckpointError as err:
                return _INCOMPATIBLE, err
            except Exception as err:  # noqa: BLE001 - any read failure: retried, then reported
                _ECHOES.failed(folder)
                described = _describe_failure(err, what)
                transient = is_transient(err)
                if not transient and attempt >= 2:  # failed twice: unreadable
                    return _UNREADABLE, described
                if attempt == self.read_attempts:
                    return (_TRANSIENT if transient else _UNREADABLE), described
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1) if transient else 0.0)
                self.manager.reload()  # the next attempt reads afresh
        raise AssertionError("unreachable")

    def _move_aside(self, steps: list[int]) -> str:
        """Moves unreadable step folders out of the way (to `<workdir>/unreadable_checkpoints/`),
        so the run can save those steps again and a later restart does not trip over them."""
        target = storage.join(storage.path(self.directory).parent, "unreadable_checkpoints")
        error = None
        if jax.process_index() == 0:
            try:
                storage.makedirs(target)
                for step in steps:
                    storage.move(storage.join(self.directory, str(step)),
                                 storage.join(target, f"{step}.{int(time.time())}"))
            except OSError as err:  # reported on every process, after they all got here
                error = err
        if agree(error is not None)[0]:
            raise CheckpointError(f"could not move the unreadable checkpoints {steps} of {self.directory} to "
                                  f"{target}" + (f": {error}" if error else " (see process 0)")
                                  + "; move or remove them, then run again.")
        storage.refresh(self.directory)  # every process lists the folder afresh (gcsfs caches listings)
        self.manager.reload()
        return target

    def _check_compatible(self, step: int, meta: dict, config: dict, template: TrainState) -> dict | None:
        """Raises IncompatibleCheckpointError on a differing configuration or array shape; returns
        the saved state's array metadata (`_stored_tree`, read once for the restore too)."""
        stored = meta.get("config")
        stored = json.loads(stored) if isinstance(stored, str) else stored
        problems = config_differences(stored, config, self.resumable) if stored is not None else []
        tree = None
        if not problems:
            tree = self._stored_tree(step)
            if tree is not None:
                arrays = {k: v for k, v in dict(tree).items() if k not in UNUSED_ITEMS}
                problems = shape_differences(arrays, state_arrays(template))
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} was trained with another configuration "
                f"(checkpoint -> this run):\n  " + "\n  ".join(shown) +
                "\nEither resume with the configuration it was trained with, or start a new run with "
                "another --workdir.")
        return tree

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception:  # noqa: BLE001 - after a failed save (already reported), closing is best effort
            if not self.save_failed:
                raise
