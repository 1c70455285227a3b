"""A train step sharded over 8 devices (data x fsdp x model, each axis split in two) equals one
device."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from msk_jax import sharding
from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_sharded_steps_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "tests.sharded_steps"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    reference = runs.pop("one_device")
    assert reference["queue_fill"] == 16 and len(reference["losses"]) == 3
    for name, run in runs.items():
        np.testing.assert_allclose(run["losses"], reference["losses"], rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(run["param_sum"], reference["param_sum"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(run["kernel"], reference["kernel"], atol=2e-5, err_msg=name)
    assert runs["data2_fsdp2_model2"]["eval_shards"] == 4 and reference["eval_shards"] == 1
    for name, run in {**runs, "one_device": reference}.items():  # sharded evaluation = one device's
        assert run["eval_rows"] == {"text": 13, "video": 13, "audio": 13}, name
        assert run["eval_difference"] < 1e-5, (name, run["eval_difference"])
    assert "model" in runs["data2_fsdp2_model2"]["kernel_spec"]  # the projections split over the model axis,
    assert runs["data2_fsdp2_model2"]["split_over"] == ["fsdp", "model"]  # the other kernels over fsdp


def test_mesh_and_rules():
    mesh = sharding.create_mesh([("data", -1), ("model", 1)])
    assert mesh.shape["data"] == len(jax.devices())
    with pytest.raises(ValueError, match="needs"):
        sharding.create_mesh([("data", len(jax.devices()) + 1)])
    tree = {"params": {"text_proj": {"fc": {"kernel": np.zeros((4, 6))}}, "bias": np.zeros(3)}}
    shardings = sharding.tree_shardings(tree, mesh, [(r".*fc/kernel$", (None, "model"))])
    assert shardings["params"]["text_proj"]["fc"]["kernel"].spec == jax.sharding.PartitionSpec(None, "model")
    assert shardings["params"]["bias"].spec == jax.sharding.PartitionSpec()
    # FSDP: matrices split on their first dimension, DAVEnet's (width, in, out) convolution
    # kernels on their input channels, vectors replicated.
    mesh = sharding.create_mesh([("fsdp", -1)])
    tree = {"proj": {"kernel": np.zeros((4, 6))}, "davenet": {"conv2": {"kernel": np.zeros((9, 4, 8))}},
            "bn": {"scale": np.zeros(8)}}
    shardings = sharding.tree_shardings(tree, mesh, sharding.FSDP_RULES)
    assert shardings["proj"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
    assert shardings["davenet"]["conv2"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert shardings["bn"]["scale"].spec == jax.sharding.PartitionSpec()
