"""The `demo` backbone: the demo corpus's own frame features (`demo_corpus.FrameEncoder`) computed
from decoded video frames, so that demo videos written as mp4 (`msk_jax.demo.videos`) and
extracted give features a demo-trained model understands.

A demo frame is an 8x8 digit image (pixels 0..16 plus noise) shown for one second; in a video it
is drawn as an 8x8 grid of grey cells (`render_frame`: value v -> grey level (v + 2) * 11). The
backbone reads each decoded frame back to 64 pixels (`read_pixels`: the mean grey of the inner
half of each cell, inverted), then:

- 2D (one frame per second, as the 2D graph decodes): relu(normalise(pixels) @ proj_2d), the
  corpus's 2D feature of that second;
- 3D (16 frames at 24/s = the corpus's 2/3 s window): the mean of the 16 frames' pixels (the
  corpus's overlap-weighted mean of the 1 s frames) and last minus first frame, then
  relu(. @ proj_3d).

The features are those of the corpus up to the video codec's loss and the grey-level rounding
(pixel values below -2 or above 21 are clipped), and the original extractor's zero-padded last
3D clip gives one more 3D row than the corpus has.
"""

from __future__ import annotations

import functools

import numpy as np

from msk_jax.demo import corpus as demo_corpus

GREY_OFFSET, GREY_SCALE = 2.0, 11.0
GRID = 8


def render_frame(pixels: np.ndarray, size: int) -> np.ndarray:
    """64 pixels (0..16 scale, any real value) -> (size, size, 3) uint8 grey grid of 8x8 cells."""
    grey = np.clip(np.round((np.asarray(pixels, np.float64) + GREY_OFFSET) * GREY_SCALE), 0, 255).astype(np.uint8)
    cells = grey.reshape(GRID, GRID)
    edges = np.linspace(0, size, GRID + 1).astype(int)
    rows = np.repeat(np.arange(GRID), np.diff(edges))
    image = cells[rows][:, rows]
    return np.repeat(image[:, :, None], 3, axis=2)


def read_pixels(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 frames -> (N, 64) pixels on the corpus's 0..16 scale: per cell of the
    8x8 grid, the mean grey of its inner half, mapped back through `render_frame`'s levels.
    Any frame size works (the 2D frames are 224 high, the 3D crops 112x112)."""
    frames = np.asarray(frames)
    n, h, w = frames.shape[:3]
    grey = frames.astype(np.float32).mean(axis=3)
    out = np.zeros((n, GRID, GRID), np.float32)
    ys, xs = np.linspace(0, h, GRID + 1), np.linspace(0, w, GRID + 1)
    for i in range(GRID):
        y0, y1 = int(ys[i] + (ys[i + 1] - ys[i]) / 4), int(np.ceil(ys[i + 1] - (ys[i + 1] - ys[i]) / 4))
        for j in range(GRID):
            x0, x1 = int(xs[j] + (xs[j + 1] - xs[j]) / 4), int(np.ceil(xs[j + 1] - (xs[j + 1] - xs[j]) / 4))
            out[:, i, j] = grey[:, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)].mean(axis=(1, 2))
    return (out.reshape(n, GRID * GRID) / GREY_SCALE - GREY_OFFSET).astype(np.float64)


@functools.lru_cache(maxsize=4)
def frame_encoder(seed: int = 0, feature_dim: int = 128):
    """The demo corpus's FrameEncoder for (seed, feature_dim): the same projections and pixel
    statistics as `demo_corpus.build_demo_corpus(seed=seed, feature_dim=feature_dim)` uses."""
    images, labels = demo_corpus.load_digit_images()
    pools = demo_corpus.image_pools(labels)
    return demo_corpus.FrameEncoder.create(images[np.concatenate(pools["train"])], feature_dim, seed)


class DemoBackbone:
    """Frames (uint8) -> demo features (float32): kind "2d" takes (N, H, W, 3) frames, "3d" takes
    (N, 16, H, W, 3) clips."""

    def __init__(self, kind: str, seed: int = 0, feature_dim: int = 128):
        if kind not in ("2d", "3d"):
            raise ValueError(f"demo backbone kind {kind!r}: expected '2d' or '3d'.")
        self.kind, self.encoder = kind, frame_encoder(seed, feature_dim)
        self.dim = feature_dim

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        enc = self.encoder
        if self.kind == "2d":
            x = enc.normalise(read_pixels(batch))
            return np.maximum(x @ enc.proj_2d, 0.0).astype(np.float32)
        n, t = batch.shape[:2]
        x = enc.normalise(read_pixels(batch.reshape((n * t,) + batch.shape[2:]))).reshape(n, t, -1)
        window = np.concatenate([x.mean(axis=1), x[:, -1] - x[:, 0]], axis=1)
        return np.maximum(window @ enc.proj_3d, 0.0).astype(np.float32)
