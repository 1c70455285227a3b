"""The paper configuration is self-consistent and its Multi-SK settings are valid."""

import importlib.util
import os
import subprocess
import sys

import pytest

from msk_jax import configs, sinkhorn
from tests.conftest import REPO_ROOT, run_env


def _load(arg=None):
    """configs/howto.py, read as the command line reads a --config file."""
    spec = importlib.util.spec_from_file_location("howto", os.path.join(REPO_ROOT, "configs", "howto.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_the_documented_path_and_the_package_give_one_configuration(tmp_path):
    assert _load("demo").to_dict() == configs.get_config("howto", "demo").to_dict()
    # A --config that names no file here is the packaged one of that name; an existing file stays.
    assert configs.resolve("configs/howto.py:demo,baseline") == "configs/howto.py:demo,baseline"  # tests run at the root
    mine = tmp_path / "howto.py"
    mine.write_text("")
    assert configs.resolve(f"{mine}:demo") == f"{mine}:demo"
    assert configs.resolve(str(tmp_path / "configs" / "bench.py")) == configs.path("bench")
    assert configs.resolve_argv(["x", "--config", "nowhere/howto.py:demo", "--workdir=w"]) == \
        ["x", "--config", configs.path("howto") + ":demo", "--workdir=w"]
    # From another directory the command line finds it (here: and reports the unknown variant, in
    # one line, before making the work directory).
    done = subprocess.run([sys.executable, "-m", "msk_jax.main", "--config=configs/howto.py:nope",
                           f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          env=run_env(MSK_JAX_TCMALLOC="0", PYTHONPATH=REPO_ROOT))
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: --config=configs/howto.py:nope: configs/howto.py: unknown variant(s) ['nope']; use paper, baseline, "
        "demo (comma-separated)."], done.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_paper_config():
    config = _load()
    assert config.objective.consistency
    assert config.videos_per_batch * config.data.n_clips == 2160
    assert sinkhorn.num_required_slots(config.model.num_anchors,
                                       config.objective.sinkhorn.required_fraction) == 32
    weights = config.objective.consistency_weights
    assert len(weights) == 18
    assert weights["c_loss_1_1"] == weights["c_loss_5_2"] == 1.0
    assert weights["c_loss_1_3"] == weights["c_loss_3_1"] == weights["c_loss_6_2"] == 0.1


def test_baseline_variant_turns_consistency_off():
    assert not _load("baseline").objective.consistency
    with pytest.raises(ValueError, match="unknown variant"):
        _load("nope")


def test_config_builds_the_paper_model_and_objective():
    import functools

    import jax
    import numpy as np

    from msk_jax.loss import ObjectiveConfig
    from msk_jax.model import MultiSKModel

    config = _load()
    objective = ObjectiveConfig.from_config(config.objective)
    assert objective.queue_len == 5500 and objective.sinkhorn_eps == 0.07 and objective.consistency_scale == 1.0
    model = MultiSKModel.from_config(config)
    batch = {"video": np.zeros((2, 12, 4096), np.float32), "video_mask": np.ones((2, 12), np.float32),
             "text": np.zeros((2, 20, 300), np.float32), "text_mask": np.ones((2, 20), np.float32),
             "audio": np.zeros((2, 40, 768), np.float32), "audio_mask": np.ones((2, 768), np.float32)}
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), batch)
    params = shapes["params"]
    assert params["joint_anchors_text"].shape == (64, 6144)
    assert params["input_anchors_audio"].shape == (64, 4096)
    assert params["text_transformer"]["block_0"]["attn"]["qkv"]["kernel"].shape == (4096, 3 * 4096)
