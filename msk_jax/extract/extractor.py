"""Raw videos -> HowTo100M features, in the layout `msk_jax.data.howto100m.HowTo100MReader` reads.

Per video (`extract_video`): the frames of `msk_jax.extract.video` through the frame backbones in
fixed-size batches (one 2048-d row per second for 2D, per 16-frame clip for 3D), each row
L2-normalised and saved float16, as the original extractor; and the 40-bin log-mel spectrogram of
the 16 kHz audio (`msk_jax.data.audio`). Output, under one root (local or gs://):

    <output>/<path>/<id>_2d.npz     key 'features', (seconds, D) float16
    <output>/<path>/<id>_3d.npz     key 'features', (clips, D) float16
    <output>/<path>/<id>_spec.npz   key 'arr_0', (40, frames) float32
    <output>/videos.csv             column 'path': the videos with features (HowTo100M's csv)
    <output>/caption.pickle         id -> {'start', 'end', 'text'} (empty lists for a video without
                                    captions: the training reader skips it as "no ASR segments")
    <output>/index.json             per video: path, id, source file, rows, seconds, caption
                                    segments, and the reason for a video that could not be decoded
    <output>/parts/part-<i>-of-<n>.json  each process's results; the process that finds every part
                                    present writes the three files above

Files are written atomically, so a run stopped at any point resumes (`resume=True`): a video whose
three files exist is not extracted again. `<path>` is the video's path relative to the input
folder without its extension (or the input csv's `path` column), and `<id>` its last component.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import pickle
import sys
import time
from typing import Callable, Sequence

import numpy as np

from msk_jax import storage
from msk_jax.data.features import DataError
from msk_jax.data.howto100m import _load_npz
from msk_jax.extract import video as V

Backbone = Callable[[np.ndarray], np.ndarray]
SUFFIXES = {"2d": "_2d.npz", "3d": "_3d.npz", "audio": "_spec.npz"}


@dataclasses.dataclass(frozen=True)
class VideoItem:
    """One input video: its file and where its features go (`path`, whose last part is the id)."""

    file: str
    path: str

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
                if name.lower().endswith(V.VIDEO_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(root, name), videos)
                    items.append(VideoItem(os.path.join(root, name), os.path.splitext(rel)[0].replace(os.sep, "/")))
        if not items:
            raise InputError(f"{videos}: no video files ({', '.join(V.VIDEO_EXTENSIONS)}) in this folder")
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
        if path not in seen:
            seen.add(path)
            items.append(VideoItem(_resolve(file, base), path))
    if not items:
        raise InputError(f"{videos}: no rows")
    return items


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
    import jax
    import jax.numpy as jnp

    from msk_jax.extract import backbones as B

    if isinstance(weights, str):
        if not weights:
            raise InputError(f"--weights_{kind}: the real backbones need weights (or use --backbone=demo)")
        if not storage.exists(weights):
            raise InputError(f"--weights_{kind}: {weights}: file does not exist")
        variables = B.load_backbone_weights(weights, kind)
    else:
        variables = weights
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    model = B.backbone(kind, dtype=compute)
    variables = jax.device_put(variables)
    prep = B.preprocess_2d if kind == "2d" else B.preprocess_3d

    @jax.jit
    def apply(v, x):
        return model.apply(v, x).astype(jnp.float32)

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(apply(variables, np.asarray(prep(batch), np.float32)))

    return run, B.FEATURE_DIM


def demo_backbone(kind: str, seed: int = 0, feature_dim: int = 128) -> tuple[Backbone, int]:
    """The demo corpus's frame features (`msk_jax.extract.demo`)."""
    from msk_jax.extract.demo import DemoBackbone

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


def compute_features(decoded: V.DecodedVideo, backbone_2d: Backbone, dim_2d: int, backbone_3d: Backbone,
                     dim_3d: int, batch: int) -> dict[str, np.ndarray]:
    """{'2d': (N2, D) float16, '3d': (N3, D) float16, 'audio': (40, frames) float32} of a decoded video."""
    from msk_jax.data.audio import log_mel_spectrogram

    f2d = _batched(backbone_2d, decoded.frames_2d, batch, dim_2d)
    f3d = _batched(backbone_3d, V.clips_3d(decoded.frames_3d), max(1, batch // V.CLIP_FRAMES), dim_3d)
    return {"2d": l2_normalize(f2d).astype(np.float16), "3d": l2_normalize(f3d).astype(np.float16),
            "audio": log_mel_spectrogram(decoded.waveform)}


def extract_video(item: VideoItem, output: str, backbone_2d: Backbone, dim_2d: int, backbone_3d: Backbone,
                  dim_3d: int, batch: int) -> dict:
    """Decodes one video, writes its three files (each atomically); returns its index record.
    Raises DataError naming the file when it cannot be decoded."""
    decoded = V.decode_video(item.file)
    if len(decoded.frames_2d) == 0 or len(decoded.frames_3d) == 0:
        raise DataError(item.file, "no frame was decoded", "no frames")
    feats = compute_features(decoded, backbone_2d, dim_2d, backbone_3d, dim_3d, batch)
    files = feature_files(output, item)
    storage.write_atomic(files["2d"], _npz_bytes(features=feats["2d"]))
    storage.write_atomic(files["3d"], _npz_bytes(features=feats["3d"]))
    storage.write_atomic(files["audio"], _npz_bytes(feats["audio"]))
    return {"rows_2d": len(feats["2d"]), "rows_3d": len(feats["3d"]), "audio_frames": int(feats["audio"].shape[1]),
            "seconds": round(decoded.duration, 3), "frames": int(len(decoded.frames_2d) + len(decoded.frames_3d))}


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
    log: Callable[[str], None] = dataclasses.field(default=lambda m: print(f"[extract] {m}", file=sys.stderr,
                                                                            flush=True))


def make_backbones(opts: Options) -> tuple[Backbone, int, Backbone, int]:
    if opts.backbone == "demo":
        return (*demo_backbone("2d", opts.demo_seed, opts.demo_feature_dim),
                *demo_backbone("3d", opts.demo_seed, opts.demo_feature_dim))
    if opts.backbone != "real":
        raise InputError(f"--backbone={opts.backbone}: expected real or demo")
    return (*real_backbone("2d", opts.weights_2d, opts.dtype), *real_backbone("3d", opts.weights_3d, opts.dtype))


def _part_path(output: str, index: int, count: int) -> str:
    return storage.join(output, "parts", f"part-{index:05d}-of-{count:05d}.json")


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
    if opts.eval_format not in ("msrvtt", "youcook2"):
        raise InputError(f"--eval_format={opts.eval_format}: expected msrvtt or youcook2")
    items = list_videos(opts.videos)
    eval_rows = _segment_rows(opts.eval_csv) if opts.eval_csv else []
    captions = load_captions(opts.captions, items)
    storage.makedirs(opts.output)
    mine = items[opts.process_index::opts.process_count]
    todo = [it for it in mine if not is_done(opts.output, it)]
    opts.log(f"{len(items)} videos, {len(mine)} for process {opts.process_index}/{opts.process_count}, "
             f"{len(mine) - len(todo)} already extracted")
    records = {}
    failures: dict[str, str] = {}
    if todo:
        b2, d2, b3, d3 = make_backbones(opts)
        began = last = time.monotonic()
        frames = 0
        for k, item in enumerate(todo):
            try:
                record = extract_video(item, opts.output, b2, d2, b3, d3, opts.batch)
            except DataError as err:
                failures[item.path] = f"{err.problem} ({err.reason})"
                opts.log(f"cannot extract {item.file}: {err.problem}")
                continue
            frames += record["frames"]
            records[item.path] = record
            now = time.monotonic()
            if now - last >= opts.progress_seconds or k + 1 == len(todo):
                last, elapsed = now, now - began
                eta = elapsed / (k + 1) * (len(todo) - k - 1)
                opts.log(f"{k + 1}/{len(todo)} videos ({len(failures)} failed), {frames / max(elapsed, 1e-9):.1f} "
                         f"frames/s, ETA {eta / 60:.1f} min")
    for item in mine:
        if item.path not in records and item.path not in failures and is_done(opts.output, item):
            records[item.path] = _record_from_files(opts.output, item)
    part = {"process_index": opts.process_index, "process_count": opts.process_count,
            "videos": {it.path: {"id": it.id, "file": it.file, **records[it.path]} if it.path in records
                       else {"id": it.id, "file": it.file, "error": failures.get(it.path, "not extracted")}
                       for it in mine}}
    storage.write_atomic(_part_path(opts.output, opts.process_index, opts.process_count), json.dumps(part, indent=1))
    summary = {"videos": len(items), "extracted_now": len(todo) - len(failures), "skipped_done": len(mine) - len(todo),
               "failed": failures, "complete": False}
    parts = [_part_path(opts.output, i, opts.process_count) for i in range(opts.process_count)]
    if all(storage.exists(p) for p in parts):
        merged = {}
        for p in parts:
            with storage.open_read(p, text=True) as f:
                merged.update(json.load(f)["videos"])
        summary.update(write_index(opts.output, items, merged, captions))
        summary["complete"] = True
        if opts.store and summary["usable"]:
            if storage.exists(storage.join(opts.store, "meta.json")):
                opts.log(f"feature store {opts.store} already built; delete it to rebuild with the new videos")
            else:
                build_store(opts)
        if opts.eval_csv:
            summary["eval_entries"] = write_eval_pickle(opts, items, eval_rows)
    failed_total = summary.get("failed_total", len(failures))
    opts.log(f"done: {summary['extracted_now']} extracted, {summary['skipped_done']} already there, "
             f"{len(failures)} failed here" + (f" ({failed_total} in all)" if summary["complete"] else ""))
    for path, reason in failures.items():
        opts.log(f"  failed: {path}: {reason}")
    return summary


def _record_from_files(output: str, item: VideoItem) -> dict:
    files = feature_files(output, item)
    arrays = {k: _load_npz(files[k], "arr_0" if k == "audio" else "features") for k in files}
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
        f2d, f3d = _load_npz(files["2d"], "features"), _load_npz(files["3d"], "features")
        if item.path not in waveforms:
            waveforms = {item.path: V.decode_audio(item.file)}
        wave = waveforms[item.path]
        lo = 0 if start is None else int(start * SAMPLE_RATE)
        hi = len(wave) if end is None else int(end * SAMPLE_RATE)
        clip_id = item.id if start is None and end is None else f"{item.id}_{start or 0:g}_{end if end is not None else 'end'}"
        while clip_id in ids:
            clip_id += "_"
        ids.add(clip_id)
        audio = log_mel_spectrogram(wave[lo:hi])
        a2d, a3d = _rows(f2d, start, end, V.FPS_2D), _rows(f3d, start, end, V.FPS_3D / V.CLIP_FRAMES)
        if opts.eval_format == "msrvtt":
            entries.append({"id": clip_id, "2d": a2d, "3d": a3d, "audio": audio, "eval_caption": caption,
                            "caption": [caption]})
        else:
            entries.append({"id": clip_id, "2d_full": a2d, "3d_full": a3d, "audio": audio, "caption": caption})
    storage.write_atomic(opts.eval_output, pickle.dumps(entries, protocol=4))
    opts.log(f"evaluation pickle ({opts.eval_format}): {len(entries)} clips -> {opts.eval_output}")
    return len(entries)
