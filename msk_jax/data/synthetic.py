"""A synthetic corpus in the original HowTo100M layout at HowTo100M's real per-video sizes.

For benchmarks of the input path: random numbers, the real shapes. Per video (defaults): 396 s,
2D features (396, 2048) and 3D features (594, 2048) float32 npz, a (40, 39600) float32 log-mel
npz (14.4 MB in all) and ~100 ASR segments of ~3 s with 1 s gaps, words drawn from a 2,000-word
vocabulary of 300-d vectors. Built once per folder (meta.json records the arguments).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import time

import numpy as np

from msk_jax.data.word2vec import save_word2vec_binary


def write_synthetic_howto100m(root: str, videos: int = 300, *, seconds: int = 396, dim_2d: int = 2048,
                              dim_3d: int = 2048, bins: int = 40, vocabulary: int = 2000, word_dim: int = 300,
                              seed: int = 0, progress: bool = True) -> dict[str, str]:
    """Writes (or finds) the corpus under `root`; returns its paths (config.data field -> path)."""
    args = dict(videos=videos, seconds=seconds, dim_2d=dim_2d, dim_3d=dim_3d, bins=bins, vocabulary=vocabulary,
                word_dim=word_dim, seed=seed)
    paths = {"csv": os.path.join(root, "howto.csv"), "caption": os.path.join(root, "caption.pickle"),
             "features_2d": os.path.join(root, "features_2d"), "features_3d": os.path.join(root, "features_3d"),
             "audio": os.path.join(root, "audio"), "word_vectors": os.path.join(root, "word2vec.bin")}
    meta_path = os.path.join(root, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == args:
                return paths
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocabulary)]
    os.makedirs(root, exist_ok=True)
    save_word2vec_binary(paths["word_vectors"],
                         {w: rng.standard_normal(word_dim).astype(np.float32) for w in words})
    captions, start = {}, time.monotonic()
    for i in range(videos):
        video_id = f"v{i:06d}"
        for key, rows, dim, suffix in (("features_2d", seconds, dim_2d, "_2d.npz"),
                                       ("features_3d", int(seconds * 1.5), dim_3d, "_3d.npz")):
            os.makedirs(os.path.join(paths[key], "synthetic", video_id), exist_ok=True)
            np.savez(os.path.join(paths[key], "synthetic", video_id, video_id + suffix),
                     features=rng.random((rows, dim), dtype=np.float32))
        os.makedirs(os.path.join(paths["audio"], "synthetic", video_id), exist_ok=True)
        np.savez(os.path.join(paths["audio"], "synthetic", video_id, video_id + "_spec.npz"),
                 rng.standard_normal((bins, seconds * 100), dtype=np.float32))
        starts = np.arange(0.5, seconds - 4, 4.0)
        captions[video_id] = {"start": starts, "end": starts + 3.0,
                              "text": [" ".join(rng.choice(words, 8)) for _ in starts]}
        if progress and (i + 1) % 50 == 0:
            print(f"synthetic corpus: {i + 1}/{videos} videos ({time.monotonic() - start:.0f} s)", flush=True)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"])
        writer.writerows([[f"synthetic/v{i:06d}"] for i in range(videos)])
    with open(paths["caption"], "wb") as f:
        pickle.dump(captions, f)
    with open(meta_path, "w") as f:
        json.dump(args, f)
    return paths
