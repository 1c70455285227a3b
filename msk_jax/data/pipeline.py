"""The training input pipeline: deterministic, resumable, sharded by process, prefetched.

The stream of a process is the concatenation of epochs; epoch e visits the videos in the order
`permutation(seed, e)` cut into blocks of `videos_per_batch` (a last partial block is dropped),
and process p of P takes the p-th slice of every block: processes read disjoint shards, and
without skipped videos the global batch is exactly the one a single process would build. Each video yields `n_clips` clips sampled with a generator seeded by
(seed, epoch, video index): the clips of a video do not depend on threads, on the process count
or on what was skipped before. A batch is the clips of the next `videos_per_batch / P` usable
videos; a video that cannot be read (missing or truncated files, no ASR segments, ...) is
skipped and counted, and `summary()` says how many and why.

`state()` is the stream position after the last batch returned; `restore(state)` continues
from there, so a resumed run sees exactly the batches an uninterrupted one would.

Videos are loaded `prefetch` batches ahead by `workers` threads, or with `processes=True` by
worker processes (spawned; each unpickles the source once, so a source should pickle small, as
`FeatureStoreSource` does): Python threads share one interpreter lock and barely scale, processes
do. A worker process writes a video's clips into a slot of shared memory and returns only its
status, so the clips are copied once, into the batch. The batches are the same either way.
Spawned workers import the program's main module, so a script that starts a process pipeline
needs the usual `if __name__ == "__main__":` guard; a worker exits when its training process dies.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import multiprocessing
import os
import threading
import time
from multiprocessing import shared_memory
from typing import Iterator, Protocol

import numpy as np

from msk_jax.data.features import DataError

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
    _exit_with_parent(parent)
    _WORKER["source"] = source
    _WORKER["slots"] = _SharedSlots(layout, count, name=memory_name)
    # Sources that take `out=` (the readers of this package) write the clips into the slot itself.
    _WORKER["writes_out"] = "out" in inspect.signature(source.sample_clips).parameters


def _load_into_slot(seed: int, epoch: int, video_index: int, slot: int):
    """In a worker process: one video's clips into `slot`. Returns (DataError fields or None,
    CPU seconds, bytes the source read)."""
    cpu, source = time.process_time(), _WORKER["source"]
    read = getattr(source, "bytes_read", 0)
    rng = video_rng(seed, epoch, video_index)
    views = _WORKER["slots"].views(slot)
    try:
        clips = source.sample_clips(video_index, rng, out=views) if _WORKER["writes_out"] else \
            source.sample_clips(video_index, rng)
    except DataError as err:
        error = (err.path, err.problem, err.reason)
    else:
        error = None
        for key, view in views.items():
            if clips[key] is view:
                continue
            if clips[key].shape != view.shape:
                raise ValueError(f"TrainingPipeline: video {video_index} gave '{key}' of shape {clips[key].shape}, "
                                 f"the first video {view.shape}; worker processes need fixed clip shapes.")
            view[...] = clips[key]
    return error, time.process_time() - cpu, getattr(source, "bytes_read", 0) - read


class TrainingPipeline:
    """Batches of training clips; iterate it, save `state()`, `restore()` it."""

    def __init__(self, source: VideoSource, videos_per_batch: int, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2, workers: int = 2,
                 processes: bool = False, keys: tuple[str, ...] = MODEL_KEYS, max_consecutive_failures: int = 1000):
        if len(source) == 0:
            raise ValueError("TrainingPipeline: the video source is empty.")
        if videos_per_batch % process_count:
            raise ValueError(f"TrainingPipeline: videos_per_batch={videos_per_batch} is not divisible by "
                             f"the {process_count} processes.")
        if not 0 <= process_index < process_count:
            raise ValueError(f"TrainingPipeline: process_index {process_index} not in [0, {process_count}).")
        self.source, self.seed, self.keys = source, seed, keys
        self.process_index, self.process_count = process_index, process_count
        self.local_videos = videos_per_batch // process_count
        if len(source) < videos_per_batch:
            raise ValueError(f"TrainingPipeline: {len(source)} videos are fewer than videos_per_batch={videos_per_batch}.")
        self.prefetch, self.max_consecutive_failures = prefetch, max_consecutive_failures
        self.workers, self.processes = max(1, workers), processes
        self._executor = None if processes else concurrent.futures.ThreadPoolExecutor(
            self.workers, thread_name_prefix="msk-data")
        self._slots: _SharedSlots | None = None
        self._free_slots: collections.deque = collections.deque()
        self._epoch, self._position = 0, 0      # stream position after the last returned batch
        self._pending: collections.deque = collections.deque()  # (epoch, position, slot, future)
        self._next = (0, 0)                      # next stream item to submit
        self._cached_epoch, self._cached_shard = -1, np.empty(0, int)
        self.skipped: collections.Counter = collections.Counter()
        self.skipped_examples: dict[str, str] = {}
        self.clips_served = 0
        self.worker_cpu_seconds = 0.0  # CPU time of the worker processes (threads count in this process's)
        self.worker_bytes_read = 0     # bytes the worker processes' sources read
        self._start_time = time.monotonic()

    # --- stream -------------------------------------------------------------------------------
    def _shard(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        block = self.local_videos * self.process_count
        blocks = order[: len(order) // block * block].reshape(-1, self.process_count, self.local_videos)
        return blocks[:, self.process_index].ravel()

    def _load(self, epoch: int, video_index: int):
        rng = video_rng(self.seed, epoch, video_index)
        try:
            clips = self.source.sample_clips(int(video_index), rng)
        except DataError as err:
            return err
        return {k: clips[k] for k in self.keys}

    def _start_processes(self, epoch: int) -> None:
        """Learns the clip shapes from the first readable video, then starts the workers."""
        shard = self._shard_cache(epoch)
        for video_index in shard[: self.max_consecutive_failures]:
            example = self._load(epoch, video_index)
            if not isinstance(example, DataError):
                break
        else:
            raise RuntimeError(f"TrainingPipeline: none of the first videos could be read (e.g. {example}).")
        count = self.local_videos * (2 + self.prefetch)
        self._slots = _SharedSlots({k: (v.shape, v.dtype.str) for k, v in example.items()}, count)
        self._free_slots.extend(range(count))
        self._executor = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(self.source, self._slots.memory.name, self._slots.layout, count, os.getpid()))

    def _submit_until(self, count: int) -> None:
        while len(self._pending) < count:
            epoch, position = self._next
            shard = self._shard_cache(epoch)
            if position >= len(shard):
                self._next = (epoch + 1, 0)
                continue
            if self.processes:
                if self._executor is None:
                    self._start_processes(epoch)
                slot = self._free_slots.popleft()
                future = self._executor.submit(_load_into_slot, self.seed, epoch, int(shard[position]), slot)
            else:
                slot, future = None, self._executor.submit(self._load, epoch, shard[position])
            self._pending.append((epoch, position, slot, future))
            self._next = (epoch, position + 1)

    def _result(self, slot, future):
        """A finished load as clips (views of a slot for processes) or a DataError."""
        if slot is None:
            return future.result()
        error, cpu, read = future.result()
        self.worker_cpu_seconds += cpu
        self.worker_bytes_read += read
        if error is not None:
            self._free_slots.append(slot)
            return DataError(*error)
        return self._slots.views(slot)

    def _shard_cache(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            self._cached_epoch, self._cached_shard = epoch, self._shard(epoch)
        return self._cached_shard

    # --- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        videos, held, failures = [], [], 0
        lookahead = self.local_videos * (1 + self.prefetch)
        while len(videos) < self.local_videos:
            self._submit_until(lookahead)
            epoch, position, slot, future = self._pending.popleft()
            result = self._result(slot, future)
            self._epoch, self._position = (epoch, position + 1)
            if isinstance(result, DataError):
                self.skipped[result.reason] += 1
                self.skipped_examples.setdefault(result.reason, str(result))
                failures += 1
                if failures >= self.max_consecutive_failures:
                    raise RuntimeError(f"TrainingPipeline: {failures} videos in a row could not be read. "
                                       + self.summary())
                continue
            failures = 0
            videos.append(result)
            held.append(slot)
        batch = {k: np.concatenate([v[k] for v in videos]) for k in self.keys}
        self._free_slots.extend(s for s in held if s is not None)
        self.clips_served += len(batch[self.keys[0]])
        return batch

    # --- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, int]:
        """The stream position after the last batch returned (save it with a checkpoint)."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "process_index": self.process_index, "process_count": self.process_count}

    def restore(self, state: dict) -> None:
        """Continues after the batch that `state` was taken after."""
        for key in ("seed", "process_index", "process_count"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"TrainingPipeline: saved state has {key}={state[key]}, this pipeline "
                                 f"{getattr(self, key)}; the input position cannot be restored.")
        self._drain()
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._next = (self._epoch, self._position)

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
        for _, _, slot, future in self._pending:
            if not future.cancel() and slot is not None:
                concurrent.futures.wait([future])
            if slot is not None:
                self._free_slots.append(slot)
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
