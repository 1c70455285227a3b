"""The model's batch: six float32 arrays per clip, named here once, their shapes from the clip
settings. Every reader fills these arrays (training clips, evaluation sets, classification sets,
search windows) and the model reads them (`model.MultiSKModel.__call__`)."""

from __future__ import annotations

import numpy as np

KEYS = ("video", "video_mask", "audio", "audio_mask", "text", "text_mask")


def clip_shapes(*, video_tokens: int, video_dim: int, audio_bins: int, audio_frames: int, words: int,
                word_dim: int) -> dict[str, tuple[int, ...]]:
    """One clip's array shapes: video tokens (2D + 3D features), log-mel frames, word vectors,
    each with its mask."""
    return {"video": (video_tokens, video_dim), "video_mask": (video_tokens,),
            "audio": (audio_bins, audio_frames), "audio_mask": (audio_frames,),
            "text": (words, word_dim), "text_mask": (words,)}


def shapes(n: int, **clip) -> dict[str, tuple[int, ...]]:
    """The shapes of `n` clips stacked (`clip_shapes`' keyword arguments)."""
    return {k: (n,) + shape for k, shape in clip_shapes(**clip).items()}


def config_shapes(config, word_dim: int, n: int | None = None) -> dict[str, tuple[int, ...]]:
    """The shapes of one global training batch of `config` (or of `n` clips)."""
    data = config.data
    n = config.videos_per_batch * data.n_clips if n is None else n
    return shapes(n, video_tokens=data.n_video_tokens, video_dim=config.model.video_dim,
                  audio_bins=config.model.audio_feat_dim, audio_frames=data.num_audio_frames, words=data.max_words,
                  word_dim=word_dim)


def zeros(shapes_: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Zero inputs with full masks (a batch for tracing and initialising the model)."""
    return {k: (np.ones if k.endswith("_mask") else np.zeros)(shape, np.float32) for k, shape in shapes_.items()}
