"""The paper configuration is self-consistent and its Multi-SK settings are valid."""

import importlib.util
import os

import pytest

from msk_jax import sinkhorn
from tests.conftest import REPO_ROOT


def _load(arg=None):
    spec = importlib.util.spec_from_file_location("howto", os.path.join(REPO_ROOT, "configs", "howto.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_paper_config():
    config = _load()
    assert config.objective.consistency
    assert config.videos_per_batch * config.clips_per_video == 2160
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
