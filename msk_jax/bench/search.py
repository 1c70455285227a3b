"""``search``: query latency and memory of the search index against the library's size, exact and
approximate side by side in one run.

For each size (windows), synthetic fused embeddings at the index's width (configs/howto.py's
``projection_dim``: 6,144, the paper's; ``dim`` overrides) are written as the index stores them,
unit rows of float16 in a memory-mapped ``.npy`` file, and queried one query at a time as
``msk_jax.search`` queries them:

- exact: ``scoring.exact_top_k`` over chunks of ``scoring.CHUNK_ROWS`` windows (every window
  scored, the best k kept);
- approximate: ``scoring.Approximate`` (faiss IVF, about sqrt(N) lists, over the first 256
  principal components, fitted on a sample of the windows) whose ``candidates`` best windows
  are scored again exactly (``scoring.approximate_top_k``); its build time and recall@10
  against exact search on the same queries.

Latency: p50 and p99 of single queries after one untimed query (wall time, the query's embedding
not included: the text tower takes the same time whatever the library's size). Memory: the
stored vectors a query reads (float16, memory-mapped: the operating system's page cache holds
them, not the process), the approximate index's own memory, and the peak of the process's
anonymous memory (``RssAnon``, sampled every 2 ms) above what it held before the queries.

The synthetic library: videos of 100 windows, videos drawn around 1 topic of n / 1,000; a
window is normalize(topic + 0.8 video + 0.6 own), each term drawn from N(0, diag(s^2)) with a
power-law spectrum s_j = (j + 1)^-1/2 (embeddings are anisotropic; the own terms come from a
pool of 16,384 draws with random signs, which keeps the generation of a million windows to
minutes); a query is a window plus as much noise again of the same spectrum, normalised
(cosine about 0.7 with its window), so that its neighbours are many windows of related videos
rather than one near-copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import numpy as np

from msk_jax.bench.common import MB, machine
from msk_jax.configs import howto
from msk_jax.search import scoring

WINDOWS_PER_VIDEO = 100
WINDOWS_PER_TOPIC = 1000
POOL = 16384  # the windows' own terms are drawn from a pool of this many, with random signs


def _spectrum(dim: int) -> np.ndarray:
    return ((np.arange(dim) + 1.0) ** -0.5).astype(np.float32)


def synthetic(path: str, n: int, dim: int, seed: int = 0, chunk: int = 8192) -> np.ndarray:
    """Writes n unit float16 windows (the module's model) to the .npy file `path`; returns it
    memory-mapped."""
    rng = np.random.default_rng(seed)
    scale = _spectrum(dim)
    topics = rng.standard_normal((max(1, n // WINDOWS_PER_TOPIC), dim), dtype=np.float32) * scale
    videos = max(1, -(-n // WINDOWS_PER_VIDEO))
    video_terms = topics[rng.integers(len(topics), size=videos)] + \
        0.8 * rng.standard_normal((videos, dim), dtype=np.float32) * scale
    pool = rng.standard_normal((min(POOL, n), dim), dtype=np.float32) * scale
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        own = pool[rng.integers(len(pool), size=hi - lo)]
        own *= rng.choice(np.array([-0.6, 0.6], np.float32), size=(hi - lo, 1))
        x = video_terms[np.arange(lo, hi) // WINDOWS_PER_VIDEO] + own
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo:hi] = x
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def synthetic_queries(data: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """(count, dim) unit float32 queries: windows drawn at random plus noise of their spectrum."""
    rng = np.random.default_rng(seed)
    dim = data.shape[1]
    scale = _spectrum(dim)
    base = np.asarray(data[np.sort(rng.choice(len(data), size=count, replace=False))], np.float32)
    noise = rng.standard_normal((count, dim), dtype=np.float32) * scale / np.sqrt(np.sum(scale ** 2))
    q = base + noise
    return q / np.linalg.norm(q, axis=1, keepdims=True)


class AnonymousMemory:
    """Peak of the process's anonymous resident memory (/proc/self/status RssAnon) while in the
    `with` block, above what it was on entering it (bytes; 0 where /proc is not there)."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self.base = every, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def __enter__(self):
        self.base = self.peak = self.now()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())

    @property
    def added(self) -> int:
        return max(0, self.peak - self.base)


def _chunks(data: np.ndarray):
    """(first window, rows) over a library, as an index's shards give them."""
    for lo in range(0, len(data), scoring.CHUNK_ROWS):
        yield lo, data[lo:lo + scoring.CHUNK_ROWS]


def _rows_of(data: np.ndarray):
    """candidates_of(keys) -> (windows, their rows) of a library whose keys are its row numbers."""
    def candidates_of(keys):
        keys = np.sort(keys)
        return keys, np.asarray(data[keys])

    return candidates_of


def _percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "queries": len(ms)}


def run_search(sizes=(10_000, 100_000, 1_000_000), dim: int = 0, queries: int = 50, exact_queries: int = 10,
               k: int = 10, candidates: int = 100, approximate: bool = True, folder: str = "", seed: int = 0,
               log=print) -> dict:
    """The benchmark (see the module's docstring); `dim` 0: configs/howto.py's projection_dim.
    `exact_queries` of the `queries` are timed exactly (a query reads the whole library), all of
    them approximately; recall@10 is over all of them."""
    dim = dim or int(howto.get_config().model.projection_dim)
    results: dict = {"machine": machine(), "dim": dim, "k": k, "candidates": candidates,
                     "chunk_rows": scoring.CHUNK_ROWS, "sizes": {}}
    work = tempfile.mkdtemp(prefix="msk_search_bench_", dir=folder or None)
    try:
        for n in sizes:
            n = int(n)
            t0 = time.perf_counter()
            data = synthetic(os.path.join(work, f"windows-{n}.npy"), n, dim, seed)
            generated = time.perf_counter() - t0
            count = min(queries, n)
            q = synthetic_queries(data, count, seed + 1)
            _, truth = scoring.exact_top_k(_chunks(data), q, k)  # also brings the vectors into the page cache
            row = {"windows": n, "generate_s": generated, "vectors_mb": n * dim * 2 / MB}
            times = []
            with AnonymousMemory() as memory:
                for i in range(min(exact_queries, count)):
                    start = time.perf_counter()
                    scoring.exact_top_k(_chunks(data), q[i:i + 1], k)
                    times.append(time.perf_counter() - start)
            row["exact"] = {**_percentiles(times), "query_memory_mb": memory.added / MB}
            if approximate:
                t0 = time.perf_counter()
                rng = np.random.default_rng(seed)
                sample = np.sort(rng.choice(n, size=scoring.Approximate.sample_size(n), replace=False))
                index = scoring.Approximate.train(data[sample], n)
                index.settings["candidates"] = candidates
                for lo in range(0, n, scoring.CHUNK_ROWS):
                    rows = data[lo:lo + scoring.CHUNK_ROWS]
                    index.add(rows, np.arange(lo, lo + len(rows)))
                built = time.perf_counter() - t0
                candidates_of = _rows_of(data)
                times, found = [], []
                scoring.approximate_top_k(index, candidates_of, q[0], k)
                with AnonymousMemory() as memory:
                    for i in range(count):
                        start = time.perf_counter()
                        _, windows = scoring.approximate_top_k(index, candidates_of, q[i], k)
                        times.append(time.perf_counter() - start)
                        found.append(windows)
                row["approximate"] = {**_percentiles(times), "build_s": built, "index_mb": index.nbytes() / MB,
                                      "query_memory_mb": memory.added / MB,
                                      "recall_at_10": scoring.recall_at(truth, found, 10),
                                      "lists": index.settings["lists"], "probe": index.settings["probe"],
                                      "dims": index.settings["dims"]}
                del index
            results["sizes"][str(n)] = row
            log(format_row(row))
            del data
            os.unlink(os.path.join(work, f"windows-{n}.npy"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def format_row(row: dict) -> str:
    e = row["exact"]
    line = (f"{row['windows']:>9,} windows  vectors {row['vectors_mb']:8.0f} MB | exact p50 {e['p50_ms']:8.1f} ms "
            f"p99 {e['p99_ms']:8.1f} ms (+{e['query_memory_mb']:.0f} MB, {e['queries']} queries)")
    if "approximate" in row:
        a = row["approximate"]
        line += (f" | approximate p50 {a['p50_ms']:6.1f} ms p99 {a['p99_ms']:6.1f} ms recall@10 "
                 f"{a['recall_at_10']:.3f} index {a['index_mb']:.0f} MB (+{a['query_memory_mb']:.0f} MB) "
                 f"built in {a['build_s']:.0f} s")
    return line


def cli(config) -> dict:
    c = config.search
    dim = c.dim or int(howto.get_config().model.projection_dim)
    print(f"search: one query at a time, k {c.k}, {dim}-d float16 windows ({machine()})", flush=True)
    return run_search(sizes=tuple(c.sizes), dim=dim, queries=c.queries, exact_queries=c.exact_queries, k=c.k,
                      candidates=c.candidates, approximate=c.approximate, folder=c.folder, seed=c.seed,
                      log=lambda line: print(line, flush=True))
