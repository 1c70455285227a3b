"""Text search over your own videos: index their windows with a trained run, then query in words.

    python -m msk_jax.search index --config=configs/howto.py:demo --checkpoint=RUN --features=DIR \\
        --index=OUT [--window=8 --stride=4]
    python -m msk_jax.search query --index=OUT "three four seven" [--k 10] [--json]
    python -m msk_jax.search query --index=OUT --queries=FILE [--json]

`index` reads videos in HowTo100M's feature layout under --features: a csv with a column `path`
(--csv, or the only *.csv in DIR), `<root>/<path>/<id>_2d.npz` and `_3d.npz` (key `features`)
and `<id>_spec.npz` (key `arr_0`, 40-bin log-mel at 100 frames/s), where the roots are
DIR/features_2d, DIR/features_3d and DIR/audio where those folders exist, else DIR itself (the
demo corpus's `howto/` folder, and what `python -m msk_jax.extract` writes). Each video is cut
into windows of --window seconds every --stride seconds (the last one ends with the audio); a
window's inputs are built as training builds a clip (`howto100m.clip_video` for the video
tokens, the log-mel frames of [start, end] for the audio; at the training length, the training
clip's token and frame counts, scaled with the window otherwise), embedded with the run's EMA
weights (--weights=online for the others) and stored with the fused video+audio embedding that
evaluation uses for t2v+a (`embedding.direction_embeddings`: the mean of the L2-normalised
video and audio embeddings). A video that cannot be read is named and skipped. ASR segments
(a caption.pickle in DIR, or --captions) are kept as each window's text, for display only.

The index (a local folder or gs://...) holds `windows-<digest>.npz` (per window: video id, path,
start, end, ASR text, and the video, audio and fused embeddings; named by a digest of its bytes)
and `index.json` (the run's configuration, the checkpoint folder and step, the weights, the window
settings, the skipped videos, and the name of its windows file). A rebuild writes its windows
beside the live ones and then index.json, in one atomic write (a rename on disk, one upload in a
bucket): that switches the index, and the windows it no longer names are removed after. So a
rebuild stopped at any point (killed, out of space) leaves the previous index answering queries
as before. One build of an index at a time.

`query` embeds each query as evaluation embeds a caption (`features.tokenize`, the run's word
vectors from the configuration's data paths, the first max_words known words) with the text
tower of the same weights, and ranks the windows by cosine similarity with their fused
video+audio embedding (--embedding=v or a: the video or audio embedding alone). Words without a
vector are named; a query with none is an error. Output: a table (rank, video, start, end,
score, ASR text) or, with --json, one JSON object per query and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
import time

import numpy as np

from msk_jax import safe_load, storage
from msk_jax.data import model_inputs, word2vec
from msk_jax.errors import DataError

FORMAT = "msk_jax.search/1"
EMBEDDINGS = {"v+a": "fused video+audio", "v": "video", "a": "audio"}
WINDOW_FIELDS = ("video_id", "path", "start", "end", "text", "video", "audio", "fused")
# The windows files an index.json may name ("windows.npz": indexes written before the name held a digest).
WINDOWS_NAME = re.compile(r"windows(-[0-9a-f]{16})?\.npz")
# What of the configuration fixes the index's embeddings and the queries' inputs.
CONFIG_FIELDS = ("model", "data.source", "data.dim_2d", "data.dim_3d", "data.word_vectors", "data.demo_dir",
                 "data.demo_size", "data.max_words", "objective.matmul_precision")


class SearchError(ValueError):
    """An index, query or input that cannot be used; the message names the file or field."""


# ----------------------------------------------------------------------------------- reading videos


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    """Where the videos of a HowTo100M-layout folder are: the csv and the three roots."""

    csv: str
    features_2d: str
    features_3d: str
    audio: str
    captions: str | None = None

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
        return cls(csv, features_2d, root("features_3d", features_2d), root("audio", folder), captions)


def read_video(layout: FeatureLayout, path: str, dim_2d: int | None, dim_3d: int | None, audio_bins: int,
               captions: dict | None = None):
    """One video of the layout as a `howto100m.Video` (its ASR segments where `captions` has
    them, else none); a DataError names the file that cannot be used."""
    from msk_jax.data.howto100m import Video, check_caption, read_features

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
    from msk_jax.data.howto100m import _window, clip_video

    tokens, token_mask = clip_video(video, settings, start, end)
    first, last = model_inputs.time_to_frames([start, end])
    lo, hi = _window(max(0, int(first)), int(last), video.num_frames)
    hi = min(hi, lo + settings.num_audio_frames)
    audio, audio_mask = model_inputs.audio_features(video.frames(lo, hi), settings.num_audio_frames)
    return {"video": tokens, "video_mask": token_mask, "audio": audio, "audio_mask": audio_mask}


def window_text(caption: dict, start: float, end: float) -> str:
    """The ASR text of the segments that overlap [start, end]."""
    return " ".join(str(t) for s, e, t in zip(caption["start"], caption["end"], caption["text"])
                    if s < end and e > start)


# ----------------------------------------------------------------------------------- the model


def _embedder(config, model, variables):
    """embed(batch of model inputs) -> {'text', 'video', 'audio'} joint embeddings, each device
    embedding a slice of every batch (as evaluation does)."""
    from msk_jax import sharding
    from msk_jax.evaluators import embedding
    from msk_jax.data.eval_sets import EvalSet

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


def _empty_text(config, n: int) -> dict[str, np.ndarray]:
    return {"text": np.zeros((n, config.data.max_words, config.model.text_dim), np.float32),
            "text_mask": np.zeros((n, config.data.max_words), np.float32)}


# ----------------------------------------------------------------------------------- index


def build_index(config, checkpoint: str, features: str, index: str, *, window: float = 8.0, stride: float = 4.0,
                weights: str = "ema", csv: str | None = None, captions: str | None = None,
                chunk_windows: int = 512, progress: bool = True) -> dict:
    """Embeds every window of every readable video under `features` with the checkpoint's
    weights and writes the index to `index`; returns its summary (index.json's fields but the
    configuration)."""
    from msk_jax.evaluators import embedding
    from msk_jax.data.howto100m import load_captions, read_csv_paths

    if not (window > 0 and stride > 0):
        raise SearchError(f"--window={window} and --stride={stride} must be positive")
    layout = FeatureLayout.find(features, csv, captions)
    paths = read_csv_paths(layout.csv)
    if not paths:
        raise SearchError(f"{layout.csv}: lists no video")
    caption_data = load_captions(layout.captions) if layout.captions else None
    model, variables, folder, step = load_weights(config, checkpoint, weights)
    embed = _embedder(config, model, variables)
    settings = window_settings(config, window)
    d = config.data
    meta_rows = {k: [] for k in ("video_id", "path", "start", "end", "text")}
    embedded = {m: [] for m in ("video", "audio")}
    pending, skipped, t0, last_report = [], [], time.monotonic(), 0.0

    def flush():
        if not pending:
            return
        batch = {k: np.stack([p[k] for p in pending]) for k in ("video", "video_mask", "audio", "audio_mask")}
        out = embed({**batch, **_empty_text(config, len(pending))}, config.eval_batch_size)
        for m in embedded:
            embedded[m].append(out[m])
        pending.clear()

    for i, path in enumerate(paths):
        try:
            video = read_video(layout, path, d.dim_2d, d.dim_3d, config.model.audio_feat_dim, caption_data)
        except DataError as err:
            skipped.append({"path": path, "problem": str(err)})
            print(f"skipped {path}: {err}", file=sys.stderr, flush=True)
            video = None
        if video is not None:
            duration = video_duration(video)
            for start in window_starts(duration, window, stride):
                end = min(start + window, duration)
                pending.append(window_inputs(video, settings, start, start + window))
                for key, value in zip(meta_rows, (video.id, path, start, end,
                                                  window_text(video.caption, start, end))):
                    meta_rows[key].append(value)
                if len(pending) >= chunk_windows:
                    flush()
        now = time.monotonic()
        if progress and (now - last_report > 10 or i + 1 == len(paths)):
            last_report = now
            print(f"[index] {i + 1}/{len(paths)} videos, {len(meta_rows['start'])} windows, {len(skipped)} skipped, "
                  f"{now - t0:.0f} s", file=sys.stderr, flush=True)
    flush()
    if not meta_rows["start"]:
        raise SearchError(f"{layout.csv}: none of its {len(paths)} videos could be read")
    arrays = {m: np.concatenate(v).astype(np.float32) for m, v in embedded.items()}
    fused = embedding.direction_embeddings({"video": arrays["video"], "audio": arrays["audio"],
                                             "text": arrays["video"]})["v+a"]
    columns = {"video_id": np.array(meta_rows["video_id"], dtype=str), "path": np.array(meta_rows["path"], dtype=str),
               "start": np.array(meta_rows["start"], np.float64), "end": np.array(meta_rows["end"], np.float64),
               "text": np.array(meta_rows["text"], dtype=str), **arrays, "fused": fused.astype(np.float32)}
    buffer = io.BytesIO()
    np.savez(buffer, **columns)
    data = buffer.getvalue()
    # The windows go under a name of their own, beside the live index's; index.json, written last
    # in one atomic write (a rename on disk, one upload in a bucket), names them: a build stopped
    # at any point leaves the previous index whole.
    windows_file = f"windows-{hashlib.sha256(data).hexdigest()[:16]}.npz"
    storage.makedirs(index)
    storage.write_atomic(storage.join(index, windows_file), data)
    summary = {"format": FORMAT, "checkpoint": os.fspath(storage.path(folder)), "step": int(step), "weights": weights,
               "features": features, "csv": layout.csv, "captions": layout.captions, "window": window,
               "stride": stride, "video_tokens": settings.n_video_tokens, "audio_frames": settings.num_audio_frames,
               "videos": len(paths) - len(skipped), "windows": len(columns["start"]), "skipped": skipped,
               "embedding_dim": int(fused.shape[1]), "windows_file": windows_file}
    storage.write_atomic(storage.join(index, "index.json"), json.dumps({**summary, "config": config.to_json()},
                                                                        indent=1))
    _remove_other_windows(index, windows_file)
    if progress:
        print(f"[index] {summary['windows']} windows of {summary['videos']} videos ({len(skipped)} skipped) "
              f"written to {index} in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return summary


def _remove_other_windows(index: str, keep: str) -> None:
    """Removes the windows files of `index` but `keep`: the index's before this build, and those
    of builds stopped before their switch. (One build of an index at a time: a concurrent one's
    new windows would go too.)"""
    for name in storage.listdir(index):
        if name != keep and WINDOWS_NAME.fullmatch(name):
            storage.path(storage.join(index, name)).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- query


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


class SearchIndex:
    """A written index: its windows (`columns`) and what built it (`meta`, `config`)."""

    def __init__(self, index: str):
        import ml_collections

        self.path = index
        meta_path = storage.join(index, "index.json")
        self.meta = self._read_meta(meta_path)
        windows_path = self._windows_path(meta_path)
        if not storage.exists(windows_path):
            # A rebuild may have switched index.json and removed these windows since it was read.
            self.meta = self._read_meta(meta_path)
            windows_path = self._windows_path(meta_path)
            if not storage.exists(windows_path):
                raise SearchError(f"{windows_path}: missing (the index is incomplete)")
        try:
            self.config = ml_collections.ConfigDict(json.loads(self.meta["config"]))
        except (TypeError, ValueError) as err:
            raise SearchError(f"{meta_path}: field 'config' is not a configuration ({err})") from None
        try:  # sizes and headers checked before anything is inflated
            # Stored uncompressed (np.savez), so no member is larger than the file.
            bound = max(safe_load.MAX_ARRAY_BYTES, storage.size(windows_path))
            self.columns = safe_load.load_npz(windows_path, WINDOW_FIELDS, max_bytes=bound)
        except DataError as err:
            raise SearchError(str(err)) from None
        count = self.meta.get("windows")
        if isinstance(count, int) and count != len(self.columns["start"]):
            raise SearchError(f"{windows_path}: holds {len(self.columns['start'])} windows, {meta_path} {count} "
                              "(files of two builds: build the index again)")

    @staticmethod
    def _read_meta(meta_path: str) -> dict:
        if not storage.exists(meta_path):
            raise SearchError(f"{meta_path}: no search index here (build one with `python -m msk_jax.search index`)")
        try:
            meta = json.loads(storage.read_bytes(meta_path))
        except ValueError as err:
            raise SearchError(f"{meta_path}: not a search index (unreadable JSON: {err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise SearchError(f"{meta_path}: field 'format' is {found!r}, expected {FORMAT!r}")
        for field in ("config", "checkpoint", "step", "weights"):
            if field not in meta:
                raise SearchError(f"{meta_path}: has no field '{field}'")
        return meta

    def _windows_path(self, meta_path: str) -> str:
        """The windows file that index.json names, a file of the index's own folder."""
        name = self.meta.get("windows_file", "windows.npz")
        if not isinstance(name, str) or not WINDOWS_NAME.fullmatch(name):
            raise SearchError(f"{meta_path}: field 'windows_file' is {name!r}, not a windows file of this folder")
        return storage.join(self.path, name)

    def __len__(self) -> int:
        return len(self.columns["start"])

    def items(self, embedding: str) -> np.ndarray:
        """The windows' L2-normalised embeddings: fused 'v+a', or 'v' / 'a' alone."""
        if embedding not in EMBEDDINGS:
            raise SearchError(f"--embedding={embedding}: expected one of {', '.join(EMBEDDINGS)}")
        key = {"v+a": "fused", "v": "video", "a": "audio"}[embedding]
        return model_inputs.l2_normalize_rows(np.asarray(self.columns[key], np.float32))


@dataclasses.dataclass
class QueryResult:
    """One query's top windows (`hits`: rank, video, path, start, end, score, text) and the
    words of it that have no vector (`unknown_words`); `error` when no word has one."""

    query: str
    embedding: str
    unknown_words: list[str]
    hits: list[dict]
    error: str | None = None

    def to_json(self) -> dict:
        out = {"query": self.query, "embedding": self.embedding, "unknown_words": self.unknown_words,
               "results": self.hits}
        if self.error:
            out["error"] = self.error
        return out


def query_data_paths(config):
    """The data a query reads, the word vectors of `config.data`, where they already are: a query
    never builds data (for source='demo', the corpus's word2vec.bin, in the folder training used);
    a SearchError or FileNotFoundError names what is missing."""
    from msk_jax import data_sources

    d = config.data
    if d.source != "demo":
        return data_sources.data_paths(config, training=False)  # checks only that the files exist
    from msk_jax.demo.corpus import corpus_paths, default_root

    # The folder `sources.demo_paths` builds the corpus in.
    root = d.demo_dir or default_root("demo_corpus" if d.demo_size == "default" else f"demo_corpus_{d.demo_size}")
    words = storage.join(root, "word2vec.bin") if storage.is_remote(root) else corpus_paths(root).word_vectors
    if not storage.exists(words):
        raise SearchError(f"{words}: missing, the demo corpus's word vectors that the index's queries read (a "
                          "query builds no data: build the corpus with `python -m msk_jax.demo.corpus "
                          f"--out={root} --size={d.demo_size} --feature_dim={d.dim_2d}`)")
    return data_sources.DataPaths(word_vectors=words)


class Searcher:
    """Text queries against an index, with the word vectors and the text tower of the run that
    built it (`config` given: it must be the index's)."""

    def __init__(self, index: str, config=None):
        from msk_jax import data_sources

        self.index = SearchIndex(index)
        if config is not None:
            check_config(config, self.index.config, storage.join(index, "index.json"))
        self.config = self.index.config
        self.paths = query_data_paths(self.config)
        self.words = data_sources.load_words(self.config, self.paths)
        model, variables, _, _ = load_weights(self.config, self.index.meta["checkpoint"], self.index.meta["weights"],
                                              step=int(self.index.meta["step"]))
        self._embed = _embedder(self.config, model, variables)

    def text_inputs(self, queries: list[str]) -> tuple[dict[str, np.ndarray], list[list[str]]]:
        """The queries as evaluation's captions (`features.text_features` of `features.tokenize`),
        and each query's words without a vector."""
        d, text, masks, unknown = self.config.data, [], [], []
        for query in queries:
            words = word2vec.tokenize(query)
            vectors, mask, _ = model_inputs.text_features(words, self.words, d.max_words)
            text.append(vectors)
            masks.append(mask)
            unknown.append([w for w in dict.fromkeys(words) if w not in self.words])
        return {"text": np.stack(text), "text_mask": np.stack(masks)}, unknown

    def embed_queries(self, queries: list[str]) -> tuple[np.ndarray, list[list[str]]]:
        """(Q, D) L2-normalised text embeddings and each query's unknown words."""
        inputs, unknown = self.text_inputs(queries)
        n, m = len(queries), self.config.model
        batch = {**inputs, "video": np.zeros((n, 1, m.video_dim), np.float32),
                 "video_mask": np.zeros((n, 1), np.float32),
                 "audio": np.zeros((n, m.audio_feat_dim, model_inputs.AUDIO_TOKEN_FRAMES), np.float32),
                 "audio_mask": np.zeros((n, model_inputs.AUDIO_TOKEN_FRAMES), np.float32)}
        batch_size = min(self.config.eval_batch_size, 1 << max(0, n - 1).bit_length())
        return model_inputs.l2_normalize_rows(self._embed(batch, batch_size)["text"]), unknown

    def search(self, queries: list[str], k: int = 10, embedding: str = "v+a") -> list[QueryResult]:
        items = self.index.items(embedding)
        embedded, unknown = self.embed_queries(queries)
        scores = embedded @ items.T
        c = self.index.columns
        results = []
        for q, query in enumerate(queries):
            words = word2vec.tokenize(query)
            if not words or len(unknown[q]) == len(set(words)):
                results.append(QueryResult(query, embedding, unknown[q], [], no_vector_message(query, unknown[q],
                                                                                               self.words)))
                continue
            order = np.argsort(-scores[q], kind="stable")[:k]
            hits = [{"rank": r + 1, "video": str(c["video_id"][i]), "path": str(c["path"][i]),
                     "start": float(c["start"][i]), "end": float(c["end"][i]), "score": float(scores[q, i]),
                     "text": str(c["text"][i])} for r, i in enumerate(order)]
            results.append(QueryResult(query, embedding, unknown[q], hits))
        return results


def _case_hint(words: list[str], vectors) -> str:
    lowered = [w for w in words if w.lower() != w and w.lower() in vectors]
    return f" (vectors are case-sensitive: {', '.join(repr(w.lower()) for w in lowered)} has one)" if lowered else ""


def no_vector_message(query: str, unknown: list[str], vectors) -> str:
    if not word2vec.tokenize(query):
        return f"the query {query!r} has no word"
    return (f"no word of the query {query!r} has a word vector ({', '.join(map(repr, unknown))})"
            + _case_hint(unknown, vectors))


def unknown_words_message(result: QueryResult, vectors) -> str:
    return (f"no word vector for {', '.join(map(repr, result.unknown_words))} in {result.query!r}: "
            "searched with its other words" + _case_hint(result.unknown_words, vectors))


def format_table(result: QueryResult) -> str:
    lines = [f"query: {result.query}   (cosine with each window's {EMBEDDINGS[result.embedding]} embedding)",
             f"{'rank':>4}  {'video':<24} {'start':>7} {'end':>7} {'score':>7}  text"]
    for hit in result.hits:
        lines.append(f"{hit['rank']:>4}  {hit['video']:<24} {hit['start']:>7.1f} {hit['end']:>7.1f} "
                     f"{hit['score']:>7.4f}  {hit['text'][:60]}")
    return "\n".join(lines)


def read_queries(path: str) -> list[str]:
    """The non-empty lines of a queries file."""
    if not storage.exists(path):
        raise SearchError(f"--queries={path}: no such file")
    with storage.open_read(path, text=True) as f:
        queries = [line.strip() for line in f if line.strip()]
    if not queries:
        raise SearchError(f"--queries={path}: holds no query")
    return queries


def run_query(index: str, queries: list[str], k: int = 10, as_json: bool = False, embedding: str = "v+a",
              config=None, out=sys.stdout, err=sys.stderr) -> int:
    """Prints each query's top k windows (a table or JSON lines), names words without a vector
    on `err`; returns the exit status (1 if a query had no word with a vector)."""
    if not queries:
        raise SearchError("no query: give one as an argument or --queries=FILE")
    if k < 1:
        raise SearchError(f"--k={k}: must be at least 1")
    searcher = Searcher(index, config)
    status = 0
    for result in searcher.search(queries, k, embedding):
        if result.error:
            print(f"error: {result.error}", file=err, flush=True)
            status = 1
        elif result.unknown_words:
            print(f"note: {unknown_words_message(result, searcher.words)}", file=err, flush=True)
        if as_json:
            print(json.dumps(result.to_json()), file=out, flush=True)
        elif not result.error:
            print(format_table(result), file=out, flush=True)
    return status


# ----------------------------------------------------------------------------------- command line


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "index: the run's configuration; query: optional, must be "
                                    "the index's.", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "index: training workdir, its checkpoints/ folder or a step folder.")
    flags.DEFINE_string("features", None, "index: the folder of the videos' features (HowTo100M layout).")
    flags.DEFINE_string("csv", None, "index: the csv listing the videos (default: the only *.csv in --features).")
    flags.DEFINE_string("captions", None, "index: ASR segments to show with the windows (default: "
                        "--features/caption.pickle where it exists).")
    flags.DEFINE_string("index", None, "The index folder (local or gs://...).")
    flags.DEFINE_float("window", 8.0, "index: window length (s).")
    flags.DEFINE_float("stride", 4.0, "index: seconds between window starts.")
    flags.DEFINE_enum("weights", "ema", ["ema", "online"], "index: which weights (ema falls back to online "
                      "when the checkpoint has none).")
    flags.DEFINE_integer("k", 10, "query: how many windows to list.")
    flags.DEFINE_bool("json", False, "query: one JSON object per query and line.")
    flags.DEFINE_string("queries", None, "query: a file of queries, one per line.")
    flags.DEFINE_enum("embedding", "v+a", list(EMBEDDINGS), "query: the windows' embedding to score against.")


def main(argv):
    from absl import flags, logging

    from msk_jax import convert
    from msk_jax.checkpoints import CheckpointError

    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    command, rest = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    try:
        if command == "index":
            if rest:
                raise SearchError(f"unexpected arguments {rest}")
            for name in ("config", "checkpoint", "features", "index"):
                if getattr(FLAGS, name) is None:
                    raise SearchError(f"index needs --{name}")
            build_index(FLAGS.config, FLAGS.checkpoint, FLAGS.features, FLAGS.index, window=FLAGS.window,
                        stride=FLAGS.stride, weights=FLAGS.weights, csv=FLAGS.csv, captions=FLAGS.captions)
            return 0
        if command == "query":
            if FLAGS.index is None:
                raise SearchError("query needs --index")
            queries = list(rest) + (read_queries(FLAGS.queries) if FLAGS.queries else [])
            return run_query(FLAGS.index, queries, FLAGS.k, FLAGS.json, FLAGS.embedding, FLAGS.config)
        raise SearchError(f"expected a command, index or query (got {command!r}): python -m msk_jax.search "
                          "index|query --help")
    except (SearchError, CheckpointError, DataError, FileNotFoundError, convert.ConversionError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    from msk_jax import allocator, cli

    allocator.use_tcmalloc()
    _define_flags()
    cli.run(main, config_flag="config", errors=(SearchError,))
