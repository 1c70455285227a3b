"""The training input pipeline: deterministic, resumable, sharded by process, prefetched.

The stream is global: the concatenation of epochs, epoch e a sequence of slots, the videos in
the order `permutation(seed, e)` cut into batches of `videos_per_batch` slots (a last partial
batch is dropped). Process p of P fills the p-th slice of every batch, so the processes read
disjoint shards and together build exactly the global batch a single process would. A slot
whose video cannot be read (missing or truncated files, no ASR segments, ...) takes a
replacement drawn from (seed, epoch, slot, attempt), tried until one can be read. Any failure of
a reader counts (a `DataError`, any other exception it raises, a worker process that dies on a
video, e.g. killed for memory): the video is skipped by name, and `summary()` names each skipped
video once with its reason. A worker that dies takes the videos it was reading with it: the pool
is replaced and those videos are read again one at a time, so only a video that kills a worker
twice is skipped, with the same replacement a `DataError` gets. So an odd file never ends a run,
and a requeued run meets the same skips at the same places. Each video yields `n_clips` clips sampled
with a generator seeded by (seed, epoch, video index). So a batch depends on nothing but the
seed and its place in the stream: not on threads, worker processes, the process count, or what
was skipped elsewhere.

`state()` is the stream position after the last batch returned (epoch and slot, the same on
every process); `restore(state)` continues from there, on any number of processes: a resumed
run sees exactly the batches an uninterrupted one would, even on another host count.

Videos are loaded `prefetch` batches ahead by `workers` threads, or with `processes=True` by
worker processes (spawned; each unpickles the source once, so a source pickles as the paths and
settings it was made from and opens itself in the worker, as every source of this package does):
Python threads share one interpreter lock and barely scale, processes do. The batches are the
same either way.

With processes and `batch_tasks=True`, the batches are assembled in shared memory by the
workers: a task is a run of consecutive videos of one batch (`videos_per_task`; by default the
batch cut into as few runs as keep every worker busy with the `prefetch + 1` batches in flight),
whose clips the worker writes straight into their rows of a batch-shaped buffer (with
`source.sample_videos(requests, outs)` where the source has it, else `sample_clips(index, rng,
out=...)` per video); a slot whose video cannot be read takes its replacements there too. The
main process only hands out tasks and counts what was skipped: the batch it returns is views of
the buffer, no copy. Batch lifetime: the buffers are reused in turn, so a batch returned by
`next()` stays unchanged until `keep_batches` more batches have been returned (also across
`restore`); the call after that may overwrite it. Copy what must live longer (`lends_batches`
says whether this applies: threads, and processes with `batch_tasks=False`, return arrays the
caller owns); `msk_jax.train.DeviceBatches` keeps to it. With `batch_tasks=False` (the default)
a worker writes one video's clips into a slot of shared memory and the main process
concatenates the slots into the batch.

Spawned workers import the program's main module, so a script that starts a process pipeline
needs the usual `if __name__ == "__main__":` guard. Workers ignore SIGTERM and SIGINT: a cluster
signals every process of a job, and the training process decides when to stop (after saving a
checkpoint), then shuts its workers down; a worker exits by itself when its training process dies.
The shared memory is freed when the pipeline closes, or by multiprocessing's resource tracker when
the training process dies; a kill of the whole process group (or cgroup) takes the tracker too, so
the segments are named after the process that made them (`msk_jax_<its pid namespace, pid and
start time>_...` in /dev/shm), and a pipeline that starts worker processes removes those of dead
processes of its host.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import inspect
import mmap
import multiprocessing
import os
import secrets
import signal
import sys
import threading
import time
from multiprocessing import shared_memory
from typing import Iterator, Protocol

import numpy as np

from msk_jax.data import batch
from msk_jax.errors import DataError


class InputPositionError(ValueError):
    """An input layout or saved position this run cannot continue (says why and what to do)."""



class VideoSource(Protocol):
    """Random access to videos: `len(source)` and `source.sample_clips(index, rng)`. A source
    whose `sample_clips` also takes `out=` (arrays to write the clips into, as
    `howto100m.sample_clips` does) lets worker processes write straight into shared memory; one
    with `sample_videos(requests, outs)` (a list of `(index, rng)` and of such arrays; per video
    the clips or the DataError) gets a task's videos in one call."""

    def __len__(self) -> int: ...

    def sample_clips(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]: ...


class _SharedSlots:
    """Shared memory cut into `count` slots of the same arrays (`layout`: key -> (shape, dtype)):
    one video's clips each, or one batch each. Created by the pipeline, attached to by the worker
    processes. The arrays are views of a memory map of its own, which lives as long as any view
    does: a batch the pipeline returned stays readable after `close` (which frees the name)."""

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], str]], count: int, name: str | None = None):
        self.layout, self.count = layout, count
        self.offsets, size = {}, 0
        for key, (shape, dtype) in layout.items():
            self.offsets[key] = size
            size += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 64) * 64
        self.slot_bytes = size
        if name is None:
            self.memory = shared_memory.SharedMemory(_segment_name(), create=True, size=max(1, size * count))
        else:
            # Spawned workers share the creating process's resource tracker, which unlinks the
            # memory if the pipeline's process dies without `close`.
            self.memory = shared_memory.SharedMemory(name=name)
        descriptor = getattr(self.memory, "_fd", -1)
        if descriptor >= 0:  # POSIX: a map of our own, unmapped when its last view goes
            # Populated up front (Linux): each process then pays its page faults of the whole
            # memory once, here, instead of inside the clip writes of its first tasks.
            self.buffer = mmap.mmap(descriptor, max(1, size * count),
                                    flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            self.memory.close()
        else:
            self.buffer = self.memory.buf

    def views(self, slot: int, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """The arrays of `slot`, or rows [lo, hi) of their first axis."""
        base, views = slot * self.slot_bytes, {}
        for key, (shape, dtype) in self.layout.items():
            offset = base + self.offsets[key]
            if rows is not None:
                offset += rows[0] * int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
                shape = (rows[1] - rows[0], *shape[1:])
            views[key] = np.ndarray(shape, dtype, self.buffer, offset)
        return views

    def close(self, unlink: bool) -> None:
        self.buffer = None
        try:
            self.memory.close()
        except BufferError:  # no map of our own: views still use the memory; it goes with them
            pass
        if unlink:
            self.memory.unlink()


# Shared memory is named by its owner: a process killed with its whole group (a cgroup or
# process-group SIGKILL also kills the resource tracker that would unlink it) leaves its segments in
# /dev/shm until a reboot, and the next pipeline on the host can tell them from live ones.
SEGMENT_PREFIX = "msk_jax_"
SEGMENT_FOLDER = "/dev/shm"


def _start_time(pid: int | str) -> int | None:
    """When a process of this pid namespace started (clock ticks after boot; Linux), None when it
    is gone or a zombie (which reads no memory)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner() -> str | None:
    """'<pid namespace>_<pid>_<start time>' of this process (None without /proc): the start time
    tells a reused pid from the owner, the namespace a process of this container from one of
    another container that shares /dev/shm."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    start = _start_time("self")
    return None if start is None else f"{namespace}_{os.getpid()}_{start}"


def _segment_name() -> str:
    """A new segment's name: the prefix, its owner (this process) and a random part."""
    return f"{SEGMENT_PREFIX}{_owner() or os.getpid()}_{secrets.token_hex(4)}"


def sweep_dead_segments(folder: str = SEGMENT_FOLDER) -> list[str]:
    """Removes this package's shared-memory segments whose owner, a process of this pid
    namespace, is dead; returns their names. Those of live processes, of other namespaces and of
    other users stay."""
    own = _owner()
    if own is None or not os.path.isdir(folder):
        return []
    namespace, removed = own.split("_")[0], []
    for name in sorted(os.listdir(folder)):
        parts = name[len(SEGMENT_PREFIX):].split("_")
        if not name.startswith(SEGMENT_PREFIX) or len(parts) != 4 or parts[0] != namespace \
                or not (parts[1].isdigit() and parts[2].isdigit()):
            continue
        if _start_time(int(parts[1])) == int(parts[2]):
            continue  # its owner lives
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:  # another user's, or removed by another process meanwhile
            continue
        removed.append(name)
    return removed


def video_rng(seed: int, epoch: int, video_index: int) -> np.random.Generator:
    """The generator of one video's clips: the same in a thread, a worker process or another host."""
    return np.random.default_rng([seed, epoch, int(video_index)])


_WORKER: dict = {}  # in a worker process: its source, the attached slots and the rows of a video


def _exit_with_parent(parent: int) -> None:
    """A worker whose training process was killed (SIGKILL, OOM) exits within a second instead of
    waiting forever; its shared memory is then freed by the resource tracker."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="msk-data-parent-watch", daemon=True).start()


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _start_worker(source: VideoSource, memory_name: str, layout: dict, count: int, parent: int,
                  rows_per_video: int) -> None:
    # A preemption signals the whole process group: the training process handles it (saves and
    # stops at a step boundary, then shuts the pool down); a worker that died here would break it.
    # A worker starts with these signals blocked (`TrainingPipeline._submit`), so one that came
    # while it started is dropped here.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _exit_with_parent(parent)
    _WORKER["source"] = source
    _WORKER["slots"] = _SharedSlots(layout, count, name=memory_name)
    _WORKER["rows_per_video"] = rows_per_video
    # Sources that take `out=` (the readers of this package) write the clips into the slot itself.
    _WORKER["writes_out"] = "out" in inspect.signature(source.sample_clips).parameters


def slot_candidate(seed: int, epoch: int, slot: int, attempt: int, num_videos: int) -> int:
    """The replacement video of a slot whose earlier candidates could not be read (attempt >= 1)."""
    return int(np.random.default_rng([seed, epoch, slot, attempt]).integers(num_videos))


def video_name(source, video: int) -> str:
    """How a failure names a video: its csv path where the source has one."""
    try:
        return str(source.paths[video])
    except (AttributeError, IndexError, TypeError, KeyError):
        return f"video {video}"


def failure(source, video: int, err: BaseException) -> tuple[str, str, str]:
    """The (path, problem, reason) fields of a read that failed: a DataError's own; for any other
    exception, the video's name, the exception's first line and its type."""
    if isinstance(err, DataError):
        return err.path, err.problem, err.reason
    lines = str(err).strip().splitlines()
    return (video_name(source, video), f"the reader raised {type(err).__name__}: {lines[0][:200] if lines else ''}",
            f"reader error ({type(err).__name__})")


WORKER_DIED = "worker died"


def _died(source, video: int) -> tuple[str, str, str]:
    return (video_name(source, video), "a worker process died reading it twice (killed, e.g. for memory, or "
            "crashed)", WORKER_DIED)


def _sample_slot(source, seed: int, epoch: int, slot: int, first_video: int, max_attempts: int, out=None,
                 first_attempt: int = 0, dead: frozenset = frozenset()):
    """The clips of one slot: its video, or the first readable replacement. Returns (clips or
    None when `max_attempts` candidates failed, [failure fields of each failure]); from
    `first_attempt` on (those before it failed already). Videos in `dead` killed a worker before
    and are not read again."""
    errors, video = [], first_video
    for attempt in range(first_attempt, max_attempts):
        if attempt:
            video = slot_candidate(seed, epoch, slot, attempt, len(source))
        if video in dead:
            errors.append(_died(source, video))
            continue
        rng = video_rng(seed, epoch, video)
        try:
            clips = source.sample_clips(video, rng) if out is None else source.sample_clips(video, rng, out=out)
        except Exception as err:  # any failure of a reader skips the video, never the run
            errors.append(failure(source, video, err))
            continue
        return clips, errors
    return None, errors


def _write(clips: dict, views: dict[str, np.ndarray], slot: int) -> None:
    """Copies into `views` the arrays of `clips` that the source did not write there itself."""
    for key, view in views.items():
        value = clips[key]
        if value is view or (value.shape == view.shape and value.strides == view.strides
                             and value.__array_interface__["data"][0] == view.__array_interface__["data"][0]):
            continue
        if value.shape != view.shape:
            raise ValueError(f"TrainingPipeline: slot {slot} gave '{key}' of shape {value.shape}, "
                             f"the first video {view.shape}; worker processes need fixed clip shapes.")
        view[...] = value


def _load_into_slot(seed: int, epoch: int, slot: int, first_video: int, max_attempts: int, memory_slot: int,
                    first_attempt: int = 0, dead: frozenset = frozenset()):
    """In a worker process: one slot's clips into shared-memory slot `memory_slot`, from candidate
    `first_attempt` on. Returns (whether it was filled, [failure fields], CPU seconds, bytes the
    source read)."""
    cpu, source = time.process_time(), _WORKER["source"]
    read = getattr(source, "bytes_read", 0)
    views = _WORKER["slots"].views(memory_slot)
    clips, errors = _sample_slot(source, seed, epoch, slot, first_video, max_attempts,
                                 out=views if _WORKER["writes_out"] else None, first_attempt=first_attempt, dead=dead)
    if clips is not None:
        _write(clips, views, slot)
    return clips is not None, errors, time.process_time() - cpu, getattr(source, "bytes_read", 0) - read


def _fill_rows(seed: int, epoch: int, buffer: int, position: int, slots: list[tuple[int, int, int]],
               max_attempts: int, dead: frozenset = frozenset()):
    """In a worker process: the clips of consecutive slots of one batch ((global slot, candidate
    video, its attempt) each, the first at video `position` of the batch), written into their rows
    of batch buffer `buffer`; a slot whose candidate cannot be read takes its next replacements
    here. Returns ([(whether the slot was filled, [failure fields]) per slot], CPU seconds, bytes
    read)."""
    cpu, source = time.process_time(), _WORKER["source"]
    read = getattr(source, "bytes_read", 0)
    n = _WORKER["rows_per_video"]
    rows = _WORKER["slots"].views(buffer, (position * n, (position + len(slots)) * n))
    outs = [{key: view[i * n:(i + 1) * n] for key, view in rows.items()} for i in range(len(slots))]
    requests = [(video, video_rng(seed, epoch, video)) for _, video, _ in slots]
    first = None
    if any(video in dead for video, _ in requests):  # each is read alone below, past the dead ones
        first = [DataError(*_died(source, video)) if video in dead else None for video, _ in requests]
    elif hasattr(source, "sample_videos"):
        try:
            first = source.sample_videos(requests, outs)
        except Exception:  # one video broke the shared read: each is read alone below, to find it
            first = None
    if first is None or None in first:
        given, first = first or [None] * len(requests), []
        for (video, rng), out, known in zip(requests, outs, given):
            if known is not None:
                first.append(known)
                continue
            try:
                first.append(source.sample_clips(video, rng, out=out) if _WORKER["writes_out"]
                             else source.sample_clips(video, rng))
            except Exception as err:
                first.append(err)
    done = []
    for (slot, video, attempt), out, clips in zip(slots, outs, first):
        errors = []
        if isinstance(clips, BaseException):
            errors.append(failure(source, video, clips))
            clips, more = _sample_slot(source, seed, epoch, slot, video, max_attempts,
                                       out=out if _WORKER["writes_out"] else None, first_attempt=attempt + 1,
                                       dead=dead)
            errors.extend(more)
        if clips is not None:
            _write(clips, out, slot)
        done.append((clips is not None, errors))
    return done, time.process_time() - cpu, getattr(source, "bytes_read", 0) - read


class TrainingPipeline:
    """Batches of training clips; iterate it, save `state()`, `restore()` it.

    processes: load in worker processes instead of threads. batch_tasks (with processes): the
    workers assemble the batches in shared memory, in tasks of `videos_per_task` consecutive
    videos (default: the batch over ceil(workers / (prefetch + 1)) tasks), and a returned batch is
    views of a buffer that stays unchanged until `keep_batches` more batches have been returned
    (`lends_batches`); False: one video per task, concatenated here into arrays the caller owns.
    The batches are the same bits either way."""

    def __init__(self, source: VideoSource, videos_per_batch: int, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2, workers: int = 2,
                 processes: bool = False, keys: tuple[str, ...] = batch.KEYS, max_attempts: int = 1000,
                 batch_tasks: bool = False, videos_per_task: int | None = None, keep_batches: int = 2):
        if len(source) == 0:
            raise ValueError("TrainingPipeline: the video source is empty.")
        if videos_per_batch % process_count:
            raise InputPositionError(
                f"videos_per_batch={videos_per_batch} cannot be split over {process_count} processes (each "
                "reads an equal slice of every batch): run on a number of processes that divides it.")
        if not 0 <= process_index < process_count:
            raise ValueError(f"TrainingPipeline: process_index {process_index} not in [0, {process_count}).")
        self.source, self.seed, self.keys = source, seed, keys
        self.videos_per_batch = videos_per_batch
        self.process_index, self.process_count = process_index, process_count
        self.local_videos = videos_per_batch // process_count
        if len(source) < videos_per_batch:
            raise ValueError(f"TrainingPipeline: {len(source)} videos are fewer than videos_per_batch={videos_per_batch}.")
        self.batches_per_epoch = len(source) // videos_per_batch
        self.prefetch, self.max_attempts = prefetch, max_attempts
        self.workers, self.processes = max(1, workers), processes
        self.batch_tasks = processes and batch_tasks
        # By default a batch is cut into as few tasks as keep every worker busy with the batches in
        # flight (prefetch + 1): whole batches when there are no more workers than those.
        tasks_per_batch = -(-self.workers // (prefetch + 1))
        self.videos_per_task = max(1, min(self.local_videos,
                                          videos_per_task or -(-self.local_videos // tasks_per_batch)))
        self.keep_batches = max(0, keep_batches)
        self._executor = None if processes else concurrent.futures.ThreadPoolExecutor(
            self.workers, thread_name_prefix="msk-data")
        self._slots: _SharedSlots | None = None
        self._free_slots: collections.deque = collections.deque()
        self._epoch, self._batch = 0, 0          # stream position after the last returned batch
        # Per slot (epoch, slot, memory slot, future); with batch tasks per batch (epoch, batch,
        # buffer, [(slots, future) per task]).
        self._pending: collections.deque = collections.deque()
        self._turn, self._returned_turn = 0, -1  # batch buffers are used in turns: turn % count
        self._next = (0, 0)                      # (epoch, local index) of the next slot to submit
        self._cached_epoch, self._cached_order = -1, np.empty(0, int)
        self.skipped: collections.Counter = collections.Counter()  # reason -> videos skipped for it
        self.skipped_videos: dict[str, tuple[str, str]] = {}  # video (file) -> (reason, problem), once each
        self.skip_events = 0                                   # failed reads, a video met twice counts twice
        self.worker_restarts = 0
        self._dead: set[int] = set()  # videos that killed a worker twice: never handed out again
        self.clips_served = 0
        self.worker_cpu_seconds = 0.0  # CPU time of the worker processes (threads count in this process's)
        self.worker_bytes_read = 0     # bytes the worker processes' sources read
        self._start_time = time.monotonic()

    # --- stream -------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            self._cached_epoch = epoch
            self._cached_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        return self._cached_order

    def _slot(self, local_index: int) -> int:
        """The global slot (index into the epoch's order) of this process's `local_index`-th."""
        batch, offset = divmod(local_index, self.local_videos)
        return batch * self.videos_per_batch + self.process_index * self.local_videos + offset

    def _load(self, epoch: int, slot: int, first_video: int):
        """One slot's clips (threads and the main process): (clips or None, [DataError fields])."""
        clips, errors = _sample_slot(self.source, self.seed, epoch, slot, first_video, self.max_attempts)
        return (None if clips is None else {k: clips[k] for k in self.keys}), errors

    @property
    def lends_batches(self) -> bool:
        """Whether the returned batches are views of buffers the pipeline reuses (they stay
        unchanged until `keep_batches` more batches have been returned)."""
        return self.batch_tasks

    def _start_processes(self, epoch: int, slot: int) -> None:
        """Learns the clip shapes from the first readable video, then starts the workers."""
        example, errors = self._load(epoch, slot, int(self._order(epoch)[slot]))
        if example is None:
            raise RuntimeError(f"TrainingPipeline: none of {len(errors)} videos could be read (e.g. "
                               f"{DataError(*errors[-1])}).")
        rows_per_video = len(example[self.keys[0]])
        if self.batch_tasks:
            # A buffer per batch in flight, the one returned and the `keep_batches` before it.
            count = self.prefetch + 1 + self.keep_batches
            layout = {k: ((self.local_videos * len(v), *v.shape[1:]), v.dtype.str) for k, v in example.items()}
        else:
            count = self.local_videos * (2 + self.prefetch)
            layout = {k: (v.shape, v.dtype.str) for k, v in example.items()}
            self._free_slots.extend(range(count))
        swept = sweep_dead_segments()
        if swept:
            print(f"input: removed {len(swept)} shared-memory segment{'s' * (len(swept) != 1)} of killed runs from "
                  f"{SEGMENT_FOLDER}", file=sys.stderr, flush=True)
        self._slots = _SharedSlots(layout, count)
        self._worker_args = (self.source, self._slots.memory.name, self._slots.layout, count, os.getpid(),
                             rows_per_video)
        self._new_pool()

    def _new_pool(self) -> None:
        self._executor = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=self._worker_args)

    def _replace_pool(self) -> None:
        """A new pool after a worker died (the executor then ends its other workers too); the
        shared memory stays."""
        # The executor ends a broken pool's workers with SIGTERM, which ours ignore: kill them.
        for process in list((getattr(self._executor, "_processes", None) or {}).values()):
            process.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.worker_restarts += 1
        self._new_pool()

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        """A task for the worker processes. A submit may start a worker, which inherits the signal
        mask: SIGTERM and SIGINT are blocked meanwhile, so a worker cannot die of one before it
        ignores them (here they wait, undelivered, for the moment the mask is restored). A pool
        that a dead worker broke since the last task is replaced first."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            try:
                return self._executor.submit(fn, *args)
            except concurrent.futures.process.BrokenProcessPool:
                self._replace_pool()
                return self._executor.submit(fn, *args)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _alone(self, fn, args_at, slot: int, video: int, epoch: int) -> tuple:
        """Reads one slot in a worker of its own (after a worker died on a task holding it):
        `fn(*args_at(candidate, attempt))`, its result once it lives. A candidate whose worker dies
        again is skipped (`WORKER_DIED`) for the slot's next replacement. Returns (the result,
        [failure fields of the candidates that killed their worker])."""
        errors, attempt = [], 0
        while True:
            future = self._submit(fn, *args_at(video, attempt))
            try:
                return future.result(), errors
            except concurrent.futures.process.BrokenProcessPool:
                self._replace_pool()
                errors.append(_died(self.source, video))
                self._dead.add(video)
                attempt += 1
                if attempt >= self.max_attempts:
                    return None, errors
                video = slot_candidate(self.seed, epoch, slot, attempt, len(self.source))

    def _next_position(self) -> tuple[int, int]:
        """(epoch, local index) of the next slot to hand out: past an epoch's last batch, the
        next epoch's first."""
        epoch, local_index = self._next
        if local_index >= self.batches_per_epoch * self.local_videos:
            self._next = (epoch + 1, 0)
        return self._next

    def _submit_batches(self, count: int) -> None:
        """Hands out the tasks of the next batches until `count` batches are in flight."""
        while len(self._pending) < count:
            epoch, local_index = self._next_position()
            if self._executor is None:
                self._start_processes(epoch, self._slot(local_index))
            order, buffer = self._order(epoch), self._turn % self._slots.count
            tasks = []
            for position in range(0, self.local_videos, self.videos_per_task):
                slots = [(slot, int(order[slot]), 0) for slot in
                         map(self._slot, range(local_index + position,
                                               local_index + min(self.local_videos, position + self.videos_per_task)))]
                tasks.append((slots, self._submit(_fill_rows, self.seed, epoch, buffer, position, slots,
                                                  self.max_attempts, frozenset(self._dead))))
            self._pending.append((epoch, local_index // self.local_videos, self._turn, tasks))
            self._turn += 1
            self._next = (epoch, local_index + self.local_videos)

    def _next_assembled(self) -> dict[str, np.ndarray]:
        """The next batch of batch tasks: views of its buffer, once its tasks are done."""
        self._submit_batches(1 + self.prefetch)
        epoch, batch, turn, tasks = self._pending.popleft()
        self._returned_turn = turn
        try:
            results = [future.result() for _, future in tasks]
        except concurrent.futures.process.BrokenProcessPool:
            results = self._refill_alone(epoch, batch, turn, tasks)
        for done, cpu, read in results:
            self.worker_cpu_seconds += cpu
            self.worker_bytes_read += read
            for (filled, errors) in done:
                self._count(errors)
                if not filled:
                    raise RuntimeError(f"TrainingPipeline: {len(errors)} videos in a row could not be read. "
                                       + self.summary())
        self._epoch, self._batch = epoch, batch + 1
        views = self._slots.views(turn % self._slots.count)
        self.clips_served += len(views[self.keys[0]])
        return {k: views[k] for k in self.keys}

    def _refill_alone(self, epoch: int, batch: int, turn: int, tasks) -> list:
        """A worker died on a task of this batch: a new pool reads the batch's slots one at a
        time into the same rows (the batches after it are dropped and handed out again)."""
        self._replace_pool()
        self._drop_pending()
        self._turn, self._next = turn + 1, (epoch, (batch + 1) * self.local_videos)
        buffer, results = turn % self._slots.count, []
        position = 0
        for slots, _ in tasks:
            for slot, video, _ in slots:
                def args_at(candidate, attempt, position=position, slot=slot):
                    return (self.seed, epoch, buffer, position, [(slot, candidate, attempt)], self.max_attempts,
                            frozenset(self._dead))
                result, died = self._alone(_fill_rows, args_at, slot, video, epoch)
                if result is None:
                    result = ([(False, [])], 0.0, 0)
                (filled, errors), = result[0]
                results.append(([(filled, died + errors)], *result[1:]))
                position += 1
        return results

    def _drop_pending(self) -> None:
        """Forgets the tasks in flight of a pool that broke (its workers are gone)."""
        if not self.batch_tasks:
            self._free_slots.extend(memory_slot for _, _, memory_slot, _ in self._pending)
        self._pending.clear()

    def _count(self, errors) -> None:
        for path, problem, reason in errors:
            self.skip_events += 1
            if path not in self.skipped_videos:
                self.skipped_videos[path] = (reason, problem)
                self.skipped[reason] += 1

    def _submit_until(self, count: int) -> None:
        while len(self._pending) < count:
            epoch, local_index = self._next_position()
            slot = self._slot(local_index)
            first_video = int(self._order(epoch)[slot])
            if self.processes:
                if self._executor is None:
                    self._start_processes(epoch, slot)
                memory_slot = self._free_slots.popleft()
                future = self._submit(_load_into_slot, self.seed, epoch, slot, first_video, self.max_attempts,
                                      memory_slot, 0, frozenset(self._dead))
            else:
                memory_slot, future = None, self._executor.submit(self._load, epoch, slot, first_video)
            self._pending.append((epoch, slot, memory_slot, future))
            self._next = (epoch, local_index + 1)

    def _result(self, epoch: int, slot: int, memory_slot, future):
        """A finished load: (clips, views of a memory slot for processes, or None; [failure fields])."""
        if memory_slot is None:
            return future.result()
        died = []
        try:
            filled, errors, cpu, read = future.result()
        except concurrent.futures.process.BrokenProcessPool:
            # A worker died: a new pool reads this slot alone, the slots after it are handed out again.
            self._replace_pool()
            self._drop_pending()
            batch, offset = divmod(slot, self.videos_per_batch)
            self._next = (epoch, batch * self.local_videos + offset - self.process_index * self.local_videos + 1)

            def args_at(candidate, attempt):
                return self.seed, epoch, slot, candidate, self.max_attempts, memory_slot, attempt, frozenset(self._dead)
            result, died = self._alone(_load_into_slot, args_at, slot, int(self._order(epoch)[slot]), epoch)
            filled, errors, cpu, read = result if result is not None else (False, [], 0.0, 0)
            errors = died + errors
        self.worker_cpu_seconds += cpu
        self.worker_bytes_read += read
        if not filled:
            self._free_slots.append(memory_slot)
            return None, errors
        return self._slots.views(memory_slot), errors

    # --- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch_tasks:
            return self._next_assembled()
        videos, held = [], []
        lookahead = self.local_videos * (1 + self.prefetch)
        for _ in range(self.local_videos):
            self._submit_until(lookahead)
            epoch, slot, memory_slot, future = self._pending.popleft()
            clips, errors = self._result(epoch, slot, memory_slot, future)
            self._count(errors)
            if clips is None:
                raise RuntimeError(f"TrainingPipeline: {len(errors)} videos in a row could not be read. "
                                   + self.summary())
            videos.append(clips)
            held.append(memory_slot)
        self._epoch, self._batch = epoch, slot // self.videos_per_batch + 1
        batch = {k: np.concatenate([v[k] for v in videos]) for k in self.keys}
        self._free_slots.extend(s for s in held if s is not None)
        self.clips_served += len(batch[self.keys[0]])
        return batch

    # --- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, int]:
        """The stream position after the last batch returned (save it with a checkpoint): the
        epoch and the global slot, the same on every process."""
        return {"epoch": self._epoch, "position": self._batch * self.videos_per_batch, "seed": self.seed,
                "videos_per_batch": self.videos_per_batch}

    def restore(self, state: dict) -> None:
        """Continues after the batch that `state` was taken after (on any process count)."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise InputPositionError(
                f"the saved input position is of a stream with seed={state['seed']}, this run has seed="
                f"{self.seed}: resume with --config.seed={state['seed']}, or start a new --workdir.")
        if int(state.get("videos_per_batch", self.videos_per_batch)) != self.videos_per_batch:
            raise InputPositionError(
                f"the saved input position is of batches of videos_per_batch={state['videos_per_batch']}, this "
                f"run has {self.videos_per_batch}: resume with that batch size, or start a new --workdir.")
        epoch, position = int(state["epoch"]), int(state["position"])
        if position % self.videos_per_batch or not 0 <= position <= self.batches_per_epoch * self.videos_per_batch:
            raise InputPositionError(
                f"the saved input position {position} is not a batch boundary of an epoch of "
                f"{self.batches_per_epoch} batches of {self.videos_per_batch} (a different training set?): resume "
                "with the data the run was trained on, or start a new --workdir.")
        self._drain()
        self._epoch, self._batch = epoch, position // self.videos_per_batch
        self._next = (epoch, self._batch * self.local_videos)

    def clips_per_second(self) -> float:
        return self.clips_served / max(time.monotonic() - self._start_time, 1e-9)

    def skipped_lines(self) -> list[str]:
        """One line per skipped video, by reason: 'reason: video: problem'."""
        by_reason = sorted(self.skipped_videos.items(), key=lambda item: (item[1][0], item[0]))
        return [f"{reason}: {path}: {problem}" for path, (reason, problem) in by_reason]

    def summary(self, max_videos: int = 100) -> str:
        """How many videos were skipped, for which reasons, and each video once with its reason
        (the first `max_videos`; `skipped_lines()` has them all)."""
        total = len(self.skipped_videos)
        if not total:
            return "input: no video skipped."
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
        again = f", met {self.skip_events} times" if self.skip_events != total else ""
        lines = [f"input: skipped {total} video{'s' * (total != 1)}{again} ({reasons}):"]
        lines += [f"  {line}" for line in self.skipped_lines()[:max_videos]]
        if total > max_videos:
            lines.append(f"  ... and {total - max_videos} more")
        return "\n".join(lines)

    def _drain(self) -> None:
        """Drops the loads in flight (a worker process may still be writing its slot: wait for it)."""
        if self.batch_tasks:
            for _, _, _, tasks in self._pending:
                running = [future for _, future in tasks if not future.cancel()]
                concurrent.futures.wait(running)
            self._pending.clear()
            self._turn = self._returned_turn + 1  # the dropped batches' buffers are free again
            return
        for _, _, memory_slot, future in self._pending:
            if not future.cancel() and memory_slot is not None:
                concurrent.futures.wait([future])
            if memory_slot is not None:
                self._free_slots.append(memory_slot)
        self._pending.clear()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=self.processes, cancel_futures=True)
            self._executor = None
        if self._slots is not None:
            self._slots.close(unlink=True)
            self._slots = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
