"""A tiny end-to-end training setup on the tiny demo corpus (shared by the training tests)."""

import importlib.util
import os

from tests.conftest import REPO_ROOT

TINY_FEATURES = 16


def load_config(arg="demo"):
    spec = importlib.util.spec_from_file_location("howto", os.path.join(REPO_ROOT, "configs", "howto.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(corpus_dir, arg="demo", **overrides):
    """The demo config shrunk to seconds: tiny corpus, tiny model, 8 clips per step."""
    config = load_config(arg)
    d = config.data
    d.demo_dir, d.demo_size = corpus_dir, "tiny"
    d.dim_2d = d.dim_3d = TINY_FEATURES
    d.n_clips, d.n_video_tokens, d.max_words, d.num_audio_frames = 2, 6, 8, 256
    d.eval_video_tokens, d.eval_audio_frames = 6, 256
    d.workers = 1
    m = config.model
    m.video_dim = 2 * TINY_FEATURES
    m.davenet_widths = (4, 4, 4, 4, 8, 8, 8)
    m.embed_dim, m.num_heads, m.projection_dim, m.num_anchors = 16, 2, 24, 4
    config.objective.queue_len = 16
    config.objective.sinkhorn.num_iters = 5
    config.videos_per_batch = 4
    config.num_train_steps = 6
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_batch_size = 16
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config
