"""The feature extractor's backbones (msk_jax.extract.backbones): parity with the reference models
on the golden file, preprocessing, and the weight import's checks."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msk_jax import parity
from msk_jax.convert import ConversionError
from msk_jax.extract import backbones
from msk_jax.parity import backbones as golden_backbones


def _golden(golden_dir):
    return np.load(os.path.join(golden_dir, "backbones.npz"))


@pytest.fixture(scope="module")
def state_3d():
    """A state dict of the 3D backbone's names and torch shapes (fc and counters included)."""
    variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32),
                                       jax.eval_shape(backbones.backbone("3d").init, jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 16, 32, 32, 3))))
    state = backbones.export_state_dict(variables)
    state.update({"fc.weight": np.zeros((400, 2048), np.float32), "fc.bias": np.zeros((400,), np.float32),
                  "bn1.num_batches_tracked": np.zeros((), np.int64)})
    return state


@pytest.mark.slow
def test_backbones_match_the_reference_with_margin(golden_dir):
    """Both full-depth models on the golden's N = 2 inputs, through the parity checker; at full
    float32 precision the errors stay well inside the README's tolerances (~200x)."""
    result = parity.check_file(os.path.join(golden_dir, "backbones.npz"))
    assert result["pass"] is True, result["failures"]
    assert result["outputs"] == 2 * (3 + 2 * 5)
    with _golden(golden_dir) as npz:
        view = parity.GoldenInputs(npz, parity.GOLDEN_FILES["backbones.npz"].is_input, "backbones.npz")
        for key in ("input_2d", "features_3d", "debug_2d_layer1_channel_mean", "debug_3d_stem_shape"):
            with pytest.raises(KeyError, match="expected output"):
                view[key]
        assert view["frames_3d"].dtype == np.uint8


def test_recipe_rebuilds_the_golden_state_dict(golden_dir):
    with _golden(golden_dir) as npz:
        keys, shapes = npz["state_dict_keys_3d"], npz["state_dict_shapes_3d"]
        state = golden_backbones.recipe_state_dict(keys[:30], shapes[:30], int(npz["seed"]), "3d")
    assert list(state) == list(keys[:30])
    assert state["conv1.weight"].shape == (64, 3, 7, 7, 7) and state["conv1.weight"].dtype == np.float32
    assert state["bn1.num_batches_tracked"].dtype == np.int64 and state["bn1.num_batches_tracked"].shape == ()
    assert np.all(state["layer1.0.bn3.weight"] == np.float32(0.2)) and np.all(state["layer1.0.bn1.weight"] == 1.0)
    assert np.all(state["layer1.0.downsample.1.weight"] == 1.0)
    assert 0.5 <= state["bn1.running_var"].min() and state["bn1.running_var"].max() <= 1.5
    # conv1 of the 3D model is scaled down by 64 (pixel-unit input)
    assert np.std(state["conv1.weight"]) == pytest.approx(np.sqrt(2 / (3 * 343)) / 64, rel=0.05)


def test_preprocessing_reproduces_the_reference_inputs(golden_dir):
    with _golden(golden_dir) as npz:
        x2 = backbones.preprocess_2d(npz["frames_2d"])
        x3 = backbones.preprocess_3d(npz["frames_3d"])
        assert x2.dtype == x3.dtype == np.float32
        assert x2.shape == (2, 128, 224, 3) and x3.shape == (2, 16, 112, 112, 3)
        np.testing.assert_allclose(np.moveaxis(x2, -1, 1), npz["input_2d"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.moveaxis(x3, -1, 1), npz["input_3d"], atol=2e-5, rtol=0)


def test_clips_from_frames_pads_with_black_frames():
    frames = np.full((20, 4, 4, 3), 7, np.uint8)
    clips = backbones.clips_from_frames(frames)
    assert clips.shape == (2, 16, 4, 4, 3)
    assert np.all(clips[1, :4] == 7) and np.all(clips[1, 4:] == 0)
    x = backbones.preprocess_3d(clips)
    np.testing.assert_allclose(x[1, -1, 0, 0], -np.asarray(backbones.MEAN_3D, np.float32), rtol=1e-6)
    assert backbones.clips_from_frames(frames[:16]).shape == (1, 16, 4, 4, 3)
    with pytest.raises(ValueError, match="RGB"):
        backbones.preprocess_2d(np.zeros((4, 4, 3), np.uint8))


def test_l2_normalize_matches_torch_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(backbones.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(backbones.l2_normalize(jnp.asarray(x, jnp.float32))), [[0.6, 0.8], [0.0, 0.0]])


def test_torch_names_and_layouts():
    assert backbones.torch_name("params", ("layer3", "conv1", "kernel")) == "layer3.conv1.weight"
    assert backbones.torch_name("params", ("layer3_5", "downsample_0", "kernel")) == "layer3.5.downsample.0.weight"
    assert backbones.torch_name("params", ("layer1_0", "downsample_1", "scale")) == "layer1.0.downsample.1.weight"
    assert backbones.torch_name("batch_stats", ("bn1", "var")) == "bn1.running_var"
    w = np.arange(2 * 3 * 4 * 5 * 6, dtype=np.float32).reshape(2, 3, 4, 5, 6)  # (out, in, kt, kh, kw)
    flax_w = backbones._to_flax(w)
    assert flax_w.shape == (4, 5, 6, 3, 2) and flax_w[1, 2, 3, 0, 1] == w[1, 0, 1, 2, 3]
    np.testing.assert_array_equal(backbones.to_torch_layout(flax_w), w)


def test_import_accepts_prefixes_and_wrappers(state_3d, tmp_path):
    plain = backbones.variables_from_state_dict(state_3d, "3d")
    n_convs = 1 + sum(backbones.ResNeXt101.blocks) * 3 + 4
    assert len(jax.tree_util.tree_leaves(plain["params"])) == n_convs + 2 * (1 + sum(backbones.ResNeXt101.blocks) * 3 + 4)
    assert plain["params"]["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 3, 8, 256)  # 256 / 32 groups
    assert plain["batch_stats"]["layer4_2"]["bn3"]["mean"].shape == (2048,)
    wrapped = {"epoch": 200, "arch": "resnext-101",
               "state_dict": {f"module.{k}": v for k, v in state_3d.items()}}
    for variant in (wrapped, {f"module.{k}": v for k, v in state_3d.items()}):
        got = backbones.variables_from_state_dict(variant, "3d")
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(plain)
    np.savez(tmp_path / "resnext.npz", **state_3d)
    loaded = backbones.load_backbone_weights(str(tmp_path / "resnext.npz"), "3d")
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(plain)


def test_import_lists_every_problem(state_3d):
    state = dict(state_3d)
    del state["layer1.0.conv1.weight"]
    state["layer2.1.conv2.weight"] = np.zeros((256, 256, 3, 3, 3), np.float32)  # not grouped
    state["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ConversionError) as err:
        backbones.variables_from_state_dict(state, "3d")
    message = str(err.value)
    assert "ResNeXt-101" in message and "3 problems" in message
    assert "missing: layer1.0.conv1.weight" in message
    assert "shape mismatch: layer2.1.conv2.weight: torch shape (256, 256, 3, 3, 3)" in message
    assert "left over: layer5.0.conv1.weight" in message
    with pytest.raises(ConversionError, match=r"ResNet-152 \(2d\) backbone \(\d+ problems\)") as err:  # 3D != 2D
        backbones.variables_from_state_dict(state_3d, "2d")
    message = str(err.value)
    assert "more missing" in message and "more shape mismatch" in message
    assert len(message.splitlines()) <= 3 * (backbones.MAX_LISTED + 1) + 1
    with pytest.raises(ValueError, match="unknown backbone kind"):
        backbones.variables_from_state_dict(state_3d, "1d")


def test_pth_needs_torch_or_is_read_with_weights_only(state_3d, tmp_path, monkeypatch):
    path = str(tmp_path / "resnext.pth")
    try:
        import torch
    except ImportError:
        monkeypatch.setitem(sys.modules, "torch", None)
        with pytest.raises(ImportError, match="needs PyTorch"):
            backbones.load_backbone_weights(path, "3d")
        return
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(np.asarray(v)) for k, v in state_3d.items()}}, path)
    loaded = backbones.load_backbone_weights(path, "3d")
    assert loaded["params"]["conv1"]["kernel"].shape == (7, 7, 7, 3, 64)


def test_bfloat16_compute_runs_and_stays_close(golden_dir):
    """The bfloat16 option on a small input: same layout, close to float32 (not within the
    reference's tolerance, which needs float32)."""
    with _golden(golden_dir) as npz:
        state = golden_backbones.recipe_state_dict(npz["state_dict_keys_2d"], npz["state_dict_shapes_2d"],
                                                   int(npz["seed"]), "2d")
        x = backbones.preprocess_2d(npz["frames_2d"][:1, :64, :64])
    variables = backbones.variables_from_state_dict(state, "2d")
    f32 = jax.jit(backbones.backbone("2d").apply)(variables, x)
    bf16 = jax.jit(backbones.backbone("2d", dtype=jnp.bfloat16).apply)(variables, x)
    assert f32.shape == bf16.shape == (1, backbones.FEATURE_DIM) and bf16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(backbones.l2_normalize(bf16) - backbones.l2_normalize(f32)))) < 2e-2
    with pytest.raises(ValueError, match=r"expected input \(N, H, W, 3\)"):
        backbones.backbone("2d").apply(variables, x[0])


@pytest.mark.slow
def test_extract_benchmark_reports_frames_per_second():
    from msk_jax import bench
    from msk_jax.bench import extract

    assert "extract" in bench.BENCHMARKS and "extract" in bench.NOT_IN_ALL
    results = extract.run_extract(batch=1, frame_size=(32, 48), clip_frames=16, clip_size=32, repeats=1)
    for name in ("2d_float32", "2d_bfloat16", "3d_float32", "3d_bfloat16"):
        assert results[f"{name}_seconds_per_batch"] > 0 and results[f"{name}_frames_per_second"] > 0
    assert results["3d_float32_frames_per_second"] == pytest.approx(16 * results["3d_float32_clips_per_second"])
    assert results["2d_float32_flops_per_batch"] > 1e8 and results["3d_float32_flops_per_second"] > 0
    table = extract.format_extract(results)
    assert "ResNet-152" in table and "ResNeXt-101" in table and "clips/s" in table
