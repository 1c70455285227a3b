"""The command-line tools' top level (msk_jax.cli), through the tools themselves: each mistake is
one line on stderr and a non-zero exit, with nothing created; --verbose shows the traceback; no
note about a missing TPU library; `evaluate --watch` on a finished run evaluates what is missing
and stops, its files apart from training's."""

import os
import re
import shutil
import subprocess
import sys
import time

from tests.conftest import REPO_ROOT, UNINTERRUPTED_STEPS, run_env
from tests.train_fixtures import overrides

TOOL_ENV = run_env(MSK_JAX_TCMALLOC="0", PYTHONPATH=REPO_ROOT)  # the package from any folder


def _start(*args, cwd=REPO_ROOT):
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=TOOL_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=120):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return process.returncode, out, err


def test_mistakes_are_one_line_and_create_nothing(tmp_path, golden_dir):
    """Started together (each pays its imports): three configuration mistakes (an unknown variant:
    test_configs.py), a work directory that cannot be made, a mistake with --verbose, an extractor
    given no video (it starts JAX without lowering absl's INFO, where the TPU note would show), and
    the parity check of one file."""
    workdir = tmp_path / "run"
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    demo = "--config=configs/howto.py:demo"
    cases = {  # args -> what the one line must name
        ("--config=configs/nowhere.py",): "no such file 'configs/nowhere.py'",
        (demo, "--config.optimizer.lrr=1"): "'optimizer' has no field 'lrr'; closest: optimizer.lr",
        (demo, "--config.optimiser.lr=1"): "has no field 'optimiser'; closest: optimizer.lr",
    }
    mistakes = {args: _start("msk_jax.main", *args, f"--workdir={workdir}", cwd=tmp_path) for args in cases}
    unwritable = _start("msk_jax.main", demo, f"--workdir={blocked}/run")
    verbose = _start("msk_jax.main", "--config=configs/nowhere.py", f"--workdir={workdir}", "--verbose")
    (tmp_path / "videos").mkdir()
    extract = _start("msk_jax.extract", f"--videos={tmp_path / 'videos'}", f"--output={tmp_path / 'features'}",
                     "--backbone=demo")
    (tmp_path / "golden").mkdir()
    os.symlink(os.path.join(golden_dir, "retrieval.npz"), tmp_path / "golden" / "retrieval.npz")
    parity = _start("msk_jax.parity", str(tmp_path / "golden"))

    for args, expected in cases.items():
        code, _, err = _finish(mistakes[args])
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (args, err)
        assert expected in err and args[-1].split("=")[0] in err, (args, err)
    code, _, err = _finish(unwritable)
    assert code == 1 and err.splitlines() == [f"error: {blocked}/run: Not a directory"], err
    code, _, err = _finish(verbose)
    assert code != 0 and "Traceback (most recent call last)" in err and "configs/nowhere.py" in err
    code, _, err = _finish(extract)
    assert code == 2 and len(err.splitlines()) == 1 and "no video files" in err, err
    code, out, err = _finish(parity)
    assert code == 0 and err == "", err
    assert re.fullmatch(r"retrieval\.npz +PASS  21 outputs  \(abs <= 1e-06: 21 outputs, worst \S+\)\n", out), out
    assert not workdir.exists() and not (tmp_path / "features").exists()


def test_watch_on_a_finished_run_evaluates_what_is_missing_and_stops(uninterrupted_run, tiny_corpus, tmp_path):
    """The run's last step was evaluated by training (eval/step_N.json): the watcher evaluates
    every checkpoint into its own files, leaves training's as it was, and stops; a second
    watcher finds everything evaluated and stops at once."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run)
    training_eval = run / "eval" / f"step_{UNINTERRUPTED_STEPS}.json"
    written_by_training = training_eval.read_bytes()
    steps = sorted(int(name) for name in os.listdir(run / "checkpoints") if name.isdigit())
    assert steps[-1] == UNINTERRUPTED_STEPS
    args = ["msk_jax.evaluate", "--config=configs/howto.py:demo", f"--checkpoint={run}", "--watch",
            "--poll_seconds=1", *(f"--config.{k}={v}" for k, v in overrides(tiny_corpus, UNINTERRUPTED_STEPS).items())]

    for evaluated in (steps, []):
        start = time.monotonic()
        code, out, err = _finish(_start(*args), timeout=90)
        assert code == 0, err[-3000:]
        assert time.monotonic() - start < 60
        assert [int(s) for s in re.findall(r"evaluation of step (\d+) written", out)] == evaluated, out
        assert f"step {UNINTERRUPTED_STEPS} is the run's last; stopping." in out
    assert training_eval.read_bytes() == written_by_training
    binary_files = sorted(set(os.listdir(run / "eval")) - {training_eval.name})
    assert binary_files == sorted(f"step_{s}-ema-MSRVTT+YouCook2.json" for s in steps), binary_files
