"""The training loop end to end: runs, evaluates, resumes after SIGKILL, stops on NaN, refuses a checkpoint of
another configuration and steps over an unreadable one. (SIGTERM on several processes: test_multihost.py; Ctrl-C,
SIGTERM, failed saves and the work directory's lease: test_stop_and_save.py.)"""

import glob
import itertools
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from msk_jax import checkpoints, data_sources, metric_writers, train
from msk_jax.checkpoint_reader import finished_steps
from tests.conftest import REPO_ROOT, UNINTERRUPTED_STEPS, run_env
from tests.train_fixtures import cli_config, kill_after_checkpoint, losses, main_args, tiny_config

pytestmark = pytest.mark.slow  # every test here trains (in this process or another)


def test_train_and_evaluate_writes_everything(tiny_corpus, tmp_path):
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(tiny_config(tiny_corpus, profile_steps=2, profile_first_step=2), workdir)
    assert set(results) == {"MSRVTT", "YouCook2"}
    assert set(results["MSRVTT"]) >= {"t2v", "v2t", "t2v+a", "v+a2t", "t+v2a"}
    with open(os.path.join(workdir, "eval", "step_6.json")) as f:
        assert json.load(f)["YouCook2"]["t2a"]["R10"] == results["YouCook2"]["t2a"]["R10"]
    rows = metric_writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert rows[0]["consistency_on"] == 0.0 and rows[-2]["consistency_on"] == 1.0  # warm-up: 16 / 8 clips
    assert all(r["steps_per_sec"] > 0 for r in rows[1:] if "loss" in r)  # progress, from the second log step
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [2, 4, 6]
    # TensorBoard: the event file and a profile of steps 3-4 for its profile tab.
    events = [n for n in os.listdir(os.path.join(workdir, "tensorboard")) if n.startswith("events.out.tfevents.")]
    traces = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(events) == 1 and len(traces) == 1 and os.path.getsize(traces[0]) > 0


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts Linux memory mappings")
def test_training_keeps_the_callers_programs_and_a_release_between_runs_keeps_none(tiny_corpus, tmp_path):
    """A notebook's own compiled functions survive a training run. A process that trains run
    after run (`msk_jax.experiments`) releases each run's programs: kept, each tiny run's held
    about 2,100 memory mappings on CPU (3 per kernel), and about 30 runs reached Linux's limit of
    65,530, where LLVM aborts the process mid-compile."""
    def mappings():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    callers = jax.jit(lambda x: x * 2)
    callers(np.float32(1))
    config = tiny_config(tiny_corpus, num_train_steps=2)
    train.train_and_evaluate(config, str(tmp_path / "first"))
    assert callers._cache_size() == 1
    train.release_compiled_programs()
    before = mappings()
    train.train_and_evaluate(config, str(tmp_path / "second"))  # the same programs, compiled again
    train.release_compiled_programs()
    assert mappings() - before < 300


def test_missing_data_points_to_the_training_guide(tiny_corpus, tmp_path):
    config = tiny_config("", arg="")
    with pytest.raises(FileNotFoundError, match="docs/training.md"):
        train.train_and_evaluate(config, str(tmp_path))
    # Every root is named by its field, the 3D one too (it never falls back to the 2D root).
    howto = os.path.join(tiny_corpus, "howto")
    config.data.update(csv=os.path.join(howto, "howto_train.csv"), caption=os.path.join(howto, "caption.pickle"),
                       features_2d=os.path.join(howto, "features_2d"), audio=os.path.join(howto, "audio"),
                       word_vectors=os.path.join(tiny_corpus, "word2vec.bin"))
    with pytest.raises(FileNotFoundError, match=r"config.data.features_3d is not set: .*3D feature root"):
        data_sources.data_paths(config)


def test_non_finite_loss_stops_without_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    """NaN inputs in the batch of step 3 (of 0..7), between log steps (every 5): the metrics are
    read asynchronously, yet the run stops at the checkpoint of step 4, naming step 3."""
    real = data_sources.build_data

    def poisoned(config):
        source, words, evals = real(config)
        calls = itertools.count()  # one loading thread (tiny_config): calls come in stream order

        class NaNAudio:
            def __len__(self):
                return len(source)

            def sample_clips(self, index, rng):
                clips = source.sample_clips(index, rng)
                if next(calls) // config.videos_per_batch == 3:
                    clips["audio"] = np.full_like(clips["audio"], np.nan)
                return clips

        return NaNAudio(), words, evals

    monkeypatch.setattr(data_sources, "build_data", poisoned)
    config = tiny_config(tiny_corpus, num_train_steps=8, log_every_steps=5, checkpoint_every_steps=2)
    with pytest.raises(train.NonFiniteLossError, match=r"step 3: non-finite value in .*loss"):
        train.train_and_evaluate(config, str(tmp_path / "nan"))
    assert finished_steps(str(tmp_path / "nan" / "checkpoints")) == [2]


def test_sigkill_and_resume_gives_the_uninterrupted_losses(tiny_corpus, uninterrupted_run, tmp_path):
    """The run loads videos in worker processes (the uninterrupted one in a thread): killed after
    a checkpoint and restarted, it gives the same losses."""
    steps, env = UNINTERRUPTED_STEPS, run_env()
    killed = str(tmp_path / "killed")
    args = main_args(killed, tiny_corpus, steps, **{"data.worker_processes": True, "data.workers": 2})
    interrupted_at = kill_after_checkpoint(args, env, os.path.join(killed, "checkpoints"), min_step=6)
    assert interrupted_at < steps

    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from step {interrupted_at}" in result.stdout
    want, got = losses(uninterrupted_run), losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    np.testing.assert_array_equal([got[s] for s in range(1, steps + 1)], [want[s] for s in range(1, steps + 1)])


def _copy_of(run, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    return copy


def test_resuming_with_another_model_stops_with_the_differences(tiny_corpus, uninterrupted_run, tmp_path):
    workdir = _copy_of(uninterrupted_run, tmp_path)
    config = cli_config(tiny_corpus, UNINTERRUPTED_STEPS + 3, **{"model.embed_dim": 32, "optimizer.lr": 0.5})
    with pytest.raises(checkpoints.IncompatibleCheckpointError) as raised:
        train.train_and_evaluate(config, workdir)
    message = str(raised.value)
    assert "model.embed_dim: 16 -> 32" in message and "optimizer.lr: 0.001 -> 0.5" in message
    assert "another --workdir" in message and "num_train_steps" not in message  # run length may change
    assert len(message.strip().splitlines()) <= 7, message
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "15", "9"]  # untouched


def test_unreadable_latest_checkpoint_is_named_and_the_previous_one_used(tiny_corpus, uninterrupted_run, tmp_path):
    """The command line (a process: what it prints is the point): the broken checkpoint is named
    once, without the echoes of Orbax's other pending reads, and the run goes on from the one
    before."""
    workdir = _copy_of(uninterrupted_run, tmp_path)
    last = UNINTERRUPTED_STEPS
    state = os.path.join(workdir, "checkpoints", str(last), "state")
    arrays = [os.path.join(root, name) for root, _, names in os.walk(state) for name in names
              if os.path.basename(root) == "d"]  # Orbax's array data files
    for path in arrays:  # cut short, as by a crash mid-copy (one cut can fall in unreferenced bytes)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 4)
    steps = UNINTERRUPTED_STEPS + 3
    result = subprocess.run(main_args(workdir, tiny_corpus, steps), cwd=REPO_ROOT, env=run_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"step {last}" in warnings[0] and state in warnings[0]
    assert f"resuming from step {last - 3}" in warnings[1]
    assert f"resumed from step {last - 3}" in result.stdout
    assert [n.split(".")[0] for n in os.listdir(os.path.join(workdir, "unreadable_checkpoints"))] == [str(last)]
    want, got = losses(uninterrupted_run), losses(workdir)
    assert sorted(got) == list(range(1, steps + 1))
    redone = (last - 2, last - 1, last)
    np.testing.assert_array_equal([got[s] for s in redone], [want[s] for s in redone])
