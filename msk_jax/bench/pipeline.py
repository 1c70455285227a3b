"""``pipeline``: the training input pipeline's clips/s on the demo corpus per worker count, or at
HowTo100M's per-video sizes (``--config.pipeline.sizes=howto100m``): npz files read by threads
against the feature store read by window (threads, then worker processes filling a slot per video,
then worker processes assembling the batches), and optionally grain.
"""

from __future__ import annotations

import os
import time

import numpy as np

from msk_jax import data_sources
from msk_jax.bench import bucket
from msk_jax.bench.common import machine
from msk_jax.data import synthetic
from msk_jax.data.batch import KEYS
from msk_jax.data.feature_store import FeatureStoreSource, build_feature_store
from msk_jax.data.howto100m import HowTo100MReader
from msk_jax.data.loader import TrainingPipeline
from msk_jax.data.word2vec import load_word2vec_binary
from msk_jax.demo.corpus import build_demo_corpus, default_root
from msk_jax.errors import DataError


def run_pipeline(settings, corpus_dir: str | None = None, size: str = "default", videos_per_batch: int = 8,
                 batches: int = 30, workers: tuple[int, ...] = (1, 2), feature_dim: int = 128) -> dict:
    """Clips/s of the training pipeline on the demo corpus (built if needed), per worker count."""
    root = corpus_dir or default_root()
    paths = build_demo_corpus(root, size=size, feature_dim=feature_dim, progress=False)
    source = HowTo100MReader(paths.csv, paths.caption, paths.features_2d, paths.audio,
                             load_word2vec_binary(paths.word_vectors), features_3d=paths.features_3d,
                             settings=settings)
    results = {"videos_per_batch": videos_per_batch, "clips_per_batch": videos_per_batch * settings.n_clips}
    for count in workers:
        pipeline = TrainingPipeline(source, videos_per_batch, seed=0, workers=count)
        next(pipeline)  # warm-up
        start = time.perf_counter()
        clips = sum(len(next(pipeline)["video"]) for _ in range(batches))
        results[f"clips_per_second_workers_{count}"] = clips / (time.perf_counter() - start)
        pipeline.close()
    results["clips_per_second"] = max(v for k, v in results.items() if k.startswith("clips_per_second_"))
    return results


def _batch_bytes(batch: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in batch.values())


def _time_pipeline(make, videos_per_batch: int, batches: int) -> dict:
    """Times `batches` batches of a pipeline after two warm-up batches (worker start-up). CPU
    time: this process's (`main_ms_per_video`: with threads, their work too) and the worker
    processes' (`worker_ms_per_video`); `videos_per_second_ceiling`: what this process could
    hand out at most, 1000 / main_ms_per_video."""
    pipeline = make()
    try:
        for _ in range(2):
            next(pipeline)
        wall, main = time.perf_counter(), time.process_time()
        worker_cpu, worker_read = pipeline.worker_cpu_seconds, pipeline.worker_bytes_read
        used = sum(_batch_bytes(next(pipeline)) for _ in range(batches))
        wall, main = time.perf_counter() - wall, time.process_time() - main
        workers = pipeline.worker_cpu_seconds - worker_cpu
        videos = batches * videos_per_batch + sum(pipeline.skipped.values())
        main_ms = 1e3 * main / videos
        return {"videos_per_second": videos / wall, "clips_per_second": batches * videos_per_batch * 10 / wall,
                "cpu_ms_per_video": main_ms + 1e3 * workers / videos, "main_ms_per_video": main_ms,
                "worker_ms_per_video": 1e3 * workers / videos, "videos_per_second_ceiling": 1e3 / max(main_ms, 1e-9),
                "used_bytes_per_video": used / videos, "worker_bytes_read": int(pipeline.worker_bytes_read - worker_read),
                "videos": videos}
    finally:
        pipeline.close()


class _GrainClips:
    """grain map: video index -> its clips (the model's arrays), or None when it cannot be read."""

    def __init__(self, source, seed: int = 0):
        self.source, self.seed = source, seed

    def __call__(self, index: int):
        try:
            clips = self.source.sample_clips(int(index), np.random.default_rng([self.seed, 0, int(index)]))
        except DataError:
            return None
        return {k: clips[k] for k in KEYS}


def _grain_pipeline(source, videos_per_batch: int, workers: int):
    """The same work with grain (optional, for comparison): shuffled indices, clips mapped in
    `workers` grain worker processes, batches of the clips of `videos_per_batch` videos."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags; this command line is argparse's
        flags.FLAGS.mark_as_parsed()

    def concatenate(videos):
        return {k: np.concatenate([v[k] for v in videos]) for k in videos[0]}

    dataset = (grain.MapDataset.range(len(source)).shuffle(seed=0).repeat().map(_GrainClips(source))
               .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * videos_per_batch))
               .filter(lambda clips: clips is not None)
               .batch(videos_per_batch, batch_fn=concatenate))
    return iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))


def _time_grain(source, videos_per_batch: int, batches: int, workers: int) -> dict:
    import psutil

    iterator = _grain_pipeline(source, videos_per_batch, workers)
    me = psutil.Process()

    def cpu():  # this process and its worker processes
        return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])

    for _ in range(2):
        next(iterator)
    wall, used = time.perf_counter(), cpu()
    for _ in range(batches):
        next(iterator)
    wall, used = time.perf_counter() - wall, cpu() - used
    videos = batches * videos_per_batch
    del iterator
    return {"videos_per_second": videos / wall, "clips_per_second": videos * 10 / wall,
            "cpu_ms_per_video": 1e3 * used / videos, "videos": videos}


def run_pipeline_howto100m(settings, corpus_dir: str | None = None, videos: int = 300, videos_per_batch: int = 16,
                           batches: int = 12, workers: tuple[int, ...] = (1, 2), dtype: str = "float32",
                           seconds: int = 396, dim: int = 2048, grain: bool = False,
                           bucket_latency_ms: tuple = (), bucket_videos: int = 48,
                           bucket_variants: tuple = tuple(bucket.VARIANTS)) -> dict:
    """The input path at HowTo100M's per-video sizes (`msk_jax.data.synthetic`), read from the page
    cache: today's npz files read whole by threads, against the feature store read by window
    (threads; worker processes filling a slot per video that this process concatenates; worker
    processes assembling the batches in shared memory, `batch_tasks`), with 1 and 2 workers, in
    the same run; with `grain`, also
    the store through grain's worker processes (grain installed separately); with
    `bucket_latency_ms`, also the store read from a bucket on localhost at each latency
    (`msk_jax.bench.bucket`)."""
    root = corpus_dir or os.path.join(os.path.dirname(default_root()), "bench_howto100m")
    paths = synthetic.write_synthetic_howto100m(os.path.join(root, "npz"), videos, seconds=seconds, dim_2d=dim,
                                                dim_3d=dim, progress=False)
    reader = HowTo100MReader(paths["csv"], paths["caption"], paths["features_2d"], paths["audio"],
                             load_word2vec_binary(paths["word_vectors"]), features_3d=paths["features_3d"],
                             settings=settings, dim_2d=dim, dim_3d=dim)
    store_dir = os.path.join(root, f"store_time_blocks_{dtype}_{videos}_{seconds}_{dim}")
    if not os.path.exists(os.path.join(store_dir, "meta.json")):
        build_feature_store(reader, store_dir, dtype=dtype, progress=False)
    store = FeatureStoreSource(store_dir, settings)
    npz_bytes = np.mean([sum(os.path.getsize(os.path.join(paths[k], reader.paths[i], f"{reader.video_id(i)}{suffix}"))
                             for k, suffix in (("features_2d", "_2d.npz"), ("features_3d", "_3d.npz"),
                                               ("audio", "_spec.npz")))
                         for i in range(len(reader))])
    for i in range(len(reader)):  # both formats into the page cache
        reader.video(i)
    paths_under_test = {"old": ("npz files, threads", reader, False, False),
                        "store_threads": ("store, threads", store, False, False),
                        "store_slots": ("store, processes, slots", store, True, False),
                        "new": ("store, processes, batches", store, True, True)}
    results = {"videos": videos, "videos_per_batch": videos_per_batch, "npz_bytes_per_video": float(npz_bytes),
               "store_dtype": dtype}
    for name, (label, source, processes, batch_tasks) in paths_under_test.items():
        rows = {}
        for count in workers:
            row = _time_pipeline(lambda: TrainingPipeline(source, videos_per_batch, seed=0, workers=count,
                                                          processes=processes, batch_tasks=batch_tasks),
                                 videos_per_batch, batches)
            if name == "old":
                row["read_per_used"] = npz_bytes / row["used_bytes_per_video"]
            elif processes:
                row["read_per_used"] = row["worker_bytes_read"] / row["videos"] / row["used_bytes_per_video"]
            rows[count] = row
        best = max(rows.values(), key=lambda r: r["videos_per_second"])
        results[name] = {"label": label, "workers": {str(k): v for k, v in rows.items()},
                         "videos_per_second": best["videos_per_second"], "clips_per_second": best["clips_per_second"],
                         "cpu_ms_per_video": rows[min(rows)]["cpu_ms_per_video"],
                         "main_ms_per_video": rows[min(rows)]["main_ms_per_video"],
                         "videos_per_second_ceiling": rows[min(rows)]["videos_per_second_ceiling"],
                         "read_per_used": best.get("read_per_used"),
                         "scaling_1_to_2": (rows[2]["videos_per_second"] / rows[1]["videos_per_second"]
                                            if 1 in rows and 2 in rows else None)}
    results.update({k: results["new"][k] for k in ("videos_per_second", "cpu_ms_per_video", "read_per_used",
                                                    "scaling_1_to_2", "main_ms_per_video",
                                                    "videos_per_second_ceiling")})
    if grain:
        rows = {count: _time_grain(store, videos_per_batch, batches, count) for count in workers}
        results["grain"] = {"label": "store, grain processes", "workers": {str(k): v for k, v in rows.items()},
                            "scaling_1_to_2": (rows[2]["videos_per_second"] / rows[1]["videos_per_second"]
                                               if 1 in rows and 2 in rows else None)}
    if bucket_latency_ms:
        results["bucket"] = bucket.run_bucket(settings, paths, root, tuple(bucket_latency_ms), videos=bucket_videos,
                                              videos_per_batch=videos_per_batch, batches=batches, workers=workers,
                                              dtype=dtype, seconds=seconds, dim=dim, variants=tuple(bucket_variants))
    return results


def format_pipeline_howto100m(r: dict) -> str:
    lines = [f"input path at HowTo100M sizes: {r['videos']} videos, {r['npz_bytes_per_video'] / 1e6:.1f} MB of npz "
             f"each, {r['videos_per_batch']} videos (x 10 clips) per batch, page cache; {machine()}",
             f"{'path':26s} {'workers':>7s} {'videos/s':>9s} {'clips/s':>8s} {'CPU-ms/video':>13s} "
             f"{'main ms/video':>14s} {'ceiling videos/s':>17s} {'read/used':>10s}"]
    for name in ("old", "store_threads", "store_slots", "new", "grain"):
        if name not in r:
            continue
        for count, row in r[name]["workers"].items():
            read, main, ceiling = (row.get(k) for k in ("read_per_used", "main_ms_per_video",
                                                         "videos_per_second_ceiling"))
            lines.append(f"{r[name]['label']:26s} {count:>7s} {row['videos_per_second']:9.0f} "
                         f"{row['clips_per_second']:8.0f} {row['cpu_ms_per_video']:13.2f} "
                         f"{'' if main is None else f'{main:.3f}':>14s} "
                         f"{'' if ceiling is None else f'{ceiling:.0f}':>17s} "
                         f"{'' if read is None else f'{read:.2f}x':>10s}")
        if r[name]["scaling_1_to_2"]:
            lines.append(f"{'':26s} 1 -> 2 workers: {r[name]['scaling_1_to_2']:.2f}x")
    if "bucket" in r:
        lines.append(bucket.format_bucket(r["bucket"]))
    return "\n".join(lines)


def cli(config) -> dict:

    c = config.pipeline
    if c.sizes not in ("demo", "howto100m"):
        raise ValueError(f"config.pipeline.sizes='{c.sizes}': expected 'demo' or 'howto100m'.")
    if c.sizes == "howto100m":
        results = run_pipeline_howto100m(data_sources.clip_settings(config), c.corpus_dir or None, c.videos,
                                         batches=c.batches or 12, dtype=c.dtype, grain=c.grain,
                                         bucket_latency_ms=tuple(c.bucket_latency_ms), bucket_videos=c.bucket_videos,
                                         bucket_variants=tuple(c.get("bucket_variants", tuple(bucket.VARIANTS))))
        print(format_pipeline_howto100m(results), flush=True)
        return results
    results = run_pipeline(data_sources.clip_settings(config), c.corpus_dir or None, c.size, batches=c.batches or 30)
    for key, value in results.items():
        if key.startswith("clips_per_second_"):
            print(f"input pipeline, {key.rsplit('_', 1)[1]} worker(s): {value:8.0f} clips/s", flush=True)
    return results
