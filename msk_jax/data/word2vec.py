"""Word vectors in the word2vec binary format (e.g. GoogleNews-vectors-negative300.bin).

The format: a header line "<vocab size> <dim>\n", then per word "<word> " followed by `dim`
little-endian float32 values (and an optional "\n"). A short reader suffices; no gensim.

A training source needs only the vectors of its captions' words (GoogleNews holds 3 M words,
3.6 GB): `caption_vectors` restricts the vectors to a caption vocabulary once and keeps the result
(`words.txt`, `words.npy`, the layout of a feature store's vectors) in a cache folder keyed by the
inputs, so that worker processes load only that (`load_vectors`, memory-mapped).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Iterable, Mapping

import numpy as np

from msk_jax import environment, storage
from msk_jax.errors import DataError

_WORD = re.compile(r"[\w']+")


def tokenize(sentence) -> list[str]:
    """The original's ASR word split: runs of word characters and apostrophes."""
    return _WORD.findall(str(sentence))


class WordVectors:
    """word -> vector lookup, as the original's `we[words]`. `origin`: the file and word limit it
    was read from (`load_word2vec_binary`), which names it in cache keys; None when built in memory."""

    def __init__(self, words: list[str], vectors: np.ndarray, origin: tuple[str, int | None] | None = None):
        self.vectors = np.asarray(vectors, np.float32)
        self.index = {w: i for i, w in enumerate(words)}
        self.dim = self.vectors.shape[1]
        self.origin = origin

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, words: Iterable[str]) -> np.ndarray:
        return self.vectors[[self.index[w] for w in words]].reshape(-1, self.dim)

    def restricted(self, words: Iterable[str]) -> "WordVectors":
        """The vectors of those of `words` in the vocabulary (sorted, each once): every lookup of
        one of them gives the bits this object gives."""
        kept = sorted({w for w in words if w in self.index})
        vectors = self.vectors[[self.index[w] for w in kept]].reshape(len(kept), self.dim)
        return WordVectors(kept, vectors)

    def fingerprint(self) -> str:
        """What identifies these vectors in a cache key: the file they were read from (its path,
        size and modification time, and the word limit), else a digest of the words and vectors."""
        if self.origin is not None:
            path, limit = self.origin
            return json.dumps({"file": file_identity(path), "limit": limit})
        digest = hashlib.sha256("\n".join(self.index).encode("utf-8"))
        digest.update(np.ascontiguousarray(self.vectors).data)
        return digest.hexdigest()


def load_word2vec_binary(path: str, limit: int | None = None) -> WordVectors:
    """Reads a word2vec binary file; `limit` keeps only the first words (the file's order). A file
    that is not one (a bad header, a vocabulary larger than the file can hold, a truncated word)
    raises a DataError naming it, before anything of the header's size is allocated."""

    if not storage.exists(path):
        raise FileNotFoundError(f"word vectors: '{path}' does not exist.")
    size = storage.size(path)
    with storage.open_read(path) as f:
        line = f.readline(64)
        header = line.split()
        if len(header) != 2 or not all(h.isdigit() for h in header) or not line.endswith(b"\n"):
            raise DataError(path, "does not start with a '<vocab> <dim>' header line (is it the word2vec *binary* "
                                  "format?)", "bad word vectors")
        vocab, dim = int(header[0]), int(header[1])
        count = vocab if limit is None else min(vocab, limit)
        row_bytes = dim * 4
        # Each word takes its vector and at least a character and a space: a header that promises
        # more than the file holds is refused before the vectors are allocated.
        if dim == 0 or count * (row_bytes + 2) > size - len(line):
            raise DataError(path, f"header promises {vocab:,} words of {dim} dimensions, more than its {size:,} bytes "
                                  "hold; not a word2vec binary file, or truncated", "bad word vectors")
        words, vectors = [], np.empty((count, dim), np.float32)
        for i in range(count):
            word = bytearray()
            while True:
                ch = f.read(1)
                if ch == b"":
                    raise DataError(path, f"is truncated at word {i} of {vocab}", "bad word vectors")
                if ch == b" ":
                    break
                if ch != b"\n":
                    word += ch
            data = f.read(row_bytes)
            if len(data) != row_bytes:
                raise DataError(path, f"is truncated in the vector of word {i} of {vocab}", "bad word vectors")
            words.append(word.decode("utf-8", errors="replace"))
            vectors[i] = np.frombuffer(data, "<f4")
    return WordVectors(words, vectors, origin=(path, limit))


def save_word2vec_binary(path: str, vectors: Mapping[str, np.ndarray]) -> None:
    """Writes word -> vector in the word2vec binary format."""
    items = list(vectors.items())
    dim = len(items[0][1]) if items else 0
    with open(path, "wb") as f:
        f.write(f"{len(items)} {dim}\n".encode())
        for word, vec in items:
            if " " in word or "\n" in word:
                raise ValueError(f"word vectors: word {word!r} contains whitespace.")
            vec = np.asarray(vec, "<f4")
            if vec.shape != (dim,):
                raise ValueError(f"word vectors: '{word}' has shape {vec.shape}, expected ({dim},).")
            f.write(word.encode("utf-8") + b" " + vec.tobytes() + b"\n")


def file_identity(path: str) -> list:
    """[path, size, modification time] of a file (local or in a bucket, as far as it tells):
    what names its contents in a cache key without reading it."""
    if not storage.is_remote(path):
        stat = os.stat(path)
        return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
    try:
        stat = storage.path(path).stat()
        return [path, getattr(stat, "length", None), str(getattr(stat, "mtime", ""))]
    except Exception:  # a store without metadata: the name alone
        return [path]


def save_vectors(folder: str, vectors: WordVectors) -> None:
    """Writes `words.txt` (one word a line, in vector order) and `words.npy` (float32) into
    `folder` (local or a URL), each atomically."""
    words = sorted(vectors.index, key=vectors.index.get)
    if len(words) != len(vectors.vectors):  # repeated words: only the vectors lookups give
        vectors = vectors.restricted(words)
        words = sorted(vectors.index, key=vectors.index.get)
    storage.write_atomic(storage.join(folder, "words.txt"), "".join(w + "\n" for w in words))
    buffer = io.BytesIO()
    np.save(buffer, vectors.vectors)
    storage.write_atomic(storage.join(folder, "words.npy"), buffer.getvalue())


def load_vectors(folder: str) -> WordVectors:
    """The vectors `save_vectors` wrote (a feature store holds its vocabulary's so too); on disk
    memory-mapped, so a process reads only the rows it uses."""
    words = storage.read_bytes(storage.join(folder, "words.txt")).decode("utf-8").split("\n")[:-1]
    npy = storage.join(folder, "words.npy")
    vectors = (np.load(npy, mmap_mode="r") if not storage.is_remote(npy)
               else np.load(io.BytesIO(storage.read_bytes(npy))))
    return WordVectors(words, vectors)


def caption_vectors(word_vectors: WordVectors, captions_key, texts: Callable[[], Iterable[str]],
                    cache_dir: str | None = None) -> str:
    """The folder of the vectors of the words of a set of captions (`load_vectors` reads it),
    built once: restricted from `word_vectors` to the tokens of `texts()` (each caption text,
    tokenised as clips tokenise it) and kept in `<cache_dir>/caption_words/<key>` (default cache
    dir: `msk_jax.environment.cache_dir()`), the key a digest of `word_vectors.fingerprint()`
    and `captions_key` (what identifies the captions, e.g. `file_identity` of their file; None:
    the vocabulary itself, computed each time)."""

    vocabulary = None
    if captions_key is None:
        vocabulary = sorted({w for text in texts() for w in tokenize(text) if w in word_vectors})
        captions_key = hashlib.sha256("\n".join(vocabulary).encode("utf-8")).hexdigest()
    key = hashlib.sha256(json.dumps([word_vectors.fingerprint(), captions_key], default=str).encode()).hexdigest()
    root = os.path.join(cache_dir or str(environment.cache_dir()), "caption_words")
    folder = os.path.join(root, key[:32])
    if os.path.exists(os.path.join(folder, "words.npy")):
        return folder
    if vocabulary is None:
        vocabulary = {w for text in texts() for w in tokenize(text) if w in word_vectors}
    os.makedirs(root, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{key[:32]}-", dir=root)
    try:
        save_vectors(partial, word_vectors.restricted(vocabulary))
        try:
            os.rename(partial, folder)  # whole or not at all; another process may have won
        except OSError:
            if not os.path.exists(os.path.join(folder, "words.npy")):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder
