"""Shared test fixtures: the golden folder and a float64 dense Multi-SK written from the spec."""

import os

import jax
import numpy as np
import pytest

# Small shapes compile far longer than they run: trade XLA optimisation for compile time.
jax.config.update("jax_disable_most_optimizations", True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.environ.get("MSK_GOLDEN_DIR", os.path.join(REPO_ROOT, "..", "shared", "golden"))


@pytest.fixture(scope="session")
def golden_dir():
    if not os.path.isdir(GOLDEN_DIR):
        pytest.skip(f"golden folder not found at {GOLDEN_DIR} (set MSK_GOLDEN_DIR)")
    return GOLDEN_DIR


def dense_multi_sinkhorn(scores, eps, num_iters, required_fraction):
    """Straightforward float64 K x N x K Multi-SK, step by step as the reference describes."""
    scores = np.asarray(scores, np.float64)
    n, k = scores.shape
    r = int(k * required_fraction)
    w = np.ones(k)
    w[: k - r] = 0.25
    q = np.exp(w[:, None, None] * scores[None] / eps)
    q /= q.sum()
    c = np.ones(k) / k * n
    c = np.maximum(c, 1.0)
    c = c / c.sum() * n
    a = q
    for _ in range(num_iters):
        a = a * (c[None, None, :] / (a.sum(axis=1, keepdims=True) + 1e-5))
        a = a / (a.sum(axis=0, keepdims=True) + 1e-5)
        a = a / (a.sum(axis=2, keepdims=True) + 1e-5)
    a = a / a.sum(axis=2, keepdims=True)
    summed = a[-r:].sum(axis=0)
    lo, hi = summed.min(axis=1, keepdims=True), summed.max(axis=1, keepdims=True)
    return a, (summed - lo) / (hi - lo)


def random_cosine_scores(rng, n, k, dim=16):
    x = rng.normal(size=(n, dim))
    z = rng.normal(size=(k, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return (x @ z.T).astype(np.float32)


TINY_MODEL = dict(video_dim=12, text_dim=10, audio_feat_dim=40, davenet_layers=(1, 1, 1, 1, 1, 1),
                  davenet_widths=(4, 4, 4, 4, 4, 4, 8), davenet_kernel=9, embed_dim=16, num_heads=2,
                  mlp_ratio=1.0, depth=1, projection_dim=24, num_anchors=4)


def tiny_batch(seed, batch=6, video_tokens=3, text_tokens=4, frames=128, empty_text=(0,), empty_audio=(1,)):
    """A random batch for TINY_MODEL in the original layout; some clips have an empty modality."""
    rng = np.random.default_rng(seed)
    text_mask = (rng.uniform(size=(batch, text_tokens)) < 0.7).astype(np.float32)
    text_mask[:, 0] = 1
    audio_mask = np.ones((batch, frames), np.float32)
    audio_mask[:, frames - frames // 4:] = 0  # padded tail
    for i in empty_text:
        text_mask[i] = 0
    for i in empty_audio:
        audio_mask[i] = 0
    return {
        "video": rng.normal(size=(batch, video_tokens, TINY_MODEL["video_dim"])).astype(np.float32),
        "video_mask": np.ones((batch, video_tokens), np.float32),
        "text": rng.normal(size=(batch, text_tokens, TINY_MODEL["text_dim"])).astype(np.float32),
        "text_mask": text_mask,
        "audio": rng.normal(size=(batch, 40, frames)).astype(np.float32),
        "audio_mask": audio_mask,
    }


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """The tiny demo corpus with 16-d video features, built once per test session."""
    from msk_jax.data.demo_corpus import build_demo_corpus

    root = str(tmp_path_factory.mktemp("tiny_demo"))
    build_demo_corpus(root, size="tiny", feature_dim=16, progress=False)
    return root
