"""The training loop end to end: runs, evaluates, resumes after SIGKILL, stops on NaN."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from msk_jax import metric_writers, train
from tests.conftest import REPO_ROOT
from tests.train_fixtures import tiny_config


def test_train_and_evaluate_writes_everything(tiny_corpus, tmp_path):
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(tiny_config(tiny_corpus), workdir)
    assert set(results) == {"MSRVTT", "YouCook2"}
    assert set(results["MSRVTT"]) >= {"t2v", "v2t", "t2v+a", "v+a2t", "t+v2a"}
    with open(os.path.join(workdir, "eval", "step_6.json")) as f:
        assert json.load(f)["YouCook2"]["t2a"]["R10"] == results["YouCook2"]["t2a"]["R10"]
    rows = metric_writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert rows[0]["consistency_on"] == 0.0 and rows[-2]["consistency_on"] == 1.0  # warm-up: 16 / 8 clips
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [2, 4, 6]


def test_missing_data_points_to_the_readme(tmp_path):
    config = tiny_config("", arg="")
    with pytest.raises(FileNotFoundError, match="README"):
        train.train_and_evaluate(config, str(tmp_path))


def test_non_finite_loss_stops_without_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    real = train.build_data

    def poisoned(config):
        source, words, evals = real(config)

        class NaNAudio:
            def __len__(self):
                return len(source)

            def sample_clips(self, index, rng):
                clips = source.sample_clips(index, rng)
                clips["audio"] = np.full_like(clips["audio"], np.nan)
                return clips

        return NaNAudio(), words, evals

    monkeypatch.setattr(train, "build_data", poisoned)
    with pytest.raises(train.NonFiniteLossError, match=r"step 0: non-finite value in .*loss"):
        train.train_and_evaluate(tiny_config(tiny_corpus), str(tmp_path / "nan"))
    assert not os.path.exists(os.path.join(tmp_path, "nan", "checkpoints", "1"))


def _main(workdir, corpus, steps):
    args = [sys.executable, "-m", "msk_jax.main", "--config=configs/howto.py:demo", f"--workdir={workdir}"]
    for key, value in _overrides(corpus, steps).items():
        args.append(f"--config.{key}={value}")
    return args


def _overrides(corpus, steps):
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


def _losses(workdir):
    last = {}
    for row in metric_writers.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if "loss" in row:
            last[row["step"]] = row["loss"]
    return last


def test_sigkill_and_resume_gives_the_uninterrupted_losses(tiny_corpus, tmp_path):
    steps = 30
    # The three runs share one compilation cache, and compile with few optimisations.
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    straight = str(tmp_path / "straight")
    subprocess.run(_main(straight, tiny_corpus, steps), cwd=REPO_ROOT, env=env, check=True, capture_output=True)

    killed = str(tmp_path / "killed")
    process = subprocess.Popen(_main(killed, tiny_corpus, steps), cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint_dir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        done = [int(s) for s in os.listdir(checkpoint_dir) if s.isdigit()] if os.path.isdir(checkpoint_dir) else []
        if any(s >= 6 for s in done):
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted_at = max(int(s) for s in os.listdir(checkpoint_dir) if s.isdigit())
    assert interrupted_at < steps

    result = subprocess.run(_main(killed, tiny_corpus, steps), cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from step {interrupted_at}" in result.stdout
    want, got = _losses(straight), _losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    np.testing.assert_array_equal([got[s] for s in range(1, steps + 1)], [want[s] for s in range(1, steps + 1)])
