"""The feature store: HowTo100M features laid out so that a clip reads only the rows it uses.

The original layout keeps each video in three npz files that must be read whole (~15 MB per
video at HowTo100M's sizes) to cut ten 8-second clips (~3 MB). The store is built once from that
layout (`python -m msk_jax.tools.build_feature_store`) and gives random access by time window:

    <store>/meta.json            format, layout, dtype, dimensions, shard files, build summary
                                 (written last: a store without it is incomplete)
    <store>/index.npz            per video (csv order): path, shard, the byte offset of the first
                                 row of its 2D, 3D and log-mel rows, their row counts; why it is
                                 unusable, if it is
    <store>/captions.pickle      the checked ASR segments of every usable video
    <store>/words.txt, words.npy the word vectors of the caption words (float32), so workers need
                                 not load the whole word2vec file
    <store>/features-00000.bin   the videos' rows: 2D (T2, D2), 3D (T3, D3) (each row
                                 L2-normalised, as clips use it) and the log-mel transposed to
                                 (frames, bins), in one of two layouts (below)

Layouts (meta.json's `format`):
- `msk_jax.feature_store/2`, **time blocks** (what the builder writes): a video is a run of
  blocks of `block_seconds` (4 s), each holding the 2D rows, then the 3D rows, then the log-mel
  frames of the same seconds (`block_rows`: 4, 6 and 400 at HowTo100M's rates). A clip's three
  windows then lie in one contiguous byte range, one request in a bucket instead of three. When clips take their
  audio later than their video (`text_audio_misaligned`: 0.5 x min_time later), the video rows
  are stored that much later (`block_lead` rows), so that a clip's video and audio rows share
  blocks rather than spreading over 12 s of all three kinds.
- `msk_jax.feature_store/1`, **kinds** (`layout="kinds"`): per video the 2D block, the 3D
  block and the log-mel block one after the other; a clip reads three separate windows. Stores
  of this format are read as they are; building one again gives it time blocks.

Rows are stored as float32, float16 or bfloat16 (`dtype`); clips are float32 whatever the
storage, and a float32 store gives the clips of the npz files bit for bit in either layout.
Videos that cannot be used are found at build time and raise the same `DataError` (same reason)
when sampled, so the training stream and its skip counts equal those of the npz files.
`FeatureStoreSource` is a `VideoSource` for `TrainingPipeline`; it pickles as its folder and
settings, so worker processes open the store themselves. A store may live in a bucket (gs://).

Reads: a video's clips are planned first (`howto100m.plan_clips`: every random draw), so all
their windows are known before any read; then every window of the video, or of all the videos
of one `sample_videos` call, is read at once (`storage.RangeReader.read_ranges`, in a bucket all
requests in flight together), and the clips are filled from the rows as they arrive. Windows of
a shard that overlap or lie within `max_gap` bytes of each other are read as one request: a
bucket request costs a worker CPU time and the bucket a share of its request rate, so a gap
smaller than that is cheaper read than requested. The default gap is the layout's
(`DEFAULT_MAX_GAP`: 1.125 MiB for time blocks, 4 requests per HowTo100M-size video at 1.5x the
bytes its clips use; BENCHMARKS.md). A bucket's latency (20-50 ms a request) is then paid about once
per call. Local stores are read through a memory map the same way, without a copy (time blocks:
a window that spans blocks is gathered, one copy). `concurrent_reads=False` reads one window at
a time (one request each), as the clips use them.
"""

from __future__ import annotations

import io
import json
import pickle
import time

import numpy as np

from msk_jax import errors, safe_load, storage
from msk_jax.data import howto100m, model_inputs, word2vec
from msk_jax.data.howto100m import ClipSettings, HowTo100MReader
from msk_jax.data.loader import failure
from msk_jax.data.word2vec import load_vectors, save_vectors

FORMAT = "msk_jax.feature_store/2"           # time blocks (what `build_feature_store` writes)
FORMAT_KINDS = "msk_jax.feature_store/1"     # a video's 2D, 3D and log-mel blocks one after the other
LAYOUTS = {"time_blocks": FORMAT, "kinds": FORMAT_KINDS}
DTYPES = ("float32", "float16", "bfloat16")
KINDS = ("2d", "3d", "audio")
AUDIO_FPS = 100          # log-mel frames per second (model_inputs: 16 kHz, hop 160)
BLOCK_SECONDS = 4.0      # a time block: 4 2D rows, 6 3D rows, 400 log-mel frames at HowTo100M's rates
# Windows at most this many bytes apart are read as one request, per layout. Time blocks: a
# clip is one range; merging the ranges of a video's clips within 1.125 MiB of each other gives
# 4.0 requests per HowTo100M-size video at 1.48x the bytes its clips use (0: 7.8 requests at
# 0.92x, 256 KiB: 6.6 at 0.97x, 2 MiB: 2.5 at 2.2x; BENCHMARKS.md). Kinds: windows within 64 KiB
# (a clip's three windows are megabytes apart; a wider gap reads most of the video).
DEFAULT_MAX_GAP = {FORMAT: 1152 << 10, FORMAT_KINDS: 64 << 10}


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


class TimeBlocks:
    """The byte positions of a video's rows in time blocks. Block b holds, for each kind k (2D,
    3D, log-mel, in that order), its rows [b * rows[k] - lead[k], (b + 1) * rows[k] - lead[k])
    that exist; so kind k's rows before block b number clip(b * rows[k] - lead[k], 0, n[k]),
    and every position follows from the video's row counts `n` without a table (`of(n)`)."""

    def __init__(self, block_rows, lead, row_bytes):
        self.block_rows, self.lead, self.row_bytes = tuple(block_rows), tuple(lead), tuple(row_bytes)
        self.block_bytes = sum(r * size for r, size in zip(self.block_rows, self.row_bytes))  # a full block
        self.inner = [sum(r * size for r, size in zip(self.block_rows[:k], self.row_bytes[:k]))
                      for k in range(len(self.block_rows))]  # where each kind starts in a full block

    def before(self, n, b: int) -> list[int]:
        """Rows of each kind in blocks before block b."""
        return [min(max(b * r - o, 0), count) for r, o, count in zip(self.block_rows, self.lead, n)]

    def blocks(self, n) -> int:
        return max(-(-(count + o) // r) for r, o, count in zip(self.block_rows, self.lead, n))

    def of(self, n) -> VideoBlocks:
        return VideoBlocks(self, [int(count) for count in n])

    def position(self, n, kind: int, row: int) -> int:
        """Byte position of `row` of `kind` from the video's first byte (the general rule; a
        `VideoBlocks` answers full blocks without it)."""
        b = (row + self.lead[kind]) // self.block_rows[kind]
        first, following = self.before(n, b), self.before(n, b + 1)
        at = sum(size * rows for size, rows in zip(self.row_bytes, first))  # the block's start
        at += sum(self.row_bytes[j] * (following[j] - first[j]) for j in range(kind))  # kinds before it in the block
        return at + (row - first[kind]) * self.row_bytes[kind]

    def first_positions(self, rows: np.ndarray) -> np.ndarray:
        """`position(n, k, 0)` of every video (rows: (videos, 3) row counts) and kind, vectorised."""
        out = np.zeros(rows.shape, np.int64)
        block_rows, lead = np.array(self.block_rows), np.array(self.lead)
        for kind, (r, o) in enumerate(zip(self.block_rows, self.lead)):
            b = o // r
            first = np.clip(b * block_rows - lead, 0, rows)
            following = np.clip((b + 1) * block_rows - lead, 0, rows)
            before_kind = ((following - first)[:, :kind] * self.row_bytes[:kind]).sum(1)  # kinds before it in the block
            out[:, kind] = (first * self.row_bytes).sum(1) + before_kind
        return out

    def write(self, arrays: list[np.ndarray]) -> list:
        """The buffers of a video's blocks, in order, from its rows of each kind (C-contiguous)."""
        n = [len(a) for a in arrays]
        rows = [np.ascontiguousarray(a).view(np.uint8) for a in arrays]  # bytes of each row (any dtype)
        pieces = []
        for b in range(self.blocks(n)):
            for array, lo, hi in zip(rows, self.before(n, b), self.before(n, b + 1)):
                if hi > lo:
                    pieces.append(array[lo:hi].reshape(-1).data)
        return pieces


class VideoBlocks:
    """One video's time blocks (`TimeBlocks.of(n)`): positions, spans and rows of its windows.
    Blocks in which every kind has all its rows (all but a few at the start and the end) lie
    `block_bytes` apart, so a position there is arithmetic; the others take the general rule."""

    def __init__(self, layout: TimeBlocks, n: list[int]):
        self.layout, self.n = layout, n
        rows, lead = layout.block_rows, layout.lead
        self.full_from = max(-(-o // r) for r, o in zip(rows, lead))
        self.full_to = min((count + o) // r for r, o, count in zip(rows, lead, n))  # blocks before it are full
        self.full_start = sum(size * rows for size, rows in zip(layout.row_bytes, layout.before(n, self.full_from)))

    def position(self, kind: int, row: int) -> int:
        """Byte position of `row` of `kind` from the video's first byte."""
        layout = self.layout
        r, o = layout.block_rows[kind], layout.lead[kind]
        b = (row + o) // r
        if self.full_from <= b < self.full_to:
            return (self.full_start + (b - self.full_from) * layout.block_bytes + layout.inner[kind]
                    + (row - b * r + o) * layout.row_bytes[kind])
        return layout.position(self.n, kind, row)

    def span(self, kind: int, lo: int, hi: int) -> tuple[int, int]:
        """(position, length) of the bytes from row `lo`'s to the end of row `hi - 1` of `kind`."""
        start = self.position(kind, lo)
        return start, self.position(kind, hi - 1) + self.layout.row_bytes[kind] - start

    def rows(self, data, kind: int, lo: int, hi: int, dtype: np.dtype, width: int) -> np.ndarray:
        """Rows [lo, hi) of `kind` from `data`, the bytes of their `span`: a view when they lie in
        one block, else gathered block by block (one copy)."""
        r, o = self.layout.block_rows[kind], self.layout.lead[kind]
        first_block, last_block = (lo + o) // r, (hi - 1 + o) // r
        if first_block == last_block:
            return np.frombuffer(data, dtype, (hi - lo) * width).reshape(hi - lo, width)
        out = np.empty((hi - lo, width), dtype)
        start, done = self.position(kind, lo), 0
        for b in range(first_block, last_block + 1):
            end = min(hi, (b + 1) * r - o) - lo
            at = self.position(kind, lo + done) - start
            out[done:end] = np.frombuffer(data, dtype, (end - done) * width, at).reshape(-1, width)
            done = end
        return out


def time_blocks_for(settings: ClipSettings | None, block_seconds: float = BLOCK_SECONDS) -> dict:
    """meta.json's `block_rows` and `block_lead` for clips cut with `settings` (None: HowTo100M's
    rates, audio and video aligned): the rows of each kind in `block_seconds`, and the video
    rows stored later by the clips' audio offset (0.5 x min_time when text_audio_misaligned)."""
    fps = (settings.fps_2d, settings.fps_3d) if settings is not None else (1.0, 1.5)
    rows = [max(1, round(f * block_seconds)) for f in (*fps, AUDIO_FPS)]
    shift = 0.5 * settings.min_time if settings is not None and settings.text_audio_misaligned else 0.0
    return {"block_seconds": block_seconds, "block_rows": rows, "block_lead": [round(f * shift) for f in fps] + [0]}


class _ShardWriter:
    """Appends blocks to shard files of about `shard_bytes` each."""

    def __init__(self, directory: str, shard_bytes: int):
        self.directory, self.shard_bytes = directory, shard_bytes
        self.names: list[str] = []
        self._file, self._offset = None, 0

    def append(self, blocks: list) -> tuple[int, list[int]]:
        """Writes the buffers one after the other; returns the shard and each one's offset."""
        sizes = [memoryview(b).nbytes for b in blocks]
        size = sum(sizes)
        if self._file is None or (self._offset and self._offset + size > self.shard_bytes):
            self.close()
            self.names.append(f"features-{len(self.names):05d}.bin")
            self._file, self._offset = storage.path(storage.join(self.directory, self.names[-1])).open("wb"), 0
        offsets = []
        for block, nbytes in zip(blocks, sizes):
            offsets.append(self._offset)
            self._file.write(block)
            self._offset += nbytes
        return len(self.names) - 1, offsets

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def build_feature_store(reader: HowTo100MReader, output: str, *, dtype: str = "float32",
                        shard_bytes: int = 4 << 30, progress: bool = True, layout: str = "time_blocks",
                        block_seconds: float = BLOCK_SECONDS) -> dict:
    """Writes the store of every video of `reader` (its word vectors give the vocabulary) to
    `output` in `layout` ("time_blocks", or "kinds": the layout of format 1), time blocks of
    `block_seconds` fitted to the reader's clip settings; returns the summary also kept in
    meta.json. Unusable videos are recorded, not written. An existing complete store is an
    error (delete it to rebuild)."""
    meta_path = storage.join(output, "meta.json")
    if storage.exists(meta_path):
        raise FileExistsError(f"feature store '{output}' already exists (meta.json); delete it to rebuild.")
    if layout not in LAYOUTS:
        raise ValueError(f"feature store layout '{layout}': expected one of {', '.join(LAYOUTS)}.")
    if not block_seconds > 0:
        raise ValueError(f"feature store block_seconds={block_seconds}: expected a positive number of seconds.")
    store_dtype = numpy_dtype(dtype)
    blocks = time_blocks_for(getattr(reader, "settings", None), block_seconds) if layout == "time_blocks" else {}
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
        stored = [np.ascontiguousarray(a, store_dtype) for a in arrays]
        rows[i] = [len(a) for a in stored]
        if blocks:
            times = TimeBlocks(blocks["block_rows"], blocks["block_lead"], [a.shape[1] * a.itemsize for a in stored])
            shards[i], (start, *_) = writer.append(times.write(stored) or [b""])
            offsets[i] = [start + times.position(rows[i].tolist(), k, 0) for k in range(len(KINDS))]
        else:
            shards[i], offsets[i] = writer.append([a.tobytes() for a in stored])
        captions[video.id] = video.caption
        vocabulary.update(w for text in video.caption["text"] for w in word2vec.tokenize(text) if w in reader.word_vectors)
        written += sum(a.nbytes for a in stored)
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
    meta = {"format": LAYOUTS[layout], **blocks, "dtype": dtype, "video_rows": "l2-normalised",
            "dim_2d": dims["2d"], "dim_3d": dims["3d"],
            "audio_bins": dims["audio"], "word_dim": int(vectors.dim), "videos": n, "usable": usable,
            "skipped": skipped, "bytes": written, "shards": writer.names, "words": len(vectors),
            "built_from": {"csv": reader.csv_path, "caption": reader.caption_path}}
    storage.write_atomic(meta_path, json.dumps(meta, indent=1))
    if progress:
        print(f"feature store: {usable} of {n} videos in {output} ({written / 2**30:.2f} GiB, {dtype}, {layout}); "
              f"skipped: {skipped or 'none'}", flush=True)
    return meta


class _StoredVideo:
    """One video of the store, read by window (the window methods of `howto100m.Video`): from
    the windows already fetched for it (`fetched`: (block, lo, hi) -> range of `pending`), else
    one request per window."""

    rows_normalized = True  # the video rows are stored L2-normalised

    def __init__(self, store: FeatureStoreSource, index: int):
        self.store, self.index = store, index
        self.id = store.video_id(index)
        self.caption = store.captions[self.id]
        self.num_rows_2d, self.num_rows_3d, self.num_frames = (int(r) for r in store.rows[index])
        self.blocks = store.video_blocks(index)
        self.fetched: dict[tuple[int, int, int], int] = {}
        self.pending: storage.PendingRanges | None = None

    def _rows(self, block: int, lo: int, hi: int) -> np.ndarray:
        at = self.fetched.get((block, lo, hi))
        if at is None:
            return self.store.read_rows(self.index, block, lo, hi, self.blocks)
        return self.store.rows_from(self.pending[at], self.index, block, lo, hi, self.blocks)

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
    clips). max_gap: windows of a file at most this many bytes apart are read as one request
    (None: the layout's `DEFAULT_MAX_GAP`). client: how a bucket's byte ranges are read
    (`storage.range_client`: "auto", "tensorstore" or "fsspec")."""

    def __init__(self, directory: str, settings: ClipSettings, *, dim_2d: int | None = None,
                 dim_3d: int | None = None, word_dim: int | None = None, concurrent_reads: bool = True,
                 max_gap: int | None = None, client: str = "auto"):
        self.directory, self.settings = directory, settings
        self.concurrent_reads, self._max_gap = concurrent_reads, max_gap
        self._expected = {"dim_2d": dim_2d, "dim_3d": dim_3d, "audio_bins": settings.audio_bins, "word_dim": word_dim}
        meta_path = storage.join(directory, "meta.json")
        if not storage.exists(meta_path):
            raise errors.DataError(directory, "is not a complete feature store (no meta.json); build it with "
                              "python -m msk_jax.tools.build_feature_store", "no feature store")
        self.meta = json.loads(storage.read_bytes(meta_path))
        self.format = self.meta.get("format") if isinstance(self.meta, dict) else None
        if self.format not in DEFAULT_MAX_GAP:
            raise errors.DataError(meta_path, f"format '{self.format}', expected '{FORMAT}' (or "
                                   f"'{FORMAT_KINDS}')", "bad store")
        for field, want in self._expected.items():
            if want is not None and self.meta[field] != want:
                raise errors.DataError(meta_path, f"{field} is {self.meta[field]} but the config expects {want}; "
                                  "rebuild the store or fix the config", "wrong dimension")
        self.dtype = numpy_dtype(self.meta["dtype"])
        self.widths = [int(self.meta[k]) for k in ("dim_2d", "dim_3d", "audio_bins")]
        self.row_bytes = [width * self.dtype.itemsize for width in self.widths]
        self.blocks = None
        if self.format == FORMAT:
            self.blocks = TimeBlocks(_block_field(meta_path, self.meta, "block_rows", 1),
                                     _block_field(meta_path, self.meta, "block_lead", 0), self.row_bytes)
        self.shard_paths = [storage.join(directory, name) for name in _shard_names(meta_path, self.meta)]
        self._read_index(storage.join(directory, "index.npz"))
        captions_path = storage.join(directory, "captions.pickle")
        with storage.open_read(captions_path) as f:
            self.captions = safe_load.load(f, captions_path)  # a copied store: only data types, never code
        self.word_vectors = load_vectors(self.directory)
        self.reader = storage.RangeReader(max_gap=DEFAULT_MAX_GAP[self.format] if max_gap is None else max_gap,
                                          client=client)

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
        row_bytes = np.array(self.row_bytes, np.int64)
        misplaced = np.zeros(n, bool)
        if self.blocks is None:
            ends = (self.offset + self.rows * row_bytes).max(1)
        else:  # a video's blocks: from its first byte, as many bytes as its rows; offsets where its rows begin
            first = self.blocks.first_positions(np.maximum(self.rows, 0))
            start = self.offset[:, 0] - first[:, 0]
            misplaced = (self.offset - first != start[:, None]).any(1)
            ends = start + (np.maximum(self.rows, 0) * row_bytes).sum(1)
            misplaced |= start < 0
            self.start = start  # each video's first byte, where its positions are counted from
        known = (self.shard >= 0) & (self.shard < len(sizes))
        room = np.where(known, sizes[np.clip(self.shard, 0, max(0, len(sizes) - 1))] if len(sizes) else 0, -1)
        outside = (self.offset < 0).any(1) | (self.rows < 0).any(1) | (ends > room)
        for i in np.flatnonzero((self.reason == "") & (outside | ~known | misplaced)):  # vectorised: millions of videos
            shard = int(self.shard[i])
            if not known[i]:
                problem = f"shard {shard} does not exist (the store has {len(sizes)})"
            elif misplaced[i]:
                problem = "its offsets do not match its rows in the store's time blocks"
            else:
                problem = (f"its rows lie outside {self.shard_paths[shard]} (bytes up to {int(ends[i]):,} of "
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

    def video_blocks(self, index: int) -> VideoBlocks | None:
        """Video `index`'s time blocks (None in the kinds layout)."""
        return None if self.blocks is None else self.blocks.of(self.rows[index])

    def _range(self, index: int, block: int, lo: int, hi: int,
               blocks: VideoBlocks | None = None) -> tuple[str, int, int]:
        """(shard path, byte offset, length) of the bytes that hold rows [lo, hi) (hi > lo) of
        kind `block` (0: 2D, 1: 3D, 2: log-mel) of video `index`: only those rows (kinds), or
        from the first to the end of the last, other kinds' rows between (time blocks; `blocks`:
        the video's, when known)."""
        shard = self.shard_paths[self.shard[index]]
        if self.blocks is None:
            return shard, int(self.offset[index, block]) + lo * self.row_bytes[block], (hi - lo) * self.row_bytes[block]
        at, length = (blocks or self.video_blocks(index)).span(block, lo, hi)
        return shard, int(self.start[index]) + at, length

    def rows_from(self, data, index: int, block: int, lo: int, hi: int,
                  blocks: VideoBlocks | None = None) -> np.ndarray:
        """Rows [lo, hi) of kind `block` of video `index` from `data`, the bytes of their `_range`."""
        if self.blocks is None:
            return np.frombuffer(data, self.dtype).reshape(hi - lo, self.widths[block])
        return (blocks or self.video_blocks(index)).rows(data, block, lo, hi, self.dtype, self.widths[block])

    def read_rows(self, index: int, block: int, lo: int, hi: int, blocks: VideoBlocks | None = None) -> np.ndarray:
        """Rows [lo, hi) of block 0 (2D), 1 (3D) or 2 (log-mel, time-major) of video `index`."""
        lo, hi = max(0, lo), min(max(lo, hi), int(self.rows[index, block]))
        if hi <= lo:
            return np.zeros((0, self.widths[block]), self.dtype)
        blocks = blocks or self.video_blocks(index)
        return self.rows_from(self.reader.read(*self._range(index, block, lo, hi, blocks)), index, block, lo, hi,
                              blocks)

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
                        ranges.append(self._range(index, *key, video.blocks))
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
                "concurrent_reads": self.concurrent_reads, "max_gap": self._max_gap, "client": self.reader.client}

    def __setstate__(self, state):
        e = state["expected"]
        self.__init__(state["directory"], state["settings"], dim_2d=e["dim_2d"], dim_3d=e["dim_3d"],
                      word_dim=e["word_dim"], concurrent_reads=state.get("concurrent_reads", True),
                      max_gap=state.get("max_gap"), client=state.get("client", "auto"))


def _block_field(meta_path: str, meta: dict, field: str, least: int) -> list[int]:
    """meta.json's `block_rows` or `block_lead`: three integers of at least `least`."""
    value = meta.get(field)
    if not (isinstance(value, list) and len(value) == len(KINDS)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in value)):
        raise errors.DataError(meta_path, f"'{field}' must be {len(KINDS)} integers of at least {least}, got {value!r}",
                               "bad store")
    return value
