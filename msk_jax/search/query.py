"""Text queries against an index: embedded as evaluation embeds a caption, ranked by cosine.

A query is embedded as evaluation embeds a caption (`word2vec.tokenize`, the run's word vectors
from the configuration's data paths, the first max_words known words) with the text tower of the
weights that built the index, and the windows are ranked by their cosine with it: the fused
video+audio embedding's by default, the video's or the audio's alone with embedding 'v' or 'a'
(`scoring.exact_top_k`; with `approximate`, the index's approximate index, for 'v+a'). Words
without a vector are named; a query with none is an error.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading

import numpy as np

from msk_jax import storage
from msk_jax.data import batch as batch_spec
from msk_jax.data import model_inputs, word2vec
from msk_jax.search import scoring
from msk_jax.search.build import approximate_windows, load_approximate
from msk_jax.search.store import EMBEDDINGS, SearchError, SearchIndex, check_config
from msk_jax.search.videos import embedder, load_weights


@dataclasses.dataclass
class QueryResult:
    """One query's top windows (`hits`: rank, video, path, start, end, score, text) and the
    words of it that have no vector (`unknown_words`); `error` when no word has one. `windows`:
    the hits' window numbers in the index; `method`: 'exact' or 'approximate'."""

    query: str
    embedding: str
    unknown_words: list[str]
    hits: list[dict]
    error: str | None = None
    windows: list[int] = dataclasses.field(default_factory=list)
    method: str = "exact"

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
    built it (`config` given: it must be the index's). Safe to call from several threads (one
    search at a time)."""

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
        self._embed = embedder(self.config, model, variables)
        self._approximate = None
        self._lock = threading.Lock()

    @property
    def has_approximate(self) -> bool:
        return bool(self.index.meta.get("approximate"))

    def reload_index(self) -> bool:
        """Reads the index again if its manifest changed (an append, a removal); whether it did.
        The run must be the same (an append keeps it)."""
        meta_path = storage.join(self.index.path, "index.json")
        try:
            current = json.loads(storage.read_bytes(meta_path))
        except (OSError, ValueError):
            return False
        if current == self.index.meta:
            return False
        index = SearchIndex(self.index.path)
        for field in ("checkpoint", "step", "weights", "config"):
            if index.meta.get(field) != self.index.meta.get(field):
                raise SearchError(f"{meta_path}: the index was built again with another run ({field} differs): "
                                  "start the server again")
        with self._lock:
            self.index, self._approximate = index, None
        return True

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
        # Text alone: one masked video token and one audio token's frames, all zeros.
        shapes = batch_spec.shapes(n, video_tokens=1, video_dim=m.video_dim, audio_bins=m.audio_feat_dim,
                                   audio_frames=model_inputs.AUDIO_TOKEN_FRAMES, words=1, word_dim=1)
        batch = {**{k: np.zeros(shape, np.float32) for k, shape in shapes.items()}, **inputs}
        batch_size = min(self.config.eval_batch_size, 1 << max(0, n - 1).bit_length())
        return model_inputs.l2_normalize_rows(self._embed(batch, batch_size)["text"]), unknown

    def search(self, queries: list[str], k: int = 10, embedding: str = "v+a",
               approximate: bool = False) -> list[QueryResult]:
        """Each query's best k windows. `approximate` uses the index's approximate index for the
        fused embedding (an error where it has none; 'v' and 'a' are searched exactly)."""
        if embedding not in EMBEDDINGS:
            raise SearchError(f"--embedding={embedding}: expected one of {', '.join(EMBEDDINGS)}")
        if k < 1:
            raise SearchError(f"--k={k}: must be at least 1")
        with self._lock:
            return self._search(queries, k, embedding, approximate)

    def _search(self, queries, k, embedding, approximate):
        index = self.index
        if approximate and not self.has_approximate:
            raise SearchError(f"{storage.join(index.path, 'index.json')}: the index has no approximate index "
                              "(build one with `python -m msk_jax.search index --approximate`)")
        method = "approximate" if approximate and embedding == "v+a" else "exact"
        embedded, unknown = self.embed_queries(queries)
        valid = [q for q, query in enumerate(queries)
                 if word2vec.tokenize(query) and len(unknown[q]) < len(set(word2vec.tokenize(query)))]
        found = {}
        if valid and method == "exact":
            top = scoring.exact_top_k(index.chunks(embedding, scoring.CHUNK_ROWS), embedded[valid], k)
            found = {q: (top[0][i], top[1][i]) for i, q in enumerate(valid)}
        elif valid:
            if self._approximate is None:
                self._approximate = load_approximate(index.path, index.meta["approximate"])
            found = {q: approximate_windows(index, self._approximate, embedded[q], k) for q in valid}
        results = []
        for q, query in enumerate(queries):
            if q not in found:
                results.append(QueryResult(query, embedding, unknown[q], [], no_vector_message(query, unknown[q],
                                                                                               self.words),
                                           method=method))
                continue
            scores, windows = found[q]
            hits = [{"rank": r + 1, **_ordered(index.window(int(w)), float(s))} for r, (s, w) in
                    enumerate(zip(scores, windows))]
            results.append(QueryResult(query, embedding, unknown[q], hits, windows=[int(w) for w in windows],
                                       method=method))
        return results


def _ordered(window: dict, score: float) -> dict:
    return {"video": window["video"], "path": window["path"], "start": window["start"], "end": window["end"],
            "score": score, "text": window["text"]}


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
    lines = [f"query: {result.query}   (cosine with each window's {EMBEDDINGS[result.embedding]} embedding"
             + (", approximate index" if result.method == "approximate" else "") + ")",
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
              config=None, approximate: bool = False, out=sys.stdout, err=sys.stderr) -> int:
    """Prints each query's top k windows (a table or JSON lines), names words without a vector
    on `err`; returns the exit status (1 if a query had no word with a vector)."""
    if not queries:
        raise SearchError("no query: give one as an argument or --queries=FILE")
    if k < 1:
        raise SearchError(f"--k={k}: must be at least 1")
    searcher = Searcher(index, config)
    status = 0
    for result in searcher.search(queries, k, embedding, approximate):
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
