"""What an index is built from: the videos of a feature folder, their windows, the run's towers.

A feature folder has HowTo100M's layout: a csv with a column `path` (--csv, or the only *.csv of
the folder), `<root>/<path>/<id>_2d.npz` and `_3d.npz` (key `features`) and `<id>_spec.npz` (key
`arr_0`, 40-bin log-mel at 100 frames/s), the roots being DIR/features_2d, DIR/features_3d and
DIR/audio where those folders exist, else DIR itself (the demo corpus's `howto/` folder, and what
`python -m msk_jax.extract` writes). What the extractor writes besides, and the page uses: the
video files (`index.json`: each video's file, relative to the folder) and a still a second
(`<id>_stills.zip`, `thumbnails`).

Each video is cut into windows of `window` seconds every `stride` seconds (the last one ends
with the audio); a window's inputs are built as training builds a clip (`howto100m.clip_video`
for the video tokens, the log-mel frames of [start, end] for the audio; at the training length,
the training clip's token and frame counts, scaled with the window otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from msk_jax import storage
from msk_jax.data import batch as batch_spec
from msk_jax.data import model_inputs
from msk_jax.data.howto100m import Video, check_caption, clip_video, feature_path, read_features, slice_bounds
from msk_jax.errors import DataError
from msk_jax.search import thumbnails
from msk_jax.search.store import SearchError

EXTRACT_FORMAT = "msk_jax.extract/1"


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    """Where the videos of a HowTo100M-layout folder are: the csv and the three roots."""

    csv: str
    features_2d: str
    features_3d: str
    audio: str
    captions: str | None = None
    folder: str = ""

    @classmethod
    def find(cls, folder: str, csv: str | None = None, captions: str | None = None) -> "FeatureLayout":
        """The layout of `folder` (see the module's docstring)."""
        if not storage.isdir(folder):
            raise SearchError(f"--features={folder}: no such folder")
        if csv is None:
            found = sorted(name for name in storage.listdir(folder) if name.endswith(".csv"))
            if len(found) != 1:
                raise SearchError(f"--features={folder}: expected one *.csv listing the videos (column 'path'), "
                                  f"found {found or 'none'}; name it with --csv")
            csv = storage.join(folder, found[0])

        def root(name, default):
            sub = storage.join(folder, name)
            return sub if storage.isdir(sub) else default

        features_2d = root("features_2d", folder)
        if captions is None and storage.exists(storage.join(folder, "caption.pickle")):
            captions = storage.join(folder, "caption.pickle")
        return cls(csv, features_2d, root("features_3d", features_2d), root("audio", folder), captions, folder)

    def files(self, path: str) -> list[str]:
        """The three feature files of the video at csv `path`."""
        video_id = path.split("/")[-1]
        return [feature_path(self.features_2d, path, video_id, "_2d.npz"),
                feature_path(self.features_3d, path, video_id, "_3d.npz"),
                storage.join(self.audio, path, f"{video_id}_spec.npz")]

    def stamp(self, path: str) -> str:
        """What changes when a video's features are written again: its files' sizes and times."""
        parts = []
        for file in self.files(path):
            try:
                if storage.is_remote(file):
                    parts.append(str(storage.size(file)))
                else:
                    info = os.stat(file)
                    parts.append(f"{info.st_size}:{info.st_mtime_ns}")
            except OSError:
                parts.append("-")
        return "|".join(parts)

    def stills(self, path: str) -> list[bytes] | None:
        """The video's stills, one a second, where the folder has them (`thumbnails`)."""
        video_id = path.split("/")[-1]
        file = storage.join(self.features_2d, path, video_id + thumbnails.SUFFIX)
        return thumbnails.read_stills(file) if storage.exists(file) else None


def video_files(folder: str) -> dict[str, str]:
    """csv path -> the absolute video file, from an extractor's index.json in `folder` (relative
    to the folder where it records that, else as it records it); {} where there is none."""
    meta_path = storage.join(folder, "index.json")
    if storage.is_remote(folder) or not storage.exists(meta_path):
        return {}
    try:
        meta = json.loads(storage.read_bytes(meta_path))
    except ValueError:
        return {}
    if not isinstance(meta, dict) or meta.get("format") != EXTRACT_FORMAT or not isinstance(meta.get("videos"), list):
        return {}
    base = os.path.abspath(folder)
    files = {}
    for record in meta["videos"]:
        if not isinstance(record, dict) or "error" in record or not isinstance(record.get("path"), str):
            continue
        relative, file = record.get("file_from_output"), record.get("file")
        candidates = [os.path.normpath(os.path.join(base, relative))] if isinstance(relative, str) else []
        candidates += [file] if isinstance(file, str) and os.path.isabs(file) else []
        for candidate in candidates:
            if os.path.isfile(candidate):
                files[record["path"]] = candidate
                break
    return files


def read_video(layout: FeatureLayout, path: str, dim_2d: int | None, dim_3d: int | None, audio_bins: int,
               captions: dict | None = None):
    """One video of the layout as a `howto100m.Video` (its ASR segments where `captions` has
    them, else none); a DataError names the file that cannot be used."""
    video_id = path.split("/")[-1]
    f2d, f3d, log_mel = read_features(layout.features_2d, layout.features_3d, layout.audio, path, dim_2d, dim_3d,
                                      audio_bins)
    caption = {"start": np.zeros(0), "end": np.zeros(0), "text": []}
    if captions and video_id in captions:
        try:
            caption = check_caption(layout.captions, video_id, captions[video_id])
        except DataError:
            pass  # the text is for display only
    return Video(video_id, f2d, f3d, log_mel, caption)


# ----------------------------------------------------------------------------------- windows


def window_settings(config, window: float):
    """The clip settings of a window of `window` seconds: training's (`sources.
    clip_settings`), with its video tokens and audio frames scaled from training's clip length
    (config.data.min_time) to the window (the same counts at the training length)."""
    from msk_jax.data_sources import clip_settings

    settings = clip_settings(config)
    scale = window / config.data.min_time
    frames = max(1, math.ceil(settings.num_audio_frames * scale / model_inputs.AUDIO_TOKEN_FRAMES)) * model_inputs.AUDIO_TOKEN_FRAMES
    return dataclasses.replace(settings, n_video_tokens=max(1, round(settings.n_video_tokens * scale)),
                               num_audio_frames=frames if scale != 1 else settings.num_audio_frames)


def video_duration(video) -> float:
    """A video's length (s): its audio's, as training's clip sampling measures it."""
    return float(model_inputs.frames_to_time(video.num_frames))


def window_starts(duration: float, window: float, stride: float) -> list[float]:
    """Starts every `stride` s while a window fits, and one more ending with the video where the
    last would leave its end uncovered (one window from 0 for a video shorter than `window`)."""
    last = max(0.0, duration - window)
    starts = [float(s) for s in np.arange(0.0, last + 1e-6, stride)]
    if starts[-1] < last - 1e-6:
        starts.append(last)
    return starts


def window_inputs(video, settings, start: float, end: float) -> dict[str, np.ndarray]:
    """The video tokens and audio of [start, end], as a training clip of those times is built:
    `clip_video` for the video, the log-mel frames from `time_to_frames(start)` to
    `time_to_frames(end)` (at most num_audio_frames) for the audio."""
    tokens, token_mask = clip_video(video, settings, start, end)
    first, last = model_inputs.time_to_frames([start, end])
    lo, hi = slice_bounds(max(0, int(first)), int(last), video.num_frames)
    hi = min(hi, lo + settings.num_audio_frames)
    audio, audio_mask = model_inputs.audio_features(video.frames(lo, hi), settings.num_audio_frames)
    return {"video": tokens, "video_mask": token_mask, "audio": audio, "audio_mask": audio_mask}


def window_text(caption: dict, start: float, end: float) -> str:
    """The ASR text of the segments that overlap [start, end]."""
    return " ".join(str(t) for s, e, t in zip(caption["start"], caption["end"], caption["text"])
                    if s < end and e > start)


class WindowStills:
    """Each window's JPEG still: from the video's still a second where the folder has them, drawn
    from its ASR digits for a demo-corpus video (config.data.source 'demo'), else none."""

    def __init__(self, layout: FeatureLayout, demo: bool):
        self.layout, self.demo, self.encoder = layout, demo, thumbnails.JpegEncoder()

    def of_video(self, path: str, video, duration: float):
        """still(start, end) -> bytes for one video."""
        stills = self.layout.stills(path)
        if stills:
            return lambda start, end: stills[thumbnails.second_of(start, end, len(stills))]
        if self.demo:
            shown = thumbnails.demo_seconds(video.caption, duration)
            return lambda start, end: self.encoder(thumbnails.demo_still(shown, start, end))
        return lambda start, end: b""


# ----------------------------------------------------------------------------------- the model


def embedder(config, model, variables):
    """embed(batch of model inputs, batch size) -> {'text', 'video', 'audio'} joint embeddings,
    each device embedding a slice of every batch (as evaluation does)."""
    from msk_jax import sharding
    from msk_jax.data.eval_sets import EvalSet
    from msk_jax.evaluators import embedding

    batches = sharding.batch_sharding(sharding.create_mesh([("data", -1)]))

    def embed(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
        n = len(batch["video"])
        eval_set = EvalSet("search", batch, [str(i) for i in range(n)], [""] * n, n)
        return embedding.embed(model, variables, eval_set, batch_size, sharding=batches)

    return embed


def load_weights(config, checkpoint: str, weights: str = "ema", step: int | None = None):
    """(model, variables, checkpoints folder, step) of a run's checkpoint: a workdir, its
    checkpoints/ folder or a step folder, or with `step`, that step of the checkpoints folder
    `checkpoint` (as an index records it)."""
    from msk_jax import checkpoint_reader
    from msk_jax.model import MultiSKModel

    model = MultiSKModel.from_config(config)
    if step is None:
        _, folder, step = checkpoint_reader.locate(checkpoint)
    else:
        folder = checkpoint
    template = checkpoint_reader.model_template(model, config, config.model.text_dim)
    variables, step = checkpoint_reader.load_msk_checkpoint(folder, step, template, weights)
    return model, variables, folder, step


def empty_text(config, n: int) -> dict[str, np.ndarray]:
    shapes = batch_spec.config_shapes(config, config.model.text_dim, n)
    return {k: np.zeros(shapes[k], np.float32) for k in ("text", "text_mask")}
