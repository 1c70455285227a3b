"""The feature store: HowTo100M features laid out so that a clip reads only the rows it uses.

The original layout keeps each video in three npz files that must be read whole (~15 MB per
video at HowTo100M's sizes) to cut ten 8-second clips (~3 MB). The store is built once from that
layout (`python -m msk_jax.tools.build_feature_store`) and gives random access by time window:

    <store>/meta.json            format, dtype, dimensions, shard files, build summary (written last:
                                 a store without it is incomplete)
    <store>/index.npz            per video (csv order): path, shard, byte offset and row count of
                                 its 2D, 3D and log-mel blocks; why it is unusable, if it is
    <store>/captions.pickle      the checked ASR segments of every usable video
    <store>/words.txt, words.npy the word vectors of the caption words (float32), so workers need
                                 not load the whole word2vec file
    <store>/features-00000.bin   per video, row-major and time-major: 2D (T2, D2), 3D (T3, D3) (each
                                 row L2-normalised, as clips use it) and the log-mel transposed to
                                 (frames, bins), so a window is one contiguous read

Rows are stored as float32, float16 or bfloat16 (`dtype`); clips are float32 whatever the
storage. Videos that cannot be used are found at build time and raise the same `DataError` (same
reason) when sampled, so the training stream and its skip counts equal those of the npz files.
`FeatureStoreSource` is a `VideoSource` for `TrainingPipeline`; it pickles as its folder and
settings, so worker processes open the store themselves. A store may live in a bucket (gs://).

Reads: a video's clips are planned first (`howto100m.plan_clips`: every random draw), so all
their windows are known before any read; then every window of the video, or of all the videos
of one `sample_videos` call, is read at once (`storage.RangeReader.read_ranges`: windows that
overlap or nearly touch become one request, and in a bucket all requests are in flight
together), and the clips are filled from the rows as they arrive. A bucket's latency (20-50 ms a
request) is then paid about once per call instead of once per window. Local stores are read
through a memory map the same way, without a copy. `concurrent_reads=False` reads one window at
a time (one request each), as the clips use them.
"""

from __future__ import annotations

import io
import json
import pickle
import time

import numpy as np

from msk_jax import safe_load, storage
from msk_jax import errors
from msk_jax.data import model_inputs, word2vec
from msk_jax.data import howto100m
from msk_jax.data.howto100m import ClipSettings, HowTo100MReader
from msk_jax.data.loader import failure
from msk_jax.data.word2vec import load_vectors, save_vectors

FORMAT = "msk_jax.feature_store/1"
DTYPES = ("float32", "float16", "bfloat16")
KINDS = ("2d", "3d", "audio")


def _shard_names(meta_path: str, meta: dict) -> list[str]:
    """meta.json's shard files: plain file names inside the store (never a path elsewhere)."""
    names = meta.get("shards")
    if not isinstance(names, list):
        raise errors.DataError(meta_path, "'shards' must be a list of file names", "bad store")
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
                or name.startswith("."):
            raise errors.DataError(meta_path, f"shard {name!r} is not a file name inside the store", "bad store")
    return names


def numpy_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise ValueError(f"feature store dtype '{name}': expected one of {', '.join(DTYPES)}.")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _ShardWriter:
    """Appends blocks to shard files of about `shard_bytes` each."""

    def __init__(self, directory: str, shard_bytes: int):
        self.directory, self.shard_bytes = directory, shard_bytes
        self.names: list[str] = []
        self._file, self._offset = None, 0

    def append(self, blocks: list[bytes]) -> tuple[int, list[int]]:
        size = sum(len(b) for b in blocks)
        if self._file is None or (self._offset and self._offset + size > self.shard_bytes):
            self.close()
            self.names.append(f"features-{len(self.names):05d}.bin")
            self._file, self._offset = storage.path(storage.join(self.directory, self.names[-1])).open("wb"), 0
        offsets = []
        for block in blocks:
            offsets.append(self._offset)
            self._file.write(block)
            self._offset += len(block)
        return len(self.names) - 1, offsets

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def build_feature_store(reader: HowTo100MReader, output: str, *, dtype: str = "float32",
                        shard_bytes: int = 4 << 30, progress: bool = True) -> dict:
    """Writes the store of every video of `reader` (its word vectors give the vocabulary) to
    `output`; returns the summary also kept in meta.json. Unusable videos are recorded, not
    written. An existing complete store is an error (delete it to rebuild)."""
    meta_path = storage.join(output, "meta.json")
    if storage.exists(meta_path):
        raise FileExistsError(f"feature store '{output}' already exists (meta.json); delete it to rebuild.")
    store_dtype = numpy_dtype(dtype)
    storage.makedirs(output)
    n = len(reader)
    offsets = np.zeros((n, 3), np.int64)
    rows = np.zeros((n, 3), np.int64)
    shards = np.full(n, -1, np.int32)
    reasons, where, problems = [""] * n, [""] * n, [""] * n
    captions, vocabulary = {}, set()
    dims: dict[str, int] = {}
    writer = _ShardWriter(output, shard_bytes)
    start, written = time.monotonic(), 0
    for i in range(n):
        try:
            video = reader.video(i)
        except Exception as err:  # any failure of a reader is recorded for its video, as training skips it
            where[i], problems[i], reasons[i] = failure(reader, i, err)
            continue
        # Video rows are stored L2-normalised, as every clip uses them (the same bits as normalising
        # at sampling time, one pass fewer per clip).
        arrays = (model_inputs.l2_normalize_rows(video.features_2d.astype(np.float32)),
                  model_inputs.l2_normalize_rows(video.features_3d.astype(np.float32)), video.log_mel.T)
        for kind, array in zip(KINDS, arrays):
            if dims.setdefault(kind, array.shape[1]) != array.shape[1]:
                reasons[i], where[i] = "wrong dimension", reader.paths[i]
                problems[i] = f"{kind} features have dimension {array.shape[1]}, the store's first video {dims[kind]}"
        if reasons[i]:
            continue
        blocks = [np.ascontiguousarray(a, store_dtype).tobytes() for a in arrays]
        shards[i], offsets[i] = writer.append(blocks)
        rows[i] = [len(a) for a in arrays]
        captions[video.id] = video.caption
        vocabulary.update(w for text in video.caption["text"] for w in word2vec.tokenize(text) if w in reader.word_vectors)
        written += sum(len(b) for b in blocks)
        if progress and ((i + 1) % 1000 == 0 or i + 1 == n):
            rate = (i + 1) / max(time.monotonic() - start, 1e-9)
            print(f"feature store: {i + 1}/{n} videos, {written / 2**30:.2f} GiB, {rate:.0f} videos/s, "
                  f"{(n - i - 1) / rate / 60:.1f} min left", flush=True)
    writer.close()
    usable = int((shards >= 0).sum())
    if not usable:
        raise errors.DataError(output, f"none of the {n} videos could be read (e.g. {where[0]}: {problems[0]})",
                          "no usable video")
    vectors = reader.word_vectors.restricted(vocabulary)  # sorted
    save_vectors(output, vectors)
    storage.write_atomic(storage.join(output, "captions.pickle"), pickle.dumps(captions, protocol=4))
    buffer = io.BytesIO()
    np.savez(buffer, paths=np.array(reader.paths, dtype=str), shard=shards, offset=offsets, rows=rows,
             reason=np.array(reasons, dtype=str), where=np.array(where, dtype=str),
             problem=np.array(problems, dtype=str))
    storage.write_atomic(storage.join(output, "index.npz"), buffer.getvalue())
    skipped: dict[str, int] = {}
    for reason in reasons:
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
    meta = {"format": FORMAT, "dtype": dtype, "video_rows": "l2-normalised", "dim_2d": dims["2d"], "dim_3d": dims["3d"],
            "audio_bins": dims["audio"], "word_dim": int(vectors.dim), "videos": n, "usable": usable,
            "skipped": skipped, "bytes": written, "shards": writer.names, "words": len(vectors),
            "built_from": {"csv": reader.csv_path, "caption": reader.caption_path}}
    storage.write_atomic(meta_path, json.dumps(meta, indent=1))
    if progress:
        print(f"feature store: {usable} of {n} videos in {output} ({written / 2**30:.2f} GiB, {dtype}); "
              f"skipped: {skipped or 'none'}", flush=True)
    return meta


class _StoredVideo:
    """One video of the store, read by window (the window methods of `howto100m.Video`): from
    the windows already fetched for it (`fetched`: (block, lo, hi) -> range of `pending`), else
    one request per window."""

    rows_normalized = True  # the video rows are stored L2-normalised

    def __init__(self, store: "FeatureStoreSource", index: int):
        self.store, self.index = store, index
        self.id = store.video_id(index)
        self.caption = store.captions[self.id]
        self.num_rows_2d, self.num_rows_3d, self.num_frames = (int(r) for r in store.rows[index])
        self.fetched: dict[tuple[int, int, int], int] = {}
        self.pending: storage.PendingRanges | None = None

    def _rows(self, block: int, lo: int, hi: int) -> np.ndarray:
        at = self.fetched.get((block, lo, hi))
        if at is None:
            return self.store.read_rows(self.index, block, lo, hi)
        return np.frombuffer(self.pending[at], self.store.dtype).reshape(hi - lo, -1)

    def rows_2d(self, lo: int, hi: int) -> np.ndarray:
        return self._rows(0, lo, hi)

    def rows_3d(self, lo: int, hi: int) -> np.ndarray:
        return self._rows(1, lo, hi)

    def frames(self, lo: int, hi: int) -> np.ndarray:
        return self._rows(2, lo, hi).T


_BLOCKS = {kind: block for block, kind in enumerate(KINDS)}  # howto100m.ClipPlan.windows' kinds


class FeatureStoreSource:
    """Random access to the videos of a feature store: `len(source)`, `source.sample_clips(i, rng)`
    (the clips `HowTo100MReader` cuts from the same videos, read by window), and
    `source.sample_videos([(i, rng), ...])` (the same for several videos, all read at once).

    concurrent_reads: plan each video's clips, then read all their windows at once (the default);
    False reads one window at a time, each its own request, as the clips use them (the same
    clips). max_gap: windows of a file at most this many bytes apart are read as one request."""

    def __init__(self, directory: str, settings: ClipSettings, *, dim_2d: int | None = None,
                 dim_3d: int | None = None, word_dim: int | None = None, concurrent_reads: bool = True,
                 max_gap: int = 64 << 10):
        self.directory, self.settings = directory, settings
        self.concurrent_reads = concurrent_reads
        self._expected = {"dim_2d": dim_2d, "dim_3d": dim_3d, "audio_bins": settings.audio_bins, "word_dim": word_dim}
        meta_path = storage.join(directory, "meta.json")
        if not storage.exists(meta_path):
            raise errors.DataError(directory, "is not a complete feature store (no meta.json); build it with "
                              "python -m msk_jax.tools.build_feature_store", "no feature store")
        self.meta = json.loads(storage.read_bytes(meta_path))
        if self.meta.get("format") != FORMAT:
            raise errors.DataError(meta_path, f"format '{self.meta.get('format')}', expected '{FORMAT}'", "bad store")
        for field, want in self._expected.items():
            if want is not None and self.meta[field] != want:
                raise errors.DataError(meta_path, f"{field} is {self.meta[field]} but the config expects {want}; "
                                  "rebuild the store or fix the config", "wrong dimension")
        self.dtype = numpy_dtype(self.meta["dtype"])
        self.row_bytes = [self.meta[k] * self.dtype.itemsize for k in ("dim_2d", "dim_3d", "audio_bins")]
        self.shard_paths = [storage.join(directory, name) for name in _shard_names(meta_path, self.meta)]
        self._read_index(storage.join(directory, "index.npz"))
        captions_path = storage.join(directory, "captions.pickle")
        with storage.open_read(captions_path) as f:
            self.captions = safe_load.load(f, captions_path)  # a copied store: only data types, never code
        self.word_vectors = load_vectors(self.directory)
        self.reader = storage.RangeReader(max_gap=max_gap)

    def _read_index(self, path: str) -> None:
        """The index's tables, each of the size meta.json gives (bounded before it is read), and
        each usable entry checked against its shard: an entry outside its shard's bytes (a damaged
        or edited index, a truncated shard) is an unusable video like one the build recorded."""
        n = int(self.meta.get("videos", 0))
        names = ("paths", "shard", "offset", "rows", "reason", "where", "problem")
        index = safe_load.load_npz(path, names, max_bytes=(1 << 20) + (n << 14))  # 16 KiB a video: its strings
        for name in names:
            if len(index[name]) != n:
                raise errors.DataError(path, f"'{name}' has {len(index[name])} entries, meta.json says {n} videos", "bad store")
        if index["offset"].shape != (n, 3) or index["rows"].shape != (n, 3):
            raise errors.DataError(path, "'offset' and 'rows' must be (videos, 3)", "bad store")
        self.paths = [str(p) for p in index["paths"]]
        self.shard, self.offset, self.rows = index["shard"], index["offset"], index["rows"]
        self.reason, self.where, self.problem = (index[k].astype(object) for k in ("reason", "where", "problem"))
        sizes = np.array([storage.size(p) for p in self.shard_paths], np.int64)
        ends = self.offset + self.rows * np.array(self.row_bytes, np.int64)
        known = (self.shard >= 0) & (self.shard < len(sizes))
        room = np.where(known, sizes[np.clip(self.shard, 0, max(0, len(sizes) - 1))] if len(sizes) else 0, -1)
        outside = (self.offset < 0).any(1) | (self.rows < 0).any(1) | (ends.max(1) > room)
        for i in np.flatnonzero((self.reason == "") & (outside | ~known)):  # vectorised: a store holds millions
            shard = int(self.shard[i])
            if not known[i]:
                problem = f"shard {shard} does not exist (the store has {len(sizes)})"
            else:
                problem = (f"its rows lie outside {self.shard_paths[shard]} (bytes up to {int(ends[i].max()):,} of "
                           f"{int(sizes[shard]):,})")
            self.reason[i], self.where[i], self.problem[i] = "bad store entry", f"{path} [{self.paths[i]}]", problem


    def __len__(self) -> int:
        return len(self.paths)

    def video_id(self, index: int) -> str:
        return self.paths[index].split("/")[-1]

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    @property
    def requests(self) -> int:
        """The read requests made so far (ranged GETs in a bucket)."""
        return self.reader.requests

    def _range(self, index: int, block: int, lo: int, hi: int) -> tuple[str, int, int]:
        """(shard path, byte offset, length) of rows [lo, hi) of a block of video `index`."""
        return (self.shard_paths[self.shard[index]], int(self.offset[index, block]) + lo * self.row_bytes[block],
                (hi - lo) * self.row_bytes[block])

    def read_rows(self, index: int, block: int, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of block 0 (2D), 1 (3D) or 2 (log-mel, time-major) of video `index`."""
        lo, hi = max(0, lo), min(max(lo, hi), int(self.rows[index, block]))
        width = self.row_bytes[block] // self.dtype.itemsize
        if hi <= lo:
            return np.zeros((0, width), self.dtype)
        data = self.reader.read(*self._range(index, block, lo, hi))
        return np.frombuffer(data, self.dtype).reshape(hi - lo, width)

    def video(self, index: int) -> _StoredVideo:
        if self.reason[index]:
            raise errors.DataError(str(self.where[index]), str(self.problem[index]), str(self.reason[index]))
        return _StoredVideo(self, index)

    def sample_clips(self, index: int, rng: np.random.Generator, out=None) -> dict[str, np.ndarray]:
        """The clips of video `index` (`howto100m.sample_clips`), written into `out` when given;
        DataError when the video cannot be used."""
        if not self.concurrent_reads:
            return howto100m.sample_clips(self.video(index), self.paths[index], self.word_vectors, self.settings,
                                          rng, out=out)
        result = self.sample_videos([(index, rng)], None if out is None else [out])[0]
        if isinstance(result, errors.DataError):
            raise result
        return result

    def sample_videos(self, requests: list[tuple[int, np.random.Generator]],
                      outs: list[dict[str, np.ndarray] | None] | None = None) -> list:
        """The clips of several videos, each `(index, rng)` of `requests` as `sample_clips(index,
        rng, out)` gives them (`outs[i]`, when given, the arrays request i is written into), with
        the windows of all of them read at once. Returns, per request, the clips or the DataError
        of a video that cannot be used."""
        outs = list(outs) if outs is not None else [None] * len(requests)
        if len(outs) != len(requests):
            raise ValueError(f"sample_videos: {len(requests)} requests but {len(outs)} outs.")
        if not self.concurrent_reads:
            results = []
            for (index, rng), out in zip(requests, outs):
                try:
                    results.append(self.sample_clips(index, rng, out=out))
                except errors.DataError as err:
                    results.append(err)
            return results
        planned, ranges = [], []  # per request: (video, its clip plans) or the DataError
        for index, rng in requests:
            try:
                video = self.video(index)
            except errors.DataError as err:
                planned.append(err)
                continue
            plans = howto100m.plan_clips(video, self.settings, rng)
            for plan in plans:
                for kind, lo, hi in plan.windows:
                    key = (_BLOCKS[kind], lo, hi)
                    if hi > lo and key not in video.fetched:
                        video.fetched[key] = len(ranges)
                        ranges.append(self._range(index, *key))
            planned.append((video, plans))
        pending = self.reader.read_ranges(ranges)
        results = []
        try:
            for item, out in zip(planned, outs):
                if isinstance(item, errors.DataError):
                    results.append(item)
                    continue
                video, plans = item
                video.pending = pending
                results.append(howto100m.fill_clips(video, self.paths[video.index], plans, self.word_vectors,
                                                    self.settings, out=out))
        except BaseException:
            pending.cancel()  # the reads of the videos not yet filled
            raise
        return results

    # Worker processes open the store themselves rather than receive its tables.
    def __getstate__(self):
        return {"directory": self.directory, "settings": self.settings, "expected": self._expected,
                "concurrent_reads": self.concurrent_reads, "max_gap": self.reader.max_gap}

    def __setstate__(self, state):
        e = state["expected"]
        self.__init__(state["directory"], state["settings"], dim_2d=e["dim_2d"], dim_3d=e["dim_3d"],
                      word_dim=e["word_dim"], concurrent_reads=state.get("concurrent_reads", True),
                      max_gap=state.get("max_gap", 64 << 10))
