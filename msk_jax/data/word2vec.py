"""Word vectors in the word2vec binary format (e.g. GoogleNews-vectors-negative300.bin).

The format: a header line "<vocab size> <dim>\n", then per word "<word> " followed by `dim`
little-endian float32 values (and an optional "\n"). A short reader suffices; no gensim.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from msk_jax import storage


class WordVectors:
    """word -> vector lookup, as the original's `we[words]`."""

    def __init__(self, words: list[str], vectors: np.ndarray):
        self.vectors = np.asarray(vectors, np.float32)
        self.index = {w: i for i, w in enumerate(words)}
        self.dim = self.vectors.shape[1]

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, words: Iterable[str]) -> np.ndarray:
        return self.vectors[[self.index[w] for w in words]].reshape(-1, self.dim)


def load_word2vec_binary(path: str, limit: int | None = None) -> WordVectors:
    """Reads a word2vec binary file; `limit` keeps only the first words (the file's order)."""
    if not storage.exists(path):
        raise FileNotFoundError(f"word vectors: '{path}' does not exist.")
    with storage.open_read(path) as f:
        header = f.readline().split()
        if len(header) != 2 or not all(h.isdigit() for h in header):
            raise ValueError(f"word vectors: '{path}' does not start with a '<vocab> <dim>' header "
                             "(is it the word2vec *binary* format?).")
        vocab, dim = int(header[0]), int(header[1])
        count = vocab if limit is None else min(vocab, limit)
        words, vectors = [], np.empty((count, dim), np.float32)
        row_bytes = dim * 4
        for i in range(count):
            word = bytearray()
            while True:
                ch = f.read(1)
                if ch == b"":
                    raise ValueError(f"word vectors: '{path}' is truncated at word {i} of {vocab}.")
                if ch == b" ":
                    break
                if ch != b"\n":
                    word += ch
            data = f.read(row_bytes)
            if len(data) != row_bytes:
                raise ValueError(f"word vectors: '{path}' is truncated in the vector of word {i} of {vocab}.")
            words.append(word.decode("utf-8", errors="replace"))
            vectors[i] = np.frombuffer(data, "<f4")
    return WordVectors(words, vectors)


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
