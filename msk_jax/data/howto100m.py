"""HowTo100M training data in the original on-disk format, and the original's clip sampling.

Layout: a csv with a column `path` listing videos (the id is the path's last component); per
video `<root_2d>/<path>/<id>_2d.npz` and `<root_3d>/<path>/<id>_3d.npz` (key `features`, (T, D))
and `<root_audio>/<path>/<id>_spec.npz` (key `arr_0`, (40, frames) log-mel at 100 frames/s);
`caption.pickle` maps id -> {'start': [...], 'end': [...], 'text': [...]} (ASR segments, s).

Clip sampling (per video, `n_clips` clips): a random start in [0, duration - min_time]; if an ASR
segment covers the start (or else the end), take it and extend it with the nearer neighbouring
segment (the previous one if its span is not longer, else the next) until it lasts >= min_time,
joining their words (each neighbour's words are appended, whichever side it is on, as in the
original); otherwise the clip has no text. With `text_audio_misaligned` the audio window starts
0.5 * min_time after the text start. Video features of [start, end] at each rate:
rows int(start * fps) : int(end * fps) + 1.

Sampling is planned first (`plan_clips`: every random draw, and the windows of rows and frames
each clip reads), then filled from those windows (`fill_clips`), so that a store can read every
window of a video at once (`feature_store.FeatureStoreSource.sample_videos`).
"""

from __future__ import annotations

import csv
import dataclasses
from typing import Any, Mapping

import numpy as np

from msk_jax import errors, safe_load, storage
from msk_jax.data import batch, model_inputs, word2vec
from msk_jax.data.word2vec import WordVectors, load_vectors


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    """How training clips are cut; built from the configuration (`input_pipeline.clip_settings`:
    config.data and config.model.audio_feat_dim), which holds every value."""

    min_time: float
    n_video_tokens: int          # int(1.5 * min_time) in the original
    fps_2d: float
    fps_3d: float
    max_words: int
    num_audio_frames: int
    n_clips: int
    text_audio_misaligned: bool
    audio_bins: int


@dataclasses.dataclass
class Video:
    """One video's raw features, in memory. Clip sampling reads it through the window methods
    (`num_rows_2d`, `rows_2d(lo, hi)`, ...), which a store that reads only what a clip uses also
    provides (`msk_jax.data.feature_store`)."""

    id: str
    features_2d: np.ndarray  # (T2, D2)
    features_3d: np.ndarray  # (T3, D3)
    log_mel: np.ndarray      # (bins, frames)
    caption: dict            # {'start': (S,), 'end': (S,), 'text': [S str]}

    @property
    def num_rows_2d(self) -> int:
        return len(self.features_2d)

    @property
    def num_rows_3d(self) -> int:
        return len(self.features_3d)

    @property
    def num_frames(self) -> int:
        return self.log_mel.shape[1]

    def rows_2d(self, lo: int, hi: int) -> np.ndarray:
        return self.features_2d[lo:hi]

    def rows_3d(self, lo: int, hi: int) -> np.ndarray:
        return self.features_3d[lo:hi]

    def frames(self, lo: int, hi: int) -> np.ndarray:
        """Log-mel frames [lo, hi) as (bins, hi - lo)."""
        return self.log_mel[:, lo:hi]


def read_csv_paths(csv_path: str) -> list[str]:
    """The `path` column of the HowTo100M csv (a local path or a URL)."""
    if not storage.exists(csv_path):
        raise FileNotFoundError(f"HowTo100M csv '{csv_path}' does not exist.")
    with storage.open_read(csv_path, text=True) as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise errors.DataError(csv_path, f"needs a 'path' column, found columns {reader.fieldnames}", "bad csv")
        return [row["path"].replace("None/", "") for row in reader if row["path"]]


def load_captions(path: str) -> dict:
    if not storage.exists(path):
        raise FileNotFoundError(f"caption file '{path}' does not exist.")
    with storage.open_read(path) as f:
        # A downloaded file: only data types, never code; a value too large to make refuses its
        # video alone (check_caption).
        captions = safe_load.load(f, path, in_place=True)
    if not isinstance(captions, Mapping):
        raise errors.DataError(path, f"must hold a dict of video id -> caption, got {type(captions).__name__}", "bad file")
    return captions


def check_caption(source: str, video_id: str, caption: Any) -> dict:
    """{'start', 'end', 'text'} with at least one segment, or a DataError."""
    where = f"{source} [{video_id}]"
    if caption is None:
        raise errors.DataError(where, "no ASR caption for this video", "no caption")
    if not isinstance(caption, Mapping) or not {"start", "end", "text"} <= set(caption):
        raise errors.DataError(where, "caption must be a dict with 'start', 'end' and 'text'", "bad caption")
    for field in ("start", "end", "text"):
        if isinstance(caption[field], safe_load.Refused):
            raise errors.DataError(where, f"caption '{field}' {caption[field].problem}", "too large")
    try:
        start = np.asarray(caption["start"], np.float64).reshape(-1)
        end = np.asarray(caption["end"], np.float64).reshape(-1)
        text = list(caption["text"])
    except (TypeError, ValueError, OverflowError) as err:
        raise errors.DataError(where, f"caption times must be numbers and texts a list ({err})", "bad caption") from None
    if not (len(start) == len(end) == len(text)):
        raise errors.DataError(where, f"caption has {len(start)} starts, {len(end)} ends and {len(text)} texts",
                          "bad caption")
    if len(start) == 0:
        raise errors.DataError(where, "caption has no ASR segments", "no ASR segments")
    bad = ~(np.isfinite(start) & np.isfinite(end))
    if bad.any():
        i = int(np.argmax(bad))
        raise errors.DataError(where, f"segment {i} has time {start[i]}-{end[i]} (NaN or infinite)", "bad caption time")
    reversed_ = end < start
    if reversed_.any():
        i = int(np.argmax(reversed_))
        raise errors.DataError(where, f"segment {i} ends before it starts ({start[i]}-{end[i]} s)", "bad caption time")
    return {"start": start, "end": end, "text": text}


def read_feature_npz(path: str, key: str) -> np.ndarray:
    """Array `key` of a feature file, its size and header checked before it is inflated
    (`safe_load.load_npz`); a DataError names the file on any problem."""
    if not storage.exists(path):
        raise errors.DataError(path, "file does not exist", "missing features")
    return safe_load.load_npz(path, (key,))[key]


def feature_path(root: str, path: str, video_id: str, suffix: str) -> str:
    candidate = storage.join(root, path, f"{video_id}{suffix}")
    if not storage.exists(candidate):  # the original's fallback layouts
        alternative = storage.join(root, f"{path}{suffix}")
        if storage.exists(alternative):
            return alternative
    return candidate


def read_features(root_2d: str, root_3d: str, root_audio: str, path: str, dim_2d: int | None, dim_3d: int | None,
                  audio_bins: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(2D features, 3D features, log-mel) of the video at csv `path` under the three roots, each
    checked (dimensions where given); a DataError names the file on bad input."""
    video_id = path.split("/")[-1]
    p2d = feature_path(root_2d, path, video_id, "_2d.npz")
    p3d = feature_path(root_3d, path, video_id, "_3d.npz")
    paudio = storage.join(root_audio, path, f"{video_id}_spec.npz")
    f2d = model_inputs.check_features(p2d, read_feature_npz(p2d, "features"), dim_2d, "2D features")
    f3d = model_inputs.check_features(p3d, read_feature_npz(p3d, "features"), dim_3d, "3D features")
    log_mel = model_inputs.check_log_mel(paudio, read_feature_npz(paudio, "arr_0"), audio_bins)
    return f2d, f3d, log_mel


class HowTo100MReader:
    """Random access to HowTo100M-format videos: `reader.video(i)`, `reader.sample_clips(i, rng)`.

    It pickles as the paths and settings it was made from and the folder of its caption
    vocabulary's word vectors (`word2vec.caption_vectors`, built on the first pickling and kept
    in the cache folder), so a worker process opens the csv and captions itself and loads only
    those vectors, never the whole word2vec file; its clips are the same bits."""

    def __init__(self, csv_path: str, caption_path: str, features_2d: str, audio: str,
                 word_vectors: WordVectors, features_3d: str,
                 settings: ClipSettings | None = None, dim_2d: int | None = None, dim_3d: int | None = None):
        """features_2d / features_3d / audio: the roots of `<path>/<id>_2d.npz`, `_3d.npz` and
        `_spec.npz` (the same folder may hold both kinds of features). settings: how clips are
        cut; None for a reader that only reads whole videos (dataset builders), whose log-mel bins
        are then checked by the training reads."""
        self.paths, self.csv_path = read_csv_paths(csv_path), csv_path
        self.captions = load_captions(caption_path)
        self.caption_path = caption_path
        self.root_2d, self.root_3d, self.root_audio = features_2d, features_3d, audio
        self.word_vectors, self.settings = word_vectors, settings
        self.dim_2d, self.dim_3d = dim_2d, dim_3d
        self._caption_words: str | None = None

    def caption_words(self) -> str | None:
        """The folder of the vectors of the captions' words (`word2vec.load_vectors`), built once
        per caption file and word vectors; None without word vectors."""
        if self.word_vectors is None:
            return None
        if self._caption_words is None:
            self._caption_words = word2vec.caption_vectors(
                self.word_vectors, word2vec.file_identity(self.caption_path), self.caption_texts)
        return self._caption_words

    def caption_texts(self):
        """Every ASR text of the captions (of malformed ones too, as far as they have texts)."""
        for caption in self.captions.values():
            if isinstance(caption, Mapping) and isinstance(caption.get("text"), (list, tuple, np.ndarray)):
                yield from (str(text) for text in caption["text"])

    def __getstate__(self):
        return {"csv_path": self.csv_path, "caption_path": self.caption_path, "features_2d": self.root_2d,
                "features_3d": self.root_3d, "audio": self.root_audio, "settings": self.settings,
                "dim_2d": self.dim_2d, "dim_3d": self.dim_3d, "words": self.caption_words()}

    def __setstate__(self, state):
        words = state["words"]
        self.__init__(state["csv_path"], state["caption_path"], state["features_2d"], state["audio"],
                      None if words is None else load_vectors(words), features_3d=state["features_3d"],
                      settings=state["settings"], dim_2d=state["dim_2d"], dim_3d=state["dim_3d"])
        self._caption_words = words

    def __len__(self) -> int:
        return len(self.paths)

    def video_id(self, index: int) -> str:
        return self.paths[index].split("/")[-1]

    def video(self, index: int) -> Video:
        """Loads and validates one video; raises DataError naming the file on bad input."""
        path, video_id = self.paths[index], self.video_id(index)
        f2d, f3d, log_mel = read_features(self.root_2d, self.root_3d, self.root_audio, path, self.dim_2d, self.dim_3d,
                                          self.settings.audio_bins if self.settings else None)
        caption = check_caption(self.caption_path, video_id, self.captions.get(video_id))
        return Video(video_id, f2d, f3d, log_mel, caption)

    def sample_clips(self, index: int, rng: np.random.Generator, out=None) -> dict[str, np.ndarray]:
        if self.settings is None:
            raise ValueError("HowTo100MReader: cutting clips needs settings= (input_pipeline.clip_settings(config)).")
        return sample_clips(self.video(index), self.paths[index], self.word_vectors, self.settings, rng, out=out)


def _extend_to_min_time(caption: dict, index: int, min_time: float) -> tuple[int, int, list[str]]:
    """The original's neighbour extension around segment `index`: (first, last, words)."""
    starts, ends, texts = caption["start"], caption["end"], caption["text"]
    first = last = index
    words = word2vec.tokenize(texts[index])
    while ends[last] - starts[first] < min_time:
        if first > 0 and last < len(ends) - 1:
            span_next = ends[last + 1] - starts[first]
            span_prev = ends[last] - starts[first - 1]
            if span_prev <= span_next:
                first -= 1
                words.extend(word2vec.tokenize(texts[first]))
            else:
                last += 1
                words.extend(word2vec.tokenize(texts[last]))
        elif first > 0:
            first -= 1
            words.extend(word2vec.tokenize(texts[first]))
        elif last < len(ends) - 1:
            last += 1
            words.extend(word2vec.tokenize(texts[last]))
        else:
            break
    return first, last, words


def slice_bounds(start, stop, length: int) -> tuple[int, int]:
    """[lo, hi) that the Python slice `[start:stop]` selects from `length` items (hi >= lo)."""
    lo, hi, _ = slice(int(start), int(stop)).indices(length)
    return lo, max(lo, hi)


@dataclasses.dataclass(frozen=True, eq=False)
class ClipPlan:
    """One clip decided before any feature is read: its times, its words and the windows it reads
    (`windows`). Sampling is planned first and filled from the windows' rows after, so that a
    store can fetch every window of a video (of several videos) at once."""

    start: float
    end: float
    words: list[str]
    frames: tuple[int, int]      # log-mel frames [lo, hi) read (at most num_audio_frames)
    rows_2d: tuple[int, int]     # 2D rows [lo, hi) read
    rows_3d: tuple[int, int]     # 3D rows [lo, hi) read: one per video token
    pick_2d: np.ndarray | None   # the row of the 2D window each token takes; None when no tokens

    @property
    def windows(self) -> tuple[tuple[str, int, int], ...]:
        """(kind, lo, hi) of each read: kind '2d' and '3d' (rows), 'audio' (log-mel frames)."""
        return ("2d", *self.rows_2d), ("3d", *self.rows_3d), ("audio", *self.frames)


def video_windows(video, settings: ClipSettings, start: float, end: float):
    """The rows the video tokens of [start, end] use: rows int(start * fps) : int(end * fps) + 1
    at each rate, of which only those the tokens take are read. Returns the 2D window, the 3D
    window and the row of the 2D window each token takes (None when the clip has no tokens)."""
    lo2, hi2 = slice_bounds(start * settings.fps_2d, int(end * settings.fps_2d) + 1, video.num_rows_2d)
    lo3, hi3 = slice_bounds(start * settings.fps_3d, int(end * settings.fps_3d) + 1, video.num_rows_3d)
    n = min(hi3 - lo3, settings.n_video_tokens) if hi2 > lo2 else 0
    if n == 0:
        return (lo2, lo2), (lo3, lo3), None
    index = model_inputs.nearest_indices(hi2 - lo2, hi3 - lo3)[:n]
    return (lo2 + int(index[0]), lo2 + int(index[-1]) + 1), (lo3, lo3 + n), index - index[0]


def plan_clip(video, settings: ClipSettings, rng: np.random.Generator) -> ClipPlan:
    """One random clip (one `rng.random()`): a random start in [0, duration - min_time], the ASR
    segment there extended to min_time (or no text), and the windows it reads."""
    duration = int(model_inputs.frames_to_time(video.num_frames))
    start = rng.random() * max(0, duration - settings.min_time)
    end = start + settings.min_time
    starts, ends = video.caption["start"], video.caption["end"]
    at_start = max(0, int(np.searchsorted(starts, start, side="left")) - 1)
    at_end = max(0, int(np.searchsorted(starts, end, side="left")) - 1)
    if starts[at_start] <= start <= ends[at_start]:
        segment = at_start
    elif starts[at_end] <= end <= ends[at_end]:
        segment = at_end
    else:
        segment = None
    if segment is None:  # no ASR narration in this clip
        first_frame = max(0, int(model_inputs.time_to_frames(start)))
        frames = slice_bounds(first_frame, first_frame + settings.num_audio_frames, video.num_frames)
        words = []
    else:
        first, last, words = _extend_to_min_time(video.caption, segment, settings.min_time)
        start, end = float(starts[first]), float(ends[last])
        audio_start, audio_end = start, end
        if settings.text_audio_misaligned:
            audio_start = start + 0.5 * settings.min_time
            audio_end = audio_start + settings.min_time
        first_frame, last_frame = model_inputs.time_to_frames([audio_start, audio_end])
        frames = slice_bounds(max(0, first_frame), last_frame, video.num_frames)
    frames = (frames[0], min(frames[1], frames[0] + settings.num_audio_frames))
    rows_2d, rows_3d, pick_2d = video_windows(video, settings, start, end)
    return ClipPlan(start, end, words, frames, rows_2d, rows_3d, pick_2d)


def plan_clips(video, settings: ClipSettings, rng: np.random.Generator) -> list[ClipPlan]:
    """The `settings.n_clips` clips of one video, planned (the draws of `sample_clips`)."""
    return [plan_clip(video, settings, rng) for _ in range(settings.n_clips)]


def _fill_video(video, rows_2d: tuple[int, int], rows_3d: tuple[int, int], pick_2d, settings: ClipSettings,
                out=None):
    normalized = getattr(video, "rows_normalized", False)
    tokens_3d = video.rows_3d(*rows_3d)
    tokens_2d = video.rows_2d(*rows_2d)
    if pick_2d is not None:
        tokens_2d = tokens_2d[pick_2d]
    return model_inputs.video_tokens(tokens_2d, tokens_3d, settings.n_video_tokens, out=out, normalized=normalized)


def _fill_audio(video, plan: ClipPlan, settings: ClipSettings, out=None):
    return model_inputs.audio_features(video.frames(*plan.frames), settings.num_audio_frames, out=out)


def clip_video(video, settings: ClipSettings, start: float, end: float, out=None):
    """The video tokens of [start, end] (`video_windows`), written into `out` = (video, mask) if given."""
    return _fill_video(video, *video_windows(video, settings, start, end), settings, out=out)


def clip_shapes(settings: ClipSettings, video_dim: int, word_dim: int) -> dict[str, tuple[int, ...]]:
    """The shapes of one video's clip arrays (float32)."""
    return batch.shapes(settings.n_clips, video_tokens=settings.n_video_tokens, video_dim=video_dim,
                        audio_bins=settings.audio_bins, audio_frames=settings.num_audio_frames,
                        words=settings.max_words, word_dim=word_dim)


def fill_clips(video, path: str, plans: list[ClipPlan], word_vectors: WordVectors, settings: ClipSettings,
               out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The clips of `plans` (`plan_clips`) cut from `video`, which is read only at the plans'
    windows (`ClipPlan.windows`): the arrays and fields of `sample_clips`."""
    if out is None:
        video_dim = video.rows_2d(0, 0).shape[1] + video.rows_3d(0, 0).shape[1]
        out = {k: np.empty(shape, np.float32)
               for k, shape in clip_shapes(settings, video_dim, word_vectors.dim).items()}
    raw_texts = []
    for c, plan in enumerate(plans):
        _fill_audio(video, plan, settings, out=(out["audio"][c], out["audio_mask"][c]))
        raw_texts.append(model_inputs.text_features(plan.words, word_vectors, settings.max_words,
                                         (out["text"][c], out["text_mask"][c]))[2])
        _fill_video(video, plan.rows_2d, plan.rows_3d, plan.pick_2d, settings,
                    out=(out["video"][c], out["video_mask"][c]))
    return {
        **{k: out[k] for k in batch.KEYS},
        "start": np.array([p.start for p in plans]), "end": np.array([p.end for p in plans]),
        "raw_text": np.array(raw_texts, dtype=object),
        "id": np.array([f"{path}{p.start}" for p in plans], dtype=object),
    }


def sample_clips(video, path: str, word_vectors: WordVectors, settings: ClipSettings,
                 rng: np.random.Generator, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """`settings.n_clips` clips of one video (a `Video`, or anything with its window methods),
    stacked: video (n, tokens, D2 + D3), audio (n, bins, frames), text (n, words, dim), their
    masks (`batch.KEYS`, written into `out` when given, e.g. shared memory), and `start`,
    `end`, `raw_text`, `id`. Planned first (`plan_clips`, every draw of `rng`), then filled
    from the windows (`fill_clips`)."""
    return fill_clips(video, path, plan_clips(video, settings, rng), word_vectors, settings, out=out)
