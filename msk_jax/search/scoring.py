"""Scoring queries against an index's float16 embeddings: exact, in bounded chunks, and approximate.

Exact (`exact_top_k`): every window's cosine with each query, a chunk of `CHUNK_ROWS` windows at
a time, keeping the best k of each query: the memory a query takes is a chunk's scores and the
best k, whatever the index's size (the embeddings are memory-mapped, read as they are scored).
On a CPU the dot products are usearch's (SIMD float16 kernels with float32 sums: numpy and
XLA's CPU backend convert float16 at a few hundred MB/s, usearch scores it at the memory's
speed); on an accelerator, JAX's, a chunk at a time on the device. Both sum in float32; the
query is rounded to float16 as the windows are.

Approximate (`Approximate`): a faiss inverted-file index (IVF, inner product) over the fused
embeddings projected on their first `dims` principal components (fitted on a sample), whose
`candidates` best windows are scored again exactly from the stored embeddings and the best k of
those returned. Chosen by measurement on this repository's 2-core machine (docs/search.md,
"Choosing the approximate index"): at 100,000 windows of 6,144 dimensions, with the same
projection and re-scoring, faiss's IVF found 98.7 % of the exact top 10 from 50 candidates, as
ScaNN did, where usearch's and hnswlib's HNSW graphs found 87-89 % at the same query time; of
the two, faiss adds and removes windows by key and serialises to one buffer.
"""

from __future__ import annotations

import io
import json
import logging
import math

import numpy as np
from usearch.index import MetricKind
from usearch.index import search as usearch_search

CHUNK_ROWS = 16384
PCA_ROWS = 16384    # windows the projection is fitted on
TRAIN_ROWS = 65536  # windows the lists are fitted on, at most
CANDIDATES = 400    # windows of the approximate index scored again exactly
# faiss's loader logs at INFO level which of its builds it tried on import.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _backend(backend: str) -> str:
    if backend != "auto":
        return backend
    import jax

    return "usearch" if jax.default_backend() == "cpu" else "jax"


def chunk_top_k(chunk: np.ndarray, queries: np.ndarray, k: int, backend: str = "auto"
                ) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k') float32, rows (Q, k') int64) of the best k' = min(k, len(chunk)) rows of
    one float16 chunk for each float16 query, best first."""
    k = min(k, len(chunk))
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if _backend(backend) == "jax":
        return _jax_top_k(chunk, queries, k)
    matches = usearch_search(np.ascontiguousarray(chunk), np.ascontiguousarray(queries), k, MetricKind.IP,
                             exact=True, threads=1)
    keys = np.atleast_2d(matches.keys).astype(np.int64)
    scores = 1.0 - np.atleast_2d(matches.distances).astype(np.float32)
    return scores, keys


def _jax_top_k(chunk: np.ndarray, queries: np.ndarray, k: int):
    import jax

    rows = CHUNK_ROWS if len(chunk) <= CHUNK_ROWS else len(chunk)
    padded = np.zeros((rows, chunk.shape[1]), np.float16)
    padded[:len(chunk)] = chunk
    scores, index = _jax_scorer(k)(jax.device_put(padded), queries.astype(np.float16), len(chunk))
    return np.asarray(scores, np.float32), np.asarray(index, np.int64)


_SCORERS: dict = {}


def _jax_scorer(k: int):
    if k not in _SCORERS:
        import jax
        import jax.numpy as jnp

        @jax.jit
        def score(chunk, queries, valid):
            sims = jnp.dot(queries, chunk.T, preferred_element_type=jnp.float32)
            sims = jnp.where(jnp.arange(chunk.shape[0])[None, :] < valid, sims, -jnp.inf)
            return jax.lax.top_k(sims, k)

        _SCORERS[k] = score
    return _SCORERS[k]


def merge(best: tuple[np.ndarray, np.ndarray] | None, scores: np.ndarray, ids: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """The best k of two (scores, ids) sets per query; ties by the smaller id."""
    if best is not None:
        scores, ids = np.concatenate([best[0], scores], axis=1), np.concatenate([best[1], ids], axis=1)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def exact_top_k(chunks, queries: np.ndarray, k: int, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k'), window numbers (Q, k')), best first, over `chunks` ((first window, (n, D)
    float16) pairs) for (Q, D) unit queries."""
    queries = np.asarray(queries, np.float32).astype(np.float16)
    best = None
    for first, chunk in chunks:
        scores, rows = chunk_top_k(chunk, queries, k, backend)
        best = merge(best, scores, rows + first, k)
    if best is None:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    return best


def rescore(rows: np.ndarray, windows: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of candidate `windows` (whose float16 embeddings are `rows`) for one query,
    scored as `exact_top_k` scores them."""
    scores, local = chunk_top_k(rows, np.asarray(query, np.float32).astype(np.float16)[None], k, "usearch")
    return merge(None, scores, windows[local], k)


# ------------------------------------------------------------------------------------ approximate


class Approximate:
    """faiss IVF over principal components (see the module's docstring), keyed by window keys."""

    def __init__(self, index, components: np.ndarray | None, mean: np.ndarray | None, settings: dict):
        self.index, self.components, self.mean, self.settings = index, components, mean, settings

    @staticmethod
    def lists_for(total: int) -> int:
        """About sqrt(N) lists."""
        return max(1, int(round(math.sqrt(max(total, 1)))))

    @staticmethod
    def probe_for(lists: int) -> int:
        """Lists searched a query: an eighth of them, at least 32."""
        return min(lists, max(32, lists // 8))

    @staticmethod
    def sample_size(total: int) -> int:
        """Windows to fit an index of `total` on: 64 a list (faiss asks for 39 at least), at least
        PCA_ROWS, at most TRAIN_ROWS."""
        return min(total, min(TRAIN_ROWS, max(PCA_ROWS, 64 * Approximate.lists_for(total))))

    @classmethod
    def train(cls, sample: np.ndarray, total: int, dims: int = 256, seed: int = 0) -> "Approximate":
        """An empty index for about `total` windows, its projection fitted on PCA_ROWS of
        `sample` ((n, D) float16 rows drawn at random, `sample_size(total)` of them) and its
        lists on all of them."""
        import faiss

        n, d = sample.shape
        rng = np.random.default_rng(seed)
        components = mean = None
        if d > dims and n > dims:
            from sklearn.utils.extmath import randomized_svd

            fit = np.asarray(sample[np.sort(rng.choice(n, size=min(n, PCA_ROWS), replace=False))], np.float32)
            mean = fit.mean(axis=0)
            _, _, vt = randomized_svd(fit - mean, dims, n_iter=4, random_state=seed)
            components = np.ascontiguousarray(vt.T, np.float32)
            del fit
        approximate = cls(None, components, mean, {})
        reduced = np.concatenate([approximate.reduce(sample[lo:lo + 8192]) for lo in range(0, n, 8192)])
        width = reduced.shape[1]
        lists = int(max(1, min(cls.lists_for(total), n // 39)))
        quantizer = faiss.IndexFlatIP(width)
        index = faiss.IndexIVFFlat(quantizer, width, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(reduced)
        approximate.index = index
        approximate.settings = {"library": "faiss", "kind": "IVF-Flat over principal components", "dims": int(width),
                                "lists": lists, "probe": cls.probe_for(lists), "candidates": CANDIDATES,
                                "trained_for": int(total),
                                "trained_on": int(n)}
        return approximate

    def reduce(self, rows: np.ndarray) -> np.ndarray:
        x = np.asarray(rows, np.float32)
        if self.components is None:
            return np.ascontiguousarray(x)
        return np.ascontiguousarray((x - self.mean) @ self.components)

    def add(self, rows: np.ndarray, keys: np.ndarray) -> None:
        self.index.add_with_ids(self.reduce(rows), np.asarray(keys, np.int64))

    def remove(self, keys: np.ndarray) -> None:
        import faiss

        keys = np.asarray(keys, np.int64)
        if len(keys):
            self.index.remove_ids(faiss.IDSelectorBatch(len(keys), faiss.swig_ptr(keys)))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, count: int) -> np.ndarray:
        """(Q, count) keys of the best candidates (-1 past the last)."""
        import faiss

        queries = np.asarray(queries, np.float32)
        # The queries are not centred: q . (x - mean) ranks x as q . x does. One thread for a few
        # queries (einsum, not BLAS; faiss's OpenMP at one thread): on a busy machine the thread
        # pools' start-up took ten times the work (12 ms against 1 ms a query, 2 cores).
        reduced = np.einsum("qd,dr->qr", queries, self.components) if self.components is not None else queries
        params = faiss.SearchParametersIVF(nprobe=int(self.settings["probe"]))
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1 if len(queries) <= 4 else threads)
        try:
            _, keys = self.index.search(np.ascontiguousarray(reduced, np.float32), count, params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        return keys

    def to_bytes(self) -> bytes:
        import faiss

        arrays = {"index": faiss.serialize_index(self.index), "settings": np.array(json.dumps(self.settings))}
        if self.components is not None:
            arrays.update(components=self.components, mean=self.mean)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_arrays(cls, arrays: dict) -> "Approximate":
        import faiss

        index = faiss.deserialize_index(np.asarray(arrays["index"], np.uint8))
        settings = json.loads(str(arrays["settings"]))
        return cls(index, arrays.get("components"), arrays.get("mean"), settings)

    def nbytes(self) -> int:
        """Its memory: the lists' vectors and ids, the centroids and the projection."""
        total = len(self) * (self.index.d * 4 + 8) + self.index.nlist * self.index.d * 4
        return total + (self.components.nbytes + self.mean.nbytes if self.components is not None else 0)


def approximate_top_k(approximate: Approximate, candidates_of, query: np.ndarray, k: int,
                      candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores (k',), window numbers (k',)) of one query: the approximate index's best
    candidates rescored exactly. `candidates_of(keys) -> (window numbers, (n, D) float16 rows)`."""
    count = max(int(candidates or approximate.settings["candidates"]), k)
    keys = approximate.search(query[None], count)[0]
    windows, rows = candidates_of(keys[keys >= 0])
    if len(windows) == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    scores, found = rescore(rows, windows, query, k)
    return scores[0], found[0]


def recall_at(exact: np.ndarray, approximate: np.ndarray, k: int = 10) -> float:
    """The mean fraction of each query's exact top k that the approximate top k holds."""
    hits = [len(set(e[:k].tolist()) & set(a[:k].tolist())) / max(1, min(k, len(e))) for e, a in zip(exact, approximate)]
    return float(np.mean(hits)) if hits else 1.0
