"""The input path at HowTo100M sizes read from a bucket (``pipeline --config.pipeline.sizes=howto100m``
with ``--config.pipeline.bucket_latency_ms``, e.g. ``(0, 20, 50)``; ``()`` skips it).

The synthetic corpus's first ``bucket_videos`` videos are built into a feature store in each
layout (time blocks, and the kinds layout of format 1), uploaded to the Cloud Storage API of the
tests (tests/gcs_server.py: gcp-storage-emulator on localhost, reached through the clients'
standard environment variables). The server waits the given latency before answering each
request (a real bucket answers in 20-50 ms), concurrent requests waiting together. Measured:

- **reads**: requests per video (the reader's count and the server's) and the bytes read over
  the bytes of the clips' arrays (read/used), per layout and coalescing gap, a video per call;
- **clients**: worker CPU per ranged GET of gcsfs (fsspec/aiohttp) and of TensorStore's kvstore,
  for small and 1 MiB ranges (so per request and per byte), in this process;
- **pipeline**: videos/s and worker CPU per video of the `TrainingPipeline` worker processes
  with batch tasks (what training runs: a task's videos planned, then all their windows read at
  once, `FeatureStoreSource.sample_videos`), from the page cache and from the bucket at each
  latency, per variant (layout x client), each against the page-cache rate of the same layout
  read by the same workers; and the server's requests and CPU per video.

The server runs on the same machine: its CPU time (reported per video) competes with the
workers', which a real bucket's does not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

from msk_jax import environment, storage
from msk_jax.data.feature_store import DEFAULT_MAX_GAP, FORMAT, FeatureStoreSource, build_feature_store
from msk_jax.data.howto100m import HowTo100MReader, clip_shapes
from msk_jax.data.loader import TrainingPipeline
from msk_jax.data.word2vec import load_word2vec_binary

BUCKET = "msk-bench"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER_MODULE = os.path.join(REPO_ROOT, "tests", "gcs_server.py")


def unavailable() -> str | None:
    """Why the bucket benchmark cannot run here (None when it can)."""
    if not os.path.exists(SERVER_MODULE):
        return f"no {SERVER_MODULE} (the bucket benchmark runs from a checkout of the repository)"
    for module in ("gcp_storage_emulator", "gcsfs", "psutil", "tensorstore"):
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

    def __enter__(self) -> LocalBucket:
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
        # GOOGLE_AUTH_TOKEN_FOR_TESTING: TensorStore sends this token instead of looking for
        # credentials (which the server does not check, and whose absence it logs as an error).
        variables = {"STORAGE_EMULATOR_HOST": self.endpoint, "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
                     "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                     "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
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
        import psutil  # optional (requirements-dev.txt): `unavailable` says when it is missing

        times = psutil.Process(self._server.pid).cpu_times()
        return times.user + times.system

    def upload(self, local_dir: str, prefix: str) -> str:
        """Copies a local folder to `gs://NAME/prefix`; returns that URL."""
        import gcsfs  # imported once the bucket is open: gcsfs reads its environment at import

        gcsfs.GCSFileSystem().put(local_dir.rstrip("/") + "/", f"{self.name}/{prefix}", recursive=True)
        return f"{self.url}/{prefix}"


def build_store(settings, paths: dict, root: str, videos: int, *, dtype: str, seconds: int, dim: int,
                layout: str = "time_blocks") -> str:
    """The feature store of the synthetic corpus's first `videos` videos in `layout` (built
    once), in shards of 256 MB (one upload each)."""
    store_dir = os.path.join(root, f"bucket_store_{layout}_{dtype}_{videos}_{seconds}_{dim}")
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
    build_feature_store(reader, store_dir, dtype=dtype, shard_bytes=256 << 20, progress=False, layout=layout)
    return store_dir


def used_bytes_per_video(source) -> int:
    """The bytes of one video's clip arrays (float32), what a batch holds of it."""
    shapes = clip_shapes(source.settings, source.meta["dim_2d"] + source.meta["dim_3d"], source.word_vectors.dim)
    return int(sum(4 * np.prod(shape) for shape in shapes.values()))


def _time_pipeline(make, bucket: LocalBucket | None, latency_ms: float, videos_per_batch: int, batches: int,
                   prefetch: int, max_seconds: float, used: int) -> dict:
    """Videos/s of a process pipeline once its workers run: started at no latency, then the
    loads begun before the latency was set are drained; `batches` timed batches (fewer when
    they take more than `max_seconds`, at least one). CPU time: the workers', the server's;
    requests: the server's; read/used: the workers' bytes read over `used` per video."""
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
        served = bucket.requests() if bucket is not None else 0
        worker, read = pipeline.worker_cpu_seconds, pipeline.worker_bytes_read
        start, done = time.perf_counter(), 0
        while done < batches and (not done or time.perf_counter() - start < max_seconds):
            next(pipeline)
            done += 1
        wall = time.perf_counter() - start
        videos = done * videos_per_batch + sum(pipeline.skipped.values())
        return {"videos_per_second": videos / wall, "videos": videos,
                "worker_cpu_ms_per_video": 1e3 * (pipeline.worker_cpu_seconds - worker) / videos,
                "read_per_used": (pipeline.worker_bytes_read - read) / videos / used,
                "server_cpu_ms_per_video": (1e3 * (bucket.cpu_seconds() - server) / videos
                                            if bucket is not None else None),
                "server_requests_per_video": ((bucket.requests() - served) / videos if bucket is not None else None)}
    finally:
        pipeline.close()


def reads_per_video(source, bucket: LocalBucket | None = None, videos: int = 48, seeds: int = 2) -> dict:
    """Requests (the source's count, and the server's) and bytes read per video of
    `source.sample_clips` (one video per call) over `videos` videos x `seeds` draws, in this
    process; read/used against the clips' arrays."""
    requests, read = source.requests, source.bytes_read
    served = bucket.requests() if bucket is not None else 0
    count = min(videos, len(source)) * seeds
    for i in range(count):
        source.sample_clips(i % len(source), np.random.default_rng(i))
    return {"requests_per_video": (source.requests - requests) / count,
            "server_requests_per_video": (bucket.requests() - served) / count if bucket is not None else None,
            "bytes_per_video": (source.bytes_read - read) / count,
            "read_per_used": (source.bytes_read - read) / count / used_bytes_per_video(source)}


def client_costs(url: str, sizes: tuple[int, ...] = (100, 1 << 20), requests: int = 200,
                 clients: tuple[str, ...] = ("fsspec", "tensorstore"), repeats: int = 3) -> dict:
    """CPU ms of this process per ranged GET of `url` through each client, all `requests` in
    flight at once (`RangeReader.read_ranges`, no coalescing), for ranges of each size; the
    median of `repeats` rounds (the clients taken in turn). From two sizes: per request and
    per MiB."""
    object_bytes = storage.size(url)
    if 2 * max(sizes) > object_bytes:
        raise ValueError(f"client_costs: ranges of {max(sizes)} bytes need an object of twice that; {url} has "
                         f"{object_bytes}.")
    times: dict = {client: {size: [] for size in sizes} for client in clients}
    for _ in range(repeats):
        for client in clients:
            for size in sizes:
                reader = storage.RangeReader(max_gap=-1, client=client)
                step = max(size, (object_bytes - size) // requests)
                ranges = [(url, (i * step) % (object_bytes - size), size) for i in range(requests)]
                reader.read_ranges(ranges[:4])[0]  # the client's connections opened
                cpu = time.process_time()
                pending = reader.read_ranges(ranges)
                for i in range(len(ranges)):
                    pending[i]
                times[client][size].append(1e3 * (time.process_time() - cpu) / requests)
    results = {}
    for client in clients:
        per_size = {str(size): float(np.median(t)) for size, t in times[client].items()}
        small, large = min(sizes), max(sizes)
        per_mib = (per_size[str(large)] - per_size[str(small)]) / ((large - small) / 2**20)
        results[client] = {"cpu_ms_per_request": per_size, "cpu_ms_per_mib": per_mib,
                           "cpu_ms_per_empty_request": per_size[str(small)] - per_mib * small / 2**20}
    return results


# What is read from the bucket, per timed variant: (layout, client). The kinds layout is the
# format-1 store with its 64 KiB gap and gcsfs.
VARIANTS = {"kinds_fsspec": ("kinds", "fsspec"), "time_blocks_fsspec": ("time_blocks", "fsspec"),
            "time_blocks_tensorstore": ("time_blocks", "tensorstore")}
GAPS = (0, 256 << 10, 1 << 20, DEFAULT_MAX_GAP[FORMAT], 2 << 20)


def run_bucket(settings, paths: dict, root: str, latencies: tuple, *, videos: int = 48, videos_per_batch: int = 16,
               batches: int = 12, workers: tuple[int, ...] = (1, 2), dtype: str = "float32", seconds: int = 396,
               dim: int = 2048, prefetch: int = 2, max_seconds: float = 10.0, variants: tuple = tuple(VARIANTS),
               gaps: tuple = GAPS, client_requests: int = 200, client_sizes: tuple = (100, 1 << 20)) -> dict:
    """Requests per video and read/used per layout and gap; each client's CPU per request; and
    videos/s, worker CPU per video and the share of the page-cache rate of the worker processes
    (batch tasks) reading the store from a bucket on localhost at each latency (ms), per variant
    (`VARIANTS`: layout x client)."""
    reason = unavailable()
    if reason:
        return {"skipped": reason}
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"bucket variants {unknown}: expected some of {', '.join(VARIANTS)}.")
    timed_layouts = sorted({VARIANTS[v][0] for v in variants}, reverse=True)
    stores = {layout: build_store(settings, paths, root, videos, dtype=dtype, seconds=seconds, dim=dim, layout=layout)
              for layout in ("time_blocks", "kinds")}
    for store_dir in stores.values():  # into the page cache
        for name in os.listdir(store_dir):
            with open(os.path.join(store_dir, name), "rb") as f:
                while f.read(64 << 20):
                    pass
    local = {layout: FeatureStoreSource(store_dir, settings) for layout, store_dir in stores.items()}
    used = used_bytes_per_video(local["time_blocks"])

    def timed(source, count, bucket=None, latency=0):
        def make():
            return TrainingPipeline(source, videos_per_batch, seed=0, workers=count, processes=True,
                                    prefetch=prefetch, batch_tasks=True)
        return _time_pipeline(make, bucket, latency, videos_per_batch, batches, prefetch, max_seconds, used)

    results = {"videos": videos, "videos_per_batch": videos_per_batch, "latencies_ms": list(latencies),
               "variants": list(variants), "used_bytes_per_video": used, "gaps": list(gaps),
               "default_gap": DEFAULT_MAX_GAP[FORMAT],
               "page_cache": {layout: {str(count): timed(local[layout], count) for count in workers}
                              for layout in timed_layouts}}
    with LocalBucket() as bucket:
        start = time.perf_counter()
        urls = {layout: bucket.upload(store_dir, f"store_{layout}") for layout, store_dir in stores.items()}
        results["upload_seconds"] = time.perf_counter() - start
        reads = {"kinds, 64 KiB gap": reads_per_video(FeatureStoreSource(urls["kinds"], settings), bucket, videos),
                 "kinds, one window at a time": reads_per_video(
                     FeatureStoreSource(urls["kinds"], settings, concurrent_reads=False), bucket, videos, seeds=1)}
        for gap in gaps:
            reads[f"time blocks, {_size(gap)} gap"] = reads_per_video(
                FeatureStoreSource(urls["time_blocks"], settings, max_gap=gap), bucket, videos)
        results["reads"] = reads
        shard = sorted(n for n in os.listdir(stores["time_blocks"]) if n.startswith("features-"))[0]
        shard_bytes = os.path.getsize(os.path.join(stores["time_blocks"], shard))  # small stores: smaller ranges
        results["clients"] = client_costs(f"{urls['time_blocks']}/{shard}",
                                          tuple(sorted({min(size, shard_bytes // 4) for size in client_sizes})),
                                          client_requests)
        for latency in latencies:
            row = {}
            for variant in variants:
                layout, client = VARIANTS[variant]
                source = FeatureStoreSource(urls[layout], settings, client=client)
                row[variant] = {}
                for count in workers:
                    row[variant][str(count)] = timing = timed(source, count, bucket, latency)
                    timing["of_page_cache"] = (timing["videos_per_second"]
                                               / results["page_cache"][layout][str(count)]["videos_per_second"])
            results[str(latency)] = row
    results["summary"] = summary(results)
    return results


def summary(r: dict, variant: str = "time_blocks_tensorstore", gap: str = "") -> dict:
    """The figures of the default read path (`variant`, the default gap) against the targets:
    requests per video, read/used, worker CPU-ms per video from the page cache and from the
    bucket at each latency, the bucket/page-cache ratio (per worker count)."""
    if variant not in r["variants"]:
        return {}
    layout = VARIANTS[variant][0]
    reads = r["reads"][gap or f"time blocks, {_size(r['default_gap'])} gap"]
    return {"variant": variant, "requests_per_video": reads["requests_per_video"],
            "read_per_used": reads["read_per_used"],
            "page_cache_worker_cpu_ms_per_video": {count: row["worker_cpu_ms_per_video"]
                                                   for count, row in r["page_cache"][layout].items()},
            "bucket_worker_cpu_ms_per_video": {str(latency): {count: row["worker_cpu_ms_per_video"]
                                                              for count, row in r[str(latency)][variant].items()}
                                               for latency in r["latencies_ms"]},
            "of_page_cache": {str(latency): {count: row["of_page_cache"]
                                             for count, row in r[str(latency)][variant].items()}
                              for latency in r["latencies_ms"]}}


def _size(nbytes: int) -> str:
    if nbytes >= 1 << 20 and nbytes % (1 << 20) == 0:
        return f"{nbytes >> 20} MiB"
    if nbytes >= 1 << 10 and nbytes % (1 << 10) == 0:
        return f"{nbytes >> 10} KiB"
    return f"{nbytes} B" if nbytes else "0"


_LAYOUT_LABELS = {"time_blocks": "time blocks", "kinds": "kinds (format 1)"}
_VARIANT_LABELS = {"kinds_fsspec": "kinds, 64 KiB gap, gcsfs",
                   "time_blocks_fsspec": f"time blocks, {_size(DEFAULT_MAX_GAP[FORMAT])} gap, gcsfs",
                   "time_blocks_tensorstore": f"time blocks, {_size(DEFAULT_MAX_GAP[FORMAT])} gap, TensorStore"}


def format_bucket(r: dict) -> str:
    if "skipped" in r:
        return f"bucket: skipped ({r['skipped']})"
    lines = [f"store in a bucket on localhost (tests/gcs_server.py): {r['videos']} videos per layout uploaded in "
             f"{r['upload_seconds']:.0f} s; clip arrays {r['used_bytes_per_video'] / 1e6:.2f} MB per video",
             f"{'reads (a video per call)':34s} {'requests/video':>15s} {'served/video':>13s} {'MB/video':>9s} "
             f"{'read/used':>10s}"]
    for name, row in r["reads"].items():
        lines.append(f"{name:34s} {row['requests_per_video']:15.2f} {row['server_requests_per_video']:13.2f} "
                     f"{row['bytes_per_video'] / 1e6:9.2f} {row['read_per_used']:9.2f}x")
    lines.append(f"{'client (CPU ms in this process)':34s} {'per request':>12s} {'per 1 MiB':>10s} "
                 + " ".join(f"{'at ' + _size(int(size)):>10s}" for size in next(iter(r["clients"].values()))
                            ["cpu_ms_per_request"]))
    for client, row in r["clients"].items():
        lines.append(f"{client:34s} {row['cpu_ms_per_empty_request']:12.3f} {row['cpu_ms_per_mib']:10.3f} "
                     + " ".join(f"{v:10.3f}" for v in row["cpu_ms_per_request"].values()))
    lines.append(f"worker processes, batch tasks, {r['videos_per_batch']} videos per batch")
    lines.append(f"{'latency':>8s} {'reads':50s} {'workers':>7s} {'videos/s':>9s} {'of page cache':>14s} "
                 f"{'worker CPU-ms/video':>20s} {'read/used':>10s} {'requests/video':>15s} "
                 f"{'server CPU-ms/video':>20s}")

    def line(latency, label, count, row):
        server, share, served = (row.get(k) for k in ("server_cpu_ms_per_video", "of_page_cache",
                                                       "server_requests_per_video"))
        lines.append(f"{latency:>8s} {label:50s} {count:>7s} {row['videos_per_second']:9.1f} "
                     f"{'' if share is None else f'{share:.2f}x':>14s} {row['worker_cpu_ms_per_video']:20.2f} "
                     f"{row['read_per_used']:9.2f}x {'' if served is None else f'{served:.2f}':>15s} "
                     f"{'' if server is None else f'{server:.2f}':>20s}")

    for layout, rows in r["page_cache"].items():
        for count, row in rows.items():
            line("-", f"page cache, {_LAYOUT_LABELS[layout]}", count, row)
    for latency in r["latencies_ms"]:
        for variant, rows in r[str(latency)].items():
            for count, row in rows.items():
                line(f"{latency} ms", f"bucket, {_VARIANT_LABELS[variant]}", count, row)
    s = r.get("summary")
    if s:
        def per_count(values):
            return " / ".join(f"{v:.2f}" for v in values.values())

        cpu = "; ".join(f"{latency} ms {per_count(v)}" for latency, v in s["bucket_worker_cpu_ms_per_video"].items())
        ratio = "; ".join(f"{latency} ms {per_count(v)}x" for latency, v in s["of_page_cache"].items())
        lines += [f"summary ({_VARIANT_LABELS[s['variant']]}; per worker count "
                  f"{' / '.join(s['page_cache_worker_cpu_ms_per_video'])}):",
                  f"  requests per video {s['requests_per_video']:.2f} (target <= 4), read/used "
                  f"{s['read_per_used']:.2f}x (target <= 1.5x)",
                  f"  worker CPU-ms per video: page cache {per_count(s['page_cache_worker_cpu_ms_per_video'])}; "
                  f"bucket {cpu} (target <= 3)",
                  f"  bucket / page-cache rate: {ratio} (target >= 0.8x at 20 ms)"]
    return "\n".join(lines)
