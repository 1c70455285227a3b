"""Writing an index: a build, an append of the videos it does not hold yet, a removal.

A build (`build_index`) embeds every readable video of a feature folder; with `append=True` it
embeds only the videos the index does not hold (a video is known by its csv path) and those
whose feature files changed since (their old windows go), and names the ones it skipped. The
new windows go into new shards; the manifest that names them is written last, in one atomic
write (`store`), so a write stopped at any point leaves the previous index answering.
`remove_videos` writes again the shards that hold the videos named, without them.

Windows are embedded with the run's EMA weights (or online) and stored with the fused
video+audio embedding that evaluation uses for t2v+a (`embedding.direction_embeddings`: the mean
of the L2-normalised video and audio embeddings), each row L2-normalised, in float16.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import numpy as np

from msk_jax import safe_load, storage
from msk_jax.data import batch as batch_spec
from msk_jax.errors import DataError
from msk_jax.search import scoring
from msk_jax.search.store import (APPROXIMATE_NAME, FORMAT, FORMAT_1, SearchError, SearchIndex, ShardColumns,
                                  check_config, read_manifest, remove_unnamed, select_videos, unit_float16,
                                  write_manifest, write_shard)
from msk_jax.search.videos import (FeatureLayout, WindowStills, embedder, empty_text, load_weights, read_video,
                                   video_duration, video_files, window_inputs, window_settings, window_starts,
                                   window_text)

SHARD_WINDOWS = 16384   # windows a shard holds at most (whole videos): 600 MB at the paper's 6,144 dims
RECALL_QUERIES = 100    # queries of the approximate index's recall@10, measured when it is written
# An approximate index is fitted again when the index has grown this many times past what it was fitted for.
REFIT_GROWTH = 16


class _Shards:
    """Collects embedded videos and writes a shard whenever `shard_windows` windows are held."""

    def __init__(self, index: str, first_key: int, shard_windows: int):
        self.index, self.next_key, self.shard_windows = index, first_key, shard_windows
        self.entries: list[dict] = []
        self._reset()

    def _reset(self):
        self.columns = {"window_video": [], "start": [], "end": [], "texts": [], "stills": []}
        self.embeddings = {"video": [], "audio": [], "fused": []}
        self.videos = {"video_id": [], "path": [], "file": [], "file_from_index": [], "stamp": [], "windows": []}
        self.held = 0

    def add_video(self, meta: dict, windows: dict, embeddings: dict[str, np.ndarray]) -> None:
        """One video: its fields (video_id, path, file, file_from_index, stamp), its windows'
        start, end, texts and stills, its (n, D) float16 embeddings."""
        n = len(windows["start"])
        if self.held and self.held + n > self.shard_windows:
            self.flush()
        number = len(self.videos["path"])
        for key in ("video_id", "path", "file", "file_from_index", "stamp"):
            self.videos[key].append(meta[key])
        self.videos["windows"].append(n)
        self.columns["window_video"] += [number] * n
        for key in ("start", "end", "texts", "stills"):
            self.columns[key] += list(windows[key])
        for key in self.embeddings:
            self.embeddings[key].append(embeddings[key])
        self.held += n

    def add_columns(self, columns: ShardColumns) -> None:
        """Every video of `columns` (a shard written again)."""
        for v in range(len(columns.videos["path"])):
            rows = np.flatnonzero(columns.window_video == v)
            self.add_video({k: columns.videos[k][v] for k in ("video_id", "path", "file", "file_from_index", "stamp")},
                           {"start": columns.start[rows], "end": columns.end[rows],
                            "texts": [columns.texts[i] for i in rows], "stills": [columns.stills[i] for i in rows]},
                           {k: columns.embeddings[k][rows] for k in self.embeddings})

    def flush(self) -> None:
        if not self.held:
            return
        columns = ShardColumns(window_video=np.array(self.columns["window_video"], np.int32),
                               start=np.array(self.columns["start"], np.float64),
                               end=np.array(self.columns["end"], np.float64), texts=self.columns["texts"],
                               stills=self.columns["stills"],
                               embeddings={k: np.concatenate(v) for k, v in self.embeddings.items()},
                               videos=self.videos)
        entry = write_shard(self.index, columns)
        entry["first_key"] = self.next_key
        self.next_key += entry["windows"]
        self.entries.append(entry)
        self._reset()


def _relative_to(index: str, file: str) -> str:
    if not file or storage.is_remote(index):
        return ""
    return os.path.relpath(file, os.path.abspath(index))


def _resolve_run(config, checkpoint, weights, window, stride, old: SearchIndex | None, index: str):
    """(config, checkpoint, step or None, weights, window, stride) of a build or an append: an
    append takes the index's, and refuses others (its windows would mix two models)."""
    if old is None:
        if config is None or checkpoint is None:
            raise SearchError("index needs --config and --checkpoint (or --append to an existing index)")
        return config, checkpoint, None, weights or "ema", 8.0 if window is None else window, \
            4.0 if stride is None else stride
    where = storage.join(index, "index.json")
    meta = old.meta
    if config is not None:
        check_config(config, old.config, where)
    rebuild = "; build the index again without --append to change it"
    if weights is not None and weights != meta["weights"]:
        raise SearchError(f"{where}: the index holds {meta['weights']} weights, --weights={weights}{rebuild}")
    for name, value in (("window", window), ("stride", stride)):
        if value is not None and float(value) != float(meta.get(name, value)):
            raise SearchError(f"{where}: the index's windows are of --{name}={meta.get(name)}, not {value}{rebuild}")
    if checkpoint is not None:
        from msk_jax import checkpoint_reader

        _, folder, step = checkpoint_reader.locate(checkpoint)
        if int(step) != int(meta["step"]) or os.fspath(storage.path(folder)) != meta["checkpoint"]:
            raise SearchError(f"--checkpoint={checkpoint} is step {step} of {storage.path(folder)}, the index holds "
                              f"step {meta['step']} of {meta['checkpoint']}{rebuild}")
    return old.config, meta["checkpoint"], int(meta["step"]), meta["weights"], float(meta["window"]), \
        float(meta["stride"])


def _open_for_append(index: str) -> SearchIndex | None:
    if not storage.exists(storage.join(index, "index.json")):
        return None
    meta = read_manifest(index)
    if meta["format"] == FORMAT_1:
        raise SearchError(f"{storage.join(index, 'index.json')}: an index of format {FORMAT_1} (one windows file) "
                          "cannot grow: build it again without --append, with its --config, --checkpoint and "
                          f"--features (it then has format {FORMAT})")
    return SearchIndex(index)


def _names(paths: list[str], most: int = 10) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f" (and {len(paths) - most} more)" if len(paths) > most else "")


def build_index(config, checkpoint: str | None, features: str, index: str, *, window: float | None = None,
                stride: float | None = None, weights: str | None = None, csv: str | None = None,
                captions: str | None = None, chunk_windows: int = 512, shard_windows: int = SHARD_WINDOWS,
                append: bool = False, approximate: bool | None = None, progress: bool = True) -> dict:
    """Embeds the windows of the readable videos under `features` with the checkpoint's weights
    and writes the index `index` (with `append`: only the videos it does not hold yet or whose
    features changed); returns its summary (index.json's fields but the configuration, and
    what this write embedded and skipped). `approximate`: write an approximate index (True),
    none (False), or keep the index's choice (None)."""
    from msk_jax.data.howto100m import load_captions, read_csv_paths
    from msk_jax.evaluators import embedding

    old = _open_for_append(index) if append else None
    config, checkpoint, step, weights, window, stride = _resolve_run(config, checkpoint, weights, window, stride,
                                                                     old, index)
    if not (window > 0 and stride > 0):
        raise SearchError(f"--window={window} and --stride={stride} must be positive")
    if shard_windows < 1:
        raise SearchError(f"shard_windows={shard_windows}: must be at least 1")
    layout = FeatureLayout.find(features, csv, captions)
    paths = list(dict.fromkeys(read_csv_paths(layout.csv)))
    if not paths:
        raise SearchError(f"{layout.csv}: lists no video")
    t0 = time.monotonic()
    held = old.video_paths() if old is not None else {}
    stamps = {p: layout.stamp(p) for p in paths}
    stamp_of = {}
    if old is not None:
        for shard in old.shards:
            stamp_of.update({str(p): str(s) for p, s in zip(shard.video_path, shard.video_stamp)})
    already = [p for p in paths if p in held and stamp_of.get(p) == stamps[p]]
    changed = [p for p in paths if p in held and stamp_of.get(p) != stamps[p]]
    todo = [p for p in paths if p not in held or p in changed]
    if already and progress:
        print(f"[index] {len(already)} videos already in the index, skipped: {_names(already)}", file=sys.stderr,
              flush=True)
    if changed and progress:
        print(f"[index] {len(changed)} videos changed since they were indexed, embedded again: {_names(changed)}",
              file=sys.stderr, flush=True)

    storage.makedirs(index)
    shards = _Shards(index, int(old.meta.get("next_key", len(old))) if old is not None else 0, shard_windows)
    skipped, embedded_videos, embedded_windows = [], [], 0
    kept_entries = list(old.meta["shards"]) if old is not None else []
    dropped_entries = []
    if changed:  # the shards holding a changed video are written again without it
        changed_set = set(changed)
        for entry, shard in zip(list(kept_entries), old.shards):
            keep = np.array([str(p) not in changed_set for p in shard.video_path])
            if not keep.all():
                kept_entries.remove(entry)
                dropped_entries.append(entry)
                shards.add_columns(select_videos(shard.columns(), keep))
    if todo:
        caption_data = load_captions(layout.captions) if layout.captions else None
        model, variables, folder, step = load_weights(config, checkpoint, weights, step)
        checkpoint = os.fspath(storage.path(folder))
        embed = embedder(config, model, variables)
        settings = window_settings(config, window)
        stills = WindowStills(layout, config.data.source == "demo")
        files = video_files(layout.folder)
        d = config.data
        pending, waiting, last_report = [], [], 0.0
        done = {"video": [], "audio": []}
        embedded_rows = [0]

        def flush_embeddings():
            if pending:
                batch = {k: np.stack([p[k] for p in pending]) for k in batch_spec.KEYS if not k.startswith("text")}
                out = embed({**batch, **empty_text(config, len(pending))}, config.eval_batch_size)
                for m in done:
                    done[m].append(out[m])
                embedded_rows[0] += len(pending)
                pending.clear()
            # The videos whose windows are all embedded go to the shards, in order.
            while waiting and waiting[0][2] <= embedded_rows[0]:
                meta, windows, _ = waiting.pop(0)
                n = len(windows["start"])
                video_rows, audio_rows = np.concatenate(done["video"]), np.concatenate(done["audio"])
                fused = embedding.direction_embeddings({"video": video_rows[:n], "audio": audio_rows[:n],
                                                        "text": video_rows[:n]})["v+a"]
                shards.add_video(meta, windows, {"video": unit_float16(video_rows[:n]),
                                                 "audio": unit_float16(audio_rows[:n]), "fused": unit_float16(fused)})
                done["video"], done["audio"] = [video_rows[n:]], [audio_rows[n:]]

        queued = 0
        for i, path in enumerate(todo):
            try:
                video = read_video(layout, path, d.dim_2d, d.dim_3d, config.model.audio_feat_dim, caption_data)
            except DataError as err:
                skipped.append({"path": path, "problem": str(err)})
                print(f"skipped {path}: {err}", file=sys.stderr, flush=True)
                video = None
            if video is not None:
                duration = video_duration(video)
                still_of = stills.of_video(path, video, duration)
                windows = {"start": [], "end": [], "texts": [], "stills": []}
                for start in window_starts(duration, window, stride):
                    end = min(start + window, duration)
                    pending.append(window_inputs(video, settings, start, start + window))
                    windows["start"].append(start)
                    windows["end"].append(end)
                    windows["texts"].append(window_text(video.caption, start, end))
                    windows["stills"].append(still_of(start, end))
                file = files.get(path, "")
                queued += len(windows["start"])
                waiting.append([{"video_id": video.id, "path": path, "file": file,
                                 "file_from_index": _relative_to(index, file), "stamp": stamps[path]}, windows,
                                queued])
                embedded_videos.append(path)
                embedded_windows += len(windows["start"])
                if len(pending) >= chunk_windows:
                    flush_embeddings()
            now = time.monotonic()
            if progress and (now - last_report > 10 or i + 1 == len(todo)):
                last_report = now
                print(f"[index] {i + 1}/{len(todo)} videos, {embedded_windows} windows, {len(skipped)} skipped, "
                      f"{now - t0:.0f} s", file=sys.stderr, flush=True)
        flush_embeddings()
    shards.flush()
    entries = kept_entries + shards.entries
    if not entries:
        raise SearchError(f"{layout.csv}: none of its {len(paths)} videos could be read")
    manifest = {"format": FORMAT, "checkpoint": checkpoint, "step": int(step) if step is not None else None,
                "weights": weights, "features": features, "csv": layout.csv, "captions": layout.captions,
                "window": window, "stride": stride, "video_tokens": window_settings(config, window).n_video_tokens,
                "audio_frames": window_settings(config, window).num_audio_frames,
                "embedding_dim": int(config.model.projection_dim), "shards": entries, "next_key": shards.next_key,
                "windows": sum(e["windows"] for e in entries), "videos": sum(e["videos"] for e in entries),
                "skipped": skipped}
    keep_approximate = approximate if approximate is not None else bool(old is not None and old.meta.get("approximate"))
    if keep_approximate:
        manifest["approximate"] = write_approximate(index, manifest, old, dropped_entries, progress)
    write_manifest(index, {**manifest, "config": config.to_json()})
    remove_unnamed(index, manifest)
    if progress:
        print(f"[index] {embedded_windows} windows of {len(embedded_videos)} videos embedded ({len(skipped)} "
              f"unreadable, {len(already)} already in the index); {index} holds {manifest['windows']} windows of "
              f"{manifest['videos']} videos in {len(entries)} shards; {time.monotonic() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return {**manifest, "embedded_videos": embedded_videos, "embedded_windows": embedded_windows,
            "already_indexed": already, "changed": changed}


def remove_videos(index: str, paths: list[str], progress: bool = True) -> dict:
    """Writes again the shards of `index` that hold the videos at csv `paths`, without them;
    returns the new manifest's fields but the configuration."""
    old = _open_for_append(index)
    if old is None:
        raise SearchError(f"{storage.join(index, 'index.json')}: no search index here")
    held = old.video_paths()
    unknown = [p for p in paths if p not in held]
    if unknown:
        raise SearchError(f"--remove: {_names(unknown)} not in the index {index}")
    gone = set(paths)
    shards = _Shards(index, int(old.meta["next_key"]), int(max([e["windows"] for e in old.meta["shards"]] +
                                                               [SHARD_WINDOWS])))
    kept, dropped = [], []
    for entry, shard in zip(old.meta["shards"], old.shards):
        keep = np.array([str(p) not in gone for p in shard.video_path])
        if keep.all():
            kept.append(entry)
            continue
        dropped.append(entry)
        if keep.any():
            shards.add_columns(select_videos(shard.columns(), keep))
            shards.flush()
    entries = kept + shards.entries
    manifest = {k: v for k, v in old.meta.items() if k != "config"}
    manifest.update(shards=entries, next_key=shards.next_key, windows=sum(e["windows"] for e in entries),
                    videos=sum(e["videos"] for e in entries))
    manifest.pop("approximate", None)
    if old.meta.get("approximate") and entries:
        manifest["approximate"] = write_approximate(index, manifest, old, dropped, progress)
    write_manifest(index, {**manifest, "config": old.meta["config"]})
    remove_unnamed(index, manifest)
    if progress:
        print(f"[index] removed {len(paths)} videos ({old.meta['windows'] - manifest['windows']} windows); {index} "
              f"holds {manifest['windows']} windows of {manifest['videos']} videos", file=sys.stderr, flush=True)
    return manifest


# ------------------------------------------------------------------------------------ approximate


def write_approximate(index: str, manifest: dict, old: SearchIndex | None, dropped: list[dict],
                      progress: bool) -> dict:
    """Writes the approximate index of the index `manifest` describes (updating the old one:
    the dropped shards' windows out, the new shards' in; fitted again when the index has grown
    REFIT_GROWTH times past what it was fitted for); returns its manifest entry, with its
    recall@10 against exact search measured on RECALL_QUERIES queries (the video embeddings of
    windows drawn at random: text queries stand apart from the windows' fused embeddings as
    these do)."""
    t0 = time.monotonic()
    view = SearchIndex(index, manifest)  # its shards written, the manifest not yet
    total = len(view)
    approximate, new_entries = None, manifest["shards"]
    if old is not None and old.meta.get("approximate"):
        loaded = load_approximate(old.path, old.meta["approximate"])
        if total <= REFIT_GROWTH * max(1, loaded.settings["trained_for"]):
            approximate = loaded
            for entry in dropped:
                approximate.remove(np.arange(entry["first_key"], entry["first_key"] + entry["windows"]))
            known = {e["name"] for e in old.meta["shards"]}
            new_entries = [e for e in manifest["shards"] if e["name"] not in known]
    if approximate is None:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(total, size=scoring.Approximate.sample_size(total), replace=False))
        approximate = scoring.Approximate.train(view.rows("v+a", sample), total)
    names = {e["name"] for e in new_entries}
    for shard in view.shards:
        if shard.name in names:
            for lo in range(0, len(shard), scoring.CHUNK_ROWS):
                rows = shard.embeddings["fused"][lo:lo + scoring.CHUNK_ROWS]
                approximate.add(rows, np.arange(shard.first_key + lo, shard.first_key + lo + len(rows)))
    data = approximate.to_bytes()
    name = f"approximate-{hashlib.sha256(data).hexdigest()[:16]}.npz"
    storage.write_atomic(storage.join(index, name), data)
    rng = np.random.default_rng(1)
    probes = rng.choice(total, size=min(total, RECALL_QUERIES), replace=False)
    queries = np.asarray(view.rows("v", probes), np.float32)
    _, exact = scoring.exact_top_k(view.chunks("v+a", scoring.CHUNK_ROWS), queries, 10)
    found = [approximate_windows(view, approximate, q, 10)[1] for q in queries]
    recall = scoring.recall_at(exact, found, 10)
    if progress:
        print(f"[index] approximate index ({approximate.settings['kind']}, {approximate.settings['lists']} lists) of "
              f"{len(approximate)} windows: recall@10 {recall:.3f} against exact search on {len(queries)} queries; "
              f"{time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return {"name": name, **approximate.settings, "windows": len(approximate), "recall_at_10": round(recall, 4),
            "recall_queries": len(queries)}


def load_approximate(index: str, entry: dict) -> scoring.Approximate:
    """The approximate index a manifest's entry names."""
    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not APPROXIMATE_NAME.fullmatch(name):
        raise SearchError(f"{storage.join(index, 'index.json')}: field 'approximate' names {name!r}, not an "
                          "approximate index of this folder")
    path = storage.join(index, name)
    try:
        arrays = safe_load.load_npz(path, None, max_bytes=max(safe_load.MAX_ARRAY_BYTES, storage.size(path)))
    except (DataError, FileNotFoundError) as err:
        raise SearchError(" ".join(str(err).split())) from None
    return scoring.Approximate.from_arrays(arrays)


def approximate_windows(view: SearchIndex, approximate: scoring.Approximate, query: np.ndarray, k: int,
                        candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, window numbers) of one query through the approximate index, rescored exactly."""
    def candidates_of(keys):
        windows = view.windows_of_keys(keys)
        windows = windows[windows >= 0]
        return windows, view.rows("v+a", windows)

    return scoring.approximate_top_k(approximate, candidates_of, np.asarray(query, np.float32), k, candidates)
