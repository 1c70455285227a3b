"""The Multi-SK model: outputs, empty modalities, padding, BatchNorm semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msk_jax.layers import BatchNorm
from msk_jax.model import MODALITIES, ModalityOutputs, ModelOutputs, MultiSKModel, pool_audio_mask
from tests.conftest import TINY_MODEL, tiny_batch


def outputs_from_original_names(flat: dict) -> ModelOutputs:
    """The inverse of `ModelOutputs.original_names`."""
    return ModelOutputs(**{m: ModalityOutputs(
        input_embedding=flat[f"in_{m}_embed"], joint_embedding=flat[f"{m}_embed"],
        joint_normalized=flat[f"{m}_embed_norm"], nonempty=flat[f"{m}_nonempty_input_mask"],
        input_similarity=flat[f"in_{m}_assignment"],
        joint_similarity={n: flat[f"trans_{m}_a{n}_assignment"] for n in MODALITIES}) for m in MODALITIES})


@pytest.fixture(scope="module")
def model_and_variables():
    model = MultiSKModel(**TINY_MODEL)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), tiny_batch(0))
    return model, variables, jax.jit(model.apply, static_argnames=("train",))


def test_outputs(model_and_variables):
    model, variables, apply = model_and_variables
    out = apply(variables, tiny_batch(1), train=False)
    k = TINY_MODEL["num_anchors"]
    params = variables["params"]
    for m in MODALITIES:
        o = out[m]
        assert o.input_embedding.shape == (6, TINY_MODEL["embed_dim"])
        assert o.joint_embedding.shape == (6, TINY_MODEL["projection_dim"])
        np.testing.assert_allclose(jnp.linalg.norm(o.input_embedding, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(o.joint_normalized, o.joint_embedding / jnp.linalg.norm(o.joint_embedding, axis=1,
                                                                                          keepdims=True), rtol=1e-5)
        assert o.input_similarity.shape == (6, k)
        for n in MODALITIES:  # sim(y^_m, Z^_n): cosine similarities to n's joint anchors
            anchors = params[f"joint_anchors_{n}"] / jnp.linalg.norm(params[f"joint_anchors_{n}"], axis=1, keepdims=True)
            np.testing.assert_allclose(o.joint_similarity[n], o.joint_normalized @ anchors.T, rtol=1e-5, atol=1e-6)
    # The original's flat names, and back.
    flat = out.original_names()
    assert len(flat) == 3 * 8 and flat["trans_video_atext_assignment"] is out["video"].joint_similarity["text"]
    assert outputs_from_original_names(flat) == out
    with pytest.raises(KeyError, match="no modality 'image'"):
        out["image"]


def test_empty_modality_gets_the_masking_token(model_and_variables):
    _, variables, apply = model_and_variables
    batch = tiny_batch(2)  # clip 0: no text; clip 1: no audio
    out = apply(variables, batch, train=False).original_names()
    np.testing.assert_array_equal(out["text_nonempty_input_mask"], [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(out["audio_nonempty_input_mask"], [1, 0, 1, 1, 1, 1])
    token = np.asarray(variables["params"]["masking_token"])
    np.testing.assert_allclose(out["in_text_embed"][0], token / np.linalg.norm(token), rtol=1e-5)
    # An empty clip's features do not matter.
    changed = dict(batch, text=batch["text"].copy(), audio=batch["audio"].copy())
    changed["text"][0] += 5.0
    changed["audio"][1] += 5.0
    out2 = apply(variables, changed, train=False).original_names()
    np.testing.assert_allclose(out2["text_embed"][0], out["text_embed"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out2["audio_embed"][1], out["audio_embed"][1], rtol=1e-5, atol=1e-6)


def test_padded_tokens_are_ignored(model_and_variables):
    _, variables, apply = model_and_variables
    batch = tiny_batch(3)
    out = apply(variables, batch, train=False)
    changed = dict(batch, text=np.where(batch["text_mask"][..., None] == 0, 100.0, batch["text"]))
    out2 = apply(variables, changed, train=False)
    np.testing.assert_allclose(out2["text"].joint_embedding, out["text"].joint_embedding, rtol=1e-5, atol=1e-6)


def test_pool_audio_mask():
    mask = jnp.asarray([[1] * 64 + [1] * 10 + [0] * 54 + [0] * 128])  # 256 frames, 4 tokens
    np.testing.assert_array_equal(pool_audio_mask(mask, 4), [[1, 1, 0, 0]])
    with pytest.raises(ValueError, match="divisible"):
        pool_audio_mask(jnp.ones((1, 250)), 4)


def test_batch_norm_matches_pytorch_semantics():
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, size=(5, 7, 3)).astype(np.float32)
    bn = BatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), x, train=False)
    params = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])}
    y, updates = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                          mutable=["batch_stats"])
    flat = x.reshape(-1, 3).astype(np.float64)
    mean, var = flat.mean(0), flat.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * params["scale"] + params["bias"], atol=1e-5)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)  # unbiased
    y_eval = bn.apply({"params": params, "batch_stats": stats}, x, train=False)
    np.testing.assert_allclose(y_eval, (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"]
                               + params["bias"], atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
    model = MultiSKModel(**dict(TINY_MODEL, dtype=jnp.bfloat16))
    batch = tiny_batch(7)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    out = jax.jit(functools.partial(model.apply, train=False))(variables, batch).original_names()
    for name in ("text_embed", "in_audio_embed", "trans_video_aaudio_assignment"):
        assert out[name].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out[name])))
    reference = jax.jit(functools.partial(MultiSKModel(**TINY_MODEL).apply, train=False))(variables, batch)
    reference = reference.original_names()
    np.testing.assert_allclose(out["video_embed_norm"], reference["video_embed_norm"], atol=0.05)
