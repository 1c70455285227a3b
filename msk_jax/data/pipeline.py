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
from there, so a resumed run sees exactly the batches an uninterrupted one would. Videos are
loaded ahead by a thread pool (`prefetch` batches ahead).
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Iterator, Protocol

import numpy as np

from msk_jax.data.features import DataError

MODEL_KEYS = ("video", "video_mask", "audio", "audio_mask", "text", "text_mask")


class VideoSource(Protocol):
    """Random access to videos: `len(source)` and `source.sample_clips(index, rng)`."""

    def __len__(self) -> int: ...

    def sample_clips(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]: ...


class TrainingPipeline:
    """Batches of training clips; iterate it, save `state()`, `restore()` it."""

    def __init__(self, source: VideoSource, videos_per_batch: int, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2, workers: int = 2,
                 keys: tuple[str, ...] = MODEL_KEYS, max_consecutive_failures: int = 1000):
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
        self._executor = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="msk-data")
        self._epoch, self._position = 0, 0      # stream position after the last returned batch
        self._pending: collections.deque = collections.deque()  # (epoch, position, future)
        self._next = (0, 0)                      # next stream item to submit
        self._cached_epoch, self._cached_shard = -1, np.empty(0, int)
        self.skipped: collections.Counter = collections.Counter()
        self.skipped_examples: dict[str, str] = {}
        self.clips_served = 0
        self._start_time = time.monotonic()

    # --- stream -------------------------------------------------------------------------------
    def _shard(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        block = self.local_videos * self.process_count
        blocks = order[: len(order) // block * block].reshape(-1, self.process_count, self.local_videos)
        return blocks[:, self.process_index].ravel()

    def _load(self, epoch: int, video_index: int):
        rng = np.random.default_rng([self.seed, epoch, int(video_index)])
        try:
            clips = self.source.sample_clips(int(video_index), rng)
        except DataError as err:
            return err
        return {k: clips[k] for k in self.keys}

    def _submit_until(self, count: int) -> None:
        while len(self._pending) < count:
            epoch, position = self._next
            shard = self._shard_cache(epoch)
            if position >= len(shard):
                self._next = (epoch + 1, 0)
                continue
            future = self._executor.submit(self._load, epoch, shard[position])
            self._pending.append((epoch, position, future))
            self._next = (epoch, position + 1)

    def _shard_cache(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            self._cached_epoch, self._cached_shard = epoch, self._shard(epoch)
        return self._cached_shard

    # --- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        videos, failures = [], 0
        lookahead = self.local_videos * (1 + self.prefetch)
        while len(videos) < self.local_videos:
            self._submit_until(lookahead)
            epoch, position, future = self._pending.popleft()
            result = future.result()
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
        batch = {k: np.concatenate([v[k] for v in videos]) for k in self.keys}
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
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()
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

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
