"""Zero-shot classification sets (UCF101, HMDB51, the demo's spoken digits) as model inputs.

The original configures UCF101 and HMDB51 (`val_cls_data_loaders`: 48 video tokens, 3072 STFT
frames, batch 8) but never published the format of its two pickles; msk_jax reads this one:

- a pickle (read by `safe_load`: data types only) of a dict
  ``{'classes': [name, ...], 'videos': [video, ...]}`` (optionally ``'splits': [split, ...]``,
  the order in which splits are reported), each video a dict with ``'id'`` (str), ``'2d'``
  (T2, D2) and ``'3d'`` (T3, D3) features at 1 and 1.5 rows per second, ``'audio'`` (40, frames)
  log-mel at 100 frames per second, ``'label'`` (int, an index into ``classes``) and ``'splits'``
  (the names of the official splits whose *test* list holds the video, e.g. ``['1']``; a video
  in no test list is left out);
- or a csv with columns ``video``, ``label`` (a class name) and ``splits`` (split names separated
  by spaces, commas or semicolons) in the folder of features in the HowTo100M layout: ``video`` is
  a video's feature path under that folder (``<video>/<id>_2d.npz``, ``_3d.npz``, ``_spec.npz``,
  ``id`` its last part; a video-file extension is ignored) and the classes are the sorted labels.

Every problem (no class names, a label out of range, a video shorter than one token of its
window, features of the wrong width) is one `DataError` naming the file and the entry, and a
class name without a single word that has a vector names the class.

Each video is embedded from windows of `n_video_tokens` 3D rows (the 2D rows nearest-resampled to
the 3D rows first, as for retrieval) and `num_audio_frames` log-mel frames: the first window (the
original's first 32 s), or up to `windows` consecutive ones, whose embeddings are averaged. Class
names become text: CamelCase and underscores split, lower-cased (``ApplyEyeMakeup`` -> "apply eye
makeup"), each put into every prompt template (``'{}'``: the name alone).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from typing import Sequence

import numpy as np

from msk_jax import errors, safe_load, storage
from msk_jax.data import batch, model_inputs, word2vec
from msk_jax.data.howto100m import read_features
from msk_jax.data.word2vec import WordVectors

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
_SPLIT_SEPARATORS = re.compile(r"[\s,;|]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


@dataclasses.dataclass
class ClassificationSet:
    """A classification set as model inputs: one batch row per window of a video (`row_video`
    says whose), one prompt row per class and template (`prompt_class` says which class)."""

    name: str
    batch: dict[str, "RowColumn"]     # video, video_mask, audio, audio_mask, text, text_mask (text empty)
    row_video: np.ndarray             # (rows,) index of the row's video
    video_ids: list[str]
    labels: np.ndarray                # (videos,) class index
    splits: dict[str, np.ndarray]     # split name -> (videos,) bool: in that split's test list
    classes: list[str]
    prompts: dict[str, np.ndarray]    # the same keys; text rows, video and audio empty
    prompt_class: np.ndarray          # (prompt rows,) class index
    unknown_words: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # class -> words without a vector
    source: str = ""
    left_out: int = 0                 # videos in no test list

    def __len__(self) -> int:
        return len(self.row_video)


def class_words(name: str) -> list[str]:
    """A class name as words: CamelCase and underscores split, lower-cased."""
    spaced = _CAMEL.sub(" ", str(name).replace("_", " ").replace("-", " "))
    return [w.lower() for w in word2vec.tokenize(spaced)]


def _split_names(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [s for s in _SPLIT_SEPARATORS.split(value.strip()) if s]
    if isinstance(value, (list, tuple, np.ndarray)):
        names = []
        for s in value:
            if isinstance(s, bytes) or not isinstance(s, (str, int, np.integer)):
                raise errors.DataError(where, f"'splits' must list split names (str or int), got {s!r}", "bad splits")
            names.append(str(s))
        return names
    raise errors.DataError(where, f"'splits' must be a list of split names, got {type(value).__name__}", "bad splits")


def _check_classes(path: str, classes) -> list[str]:
    if not isinstance(classes, (list, tuple)) or not classes:
        raise errors.DataError(path, "has no class names: 'classes' must be a non-empty list of str (a label is an "
                                "index into it)", "missing classes")
    for i, name in enumerate(classes):
        if not isinstance(name, str) or not name.strip():
            raise errors.DataError(f"{path} [class {i}]", f"class name must be a non-empty str, got {name!r}", "bad class")
    if len(set(classes)) != len(classes):
        twice = sorted({c for c in classes if classes.count(c) > 1})
        raise errors.DataError(path, f"class names appear twice: {twice}", "bad class")
    return [str(c) for c in classes]


def load_pickle(path: str) -> tuple[list[str], list[dict], list[str] | None]:
    """(classes, videos, split order or None) of a classification pickle; the videos' fields are
    checked by `build_classification_set`."""
    with storage.open_read(path) as f:
        data = safe_load.load(f, path)  # only data types, never code; a DataError names the file
    if not isinstance(data, dict):
        raise errors.DataError(path, f"must hold a dict with 'classes' and 'videos', got {type(data).__name__}", "bad file")
    classes = _check_classes(path, data.get("classes"))
    videos = data.get("videos")
    if not isinstance(videos, list):
        raise errors.DataError(path, "has no 'videos' list", "bad file")
    order = data.get("splits")
    if order is not None:
        order = _split_names(order, path)
    return classes, videos, order


def load_csv(path: str, dim_2d: int | None = None, dim_3d: int | None = None,
             audio_bins: int | None = None) -> tuple[list[str], list[dict], None]:
    """(classes, videos, None) of a csv (video, label, splits) over features in the HowTo100M
    layout under the csv's folder."""
    root = os.fspath(storage.path(path).parent)
    with storage.open_read(path, text=True) as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    fields = set(rows[0]) if rows else set()
    missing = [c for c in ("video", "label", "splits") if c not in fields]
    if missing:
        raise errors.DataError(path, f"needs the columns video, label and splits; missing {', '.join(missing)}", "bad csv")
    classes = sorted({(row["label"] or "").strip() for row in rows})
    if "" in classes:
        i = next(i for i, row in enumerate(rows) if not (row["label"] or "").strip())
        raise errors.DataError(f"{path} [row {i + 2}]", "has an empty label", "missing classes")
    index = {c: i for i, c in enumerate(classes)}
    videos = []
    for i, row in enumerate(rows):
        where = f"{path} [row {i + 2}]"
        video = (row["video"] or "").strip().strip("/")
        if not video:
            raise errors.DataError(where, "has an empty 'video' field", "bad entry")
        if video.lower().endswith(VIDEO_EXTENSIONS):
            video = os.path.splitext(video)[0]
        try:
            f2d, f3d, log_mel = read_features(root, root, root, video, dim_2d, dim_3d, audio_bins)
        except errors.DataError as err:  # names the feature file; the row says which video
            raise errors.DataError(where, str(err), err.reason) from None
        videos.append({"id": video, "2d": f2d, "3d": f3d, "audio": log_mel, "label": index[row["label"].strip()],
                       "splits": row["splits"] or "", "where": where})
    return classes, videos, None


def load_entries(path: str, what: str, field: str, **csv_options) -> tuple[list[str], list[dict], list[str] | None]:
    """The classes and videos of a classification file (pickle or csv); a missing file names
    the configuration field it came from."""
    if not storage.exists(path):
        raise FileNotFoundError(f"config.data.{field}='{path}' ({what}) does not exist; see "
                                "docs/classification.md.")
    if path.lower().endswith(".csv"):
        return load_csv(path, **csv_options)
    return load_pickle(path)


def _windows(f2d: np.ndarray, f3d: np.ndarray, log_mel: np.ndarray, n_tokens: int, n_frames: int,
             windows: int, where: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(2D rows, 3D rows, log-mel frames) of each window of a video: the first always, then each
    next one that starts within both the video rows and the audio (one audio token)."""
    if not len(f2d) or not len(f3d):
        raise errors.DataError(where, f"has {len(f2d)} 2D and {len(f3d)} 3D feature rows: shorter than one video "
                                 "token of its window", "video too short")
    rows_2d = model_inputs.nearest_resample(f2d, len(f3d))
    out = []
    for w in range(max(1, windows)):
        lo_tokens, lo_frames = w * n_tokens, w * n_frames
        if w and (lo_tokens >= len(f3d) or log_mel.shape[1] - lo_frames < model_inputs.AUDIO_TOKEN_FRAMES):
            break
        out.append((rows_2d[lo_tokens:lo_tokens + n_tokens], f3d[lo_tokens:lo_tokens + n_tokens],
                    log_mel[:, lo_frames:lo_frames + n_frames]))
    return out


class _Rows:
    """The model inputs of a set's windows, built batch by batch when read: a padded 32-s window
    takes 1.3 MB (48 x 4096 video floats and 40 x 3072 audio frames), 14 GB for UCF101's 11,213
    test videos, while their features take a fifth of that. The last batch built is kept, as
    `evaluation.embed` reads it one key at a time."""

    def __init__(self, windows: list, n_tokens: int, n_frames: int, video_dim: int, audio_bins: int,
                 text_shape: tuple[int, int]):
        self.windows, self.n_tokens, self.n_frames = windows, n_tokens, n_frames
        self.shapes = batch.clip_shapes(video_tokens=n_tokens, video_dim=video_dim, audio_bins=audio_bins,
                                        audio_frames=n_frames, words=text_shape[0], word_dim=text_shape[1])
        self._last: tuple[tuple, dict] | None = None

    def build(self, index: slice) -> dict[str, np.ndarray]:
        key = index.indices(len(self.windows))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        rows = self.windows[index]
        out = {k: np.zeros((len(rows),) + shape, np.float32) for k, shape in self.shapes.items()}
        for j, (rows_2d, rows_3d, log_mel) in enumerate(rows):
            model_inputs.video_tokens(rows_2d, rows_3d, self.n_tokens, out=(out["video"][j], out["video_mask"][j]))
            model_inputs.audio_features(log_mel, self.n_frames, out=(out["audio"][j], out["audio_mask"][j]))
        self._last = (key, out)
        return out


class RowColumn:
    """One key of `_Rows` as an array-like column: a slice gives a numpy array."""

    def __init__(self, rows: _Rows, key: str):
        self.rows, self.key = rows, key
        self.shape = (len(rows.windows),) + rows.shapes[key]
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.rows.build(slice(int(index), int(index) + 1 or None))[self.key][0]
        if not isinstance(index, slice):
            raise TypeError(f"a classification set's rows are read by index or slice, got {type(index).__name__}")
        return self.rows.build(index)[self.key]

    def __array__(self, dtype=None, copy=None):
        array = self.rows.build(slice(None))[self.key]
        return array if dtype is None else array.astype(dtype)


def build_prompts(classes: Sequence[str], templates: Sequence[str], word_vectors: WordVectors, max_words: int,
                  source: str) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, list[str]]]:
    """(text rows, class of each row, class -> words without a vector) of every class in every
    template; a class none of whose words has a vector raises a DataError naming it."""
    texts, masks, owner, unknown = [], [], [], {}
    for c, name in enumerate(classes):
        words = class_words(name)
        known = [w for w in words if w in word_vectors]
        missing = [w for w in words if w not in word_vectors]
        if not known:
            raise errors.DataError(f"{source} [class {c} {name!r}]",
                              f"no word of the class name ({' '.join(words) or repr(name)}) has a vector in the word "
                              "vectors", "unknown class name")
        if missing:
            unknown[name] = missing
        for template in templates:
            text, mask, _ = model_inputs.text_features(word2vec.tokenize(template.replace("{}", " ".join(words))), word_vectors,
                                            max_words)
            texts.append(text)
            masks.append(mask)
            owner.append(c)
    return {"text": np.stack(texts), "text_mask": np.stack(masks)}, np.asarray(owner, np.int64), unknown


def build_classification_set(name: str, classes: list[str], videos: list[dict], word_vectors: WordVectors, *,
                             source: str, n_video_tokens: int, num_audio_frames: int, video_dim: int,
                             max_words: int, audio_bins: int = 40, templates: Sequence[str] = ("{}",),
                             windows: int = 1, split_order: Sequence[str] | None = None, dim_2d: int | None = None,
                             dim_3d: int | None = None) -> ClassificationSet:
    """Model inputs of a classification set; every bad entry is a DataError naming `source`,
    the entry and its id."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"classification templates must each hold '{{}}' (the class name), got {list(templates)}.")
    prompts, prompt_class, unknown = build_prompts(classes, templates, word_vectors, max_words, source)
    windows_of_rows, row_video, ids, labels, memberships, seen, left_out = [], [], [], [], [], set(), 0
    for i, entry in enumerate(videos):
        if not isinstance(entry, dict):
            raise errors.DataError(f"{source} [entry {i}]", f"must be a dict, got {type(entry).__name__}", "bad entry")
        where = (entry["where"] if isinstance(entry.get("where"), str)
                 else f"{source} [entry {i}, id {entry.get('id')!r}]")
        for key in ("id", "2d", "3d", "audio", "label", "splits"):
            if key not in entry:
                raise errors.DataError(where, f"has no '{key}' field", "bad entry")
        label = entry["label"]
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise errors.DataError(where, f"label must be an int (an index into the {len(classes)} classes), got {label!r}",
                              "bad label")
        if not 0 <= int(label) < len(classes):
            raise errors.DataError(where, f"label {int(label)} is out of range: {len(classes)} classes, labels "
                                     f"0..{len(classes) - 1}", "label out of range")
        member = _split_names(entry["splits"], where)
        if not member:
            left_out += 1
            continue
        vid = str(entry["id"])
        if vid in seen:
            raise errors.DataError(where, f"id {vid!r} appears twice", "duplicate id")
        seen.add(vid)
        f2d = model_inputs.check_features(where, entry["2d"], dim_2d, "'2d'")
        f3d = model_inputs.check_features(where, entry["3d"], dim_3d, "'3d'")
        log_mel = model_inputs.check_log_mel(where, entry["audio"], audio_bins)
        if f2d.shape[1] + f3d.shape[1] != video_dim:
            raise errors.DataError(where, f"video tokens would be {f2d.shape[1] + f3d.shape[1]}-d ('2d' + '3d'), the "
                                     f"model reads {video_dim}-d", "wrong dimension")
        for window in _windows(f2d, f3d, log_mel, n_video_tokens, num_audio_frames, windows, where):
            windows_of_rows.append(window)
            row_video.append(len(ids))
        ids.append(vid)
        labels.append(int(label))
        memberships.append(member)
    if not ids:
        raise errors.DataError(source, "has no video in a test split: an empty classification set", "empty")
    names = list(split_order or [])
    names += sorted({s for m in memberships for s in m} - set(names), key=lambda s: (len(s), s))
    splits = {s: np.array([s in m for m in memberships]) for s in names}
    splits = {s: mask for s, mask in splits.items() if mask.any()}
    rows = _Rows(windows_of_rows, n_video_tokens, num_audio_frames, video_dim, audio_bins or 40,
                 prompts["text"].shape[1:])
    inputs = {k: RowColumn(rows, k) for k in rows.shapes}
    prompt_rows = len(prompt_class)
    for key in ("video", "video_mask", "audio", "audio_mask"):
        prompts[key] = np.zeros((prompt_rows,) + rows.shapes[key], np.float32)
    return ClassificationSet(name, inputs, np.asarray(row_video, np.int64), ids, np.asarray(labels, np.int64), splits,
                             list(classes), prompts, prompt_class, unknown, source, left_out)


def write_pickle(path: str, classes: Sequence[str], videos: Sequence[dict],
                 splits: Sequence[str] | None = None) -> None:
    """A classification pickle in the format above (atomically; a local path or a URL)."""
    import pickle

    data = {"classes": list(classes), "videos": [dict(v) for v in videos]}
    if splits is not None:
        data["splits"] = list(splits)
    storage.write_atomic(path, pickle.dumps(data, protocol=4))
