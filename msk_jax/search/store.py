"""An index on disk: a manifest (`index.json`) naming shards, each a folder of its own windows.

    <index>/index.json            format, the run (configuration, checkpoint folder and step,
                                  weights), the window settings, the shards (name, windows,
                                  videos, first key), the approximate index if any, the videos
                                  that could not be read
    <index>/shard-<16 hex>/       one shard (a build or an append writes one per `shard_windows`
                                  windows, whole videos in each):
        video.npy, audio.npy, fused.npy   (windows, D) float16, each row L2-normalised (fused:
                                  evaluation's v+a, the mean of the normalised video and audio
                                  embeddings, normalised)
        windows.npz               per window: its video (a row of the shard's videos), start, end,
                                  ASR text (UTF-8, `text_offsets` into `text_bytes`), its still
                                  (`thumb_offsets` into thumbs.bin); per video: id, csv path,
                                  the video file (absolute, and relative to the index folder),
                                  a stamp of its feature files, its number of windows
        thumbs.bin                the windows' JPEG stills, one after the other
    <index>/approximate-<16 hex>.npz  the approximate index (`scoring.Approximate`), optional

A shard is written whole before the manifest names it, and the manifest is replaced in one
atomic write (a rename on disk, one upload in a bucket) that switches the index; the shards
and approximate index it no longer names are removed after. So a build, an append or a removal
stopped at any point (SIGKILL, out of space) leaves the previous index answering queries. One
writer of an index at a time; readers may run beside it.

Each window has a key, its shard's first key plus its row, that stays the same while the
window is in the index (the approximate index stores keys). Embeddings are memory-mapped from
local shards (a query reads the rows it scores, the process holds no copy) and read whole from
a bucket. An index of the first format (one `windows-<digest>.npz`, format msk_jax.search/1) is
read as one shard, in memory; appending to it is refused (build it again, without --append).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil

import numpy as np

from msk_jax import safe_load, storage
from msk_jax.data import model_inputs
from msk_jax.errors import DataError

FORMAT = "msk_jax.search/2"
FORMAT_1 = "msk_jax.search/1"
EMBEDDINGS = {"v+a": "fused video+audio", "v": "video", "a": "audio"}
ARRAYS = {"v+a": "fused", "v": "video", "a": "audio"}
SHARD_NAME = re.compile(r"shard-[0-9a-f]{16}")
APPROXIMATE_NAME = re.compile(r"approximate-[0-9a-f]{16}\.npz")
# The windows files a format-1 index.json may name ("windows.npz": the first of them held no digest).
WINDOWS_NAME = re.compile(r"windows(-[0-9a-f]{16})?\.npz")
WINDOW_FIELDS = ("video_id", "path", "start", "end", "text", "video", "audio", "fused")
SHARD_FIELDS = ("window_video", "start", "end", "text_bytes", "text_offsets", "thumb_offsets", "video_id",
                "video_path", "video_file", "video_file_from_index", "video_stamp", "video_windows")
# What of the configuration fixes the index's embeddings and the queries' inputs.
CONFIG_FIELDS = ("model", "data.source", "data.dim_2d", "data.dim_3d", "data.word_vectors", "data.demo_dir",
                 "data.demo_size", "data.max_words", "objective.matmul_precision")


class SearchError(ValueError):
    """An index, query or input that cannot be used; the message names the file or field."""


@dataclasses.dataclass
class ShardColumns:
    """What a shard holds, in memory, before it is written (and for a format-1 index)."""

    window_video: np.ndarray            # (n,) int32: the row of `videos` each window belongs to
    start: np.ndarray                   # (n,) float64
    end: np.ndarray                     # (n,) float64
    texts: list[str]                    # (n,)
    stills: list[bytes]                 # (n,) JPEG bytes, b"" for none
    embeddings: dict[str, np.ndarray]   # "video", "audio", "fused": (n, D) float16, unit rows
    videos: dict[str, list]             # "video_id", "path", "file", "file_from_index", "stamp", "windows"

    def __len__(self) -> int:
        return len(self.start)


def unit_float16(x: np.ndarray) -> np.ndarray:
    return model_inputs.l2_normalize_rows(np.asarray(x, np.float32)).astype(np.float16)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _tables(columns: ShardColumns) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(windows.npz's arrays, thumbs.bin's bytes) of a shard's columns."""
    text_bytes, text_offsets = _pack([t.encode() for t in columns.texts])
    thumbs, thumb_offsets = _pack(columns.stills)
    v = columns.videos
    tables = {"window_video": np.asarray(columns.window_video, np.int32),
              "start": np.asarray(columns.start, np.float64), "end": np.asarray(columns.end, np.float64),
              "text_bytes": text_bytes, "text_offsets": text_offsets, "thumb_offsets": thumb_offsets,
              "video_id": np.array(v["video_id"], dtype=str), "video_path": np.array(v["path"], dtype=str),
              "video_file": np.array(v["file"], dtype=str),
              "video_file_from_index": np.array(v["file_from_index"], dtype=str),
              "video_stamp": np.array(v["stamp"], dtype=str), "video_windows": np.asarray(v["windows"], np.int64)}
    return tables, thumbs


def write_shard(index: str, columns: ShardColumns) -> dict:
    """Writes a shard folder of `index` (not yet named by the manifest); returns its manifest entry."""
    tables, thumbs = _tables(columns)
    buffer = io.BytesIO()
    np.savez(buffer, **tables)
    files = {"windows.npz": buffer.getvalue(), "thumbs.bin": thumbs.tobytes()}
    files.update({f"{k}.npy": _npy_bytes(columns.embeddings[k]) for k in ("video", "audio", "fused")})
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(hashlib.sha256(files[name]).digest())
    name = f"shard-{digest.hexdigest()[:16]}"
    folder = storage.join(index, name)
    storage.makedirs(folder)
    for file, data in files.items():
        storage.write_atomic(storage.join(folder, file), data)
    return {"name": name, "windows": len(columns), "videos": len(columns.videos["path"])}


def _pack(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(items) + 1, np.int64)
    offsets[1:] = np.cumsum([len(s) for s in items]) if items else []
    return np.frombuffer(b"".join(items), np.uint8).copy(), offsets


def write_manifest(index: str, manifest: dict) -> None:
    """The switch: index.json replaced in one atomic write."""
    storage.write_atomic(storage.join(index, "index.json"), json.dumps(manifest, indent=1))


def remove_unnamed(index: str, manifest: dict) -> None:
    """Removes the shards, approximate indexes and format-1 windows files of `index` that
    `manifest` does not name: the index's before a switch, and those of writes stopped before
    theirs. (One writer at a time: a concurrent writer's new shards would go too.)"""
    keep = {s["name"] for s in manifest["shards"]}
    if manifest.get("approximate"):
        keep.add(manifest["approximate"]["name"])
    for name in storage.listdir(index):
        if name in keep:
            continue
        target = storage.path(storage.join(index, name))
        if SHARD_NAME.fullmatch(name):
            if storage.is_remote(index):
                target.rmtree()
            else:
                shutil.rmtree(target, ignore_errors=True)
        elif APPROXIMATE_NAME.fullmatch(name) or WINDOWS_NAME.fullmatch(name):
            target.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ reading


class Shard:
    """One shard of a written index: its embeddings (memory-mapped where local), its windows'
    times and texts, its videos, and a way to its stills."""

    def __init__(self, name: str, embeddings: dict[str, np.ndarray], tables: dict[str, np.ndarray],
                 thumbs: str | bytes | None, first_key: int):
        self.name, self.embeddings, self.first_key = name, embeddings, first_key
        self.window_video = tables["window_video"]
        self.start, self.end = tables["start"], tables["end"]
        self._text_bytes, self._text_offsets = tables["text_bytes"], tables["text_offsets"]
        self._thumb_offsets = tables["thumb_offsets"]
        self.video_id, self.video_path = tables["video_id"], tables["video_path"]
        self.video_file, self.video_file_from_index = tables["video_file"], tables["video_file_from_index"]
        self.video_stamp, self.video_windows = tables["video_stamp"], tables["video_windows"]
        self._thumbs = thumbs

    def __len__(self) -> int:
        return len(self.start)

    @classmethod
    def open(cls, index: str, entry: dict, dim: int, where: str) -> "Shard":
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise SearchError(f"{where}: a shard's name is {name!r}, not a shard of this folder")
        folder = storage.join(index, name)
        n = entry.get("windows")
        embeddings = {k: _open_npy(storage.join(folder, f"{k}.npy"), (n, dim)) for k in ("video", "audio", "fused")}
        path = storage.join(folder, "windows.npz")
        try:
            tables = safe_load.load_npz(path, SHARD_FIELDS, max_bytes=max(safe_load.MAX_ARRAY_BYTES,
                                                                           storage.size(path)))
        except (DataError, FileNotFoundError) as err:
            raise SearchError(str(err).splitlines()[0]) from None
        videos = len(tables["video_id"])
        checks = {"window_video": (n,), "start": (n,), "end": (n,), "text_offsets": (n + 1,),
                  "thumb_offsets": (n + 1,), "video_path": (videos,), "video_file": (videos,),
                  "video_file_from_index": (videos,), "video_stamp": (videos,), "video_windows": (videos,)}
        for key, shape in checks.items():
            if tables[key].shape != shape:
                raise SearchError(f"{path} [{key}]: shape {tables[key].shape}, expected {shape} (files of two "
                                  "writes: build the index again)")
        if n and not (0 <= tables["window_video"].min() and tables["window_video"].max() < videos):
            raise SearchError(f"{path} [window_video]: names videos the shard does not hold")
        for key, total in (("text_offsets", len(tables["text_bytes"])), ("thumb_offsets", None)):
            offsets = tables[key]
            if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or (total is not None and offsets[-1] != total):
                raise SearchError(f"{path} [{key}]: not offsets into its bytes")
        thumbs = storage.join(folder, "thumbs.bin")
        if storage.size(thumbs) != tables["thumb_offsets"][-1]:
            raise SearchError(f"{thumbs}: holds {storage.size(thumbs)} bytes, {path} names "
                              f"{tables['thumb_offsets'][-1]} (files of two writes: build the index again)")
        first_key = entry.get("first_key", 0)
        return cls(name, embeddings, tables, thumbs if not storage.is_remote(thumbs) else storage.read_bytes(thumbs),
                   int(first_key))

    @classmethod
    def from_columns(cls, name: str, columns: ShardColumns, first_key: int = 0) -> "Shard":
        """A shard held in memory (a format-1 index)."""
        tables, thumbs = _tables(columns)
        return cls(name, columns.embeddings, tables, thumbs.tobytes(), first_key)

    def text(self, row: int) -> str:
        return self._text_bytes[self._text_offsets[row]:self._text_offsets[row + 1]].tobytes().decode()

    def has_still(self, row: int) -> bool:
        return bool(self._thumb_offsets[row + 1] > self._thumb_offsets[row])

    def still(self, row: int) -> bytes:
        """The window's JPEG still (b"" when it has none)."""
        lo, hi = int(self._thumb_offsets[row]), int(self._thumb_offsets[row + 1])
        if hi <= lo:
            return b""
        if isinstance(self._thumbs, bytes):
            return self._thumbs[lo:hi]
        with open(self._thumbs, "rb") as f:
            f.seek(lo)
            return f.read(hi - lo)

    def columns(self) -> ShardColumns:
        """Everything the shard holds, in memory (to write it again without some videos)."""
        return ShardColumns(
            window_video=np.asarray(self.window_video), start=np.asarray(self.start), end=np.asarray(self.end),
            texts=[self.text(i) for i in range(len(self))], stills=[self.still(i) for i in range(len(self))],
            embeddings={k: np.asarray(v) for k, v in self.embeddings.items()},
            videos={"video_id": list(self.video_id), "path": list(self.video_path), "file": list(self.video_file),
                    "file_from_index": list(self.video_file_from_index), "stamp": list(self.video_stamp),
                    "windows": list(self.video_windows)})


def select_videos(columns: ShardColumns, keep: np.ndarray) -> ShardColumns:
    """The columns of the videos whose row of `keep` (bool, per video) is set."""
    rows = np.flatnonzero(keep[columns.window_video])
    renumber = np.cumsum(keep) - 1
    return ShardColumns(
        window_video=renumber[columns.window_video[rows]].astype(np.int32), start=columns.start[rows],
        end=columns.end[rows], texts=[columns.texts[i] for i in rows], stills=[columns.stills[i] for i in rows],
        embeddings={k: v[rows] for k, v in columns.embeddings.items()},
        videos={k: [x for x, kept in zip(v, keep) if kept] for k, v in columns.videos.items()})


def _open_npy(path: str, shape: tuple) -> np.ndarray:
    """A float16 (windows, D) array of a shard: memory-mapped on disk, read whole from a bucket."""
    try:
        if storage.is_remote(path):
            array = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
        else:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise SearchError(f"{path}: missing (the index is incomplete)") from None
    except (ValueError, OSError) as err:
        raise SearchError(f"{path}: not an array file ({' '.join(str(err).split())})") from None
    if array.dtype != np.float16 or array.shape != shape:
        raise SearchError(f"{path}: holds {array.shape} {array.dtype}, expected {shape} float16 (files of two "
                          "writes: build the index again)")
    return array


def read_manifest(index: str) -> dict:
    meta_path = storage.join(index, "index.json")
    if not storage.exists(meta_path):
        raise SearchError(f"{meta_path}: no search index here (build one with `python -m msk_jax.search index`)")
    try:
        meta = json.loads(storage.read_bytes(meta_path))
    except ValueError as err:
        raise SearchError(f"{meta_path}: not a search index (unreadable JSON: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, FORMAT_1):
        found = meta.get("format") if isinstance(meta, dict) else None
        raise SearchError(f"{meta_path}: field 'format' is {found!r}, expected {FORMAT!r}")
    for field in ("config", "checkpoint", "step", "weights") + (("shards",) if meta["format"] == FORMAT else ()):
        if field not in meta:
            raise SearchError(f"{meta_path}: has no field '{field}'")
    if meta["format"] == FORMAT and not isinstance(meta["shards"], list):
        raise SearchError(f"{meta_path}: field 'shards' is not a list")
    return meta


class SearchIndex:
    """A written index: its shards in key order (`shards`), what built it (`meta`, `config`)."""

    def __init__(self, index: str, manifest: dict | None = None):
        """The index at `index`, or with `manifest`, the shards it names (a manifest about to
        be written; the index then has no configuration)."""
        import ml_collections

        self.path = index
        meta_path = storage.join(index, "index.json")
        for attempt in range(2):
            self.meta = read_manifest(index) if manifest is None else manifest
            try:
                self.shards = self._open_shards(meta_path)
                break
            except SearchError:
                # A writer may have switched the manifest and removed these shards since it was read.
                if attempt or manifest is not None:
                    raise
        self.config = None
        if "config" in self.meta:
            try:
                self.config = ml_collections.ConfigDict(json.loads(self.meta["config"]))
            except (TypeError, ValueError) as err:
                raise SearchError(f"{meta_path}: field 'config' is not a configuration ({err})") from None
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.video_offsets = np.cumsum([0] + [len(s.video_id) for s in self.shards])
        self.first_keys = np.array([s.first_key for s in self.shards], np.int64)

    def _open_shards(self, meta_path: str) -> list[Shard]:
        if self.meta["format"] == FORMAT_1:
            return [read_format_1(self.path, self.meta, meta_path)]
        dim = self.meta.get("embedding_dim")
        if not isinstance(dim, int) or dim < 1:
            raise SearchError(f"{meta_path}: field 'embedding_dim' is {dim!r}")
        for entry in self.meta["shards"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("windows"), int) or \
                    not isinstance(entry.get("first_key"), int):
                raise SearchError(f"{meta_path}: a shard entry {entry!r} lacks its windows or first key")
        shards = [Shard.open(self.path, e, dim, meta_path) for e in self.meta["shards"]]
        keys = [(s.first_key, s.first_key + len(s)) for s in shards]
        if any(b[0] < a[1] for a, b in zip(keys, keys[1:])):
            raise SearchError(f"{meta_path}: the shards' keys overlap or are out of order")
        return shards

    @property
    def format(self) -> str:
        return self.meta["format"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def videos(self) -> int:
        return int(self.video_offsets[-1])

    @property
    def dim(self) -> int:
        return self.shards[0].embeddings["fused"].shape[1] if self.shards else int(self.meta.get("embedding_dim", 0))

    def embedding_key(self, embedding: str) -> str:
        if embedding not in EMBEDDINGS:
            raise SearchError(f"--embedding={embedding}: expected one of {', '.join(EMBEDDINGS)}")
        return ARRAYS[embedding]

    def chunks(self, embedding: str, rows: int):
        """(first window, (n, D) float16 unit rows) over the index, n <= rows."""
        key = self.embedding_key(embedding)
        for shard, offset in zip(self.shards, self.offsets):
            array = shard.embeddings[key]
            for lo in range(0, len(shard), rows):
                yield int(offset + lo), array[lo:lo + rows]

    def locate(self, window: int) -> tuple[Shard, int]:
        """The shard and row of window number `window` (0 <= window < len(self))."""
        s = self._shard_of(window)
        return self.shards[s], int(window - self.offsets[s])

    def _shard_of(self, window: int) -> int:
        return int(np.searchsorted(self.offsets, window, side="right") - 1)

    def windows_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Window numbers of keys (-1 for a key no shard holds)."""
        keys = np.asarray(keys, np.int64)
        out = np.full(keys.shape, -1, np.int64)
        if not self.shards:
            return out
        s = np.searchsorted(self.first_keys, keys, side="right") - 1
        valid = s >= 0
        s = np.maximum(s, 0)
        row = keys - self.first_keys[s]
        valid &= row < np.diff(self.offsets)[s]
        out[valid] = (self.offsets[s] + row)[valid]
        return out

    def rows(self, embedding: str, windows: np.ndarray) -> np.ndarray:
        """(len(windows), D) float16 of those window numbers."""
        key = self.embedding_key(embedding)
        out = np.empty((len(windows), self.dim), np.float16)
        for i, w in enumerate(windows):
            shard, row = self.locate(int(w))
            out[i] = shard.embeddings[key][row]
        return out

    def window(self, window: int) -> dict:
        """What a query shows of one window: video id, csv path, start, end, ASR text."""
        shard, row = self.locate(window)
        v = int(shard.window_video[row])
        return {"video": str(shard.video_id[v]), "path": str(shard.video_path[v]), "start": float(shard.start[row]),
                "end": float(shard.end[row]), "text": shard.text(row)}

    def video_number(self, window: int) -> int:
        """The number of the window's video in the index (its shard's first video's plus its row)."""
        s = self._shard_of(window)
        return int(self.video_offsets[s] + self.shards[s].window_video[window - self.offsets[s]])

    def video_file(self, number: int) -> str | None:
        """The file of video number `number` as the index lists it: relative to the index folder
        where that exists, else its absolute path; None when the index has none."""
        s = int(np.searchsorted(self.video_offsets, number, side="right") - 1)
        shard, row = self.shards[s], int(number - self.video_offsets[s])
        relative, absolute = str(shard.video_file_from_index[row]), str(shard.video_file[row])
        if relative and not storage.is_remote(self.path):
            candidate = os.path.normpath(os.path.join(os.path.abspath(self.path), relative))
            if os.path.isfile(candidate):
                return candidate
        return absolute if absolute and os.path.isfile(absolute) else None

    def video_paths(self) -> dict[str, tuple[str, int]]:
        """csv path -> (shard name, its row in the shard's videos) of every video."""
        return {str(p): (s.name, i) for s in self.shards for i, p in enumerate(s.video_path)}

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """Every window's fields in memory (WINDOW_FIELDS; embeddings float32): for small indexes."""
        out = {k: [] for k in WINDOW_FIELDS}
        for shard in self.shards:
            out["video_id"] += [str(shard.video_id[v]) for v in shard.window_video]
            out["path"] += [str(shard.video_path[v]) for v in shard.window_video]
            out["start"].append(np.asarray(shard.start))
            out["end"].append(np.asarray(shard.end))
            out["text"] += [shard.text(i) for i in range(len(shard))]
            for k in ("video", "audio", "fused"):
                out[k].append(np.asarray(shard.embeddings[k], np.float32))
        return {k: (np.array(v, dtype=str) if k in ("video_id", "path", "text") else
                    np.concatenate(v) if v else np.zeros((0,))) for k, v in out.items()}


def read_format_1(index: str, meta: dict, meta_path: str) -> Shard:
    """A format-1 index (one windows file) as one shard in memory."""
    name = meta.get("windows_file", "windows.npz")
    if not isinstance(name, str) or not WINDOWS_NAME.fullmatch(name):
        raise SearchError(f"{meta_path}: field 'windows_file' is {name!r}, not a windows file of this folder")
    windows_path = storage.join(index, name)
    if not storage.exists(windows_path):
        raise SearchError(f"{windows_path}: missing (the index is incomplete)")
    try:  # sizes and headers checked before anything is inflated; stored uncompressed, no member is larger
        columns = safe_load.load_npz(windows_path, WINDOW_FIELDS,
                                     max_bytes=max(safe_load.MAX_ARRAY_BYTES, storage.size(windows_path)))
    except DataError as err:
        raise SearchError(str(err)) from None
    n = len(columns["start"])
    count = meta.get("windows")
    if isinstance(count, int) and count != n:
        raise SearchError(f"{windows_path}: holds {n} windows, {meta_path} {count} "
                          "(files of two builds: build the index again)")
    paths = [str(p) for p in columns["path"]]
    order = list(dict.fromkeys(paths))
    number = {p: i for i, p in enumerate(order)}
    ids = {str(p): str(v) for p, v in zip(columns["path"], columns["video_id"])}
    window_video = np.array([number[p] for p in paths], np.int32)
    return Shard.from_columns(name, ShardColumns(
        window_video=window_video, start=np.asarray(columns["start"], np.float64),
        end=np.asarray(columns["end"], np.float64), texts=[str(t) for t in columns["text"]], stills=[b""] * n,
        embeddings={k: unit_float16(columns[k]) for k in ("video", "audio", "fused")},
        videos={"video_id": [ids[p] for p in order], "path": order, "file": [""] * len(order),
                "file_from_index": [""] * len(order), "stamp": [""] * len(order),
                "windows": list(np.bincount(window_video, minlength=len(order)))}))


# ------------------------------------------------------------------------------------ configuration


def _config_value(config, dotted: str):
    node = config
    for key in dotted.split("."):
        if key not in node:
            return None
        node = node[key]
    return node.to_dict() if hasattr(node, "to_dict") else node


def _normalized(value):
    """JSON's view of a value (tuples as lists), for comparing configurations."""
    return json.loads(json.dumps(value, default=str))


def check_config(config, stored, where: str) -> None:
    """A SearchError naming the first field where `config` differs from the index's."""
    for field in CONFIG_FIELDS:
        mine, theirs = _normalized(_config_value(config, field)), _normalized(_config_value(stored, field))
        if isinstance(mine, dict) and isinstance(theirs, dict):
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    raise SearchError(f"{where}: config.{field}.{key} is {theirs.get(key)!r} in the index but "
                                      f"{mine.get(key)!r} in --config (the index was built with another configuration)")
        elif mine != theirs:
            raise SearchError(f"{where}: config.{field} is {theirs!r} in the index but {mine!r} in --config "
                              "(the index was built with another configuration)")
