"""The input path at HowTo100M sizes read from a bucket (``pipeline --config.pipeline.sizes=howto100m``
with ``--config.pipeline.bucket_latency_ms``, e.g. ``(0, 20, 50)``; ``()`` skips it).

The synthetic corpus's first ``bucket_videos`` videos are built into a feature store, which is
uploaded to the Cloud Storage API of the tests (tests/gcs_server.py: gcp-storage-emulator on
localhost, reached through the clients' standard environment variables). The server waits the
given latency before answering each request (a real bucket answers in 20-50 ms), concurrent
requests waiting together. Per latency, the same `TrainingPipeline` worker processes read the
store from the bucket

- one window at a time, each its own request (``FeatureStoreSource(concurrent_reads=False)``),
  a video per task: the read path before concurrent reads;
- with every window of a video read at once (the default), a video per task;
- with every window of a task's videos read at once, where the pipeline hands out tasks of
  several videos of a batch (``batch_tasks``, read with ``FeatureStoreSource.sample_videos``),

each beside the same store read from the page cache by the same workers handed the same tasks.
One more row reads batches with ``sample_videos`` in this process. The server runs on the same
machine: its CPU time (reported per video) competes with the workers', which a real bucket's
does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

from msk_jax import environment

BUCKET = "msk-bench"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER_MODULE = os.path.join(REPO_ROOT, "tests", "gcs_server.py")


def unavailable() -> str | None:
    """Why the bucket benchmark cannot run here (None when it can)."""
    if not os.path.exists(SERVER_MODULE):
        return f"no {SERVER_MODULE} (the bucket benchmark runs from a checkout of the repository)"
    import importlib.util

    for module in ("gcp_storage_emulator", "gcsfs", "psutil"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -r requirements-dev.txt)"
    return None


def set_latency(endpoint: str, ms: float) -> None:
    """Makes the server at `endpoint` (http://host:port) wait `ms` ms before answering each request."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/_msk/latency?ms={ms}", data=b"", method="POST"),
                           timeout=30).read()


def request_counts(endpoint: str, reset: bool = False) -> dict[str, int]:
    """{"requests", "ranged_reads"} the server at `endpoint` answered (since the last reset); with
    `reset`, sets them back to 0."""
    request = urllib.request.Request(f"{endpoint}/_msk/counts", data=b"" if reset else None,
                                     method="POST" if reset else "GET")
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


class LocalBucket:
    """`gs://NAME` on tests/gcs_server.py, started on a free localhost port; while open, the
    clients' environment variables (this process's and the processes it starts) point at it.
    Open it before gcsfs is first imported: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at
    import, and otherwise asks a control API the server lacks about the bucket at every read."""

    def __init__(self, name: str = BUCKET):
        self.name, self.url = name, f"gs://{name}"
        self._server, self._environment, self.endpoint = None, contextlib.ExitStack(), ""

    def __enter__(self) -> "LocalBucket":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._server = subprocess.Popen([sys.executable, "-m", "tests.gcs_server", "--port", str(port),
                                         "--bucket", self.name], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b/{self.name}", timeout=2).read()
                break
            except OSError:
                if self._server.poll() is not None or time.time() > deadline:
                    self._server.kill()
                    raise RuntimeError("tests/gcs_server.py did not start")
                time.sleep(0.2)
        variables = {"STORAGE_EMULATOR_HOST": self.endpoint, "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
                     "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self._environment.enter_context(environment.setting(variables))
        return self

    def __exit__(self, *exc) -> None:
        self._environment.close()
        self._server.terminate()
        self._server.wait(timeout=30)

    def set_latency(self, ms: float) -> None:
        """Every request from now on waits `ms` ms before it is answered."""
        set_latency(self.endpoint, ms)

    def requests(self) -> int:
        """The requests the server answered so far."""
        return request_counts(self.endpoint)["requests"]

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far."""
        import psutil

        times = psutil.Process(self._server.pid).cpu_times()
        return times.user + times.system

    def upload(self, local_dir: str, prefix: str) -> str:
        """Copies a local folder to `gs://NAME/prefix`; returns that URL."""
        import gcsfs

        gcsfs.GCSFileSystem().put(local_dir.rstrip("/") + "/", f"{self.name}/{prefix}", recursive=True)
        return f"{self.url}/{prefix}"


def build_store(settings, paths: dict, root: str, videos: int, *, dtype: str, seconds: int, dim: int) -> str:
    """The feature store of the synthetic corpus's first `videos` videos (built once), in shards
    of 256 MB (one upload each)."""
    from msk_jax.data.feature_store import build_feature_store
    from msk_jax.data.howto100m import HowTo100MReader
    from msk_jax.data.word2vec import load_word2vec_binary

    store_dir = os.path.join(root, f"bucket_store_{dtype}_{videos}_{seconds}_{dim}")
    if os.path.exists(os.path.join(store_dir, "meta.json")):
        return store_dir
    csv_path = os.path.join(root, f"first_{videos}.csv")
    with open(paths["csv"]) as f:
        lines = f.readlines()
    if len(lines) - 1 < videos:
        raise ValueError(f"bucket_videos={videos}: the synthetic corpus has {len(lines) - 1} videos; "
                         "raise config.pipeline.videos or lower bucket_videos.")
    with open(csv_path, "w") as f:
        f.writelines(lines[:videos + 1])
    reader = HowTo100MReader(csv_path, paths["caption"], paths["features_2d"], paths["audio"],
                             load_word2vec_binary(paths["word_vectors"]), features_3d=paths["features_3d"],
                             settings=settings, dim_2d=dim, dim_3d=dim)
    build_feature_store(reader, store_dir, dtype=dtype, shard_bytes=256 << 20, progress=False)
    return store_dir


def _time_pipeline(make, bucket: LocalBucket | None, latency_ms: float, videos_per_batch: int, batches: int,
                   prefetch: int, max_seconds: float) -> dict:
    """Videos/s of a process pipeline once its workers run: started at no latency, then the
    loads begun before the latency was set are drained; `batches` timed batches (fewer when
    they take more than `max_seconds`, at least one). CPU time: the workers', the server's."""
    if bucket is not None:
        bucket.set_latency(0)
    pipeline = make()
    try:
        next(pipeline)
        if bucket is not None:
            bucket.set_latency(latency_ms)
        for _ in range(prefetch + 1):
            next(pipeline)
        server = bucket.cpu_seconds() if bucket is not None else 0.0
        worker, start, done = pipeline.worker_cpu_seconds, time.perf_counter(), 0
        while done < batches and (not done or time.perf_counter() - start < max_seconds):
            next(pipeline)
            done += 1
        wall = time.perf_counter() - start
        videos = done * videos_per_batch + sum(pipeline.skipped.values())
        return {"videos_per_second": videos / wall, "videos": videos,
                "worker_cpu_ms_per_video": 1e3 * (pipeline.worker_cpu_seconds - worker) / videos,
                "server_cpu_ms_per_video": (1e3 * (bucket.cpu_seconds() - server) / videos
                                            if bucket is not None else None)}
    finally:
        pipeline.close()


def _time_in_process(source, bucket: LocalBucket | None, latency_ms: float, videos_per_batch: int, batches: int,
                     max_seconds: float) -> dict:
    """Videos/s of `source.sample_videos` on batches of `videos_per_batch` videos in this process."""
    from msk_jax.data.howto100m import clip_shapes

    settings = source.settings
    shapes = clip_shapes(settings, source.meta["dim_2d"] + source.meta["dim_3d"], source.word_vectors.dim)
    outs = [{k: np.empty(s, np.float32) for k, s in shapes.items()} for _ in range(videos_per_batch)]
    order = np.random.default_rng(0).permutation(len(source))

    def batch(b: int):
        requests = [(int(order[(b * videos_per_batch + i) % len(order)]), np.random.default_rng([0, b, i]))
                    for i in range(videos_per_batch)]
        source.sample_videos(requests, outs)

    if bucket is not None:
        bucket.set_latency(0)
    batch(0)
    if bucket is not None:
        bucket.set_latency(latency_ms)
    server = bucket.cpu_seconds() if bucket is not None else 0.0
    cpu, start, done = time.process_time(), time.perf_counter(), 0
    while done < batches and (not done or time.perf_counter() - start < max_seconds):
        batch(1 + done)
        done += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    videos = done * videos_per_batch
    return {"videos_per_second": videos / wall, "videos": videos, "worker_cpu_ms_per_video": 1e3 * cpu / videos,
            "server_cpu_ms_per_video": (1e3 * (bucket.cpu_seconds() - server) / videos
                                        if bucket is not None else None)}


def _reads_per_video(source, bucket: LocalBucket, videos: int = 16) -> dict:
    """Requests (the source's count and the server's) and bytes per video of `source.sample_clips`
    in this process."""
    requests, served, read = source.requests, bucket.requests(), source.bytes_read
    for i in range(videos):
        source.sample_clips(i % len(source), np.random.default_rng(i))
    return {"requests_per_video": (source.requests - requests) / videos,
            "server_requests_per_video": (bucket.requests() - served) / videos,
            "bytes_per_video": (source.bytes_read - read) / videos}


# The pipeline's ways of handing out work: a video per task, and tasks of several videos of a
# batch (which a source reads with `sample_videos`).
PIPELINE_MODES = {"video_tasks": {}, "batch_tasks": {"batch_tasks": True}}


def run_bucket(settings, paths: dict, root: str, latencies: tuple, *, videos: int = 48, videos_per_batch: int = 16,
               batches: int = 12, workers: tuple[int, ...] = (1, 2), dtype: str = "float32", seconds: int = 396,
               dim: int = 2048, prefetch: int = 2, max_seconds: float = 10.0) -> dict:
    """Videos/s of the store in a bucket on localhost at each latency (ms), read one window at a
    time and with all of a video's (of a task's videos') windows at once, by the same worker
    processes as the page-cache rate beside them."""
    from msk_jax.data.feature_store import FeatureStoreSource
    from msk_jax.data.loader import TrainingPipeline

    reason = unavailable()
    if reason:
        return {"skipped": reason}
    store_dir = build_store(settings, paths, root, videos, dtype=dtype, seconds=seconds, dim=dim)
    for name in os.listdir(store_dir):  # into the page cache
        with open(os.path.join(store_dir, name), "rb") as f:
            while f.read(64 << 20):
                pass
    modes = PIPELINE_MODES

    def timed(source, count, mode, bucket=None, latency=0):
        def make():
            return TrainingPipeline(source, videos_per_batch, seed=0, workers=count, processes=True,
                                    prefetch=prefetch, **modes[mode])
        return _time_pipeline(make, bucket, latency, videos_per_batch, batches, prefetch, max_seconds)

    local = FeatureStoreSource(store_dir, settings)
    results = {"videos": videos, "videos_per_batch": videos_per_batch, "latencies_ms": list(latencies),
               "modes": list(modes),
               "page_cache": {mode: {str(count): timed(local, count, mode) for count in workers} for mode in modes},
               "page_cache_in_process": _time_in_process(local, None, 0, videos_per_batch, batches, max_seconds)}
    with LocalBucket() as bucket:
        start = time.perf_counter()
        url = bucket.upload(store_dir, "store")
        results["upload_seconds"] = time.perf_counter() - start
        sources = {"one_at_a_time": FeatureStoreSource(url, settings, concurrent_reads=False),
                   "concurrent": FeatureStoreSource(url, settings)}
        results["reads"] = {name: _reads_per_video(source, bucket) for name, source in sources.items()}
        variants = {"one_at_a_time": ("one_at_a_time", "video_tasks"), "concurrent": ("concurrent", "video_tasks"),
                    "concurrent_batch_tasks": ("concurrent", "batch_tasks")}
        for latency in latencies:
            row = {}
            for variant, (name, mode) in variants.items():
                row[variant] = {}
                for count in workers:
                    row[variant][str(count)] = timing = timed(sources[name], count, mode, bucket, latency)
                    timing["of_page_cache"] = (timing["videos_per_second"]
                                               / results["page_cache"][mode][str(count)]["videos_per_second"])
            row["in_process"] = timing = _time_in_process(sources["concurrent"], bucket, latency, videos_per_batch,
                                                          batches, max_seconds)
            timing["of_page_cache"] = (timing["videos_per_second"]
                                       / results["page_cache_in_process"]["videos_per_second"])
            results[str(latency)] = row
    return results


_MODE_LABELS = {"video_tasks": "a video per task", "batch_tasks": "tasks of a batch's videos"}
_VARIANT_LABELS = {"one_at_a_time": "bucket, one window at a time", "concurrent": "bucket, a video's windows at once",
                   "concurrent_batch_tasks": "bucket, a task's windows at once"}


def format_bucket(r: dict) -> str:
    if "skipped" in r:
        return f"bucket: skipped ({r['skipped']})"
    reads = r["reads"]
    lines = [f"store in a bucket on localhost (tests/gcs_server.py): {r['videos']} videos uploaded in "
             f"{r['upload_seconds']:.0f} s; requests per video: one at a time "
             f"{reads['one_at_a_time']['requests_per_video']:.1f}, at once "
             f"{reads['concurrent']['requests_per_video']:.1f} (windows that overlap or lie within 64 KiB read as "
             f"one; {reads['concurrent']['bytes_per_video'] / 1e6:.2f} MB per video); worker processes, "
             f"{r['videos_per_batch']} videos per batch",
             f"{'latency':>8s} {'reads':36s} {'workers':>7s} {'videos/s':>9s} {'of page cache':>14s} "
             f"{'worker CPU-ms/video':>20s} {'server CPU-ms/video':>20s}"]

    def line(latency, label, count, row):
        server = row.get("server_cpu_ms_per_video")
        share = row.get("of_page_cache")
        lines.append(f"{latency:>8s} {label:36s} {count:>7s} {row['videos_per_second']:9.1f} "
                     f"{'' if share is None else f'{share:.2f}x':>14s} {row['worker_cpu_ms_per_video']:20.1f} "
                     f"{'' if server is None else f'{server:.1f}':>20s}")

    for mode, rows in r["page_cache"].items():
        for count, row in rows.items():
            line("-", f"page cache, {_MODE_LABELS[mode]}", count, row)
    line("-", "page cache, sample_videos here", "1", r["page_cache_in_process"])
    for latency in r["latencies_ms"]:
        row = r[str(latency)]
        for variant, label in _VARIANT_LABELS.items():
            for count, timed in row.get(variant, {}).items():
                line(f"{latency} ms", label, count, timed)
        line(f"{latency} ms", f"bucket, sample_videos of {r['videos_per_batch']} here", "1", row["in_process"])
    return "\n".join(lines)
