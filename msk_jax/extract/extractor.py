"""Raw videos -> HowTo100M features, in the layout `msk_jax.data.howto100m.HowTo100MReader` reads.

Per video (`extract_video`): the frames of `msk_jax.extract.video` through the frame backbones in
fixed-size batches (one 2048-d row per second for 2D, per 16-frame clip for 3D), each row
L2-normalised and saved float16, as the original extractor; and the 40-bin log-mel spectrogram of
the 16 kHz audio (`msk_jax.data.audio`). Output, under one root (local or gs://):

    <output>/<path>/<id>_2d.npz     key 'features', (seconds, D) float16
    <output>/<path>/<id>_3d.npz     key 'features', (clips, D) float16
    <output>/<path>/<id>_spec.npz   key 'arr_0', (40, frames) float32
    <output>/<path>/<id>_stills.zip a JPEG still a second (the 2D frames), what the search page
                                    shows (`msk_jax.search.thumbnails`); not needed to train
    <output>/videos.csv             column 'path': the videos with features (HowTo100M's csv)
    <output>/caption.pickle         id -> {'start', 'end', 'text'} (empty lists for a video without
                                    captions: the training reader skips it as "no ASR segments")
    <output>/index.json             per video: path, id, source file, rows, seconds, caption
                                    segments, and the reason for a video that could not be decoded
    <output>/parts/part-<i>-of-<n>.json  each process's results; a process that finds every part
                                    present writes the three files above (and the store and
                                    evaluation pickle) if it creates parts/finalising.json, which
                                    exactly one can at a time (an exclusive create); the others
                                    name the one that does and leave it their parts
    <output>/.extract-state/<path>.started  present while the video is being extracted (below)

Files are written atomically, so a run stopped at any point resumes (`resume=True`): a video whose
three files exist is not extracted again. `<path>` is the video's path relative to the input
folder without its extension (or the input csv's `path` column), and `<id>` its last component.

Input is not trusted:
- a `<path>` that is absolute, holds `..`, names one of the files above or resolves outside the
  output root (through a symbolic link) is refused, that video alone; two videos that would write
  the same `<path>` or share an `<id>` (the key of their captions) stop the run before anything
  is extracted, naming both;
- videos are read by `msk_jax.extract.video` (local files, common containers only) within
  `video.Limits` (duration, pixels per frame, aspect ratio), checked on the header first;
- frames stream from the decoder to the backbones in fixed-size batches, so the frames in memory
  are one batch's, whatever the video's length (what grows with it: the 16 kHz waveform, 64 KB a
  second, and the spectrogram's computation over it, about 4 GB an hour of video at its peak; the
  feature rows, about 20 KB a second);
- a video is marked before it is decoded and unmarked when its files are written, when it fails
  as a named video (DataError) or when the run is stopped from outside (Ctrl-C, SIGTERM); a mark
  left behind means the process died on that video (killed for memory, say, or an exception that
  ended the run), and the next run skips it, naming it, unless `retry_killed`.
Videos that fail are named, one line each, and the others are extracted.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import posixpath
import re
import socket
import sys
import time
from typing import Callable, Sequence

import numpy as np

from msk_jax import storage
from msk_jax.errors import DataError
from msk_jax.data.howto100m import read_feature_npz
from msk_jax.extract import video
from msk_jax.search import thumbnails

Backbone = Callable[[np.ndarray], np.ndarray]
SUFFIXES = {"2d": "_2d.npz", "3d": "_3d.npz", "audio": "_spec.npz"}
EVAL_FORMATS = ("msrvtt", "youcook2", "classification")
STATE_DIR = ".extract-state"
# First components of <path> that would put features on the run's own files and folders.
RESERVED_NAMES = ("parts", STATE_DIR, "videos.csv", "caption.pickle", "index.json")


@dataclasses.dataclass(frozen=True)
class VideoItem:
    """One input video: its file and where its features go (`path`, whose last part is the id);
    `where` names its csv row, for messages."""

    file: str
    path: str
    where: str = dataclasses.field(default="", compare=False)

    @property
    def id(self) -> str:
        return self.path.split("/")[-1]


class InputError(ValueError):
    """Bad command-line input (a missing folder, a csv without a needed column); one line."""


# --------------------------------------------------------------------------------------- inputs


def _read_csv(path: str, required: Sequence[str]) -> list[dict]:
    if not storage.exists(path):
        raise InputError(f"{path}: file does not exist")
    with storage.open_read(path, text=True) as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        missing = [c for c in required if c not in fields]
        if missing:
            raise InputError(f"{path}: needs column(s) {', '.join(repr(c) for c in missing)}; found {fields}")
        return list(reader)


def _resolve(file: str, base: str) -> str:
    return file if os.path.isabs(file) or storage.is_remote(file) else os.path.normpath(os.path.join(base, file))


def list_videos(videos: str) -> list[VideoItem]:
    """The videos of a folder (every file with a video extension, recursively, sorted) or of a csv
    (column `video`: a file, relative to the csv's folder unless absolute; optional column `path`:
    where its features go, default the file name without extension)."""
    if not videos:
        raise InputError("--videos: give a folder of videos or a csv with a 'video' column")
    if os.path.isdir(videos):
        items = []
        for root, dirs, files in os.walk(videos):
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(video.VIDEO_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(root, name), videos)
                    items.append(VideoItem(os.path.join(root, name), os.path.splitext(rel)[0].replace(os.sep, "/")))
        if not items:
            raise InputError(f"{videos}: no video files ({', '.join(video.VIDEO_EXTENSIONS)}) in this folder")
        return items
    if not os.path.exists(videos) and not storage.is_remote(videos):
        raise InputError(f"{videos}: no such folder or csv")
    rows = _read_csv(videos, ["video"])
    base = os.path.dirname(os.path.abspath(videos))
    items, seen = [], set()
    for i, row in enumerate(rows):
        file = (row.get("video") or "").strip()
        if not file:
            raise InputError(f"{videos}: row {i + 2} has an empty 'video' field")
        path = (row.get("path") or "").strip() or os.path.splitext(os.path.basename(file))[0]
        item = VideoItem(_resolve(file, base), path, f"{videos} row {i + 2}")
        if (item.file, item.path) not in seen:  # a csv of clips lists a video once per clip
            seen.add((item.file, item.path))
            items.append(item)
    if not items:
        raise InputError(f"{videos}: no rows")
    return items


def _inside(output: str, rel: str) -> tuple[bool, str]:
    """Whether `output`/`rel` resolved (symbolic links followed on disk; the key normalised in a
    bucket) lies strictly inside `output` resolved; and that resolved path."""
    if storage.is_remote(output):
        scheme, _, rest = output.partition("://")
        root = posixpath.normpath("/" + rest)
        target = posixpath.normpath(posixpath.join(root, rel))
        shown = f"{scheme}:/{target}"
    else:
        root = os.path.realpath(output)
        target = shown = os.path.realpath(os.path.join(root, rel))
    return target.startswith(root.rstrip("/") + "/"), shown


def output_path_problem(output: str, path: str) -> str | None:
    """Why the features of a video with this `<path>` may not be written under `output` (None: they
    may). The path is relative, without `..`, not one of the run's own names, and stays inside
    `output` once resolved."""
    if not path.strip("/"):
        return "is empty"
    if not path.isprintable():
        return "holds control characters"
    if "://" in path:
        return "is a URL; give a path relative to --output"
    if os.path.isabs(path) or path.startswith("/"):
        return "is absolute; give a path relative to --output"
    if ".." in path.split("/"):
        return "holds '..'; the features of every video stay inside --output"
    norm = posixpath.normpath(path)
    if norm.split("/")[0] in RESERVED_NAMES:
        return f"starts with {norm.split('/')[0]!r}, a name of the run's own files in --output"
    inside, target = _inside(output, norm)
    if not inside:
        return f"resolves to {target}, outside --output (through a symbolic link)"
    return None


def check_output_paths(output: str, items: Sequence[VideoItem]) -> tuple[list[VideoItem], dict[str, str]]:
    """The items with their paths normalised ('a//b/./x' -> 'a/b/x'; an item listed twice kept
    once) and {path: why} of those whose features may not be written under `output`."""
    checked, refused, seen = [], {}, set()
    for item in items:
        problem = output_path_problem(output, item.path)
        if problem:
            where = f"{item.where} ({item.file})" if item.where else item.file
            refused[item.path] = f"{where}: output path {item.path!r} {problem}"
            checked.append(item)
            continue
        item = dataclasses.replace(item, path=posixpath.normpath(item.path))
        if (item.file, item.path) not in seen:
            seen.add((item.file, item.path))
            checked.append(item)
    return checked, refused


def check_unique(items: Sequence[VideoItem]) -> None:
    """Raises InputError (one line, naming both videos of the first clash) when two videos would
    write the same files (same `<path>`: 'x.mp4' and 'x.webm' of one folder) or share an `<id>`
    (the key of their captions: 'a/x.mp4' and 'b/x.mp4')."""
    def name(item):
        return f"{item.file} ({item.where})" if item.where else item.file

    by_path: dict[str, VideoItem] = {}
    by_id: dict[str, VideoItem] = {}
    clashes = []
    for item in items:
        other = by_path.setdefault(item.path, item)
        if other is not item:
            clashes.append(f"videos {name(other)} and {name(item)} would both write {item.path}/{item.id}_*.npz")
            continue
        other = by_id.setdefault(item.id, item)
        if other is not item:
            clashes.append(f"videos {name(other)} and {name(item)} share the name {item.id!r} ({other.path} and "
                           f"{item.path}), the key of their captions")
    if clashes:
        more = f" (and {len(clashes) - 1} more clash{'es' if len(clashes) > 2 else ''})" if len(clashes) > 1 else ""
        raise InputError(f"{clashes[0]}{more}; rename one, or give each a distinct name in a csv's 'path' column")


def _classification_rows(path: str) -> list[dict]:
    return _read_csv(path, ["video", "label", "splits"])


def _segment_rows(path: str) -> list[dict]:
    rows = _read_csv(path, ["video", "start", "end"])
    if rows and "caption" not in rows[0] and "text" not in rows[0]:
        raise InputError(f"{path}: needs a 'caption' (or 'text') column")
    return rows


def _float(value, where: str, field: str) -> float | None:
    value = (value or "").strip() if isinstance(value, str) else value
    if value in ("", None):
        return None
    try:
        return float(value)
    except ValueError:
        raise InputError(f"{where}: field '{field}' is not a number: {value!r}") from None


def load_captions(path: str | None, items: Sequence[VideoItem]) -> dict[str, dict]:
    """id -> {'start', 'end', 'text'} from a caption.pickle or a csv (video, start, end, caption|text;
    `video` is a file or an id); every video of `items` gets an entry, empty if it has no caption."""
    captions: dict[str, dict] = {}
    if path:
        if path.endswith((".pickle", ".pkl")):
            if not storage.exists(path):
                raise InputError(f"{path}: file does not exist")
            from msk_jax import safe_load

            loaded = safe_load.load_path(path)
            if not isinstance(loaded, dict):
                raise InputError(f"{path}: must hold a dict id -> {{'start', 'end', 'text'}}")
            for vid, c in loaded.items():
                if not isinstance(c, dict) or not {"start", "end", "text"} <= set(c):
                    raise InputError(f"{path}: caption of {vid!r} must be a dict with 'start', 'end' and 'text'")
                captions[vid] = {"start": np.asarray(c["start"], np.float64), "end": np.asarray(c["end"], np.float64),
                                 "text": [str(t) for t in c["text"]]}
        else:
            segments: dict[str, list] = {}
            for i, row in enumerate(_segment_rows(path)):
                where = f"{path} row {i + 2}"
                vid = os.path.splitext(os.path.basename(row["video"].strip()))[0]
                start, end = _float(row["start"], where, "start"), _float(row["end"], where, "end")
                text = row.get("caption", row.get("text")) or ""
                segments.setdefault(vid, []).append((start or 0.0, end if end is not None else start or 0.0, text))
            for vid, segs in segments.items():
                segs.sort(key=lambda s: s[0])
                captions[vid] = {"start": np.array([s[0] for s in segs], np.float64),
                                 "end": np.array([s[1] for s in segs], np.float64), "text": [s[2] for s in segs]}
    for item in items:
        captions.setdefault(item.id, {"start": np.zeros(0), "end": np.zeros(0), "text": []})
    return captions


# ------------------------------------------------------------------------------------ backbones


def _batched(fn: Callable[[np.ndarray], np.ndarray], items: np.ndarray, batch: int, dim: int) -> np.ndarray:
    """fn over `items` in batches of exactly `batch` (the last one zero-padded, so one compiled
    shape per frame size), outputs trimmed."""
    if len(items) == 0:
        return np.zeros((0, dim), np.float32)
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(chunk), np.float32)[:n])
    return np.concatenate(out)


def real_backbone(kind: str, weights, dtype: str = "float32") -> tuple[Backbone, int]:
    """ResNet-152 ("2d") or ResNeXt-101 ("3d") of `msk_jax.extract.backbones`, jit-compiled:
    uint8 frames (N, H, W, 3) or clips (N, 16, H, W, 3) -> (N, 2048) float32. `weights`: a weight
    file (`backbones.load_backbone_weights`) or the Flax variables themselves."""
    import jax  # the networks' libraries load only when they run: the demo backbone needs none
    import jax.numpy as jnp

    from msk_jax.extract import backbones

    if isinstance(weights, str):
        if not weights:
            raise InputError(f"--weights_{kind}: the real backbones need weights (or use --backbone=demo)")
        if not storage.exists(weights):
            raise InputError(f"--weights_{kind}: {weights}: file does not exist")
        variables = backbones.load_backbone_weights(weights, kind)
    else:
        variables = weights
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    model = backbones.backbone(kind, dtype=compute)
    variables = jax.device_put(variables)
    prep = backbones.preprocess_2d if kind == "2d" else backbones.preprocess_3d

    @jax.jit
    def apply(v, x):
        return model.apply(v, x).astype(jnp.float32)

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(apply(variables, np.asarray(prep(batch), np.float32)))

    return run, backbones.FEATURE_DIM


def demo_backbone(kind: str, seed: int = 0, feature_dim: int = 128) -> tuple[Backbone, int]:
    """The demo corpus's frame features (`msk_jax.demo.backbone`)."""
    from msk_jax.demo.backbone import DemoBackbone

    return DemoBackbone(kind, seed, feature_dim), feature_dim


# ------------------------------------------------------------------------------------ one video


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (F.normalize(dim=1), eps 1e-12), float32."""
    rows = np.asarray(rows, np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _npz_bytes(*arrays, **named) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays, **named)
    return buffer.getvalue()


def feature_files(output: str, item: VideoItem) -> dict[str, str]:
    return {kind: storage.join(output, item.path, item.id + suffix) for kind, suffix in SUFFIXES.items()}


def is_done(output: str, item: VideoItem) -> bool:
    return all(storage.exists(p) for p in feature_files(output, item).values())


def compute_features(decoded: video.DecodedVideo, backbone_2d: Backbone, dim_2d: int, backbone_3d: Backbone,
                     dim_3d: int, batch: int) -> dict[str, np.ndarray]:
    """{'2d': (N2, D) float16, '3d': (N3, D) float16, 'audio': (40, frames) float32} of a video
    decoded in memory; `extract_video` computes the same rows, the same batches, frame by frame."""
    from msk_jax.data.audio import log_mel_spectrogram

    f2d = _batched(backbone_2d, decoded.frames_2d, batch, dim_2d)
    f3d = _batched(backbone_3d, video.clips_3d(decoded.frames_3d), max(1, batch // video.CLIP_FRAMES), dim_3d)
    return {"2d": l2_normalize(f2d).astype(np.float16), "3d": l2_normalize(f3d).astype(np.float16),
            "audio": log_mel_spectrogram(decoded.waveform)}


class _Batches:
    """Frames, one at a time, through a backbone in calls of exactly `per_call` items of `group`
    frames (a 3D clip: 16), as `_batched` over the whole video's frames gives them: the last item
    and the last call zero-padded, rows of the padding dropped. Holds one call's frames."""

    def __init__(self, fn: Backbone, per_call: int, dim: int, group: int = 1):
        self.fn, self.per_call, self.dim, self.group = fn, per_call, dim, group
        self.buffer: np.ndarray | None = None
        self.filled = 0
        self.rows: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> None:
        if self.buffer is None:
            self.buffer = np.zeros((self.per_call * self.group,) + frame.shape, frame.dtype)
        self.buffer[self.filled] = frame
        self.filled += 1
        if self.filled == len(self.buffer):
            self._call(self.per_call)

    def _call(self, items: int) -> None:
        batch = self.buffer if self.group == 1 else \
            self.buffer.reshape((self.per_call, self.group) + self.buffer.shape[1:])
        self.rows.append(np.asarray(self.fn(batch), np.float32)[:items])
        # A new buffer, not the old one zeroed: a backbone may still hold the batch it was given.
        self.buffer, self.filled = np.zeros_like(self.buffer), 0

    def finish(self) -> np.ndarray:
        """(rows, dim) float32: one per frame (group 1) or per started group of frames."""
        if self.filled:
            self._call(-(-self.filled // self.group))
        return np.concatenate(self.rows) if self.rows else np.zeros((0, self.dim), np.float32)


def extract_video(item: VideoItem, output: str, backbone_2d: Backbone, dim_2d: int, backbone_3d: Backbone,
                  dim_3d: int, batch: int, limits: video.Limits | None = None) -> dict:
    """Decodes one video, its frames going to the backbones batch by batch as they are decoded
    (the rows of `compute_features`), writes its three files (each atomically); returns its index
    record. Raises DataError naming the file when it cannot be decoded or is beyond `limits`."""
    from msk_jax.data.audio import log_mel_spectrogram

    rows_2d = _Batches(backbone_2d, batch, dim_2d)
    rows_3d = _Batches(backbone_3d, max(1, batch // video.CLIP_FRAMES), dim_3d, group=video.CLIP_FRAMES)
    stills = thumbnails.SecondStills()

    def add_2d(frame: np.ndarray) -> None:
        rows_2d.add(frame)
        stills.add(frame)

    streamed = video.stream_video(item.file, add_2d, rows_3d.add, limits=limits)
    if streamed.frames_2d == 0 or streamed.frames_3d == 0:
        raise DataError(item.file, "no frame was decoded", "no frames")
    feats = {"2d": l2_normalize(rows_2d.finish()).astype(np.float16),
             "3d": l2_normalize(rows_3d.finish()).astype(np.float16),
             "audio": log_mel_spectrogram(streamed.waveform)}
    files = feature_files(output, item)
    # The stills before the features: a video whose features are all written has its stills.
    storage.write_atomic(storage.join(output, item.path, item.id + thumbnails.SUFFIX), stills.zip_bytes())
    storage.write_atomic(files["2d"], _npz_bytes(features=feats["2d"]))
    storage.write_atomic(files["3d"], _npz_bytes(features=feats["3d"]))
    storage.write_atomic(files["audio"], _npz_bytes(feats["audio"]))
    return {"rows_2d": len(feats["2d"]), "rows_3d": len(feats["3d"]), "audio_frames": int(feats["audio"].shape[1]),
            "seconds": round(streamed.duration, 3), "frames": int(streamed.frames_2d + streamed.frames_3d)}


# ------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class Options:
    """What `run` extracts and how (the command line's flags)."""

    videos: str
    output: str
    backbone: str = "real"
    weights_2d: str = ""
    weights_3d: str = ""
    dtype: str = "float32"
    batch: int = 64
    captions: str = ""
    store: str = ""
    word_vectors: str = ""
    store_dtype: str = "float16"
    eval_csv: str = ""
    eval_format: str = "msrvtt"
    eval_output: str = ""
    process_index: int = 0
    process_count: int = 1
    demo_seed: int = 0
    demo_feature_dim: int = 128
    progress_seconds: float = 10.0
    max_duration: float = video.Limits.max_seconds
    max_pixels: int = video.Limits.max_pixels
    max_aspect: float = video.Limits.max_aspect
    retry_killed: bool = False
    log: Callable[[str], None] = dataclasses.field(default=lambda m: print(f"[extract] {m}", file=sys.stderr,
                                                                            flush=True))

    def limits(self) -> video.Limits:
        """The bounds on a video (`video.Limits`) that the max_* options set."""
        for flag in ("max_duration", "max_pixels", "max_aspect"):
            if not getattr(self, flag) > 0:
                raise InputError(f"--{flag}={getattr(self, flag)}: must be positive")
        if self.max_aspect < 1:
            raise InputError(f"--max_aspect={self.max_aspect}: must be at least 1 (longer side / shorter side)")
        return video.Limits(max_seconds=self.max_duration, max_pixels=self.max_pixels, max_aspect=self.max_aspect)


def make_backbones(opts: Options) -> tuple[Backbone, int, Backbone, int]:
    if opts.backbone == "demo":
        return (*demo_backbone("2d", opts.demo_seed, opts.demo_feature_dim),
                *demo_backbone("3d", opts.demo_seed, opts.demo_feature_dim))
    if opts.backbone != "real":
        raise InputError(f"--backbone={opts.backbone}: expected real or demo")
    return (*real_backbone("2d", opts.weights_2d, opts.dtype), *real_backbone("3d", opts.weights_3d, opts.dtype))


def _part_path(output: str, index: int, count: int) -> str:
    return storage.join(output, "parts", f"part-{index:05d}-of-{count:05d}.json")


def marker_path(output: str, item: VideoItem) -> str:
    """The file present while `item` is being extracted (see the module's docstring)."""
    return storage.join(output, STATE_DIR, item.path + ".started")


def _unmark(marker: str) -> None:
    storage.path(marker).unlink(missing_ok=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run(opts: Options) -> dict:
    """Extracts this process's share of the videos (every `process_count`-th from
    `process_index`), then, if every process's part is written, the csv, captions, index, and the
    optional store and evaluation pickle. Returns a summary."""
    if opts.batch < 1:
        raise InputError(f"--batch={opts.batch}: must be at least 1")
    if not 0 <= opts.process_index < opts.process_count:
        raise InputError(f"--process_index={opts.process_index} is not in [0, --process_count={opts.process_count})")
    if opts.store and not opts.word_vectors:
        raise InputError("--store needs --word_vectors (the store keeps the vectors of the caption words)")
    if opts.eval_csv and not opts.eval_output:
        raise InputError("--eval_csv needs --eval_output (the pickle to write)")
    if opts.eval_format not in EVAL_FORMATS:
        raise InputError(f"--eval_format={opts.eval_format}: expected {', '.join(EVAL_FORMATS)}")
    limits = opts.limits()
    items, refused = check_output_paths(opts.output, list_videos(opts.videos))
    check_unique([it for it in items if it.path not in refused])
    eval_rows = ((_classification_rows if opts.eval_format == "classification" else _segment_rows)(opts.eval_csv)
                 if opts.eval_csv else [])
    captions = load_captions(opts.captions, items)
    storage.makedirs(opts.output)
    mine = items[opts.process_index::opts.process_count]
    failures: dict[str, str] = {it.path: refused[it.path] for it in mine if it.path in refused}
    done, todo = [], []
    for it in mine:
        if it.path in failures:
            continue
        if is_done(opts.output, it):
            done.append(it)
        elif not opts.retry_killed and storage.exists(marker_path(opts.output, it)):
            failures[it.path] = (f"{it.file}: killed the extractor last time (it left {marker_path(opts.output, it)}); "
                                 "skipped: --retry_killed tries it again")
        else:
            todo.append(it)
    opts.log(f"{len(items)} videos, {len(mine)} for process {opts.process_index}/{opts.process_count}, "
             f"{len(done)} already extracted" + (f", {len(failures)} refused or skipped" if failures else ""))
    records = {}
    if todo:
        b2, d2, b3, d3 = make_backbones(opts)
        began = last = time.monotonic()
        frames = failed_now = 0
        for k, item in enumerate(todo):
            marker = marker_path(opts.output, item)
            storage.write_atomic(marker, json.dumps({"file": item.file, "host": socket.gethostname(),
                                                     "pid": os.getpid(), "started": time.time()}))
            try:
                record = extract_video(item, opts.output, b2, d2, b3, d3, opts.batch, limits)
            except DataError as err:
                _unmark(marker)
                failed_now += 1
                failures[item.path] = _one_line(f"{item.file}: {err.problem} ({err.reason})")
                opts.log(f"cannot extract {item.file}: {_one_line(err.problem)}")
                continue
            except (KeyboardInterrupt, SystemExit):
                _unmark(marker)  # stopped from outside (Ctrl-C, SIGTERM): not the video's doing
                raise
            # Any other exception leaves the mark: this video ended the run.
            _unmark(marker)
            frames += record["frames"]
            records[item.path] = record
            now = time.monotonic()
            if now - last >= opts.progress_seconds or k + 1 == len(todo):
                last, elapsed = now, now - began
                eta = elapsed / (k + 1) * (len(todo) - k - 1)
                opts.log(f"{k + 1}/{len(todo)} videos ({failed_now} failed), {frames / max(elapsed, 1e-9):.1f} "
                         f"frames/s, ETA {eta / 60:.1f} min")
    extracted_now = len(records)
    for item in done:
        records[item.path] = _record_from_files(opts.output, item)
    part = {"process_index": opts.process_index, "process_count": opts.process_count,
            "videos": {it.path: {"id": it.id, "file": it.file, **records[it.path]} if it.path in records
                       else {"id": it.id, "file": it.file, "error": failures.get(it.path, "not extracted")}
                       for it in mine}}
    storage.write_atomic(_part_path(opts.output, opts.process_index, opts.process_count), json.dumps(part, indent=1))
    summary = {"videos": len(items), "extracted_now": extracted_now, "skipped_done": len(done),
               "failed": failures, "complete": False}
    parts = [_part_path(opts.output, i, opts.process_count) for i in range(opts.process_count)]
    # One process at a time finalises, the one holding parts/finalising.json; it finalises again
    # while a part changes under it (a process that found the claim taken left its part to it).
    while all(storage.exists(p) for p in parts):
        holder = _claim_finalising(opts)
        if holder is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) \
                if isinstance(holder.get("started"), (int, float)) else "?"
            opts.log(f"{_who(holder)} finalises, since {since} (videos.csv, caption.pickle, index.json"
                     + (", the store" if opts.store else "") + (", the evaluation pickle" if opts.eval_csv else "")
                     + f"); process {opts.process_index} leaves it its part (if that process is gone, delete "
                     f"{storage.join(opts.output, 'parts', FINALISING)} and run again)")
            summary["finaliser"] = holder
            break
        try:
            digest, merged = _read_parts(parts, opts)
            finalised = _read_json(storage.join(opts.output, "parts", FINALISED))
            if finalised and finalised.get("digest") == digest and _outputs_exist(opts):
                opts.log(f"{_who(finalised)} finalised these parts already; nothing to write")
                summary["finaliser"] = finalised
                break
            summary.update(_finalise(opts, items, merged, captions, eval_rows))
            storage.write_atomic(storage.join(opts.output, "parts", FINALISED),
                                 json.dumps({**_me(opts), "digest": digest, "finished": time.time()}))
        finally:
            storage.path(storage.join(opts.output, "parts", FINALISING)).unlink(missing_ok=True)
        if _read_parts(parts, opts)[0] == digest:
            break
    failed_total = summary.get("failed_total", len(failures))
    opts.log(f"done: {summary['extracted_now']} extracted, {summary['skipped_done']} already there, "
             f"{len(failures)} failed here" + (f" ({failed_total} in all)" if summary["complete"] else ""))
    for path, reason in failures.items():
        opts.log(f"  failed: {path}: {reason}")
    return summary


FINALISING = "finalising.json"  # in parts/: held by the process that finalises, while it does
FINALISED = "finalised.json"    # in parts/: what was finalised last (a digest of parts and options)


def _finalise(opts: Options, items: Sequence[VideoItem], merged: dict, captions: dict, eval_rows: list) -> dict:
    """The csv, captions and index of every process's videos, the optional store and evaluation
    pickle; returns the summary's fields."""
    summary = write_index(opts.output, items, merged, captions)
    summary["complete"] = True
    if opts.store and summary["usable"]:
        if storage.exists(storage.join(opts.store, "meta.json")):
            opts.log(f"feature store {opts.store} already built; delete it to rebuild with the new videos")
        else:
            build_store(opts)
    if opts.eval_csv:
        summary["eval_entries"] = write_eval_pickle(opts, items, eval_rows)
    return summary


def _me(opts: Options) -> dict:
    return {"process_index": opts.process_index, "process_count": opts.process_count,
            "host": socket.gethostname(), "pid": os.getpid()}


def _who(record: dict) -> str:
    return (f"process {record.get('process_index')} of {record.get('process_count')} (host {record.get('host')}, "
            f"pid {record.get('pid')})")


def _read_json(p: str) -> dict | None:
    """A small JSON record, None where it is missing or unreadable."""
    try:
        record = json.loads(storage.read_bytes(p))
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read_parts(parts: Sequence[str], opts: Options) -> tuple[str, dict]:
    """(a digest of the parts and of what else shapes what finalising writes: the options, the
    captions and evaluation clips; every process's videos)."""
    digest = hashlib.sha256(json.dumps([opts.videos, opts.captions, opts.store, opts.word_vectors, opts.store_dtype,
                                        opts.eval_csv, opts.eval_format, opts.eval_output]).encode())
    for p in (opts.captions, opts.eval_csv):
        if p:
            digest.update(storage.read_bytes(p))
    merged = {}
    for p in parts:
        data = storage.read_bytes(p)
        digest.update(data)
        merged.update(json.loads(data)["videos"])
    return digest.hexdigest(), merged


def _outputs_exist(opts: Options) -> bool:
    needed = [storage.join(opts.output, name) for name in ("videos.csv", "caption.pickle", "index.json")]
    needed += [storage.join(opts.store, "meta.json")] if opts.store else []
    needed += [opts.eval_output] if opts.eval_csv else []
    return all(storage.exists(p) for p in needed)


def _create_new(p: str, data: bytes) -> bool:
    """Creates a file that must not exist, in one step that fails when it does (O_EXCL on disk,
    ifGenerationMatch=0 in a bucket): whether this call created it."""
    if storage.is_remote(p):
        import fsspec

        fs, name = fsspec.core.url_to_fs(p)
        try:
            fs.pipe_file(name, data, mode="create")
        except FileExistsError:
            return False
        return True
    storage.makedirs(os.path.dirname(p))
    try:
        descriptor = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    storage.fsync_folder(os.path.dirname(p))
    return True


def _died_here(record: dict) -> bool:
    """Whether the process of a record ran on this host and is gone."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def _claim_finalising(opts: Options) -> dict | None:
    """Takes parts/finalising.json for this process: None when it did, else the record of the
    process that holds it. A holder that died on this host (killed while finalising) is taken
    over, by one process only: the one that creates the mark named after it."""
    claim = storage.join(opts.output, "parts", FINALISING)
    me = {**_me(opts), "started": time.time()}
    holder: dict = {"process_index": "?", "host": "?", "pid": "?"}
    for _ in range(3):
        if _create_new(claim, json.dumps(me).encode()):
            return None
        holder = _read_json(claim) or holder
        if not _died_here(holder):
            if storage.exists(claim):
                return holder
            continue  # released meanwhile
        if not _create_new(f"{claim}.takeover-{holder['pid']}-{holder.get('started')}", b""):
            return holder
        opts.log(f"{_who(holder)} died while finalising; process {opts.process_index} takes over")
        storage.path(claim).unlink(missing_ok=True)
    return holder


def _record_from_files(output: str, item: VideoItem) -> dict:
    files = feature_files(output, item)
    arrays = {k: read_feature_npz(files[k], "arr_0" if k == "audio" else "features") for k in files}
    return {"rows_2d": len(arrays["2d"]), "rows_3d": len(arrays["3d"]), "audio_frames": int(arrays["audio"].shape[1]),
            "seconds": round(arrays["audio"].shape[1] / 100.0, 3), "frames": 0}


def write_index(output: str, items: Sequence[VideoItem], records: dict, captions: dict) -> dict:
    """videos.csv (the videos with features), caption.pickle and index.json of the whole run."""
    ok = [it for it in items if it.path in records and "error" not in records[it.path]]
    lines = io.StringIO()
    writer = csv.writer(lines)
    writer.writerow(["path"])
    writer.writerows([it.path] for it in ok)
    storage.write_atomic(storage.join(output, "videos.csv"), lines.getvalue())
    written_captions = {it.id: captions.get(it.id, {"start": np.zeros(0), "end": np.zeros(0), "text": []})
                        for it in ok}
    storage.write_atomic(storage.join(output, "caption.pickle"), pickle.dumps(written_captions, protocol=4))
    index = {"format": "msk_jax.extract/1", "layout": {k: f"<path>/<id>{s}" for k, s in SUFFIXES.items()},
             "csv": "videos.csv", "captions": "caption.pickle", "videos": []}
    failed = {}
    for it in items:
        record = dict(records.get(it.path, {"id": it.id, "file": it.file, "error": "not extracted"}))
        record["path"] = it.path
        record["caption_segments"] = len(captions.get(it.id, {}).get("text", []))
        if not storage.is_remote(output) and not storage.is_remote(it.file):
            # The video file as seen from the output folder, so that both can move together.
            record["file_from_output"] = os.path.relpath(os.path.abspath(it.file), os.path.abspath(output))
        index["videos"].append(record)
        if "error" in record:
            failed[it.path] = record["error"]
    storage.write_atomic(storage.join(output, "index.json"), json.dumps(index, indent=1))
    return {"usable": len(ok), "failed_total": len(failed), "failed_all": failed,
            "without_captions": sum(1 for it in ok if not len(written_captions[it.id]["text"]))}


def build_store(opts: Options) -> dict:
    """A feature store (`msk_jax.data.feature_store`) of the written videos."""
    from msk_jax.data.feature_store import build_feature_store
    from msk_jax.data.howto100m import HowTo100MReader
    from msk_jax.data.word2vec import load_word2vec_binary

    if not storage.exists(opts.word_vectors):
        raise InputError(f"--word_vectors: {opts.word_vectors}: file does not exist")
    words = load_word2vec_binary(opts.word_vectors)
    reader = HowTo100MReader(storage.join(opts.output, "videos.csv"), storage.join(opts.output, "caption.pickle"),
                             opts.output, opts.output, words, features_3d=opts.output)
    return build_feature_store(reader, opts.store, dtype=opts.store_dtype, progress=True)


# ------------------------------------------------------------------------------ evaluation sets


def _rows(features: np.ndarray, start: float | None, end: float | None, rate: float) -> np.ndarray:
    """Rows of features at `rate` per second covering [start, end] (at least one row)."""
    lo = 0 if start is None else min(int(math.floor(start * rate)), max(len(features) - 1, 0))
    hi = len(features) if end is None else min(max(int(math.ceil(end * rate)), lo + 1), len(features))
    return np.asarray(features[lo:hi], np.float32)


def write_eval_pickle(opts: Options, items: Sequence[VideoItem], rows: list[dict]) -> int:
    """An evaluation pickle (MSR-VTT or YouCook2 format, `msk_jax.data.eval_sets`) of the clips of
    `rows` (video, start, end, caption): 2D/3D rows of the extracted video covering [start, end]
    (an empty start/end: the whole video) and the log-mel spectrogram of that stretch of its audio,
    as the original sets hold each clip's own spectrogram. Returns the number of entries."""
    from msk_jax.data.audio import SAMPLE_RATE, log_mel_spectrogram

    if opts.eval_format == "classification":
        return write_classification_pickle(opts, items, rows)
    by_key = {}
    for it in items:
        by_key.setdefault(it.id, it)
        by_key.setdefault(os.path.abspath(it.file), it)
    base = os.path.dirname(os.path.abspath(opts.eval_csv))
    waveforms: dict[str, np.ndarray] = {}
    entries, ids = [], set()
    for i, row in enumerate(rows):
        where = f"{opts.eval_csv} row {i + 2}"
        name = row["video"].strip()
        item = by_key.get(os.path.abspath(_resolve(name, base))) or by_key.get(os.path.splitext(os.path.basename(name))[0])
        if item is None:
            raise InputError(f"{where}: video {name!r} is not among --videos")
        if not is_done(opts.output, item):
            opts.log(f"evaluation clip {where} left out: {item.file} has no features")
            continue
        start, end = _float(row["start"], where, "start"), _float(row["end"], where, "end")
        caption = (row.get("caption", row.get("text")) or "").strip()
        files = feature_files(opts.output, item)
        f2d, f3d = read_feature_npz(files["2d"], "features"), read_feature_npz(files["3d"], "features")
        if item.path not in waveforms:
            waveforms = {item.path: video.decode_audio(item.file, opts.limits())}
        wave = waveforms[item.path]
        lo = 0 if start is None else int(start * SAMPLE_RATE)
        hi = len(wave) if end is None else int(end * SAMPLE_RATE)
        clip_id = item.id if start is None and end is None else f"{item.id}_{start or 0:g}_{end if end is not None else 'end'}"
        while clip_id in ids:
            clip_id += "_"
        ids.add(clip_id)
        audio = log_mel_spectrogram(wave[lo:hi])
        a2d, a3d = _rows(f2d, start, end, video.FPS_2D), _rows(f3d, start, end, video.FPS_3D / video.CLIP_FRAMES)
        if opts.eval_format == "msrvtt":
            entries.append({"id": clip_id, "2d": a2d, "3d": a3d, "audio": audio, "eval_caption": caption,
                            "caption": [caption]})
        else:
            entries.append({"id": clip_id, "2d_full": a2d, "3d_full": a3d, "audio": audio, "caption": caption})
    storage.write_atomic(opts.eval_output, pickle.dumps(entries, protocol=4))
    opts.log(f"evaluation pickle ({opts.eval_format}): {len(entries)} clips -> {opts.eval_output}")
    return len(entries)


def _item_of(by_key: dict, name: str, base: str) -> VideoItem | None:
    return by_key.get(os.path.abspath(_resolve(name, base))) or by_key.get(os.path.splitext(os.path.basename(name))[0])


def write_classification_pickle(opts: Options, items: Sequence[VideoItem], rows: list[dict]) -> int:
    """A classification pickle (`msk_jax.data.classification_sets`) of the videos of `rows`
    (video, label: a class name, splits: the split names whose test list holds the video): each
    whole video's 2D and 3D features and log-mel as extracted; the classes are the sorted labels
    of every row (a video without features is left out, named, and its class kept). Returns
    the number of videos."""
    from msk_jax.data.classification_sets import write_pickle

    by_key = {}
    for it in items:
        by_key.setdefault(it.id, it)
        by_key.setdefault(os.path.abspath(it.file), it)
    base = os.path.dirname(os.path.abspath(opts.eval_csv))
    labels = [(row.get("label") or "").strip() for row in rows]
    for i, label in enumerate(labels):
        if not label:
            raise InputError(f"{opts.eval_csv} row {i + 2}: empty 'label' (the class name)")
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    videos, rows_of = [], {}
    for i, row in enumerate(rows):
        where = f"{opts.eval_csv} row {i + 2}"
        name = (row.get("video") or "").strip()
        item = _item_of(by_key, name, base)
        if item is None:
            raise InputError(f"{where}: video {name!r} is not among --videos")
        if item.path in rows_of:
            raise InputError(f"{where}: video {name!r} is listed twice (also {rows_of[item.path]}); a video has "
                             "one label and lists all its splits in one row")
        rows_of[item.path] = where
        if not is_done(opts.output, item):
            opts.log(f"classification video {where} left out: {item.file} has no features")
            continue
        files = feature_files(opts.output, item)
        videos.append({"id": item.id, "2d": read_feature_npz(files["2d"], "features"),
                       "3d": read_feature_npz(files["3d"], "features"), "audio": read_feature_npz(files["audio"], "arr_0"),
                       "label": index[labels[i]],
                       "splits": [s for s in re.split(r"[\s,;|]+", row.get("splits") or "") if s]})
    write_pickle(opts.eval_output, classes, videos)
    opts.log(f"evaluation pickle (classification): {len(videos)} videos, {len(classes)} classes -> {opts.eval_output}")
    return len(videos)
