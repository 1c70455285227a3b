"""A tiny end-to-end training setup on the tiny demo corpus (shared by the training tests)."""

import os
import signal
import subprocess
import sys
import tempfile
import time

from msk_jax import configs, metric_writers, storage
from msk_jax.checkpoints import open_manager
from tests.conftest import REPO_ROOT

TINY_FEATURES = 16
TRAINED_STEPS = 40 * 2


def load_config(arg="demo"):
    """configs/howto.py[:arg], as `--config=configs/howto.py:arg` reads it."""
    return configs.get_config("howto", arg)


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
        _set(config, key, value)
    return config


def _set(config, key, value):
    """config[a][b][c] = value for key 'a.b.c'."""
    *parents, leaf = key.split(".")
    for p in parents:
        config = config[p]
    config[leaf] = value


def trained_config(corpus_dir):
    """The demo without the consistency loss, narrowed (embed 32, 8 anchors) and with 2 clips of
    16 videos per step at lr 3e-3, on the small corpus: in TRAINED_STEPS steps (about 20 s here)
    it retrieves far above an untrained model (MSR-VTT-format t2v R@10 25 against 9, v2t 30
    against 11, measured 2026-12-03). Checkpoints at steps 40 and 80."""
    config = load_config("demo,baseline")
    d = config.data
    d.demo_dir, d.demo_size = corpus_dir, "small"
    d.dim_2d = d.dim_3d = 32
    d.n_clips = 2
    m = config.model
    m.video_dim = 64
    m.davenet_widths = (8, 8, 16, 16, 32, 32, 64)
    m.embed_dim, m.num_heads, m.projection_dim, m.num_anchors = 32, 2, 48, 8
    config.videos_per_batch = 16
    config.optimizer.lr = 3e-3
    config.num_train_steps = TRAINED_STEPS
    config.log_every_steps = 20
    config.checkpoint_every_steps = TRAINED_STEPS // 2
    return config


def main_args(workdir, corpus, steps, **extra):
    """`python -m msk_jax.main` with the demo config shrunk to tiny_config, for `steps` steps
    (`extra`: more --config overrides)."""
    args = [sys.executable, "-m", "msk_jax.main", "--config=configs/howto.py:demo", f"--workdir={workdir}"]
    for key, value in {**overrides(corpus, steps), **extra}.items():
        args.append(f"--config.{key}={value}")
    return args


def cli_config(corpus, steps, **extra):
    """The configuration `main_args(workdir, corpus, steps, **extra)` trains with, for runs in
    this process that continue (or refuse) a run of the command line."""
    config = load_config("demo")
    for key, value in {**overrides(corpus, steps), **extra}.items():
        if key == "model.davenet_widths":  # written for the command line: "(4,4,...)"
            value = tuple(int(v) for v in value.strip("()").split(","))
        _set(config, key, value)
    return config


def overrides(corpus, steps):
    """tiny_config as command-line overrides of the demo config."""
    config = tiny_config(corpus)
    d, m = config.data, config.model
    return {"data.demo_dir": corpus, "data.demo_size": "tiny", "data.dim_2d": d.dim_2d, "data.dim_3d": d.dim_3d,
            "data.n_clips": d.n_clips, "data.n_video_tokens": d.n_video_tokens, "data.max_words": d.max_words,
            "data.num_audio_frames": d.num_audio_frames, "data.workers": 1, "model.video_dim": m.video_dim,
            "model.davenet_widths": "(" + ",".join(map(str, m.davenet_widths)) + ")",
            "model.embed_dim": m.embed_dim, "model.num_heads": m.num_heads, "model.projection_dim": m.projection_dim,
            "model.num_anchors": m.num_anchors, "objective.queue_len": config.objective.queue_len,
            "objective.sinkhorn.num_iters": 5, "videos_per_batch": config.videos_per_batch,
            "num_train_steps": steps, "log_every_steps": 1, "checkpoint_every_steps": 3, "eval_every_steps": 0}


def losses(workdir):
    """{step: loss} from a run's metrics.jsonl (the last line of a step, after a resume)."""
    last = {}
    for row in metric_writers.read_jsonl(f"{workdir}/metrics.jsonl"):
        if "loss" in row:
            last[row["step"]] = row["loss"]
    return last


class CheckpointWatch:
    """The complete checkpoint steps of a folder that a running training writes (local or a
    bucket), read through one Orbax manager that is reloaded at each look."""

    def __init__(self, folder):
        self.folder, self.manager = folder, None

    def steps(self) -> list[int]:
        storage.refresh(self.folder)
        if self.manager is None:
            if not storage.isdir(self.folder):
                return []
            self.manager = open_manager(self.folder, create=False)
        else:
            self.manager.reload()
        return sorted(self.manager.all_steps())

    def close(self):
        if self.manager is not None:
            self.manager.close()


def kill_after_checkpoint(args, env, checkpoints_folder, min_step, timeout=300):
    """Starts a training process and SIGKILLs it once a complete checkpoint of step >= min_step
    exists (local folder or bucket); returns the newest complete step at the kill."""
    watch = CheckpointWatch(checkpoints_folder)
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None:
            if any(s >= min_step for s in watch.steps()):
                break
            time.sleep(0.05)
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the run ended (code {process.returncode}) before it could be killed:\n"
                                 + log.read()[-3000:])
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    steps = watch.steps()
    watch.close()
    return max(steps)


def logged_steps(workdir):
    """The last step a running training has logged (0 before any; a half-written line counts
    as not yet written)."""
    try:
        return max(losses(workdir), default=0)
    except (OSError, ValueError):
        return 0
