"""Tiny datasets in the original on-disk formats, with values chosen so clips can be computed by hand."""

import csv
import os
import pickle

import numpy as np

from msk_jax.data import eval_sets
from msk_jax.data.word2vec import WordVectors, save_word2vec_binary

WORDS = ["a", "b", "c", "d", "e", "p", "q", "r", "s"]
DIM_2D, DIM_3D, WORD_DIM = 4, 6, 5


def word_vectors():
    return {w: np.full(WORD_DIM, i + 1, np.float32) for i, w in enumerate(WORDS)}


def frames_for(seconds):
    """Spectrogram frames whose duration the original reads as exactly `seconds`."""
    return int(seconds * 100)


def write_video(root, path, duration, caption, captions, *, rng, dim_2d=DIM_2D, dim_3d=DIM_3D, frames=None):
    vid = path.split("/")[-1]
    for sub, rows, dim, suffix in (("features_2d", int(duration), dim_2d, "_2d.npz"),
                                   ("features_3d", int(duration * 1.5), dim_3d, "_3d.npz")):
        folder = os.path.join(root, sub, path)
        os.makedirs(folder, exist_ok=True)
        np.savez(os.path.join(folder, vid + suffix), features=rng.uniform(0.1, 1, (rows, dim)).astype(np.float32))
    folder = os.path.join(root, "audio", path)
    os.makedirs(folder, exist_ok=True)
    n = frames if frames is not None else frames_for(duration)
    # Frame f holds the value f in every bin, so crops can be read off.
    np.savez(os.path.join(folder, vid + "_spec.npz"), np.tile(np.arange(n, dtype=np.float32), (40, 1)))
    if caption is not None:
        captions[vid] = caption


def segments(*items):
    return {"start": np.array([s for s, _, _ in items], float), "end": np.array([e for _, e, _ in items], float),
            "text": [t for _, _, t in items]}


def write_howto(root, videos):
    """videos: list of (path, duration, caption dict or None, kwargs)."""
    rng = np.random.default_rng(0)
    captions = {}
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "howto_train.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"])
        for path, duration, caption, kwargs in videos:
            writer.writerow([path])
            write_video(root, path, duration, caption, captions, rng=rng, **kwargs)
    with open(os.path.join(root, "caption.pickle"), "wb") as f:
        pickle.dump(captions, f)
    save_word2vec_binary(os.path.join(root, "word2vec.bin"), word_vectors())


def write_eval_pickle(path, kind, n, *, rng, drop_2d=0):
    entries = []
    for i in range(n):
        seconds = 4 + i % 3
        entry = {"id": f"clip{i}", "audio": rng.normal(size=(40, seconds * 100)).astype(np.float32)}
        f2d = rng.uniform(0.1, 1, (seconds, DIM_2D)).astype(np.float32)
        f3d = rng.uniform(0.1, 1, (int(seconds * 1.5), DIM_3D)).astype(np.float32)
        if kind == "msrvtt":
            entry.update({"2d": f2d, "3d": f3d, "eval_caption": f"a b x{i} c", "caption": [f"a b x{i} c"]})
        else:
            entry.update({"3d_full": f3d, "caption": "p q zz"})
            if i >= drop_2d:
                entry["2d_full"] = f2d
        entries.append(entry)
    with open(path, "wb") as f:
        pickle.dump(entries, f)
    return entries


def read_eval_pickle(path: str, fmt: eval_sets.EvalFormat, word_vectors: WordVectors, **kwargs) -> eval_sets.EvalSet:
    """An evaluation pickle as model inputs, the way the evaluation sets are built."""
    entries, dropped = eval_sets.load_eval_entries(path, fmt)
    return eval_sets.build_eval_set(entries, fmt, word_vectors, source=path, dropped=dropped, **kwargs)
