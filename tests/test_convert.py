"""Import of original PyTorch weights: round trip, and clear errors for weights that do not fit."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from msk_jax import convert
from msk_jax.model import MultiSKModel
from tests.conftest import TINY_MODEL, tiny_batch


@pytest.fixture(scope="module")
def tiny():
    model = MultiSKModel(**TINY_MODEL)
    template = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), tiny_batch(0))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(1), tiny_batch(0))
    return template, convert.export_state_dict(variables), variables


def test_round_trip(tiny):
    template, state, variables = tiny
    assert state["davenet.conv1.weight"].shape == (4, 1, 40, 1)
    assert state["davenet.layer1.0.conv1.weight"].shape == (4, 4, 1, 9)
    assert state["fusion_text.blocks.0.attn.qkv.weight"].shape == (48, 16)
    assert state["cluster_video.anc_linear.weight"].shape == (4, 16)
    back = convert.convert_state_dict(state, template)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_unused_original_names_are_accepted(tiny):
    template, state, _ = tiny
    state = dict(state)
    state["davenet.batchnorm1.weight"] = np.ones(1, np.float32)
    state["fusion_video.norm.weight"] = np.ones(16, np.float32)
    state["cluster_text.anc_linear.bias"] = np.zeros(4, np.float32)
    state["davenet.bn1.num_batches_tracked"] = np.array(3)
    for name in list(state):
        if name.startswith("fusion_text."):
            state["fusion." + name[len("fusion_text."):]] = state[name]
    convert.convert_state_dict(state, template)


def test_renamed_weight_is_reported(tiny):
    template, state, _ = tiny
    state = dict(state)
    state["video_proj.fc.weights"] = state.pop("video_proj.fc.weight")
    with pytest.raises(convert.ConversionError) as err:
        convert.convert_state_dict(state, template)
    message = str(err.value)
    assert "missing: video_proj.fc.weight" in message
    assert "left over: video_proj.fc.weights" in message


def test_reshaped_weight_is_reported(tiny):
    template, state, _ = tiny
    state = dict(state)
    state["fusion_audio.blocks.0.mlp.fc1.weight"] = np.zeros((8, 16), np.float32)
    with pytest.raises(convert.ConversionError, match=r"shape mismatch: fusion_audio\.blocks\.0\.mlp\.fc1\.weight: "
                                                      r"torch shape \(8, 16\)"):
        convert.convert_state_dict(state, template)


def test_diverging_shared_module_is_reported(tiny):
    template, state, _ = tiny
    state = dict(state)
    state["fusion.masking_token"] = state["fusion_text.masking_token"] + 1
    with pytest.raises(convert.ConversionError, match="one module"):
        convert.convert_state_dict(state, template)


def test_golden_config_and_unsupported_settings(golden_dir):
    with np.load(os.path.join(golden_dir, "model_forward.npz")) as npz:
        config = json.loads(str(npz["config_json"]))
    fields = convert.model_config_from_original(config)
    assert fields["embed_dim"] == 64 and fields["num_anchors"] == 8 and fields["davenet_widths"][-1] == 64
    with pytest.raises(convert.ConversionError, match="use_positional_emb"):
        convert.model_config_from_original(dict(config, use_positional_emb=True))
    mixed = convert.model_config_from_original(dict(config, fusion_params=dict(config["fusion_params"], anc_len_txt=3)))
    assert mixed["num_anchors"] == (3, 8, 8)
