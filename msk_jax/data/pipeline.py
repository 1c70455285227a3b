"""The training input pipeline: deterministic, resumable, sharded by process, prefetched.

The stream is global: the concatenation of epochs, epoch e a sequence of slots, the videos in
the order `permutation(seed, e)` cut into batches of `videos_per_batch` slots (a last partial
batch is dropped). Process p of P fills the p-th slice of every batch, so the processes read
disjoint shards and together build exactly the global batch a single process would. A slot
whose video cannot be read (missing or truncated files, no ASR segments, ...) takes a
replacement drawn from (seed, epoch, slot, attempt), tried until one can be read; the failures
are counted and `summary()` says how many and why. Each video yields `n_clips` clips sampled
with a generator seeded by (seed, epoch, video index). So a batch depends on nothing but the
seed and its place in the stream: not on threads, worker processes, the process count, or what
was skipped elsewhere.

`state()` is the stream position after the last batch returned (epoch and slot, the same on
every process); `restore(state)` continues from there, on any number of processes: a resumed
run sees exactly the batches an uninterrupted one would, even on another host count.

Videos are loaded `prefetch` batches ahead by `workers` threads, or with `processes=True` by
worker processes (spawned; each unpickles the source once, so a source should pickle small, as
`FeatureStoreSource` does): Python threads share one interpreter lock and barely scale, processes
do. A worker process writes a video's clips into a slot of shared memory and returns only its
status, so the clips are copied once, into the batch. The batches are the same either way.
Spawned workers import the program's main module, so a script that starts a process pipeline
needs the usual `if __name__ == "__main__":` guard. Workers ignore SIGTERM and SIGINT: a cluster
signals every process of a job, and the training process decides when to stop (after saving a
checkpoint), then shuts its workers down; a worker exits by itself when its training process dies.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import shared_memory
from typing import Iterator, Protocol

import numpy as np

from msk_jax.data.features import DataError


class InputPositionError(ValueError):
    """An input layout or saved position this run cannot continue (says why and what to do)."""

MODEL_KEYS = ("video", "video_mask", "audio", "audio_mask", "text", "text_mask")


class VideoSource(Protocol):
    """Random access to videos: `len(source)` and `source.sample_clips(index, rng)`. A source
    whose `sample_clips` also takes `out=` (arrays to write the clips into, as
    `howto100m.sample_clips` does) lets worker processes write straight into shared memory."""

    def __len__(self) -> int: ...

    def sample_clips(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]: ...


class _SharedSlots:
    """Shared memory cut into `count` slots, each holding one video's clips (`layout`: key ->
    (shape, dtype)). Created by the pipeline, attached to by the worker processes."""

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], str]], count: int, name: str | None = None):
        self.layout, self.count = layout, count
        self.offsets, size = {}, 0
        for key, (shape, dtype) in layout.items():
            self.offsets[key] = size
            size += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 64) * 64
        self.slot_bytes = size
        if name is None:
            self.memory = shared_memory.SharedMemory(create=True, size=max(1, size * count))
        else:
            # Spawned workers share the creating process's resource tracker, which unlinks the
            # memory if the pipeline's process dies without `close`.
            self.memory = shared_memory.SharedMemory(name=name)

    def views(self, slot: int) -> dict[str, np.ndarray]:
        base = slot * self.slot_bytes
        return {key: np.ndarray(shape, dtype, self.memory.buf, base + self.offsets[key])
                for key, (shape, dtype) in self.layout.items()}

    def close(self, unlink: bool) -> None:
        self.memory.close()
        if unlink:
            self.memory.unlink()


def video_rng(seed: int, epoch: int, video_index: int) -> np.random.Generator:
    """The generator of one video's clips: the same in a thread, a worker process or another host."""
    return np.random.default_rng([seed, epoch, int(video_index)])


_WORKER: dict = {}  # in a worker process: its source and the attached slots


def _exit_with_parent(parent: int) -> None:
    """A worker whose training process was killed (SIGKILL, OOM) exits within a second instead of
    waiting forever; its shared memory is then freed by the resource tracker."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="msk-data-parent-watch", daemon=True).start()


def _start_worker(source: VideoSource, memory_name: str, layout: dict, count: int, parent: int) -> None:
    # A preemption signals the whole process group: the training process handles it (saves and
    # stops at a step boundary, then shuts the pool down); a worker that died here would break it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)
    _WORKER["source"] = source
    _WORKER["slots"] = _SharedSlots(layout, count, name=memory_name)
    # Sources that take `out=` (the readers of this package) write the clips into the slot itself.
    _WORKER["writes_out"] = "out" in inspect.signature(source.sample_clips).parameters


def slot_candidate(seed: int, epoch: int, slot: int, attempt: int, num_videos: int) -> int:
    """The replacement video of a slot whose earlier candidates could not be read (attempt >= 1)."""
    return int(np.random.default_rng([seed, epoch, slot, attempt]).integers(num_videos))


def _sample_slot(source, seed: int, epoch: int, slot: int, first_video: int, max_attempts: int, out=None):
    """The clips of one slot: its video, or the first readable replacement. Returns (clips or
    None when `max_attempts` candidates failed, [DataError fields of each failure])."""
    errors, video = [], first_video
    for attempt in range(max_attempts):
        if attempt:
            video = slot_candidate(seed, epoch, slot, attempt, len(source))
        rng = video_rng(seed, epoch, video)
        try:
            clips = source.sample_clips(video, rng) if out is None else source.sample_clips(video, rng, out=out)
        except DataError as err:
            errors.append((err.path, err.problem, err.reason))
            continue
        return clips, errors
    return None, errors


def _load_into_slot(seed: int, epoch: int, slot: int, first_video: int, max_attempts: int, memory_slot: int):
    """In a worker process: one slot's clips into shared-memory slot `memory_slot`. Returns
    (whether it was filled, [DataError fields], CPU seconds, bytes the source read)."""
    cpu, source = time.process_time(), _WORKER["source"]
    read = getattr(source, "bytes_read", 0)
    views = _WORKER["slots"].views(memory_slot)
    clips, errors = _sample_slot(source, seed, epoch, slot, first_video, max_attempts,
                                 out=views if _WORKER["writes_out"] else None)
    if clips is not None:
        for key, view in views.items():
            if clips[key] is view:
                continue
            if clips[key].shape != view.shape:
                raise ValueError(f"TrainingPipeline: slot {slot} gave '{key}' of shape {clips[key].shape}, "
                                 f"the first video {view.shape}; worker processes need fixed clip shapes.")
            view[...] = clips[key]
    return clips is not None, errors, time.process_time() - cpu, getattr(source, "bytes_read", 0) - read


class TrainingPipeline:
    """Batches of training clips; iterate it, save `state()`, `restore()` it."""

    def __init__(self, source: VideoSource, videos_per_batch: int, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2, workers: int = 2,
                 processes: bool = False, keys: tuple[str, ...] = MODEL_KEYS, max_attempts: int = 1000):
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
        self._executor = None if processes else concurrent.futures.ThreadPoolExecutor(
            self.workers, thread_name_prefix="msk-data")
        self._slots: _SharedSlots | None = None
        self._free_slots: collections.deque = collections.deque()
        self._epoch, self._batch = 0, 0          # stream position after the last returned batch
        self._pending: collections.deque = collections.deque()  # (epoch, slot, memory slot, future)
        self._next = (0, 0)                      # (epoch, local index) of the next slot to submit
        self._cached_epoch, self._cached_order = -1, np.empty(0, int)
        self.skipped: collections.Counter = collections.Counter()
        self.skipped_examples: dict[str, str] = {}
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

    def _shard(self, epoch: int) -> np.ndarray:
        """The first-choice videos of this process's slots in `epoch`, in order."""
        local = np.arange(self.batches_per_epoch * self.local_videos)
        batch, offset = np.divmod(local, self.local_videos)
        return self._order(epoch)[batch * self.videos_per_batch + self.process_index * self.local_videos + offset]

    def _load(self, epoch: int, slot: int, first_video: int):
        """One slot's clips (threads and the main process): (clips or None, [DataError fields])."""
        clips, errors = _sample_slot(self.source, self.seed, epoch, slot, first_video, self.max_attempts)
        return (None if clips is None else {k: clips[k] for k in self.keys}), errors

    def _start_processes(self, epoch: int, slot: int) -> None:
        """Learns the clip shapes from the first readable video, then starts the workers."""
        example, errors = self._load(epoch, slot, int(self._order(epoch)[slot]))
        if example is None:
            raise RuntimeError(f"TrainingPipeline: none of {len(errors)} videos could be read (e.g. "
                               f"{DataError(*errors[-1])}).")
        count = self.local_videos * (2 + self.prefetch)
        self._slots = _SharedSlots({k: (v.shape, v.dtype.str) for k, v in example.items()}, count)
        self._free_slots.extend(range(count))
        self._executor = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(self.source, self._slots.memory.name, self._slots.layout, count, os.getpid()))

    def _submit_until(self, count: int) -> None:
        while len(self._pending) < count:
            epoch, local_index = self._next
            if local_index >= self.batches_per_epoch * self.local_videos:
                self._next = (epoch + 1, 0)
                continue
            slot = self._slot(local_index)
            first_video = int(self._order(epoch)[slot])
            if self.processes:
                if self._executor is None:
                    self._start_processes(epoch, slot)
                memory_slot = self._free_slots.popleft()
                future = self._executor.submit(_load_into_slot, self.seed, epoch, slot, first_video,
                                               self.max_attempts, memory_slot)
            else:
                memory_slot, future = None, self._executor.submit(self._load, epoch, slot, first_video)
            self._pending.append((epoch, slot, memory_slot, future))
            self._next = (epoch, local_index + 1)

    def _result(self, memory_slot, future):
        """A finished load: (clips, views of a memory slot for processes, or None; [DataError fields])."""
        if memory_slot is None:
            return future.result()
        filled, errors, cpu, read = future.result()
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
        videos, held = [], []
        lookahead = self.local_videos * (1 + self.prefetch)
        for _ in range(self.local_videos):
            self._submit_until(lookahead)
            epoch, slot, memory_slot, future = self._pending.popleft()
            clips, errors = self._result(memory_slot, future)
            for fields in errors:
                error = DataError(*fields)
                self.skipped[error.reason] += 1
                self.skipped_examples.setdefault(error.reason, str(error))
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

    def summary(self) -> str:
        total = sum(self.skipped.values())
        if not total:
            return "input: no video skipped."
        lines = [f"input: skipped {total} videos:"]
        for reason, count in self.skipped.most_common():
            lines.append(f"  {count} x {reason} (e.g. {self.skipped_examples[reason]})")
        return "\n".join(lines)

    def _drain(self) -> None:
        """Drops the loads in flight (a worker process may still be writing its slot: wait for it)."""
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
