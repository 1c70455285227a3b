"""The consistency cost and the masked NormSoftmax contrastive loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from msk_jax import loss


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


T_CONTRASTIVE, T_CONSISTENCY = 0.05, 0.1  # the temperatures these tests use


def _reference_norm_softmax(sims, temperature=T_CONTRASTIVE):
    """The original loss on an already-indexed (valid-only) matrix, in float64."""
    x = np.asarray(sims, np.float64) / temperature
    return -np.mean(np.diag(_log_softmax(x, 1))) - np.mean(np.diag(_log_softmax(x.T, 1)))


def test_consistency_cost_is_bce_of_exponentiated_logits():
    rng = np.random.default_rng(1)
    s = rng.uniform(-1, 0.3, size=(7, 5)).astype(np.float32)  # keeps 1 - sigmoid representable
    p = rng.uniform(0, 1, size=(7, 5)).astype(np.float32)
    x = np.exp(s.astype(np.float64) / T_CONSISTENCY)
    sig = 1 / (1 + np.exp(-x))
    expected = np.mean(-(p * np.log(sig) + (1 - p) * np.log(1 - sig)))
    np.testing.assert_allclose(loss.consistency_cost(s, p, T_CONSISTENCY), expected, rtol=1e-5)


def test_consistency_cost_gradient_only_through_similarity():
    s = jnp.full((2, 3), 0.2)
    p = jnp.full((2, 3), 0.5)
    grad_p = jax.grad(lambda p: loss.consistency_cost(s, p, T_CONSISTENCY))(p)
    np.testing.assert_array_equal(grad_p, 0.0)
    assert np.all(np.asarray(jax.grad(lambda s: loss.consistency_cost(s, p, T_CONSISTENCY))(s)) != 0)


def _reference_costs(s, p, tau=T_CONSISTENCY):
    """Each consistency cost and its gradient with respect to s, in float64 numpy."""
    s, p = np.asarray(s, np.float64), np.asarray(p, np.float64)

    def bce(x):  # value per entry and d/dx
        sig = 1 / (1 + np.exp(-x))
        return -(p * np.log(sig) + (1 - p) * np.log(1 - sig)), sig - p

    n = s.size
    x = np.exp(s / tau)
    value, dx = bce(x)
    original = (value.mean(), dx * x / tau / n)
    value, dx = bce(s / tau)
    sigmoid = (value.mean(), dx / tau / n)
    rows = p / p.sum(1, keepdims=True)
    log_q = _log_softmax(s / tau, 1)
    softmax = ((-(rows * log_q).sum(1)).mean(), (np.exp(log_q) * rows.sum(1, keepdims=True) - rows) / tau / len(s))
    return {"original": original, "sigmoid": sigmoid, "softmax": softmax}


def test_each_consistency_cost_and_its_gradient_against_numpy():
    rng = np.random.default_rng(3)
    s = rng.uniform(-1, 0.3, size=(6, 4)).astype(np.float32)
    p = rng.uniform(0.01, 1, size=(6, 4)).astype(np.float32)
    for kind, (value, grad) in _reference_costs(s, p).items():
        np.testing.assert_allclose(loss.consistency_cost(s, p, T_CONSISTENCY, kind), value, rtol=1e-5, err_msg=kind)
        got = jax.grad(lambda x: loss.consistency_cost(x, p, T_CONSISTENCY, kind))(jnp.asarray(s))
        np.testing.assert_allclose(got, grad, rtol=1e-4, atol=1e-7, err_msg=kind)
    assert float(loss.consistency_cost(s, np.zeros_like(p), T_CONSISTENCY, "softmax")) == 0.0  # an empty target row
    with pytest.raises(ValueError, match="consistency_cost"):
        loss.consistency_cost(s, p, T_CONSISTENCY, "cosine")


def test_corrected_costs_represent_targets_below_one_half():
    """Cosines fitted to a target whose entries lie below 0.5, each cost minimised from the same
    start: "sigmoid" and "softmax" come within a hair of their floor (the target's own entropy:
    the prediction equals the target), "original" stays far above its own: its prediction
    sigmoid(exp(s / tau)) cannot go below 0.5."""
    rng = np.random.default_rng(4)
    p = rng.uniform(0.02, 0.45, size=(5, 6)).astype(np.float32)
    q = p / p.sum(1, keepdims=True)
    floors = {"original": float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p)))),
              "sigmoid": float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p)))),
              "softmax": float(np.mean(-(q * np.log(q)).sum(1)))}
    excess = {}
    for kind in loss.CONSISTENCY_COSTS:
        optimizer = optax.adam(0.05)

        @jax.jit
        def step(u, state, kind=kind):
            value, grad = jax.value_and_grad(  # cosines in (-1, 1)
                lambda u: loss.consistency_cost(jnp.tanh(u), p, T_CONSISTENCY, kind))(u)
            updates, state = optimizer.update(grad, state)
            return optax.apply_updates(u, updates), state, value

        u = jnp.zeros_like(p)
        state = optimizer.init(u)
        for _ in range(600):
            u, state, value = step(u, state)
        excess[kind] = float(value) - floors[kind]
    assert excess["sigmoid"] < 1e-3 and excess["softmax"] < 1e-3, excess
    assert excess["original"] > 0.1, excess


def test_consistency_floor_is_the_least_cost_over_cosines():
    """Each cost's floor: below its value at any cosines, equal to the brute-force least value
    entry by entry for the BCE costs (a fine grid of s in [-1, 1]), and reached by softmax at the
    cosines whose softmax is the target; the original's floor is log 2 on entries below 0.5."""
    rng = np.random.default_rng(5)
    p = rng.uniform(0.05, 0.95, size=(4, 6))
    p[0, :2], p[1, :2] = 0.0, 1.0  # entries the BCE costs can only approach
    grid = np.linspace(-1, 1, 4001)[:, None, None]
    for kind in ("original", "sigmoid"):
        floor = float(loss.consistency_floor(None, p.astype(np.float32), T_CONSISTENCY, kind))
        x = np.exp(grid / T_CONSISTENCY) if kind == "original" else grid / T_CONSISTENCY
        sig = np.clip(1 / (1 + np.exp(-x)), 1e-300, 1 - 1e-16)
        brute = np.mean(np.min(-(p * np.log(sig) + (1 - p) * np.log1p(-sig)), axis=0))
        np.testing.assert_allclose(floor, brute, rtol=1e-4, err_msg=kind)
    below = rng.uniform(0.01, 0.49, size=(3, 5)).astype(np.float32)
    np.testing.assert_allclose(loss.consistency_floor(None, below, T_CONSISTENCY, "original"), np.log(2), rtol=1e-3)
    rows = p / p.sum(1, keepdims=True)
    q = rng.uniform(0.2, 1, size=(4, 6))  # a reachable target: log-ratios within 2 / tau
    s = T_CONSISTENCY * np.log(q / q.sum(1, keepdims=True))
    s = s - s.max(1, keepdims=True) + 1  # the same softmax, cosines in [-1, 1]
    np.testing.assert_allclose(loss.consistency_floor(None, q.astype(np.float32), T_CONSISTENCY, "softmax"),
                               loss.consistency_cost(s.astype(np.float32), q.astype(np.float32), T_CONSISTENCY,
                                                     "softmax"), rtol=1e-5)
    for kind in loss.CONSISTENCY_COSTS:
        floor = float(loss.consistency_floor(None, p.astype(np.float32), T_CONSISTENCY, kind))
        for _ in range(5):
            cos = rng.uniform(-1, 1, size=p.shape).astype(np.float32)
            assert floor <= float(loss.consistency_cost(cos, p.astype(np.float32), T_CONSISTENCY, kind)) + 1e-6
    assert float(loss.consistency_floor(None, p.astype(np.float32), T_CONSISTENCY, "softmax")) == pytest.approx(
        float(np.mean(-(np.where(rows > 0, rows * np.log(np.where(rows > 0, rows, 1)), 0)).sum(1))), rel=1e-5)


def test_masking_equals_indexing():
    rng = np.random.default_rng(2)
    sims = rng.uniform(-1, 1, size=(9, 9)).astype(np.float32)
    valid = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    masked = loss.norm_softmax_loss(jnp.asarray(sims), T_CONTRASTIVE, jnp.asarray(valid))
    np.testing.assert_allclose(masked, _reference_norm_softmax(sims[valid][:, valid]), rtol=1e-5)
    np.testing.assert_allclose(loss.norm_softmax_loss(sims, T_CONTRASTIVE), _reference_norm_softmax(sims), rtol=1e-5)


def test_masked_samples_get_no_gradient_and_stay_finite():
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    valid = jnp.array([True, False, True, True, True, False])

    def objective(a):
        return loss.norm_softmax_loss(loss.cosine_similarity_matrix(a, b), T_CONTRASTIVE, valid)

    grad = np.asarray(jax.grad(objective)(a))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[~np.asarray(valid)], 0.0)
    assert np.all(np.abs(grad[np.asarray(valid)]).sum(axis=1) > 0)


def test_no_valid_sample_gives_zero_loss():
    sims = jnp.eye(4)
    assert float(loss.norm_softmax_loss(sims, T_CONTRASTIVE, jnp.zeros(4, bool))) == 0.0


def test_cosine_similarity_matrix_matches_original_eps():
    a = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    sims = np.asarray(loss.cosine_similarity_matrix(a, a))
    np.testing.assert_allclose(sims, [[1.0, 0.0], [0.0, 0.0]], atol=1e-7)


def test_contrastive_objective_weights_pairs():
    rng = np.random.default_rng(4)
    emb = {m: jnp.asarray(rng.normal(size=(8, 6)), jnp.float32) for m in ("text", "video", "audio")}
    nonempty = {"text": jnp.array([0, 1, 1, 1, 1, 1, 1, 1], bool),
                "video": jnp.ones(8, bool),
                "audio": jnp.array([1, 0, 1, 1, 1, 1, 0, 1], bool)}
    total, losses = loss.contrastive_objective(emb, nonempty, {"tv": 1.0, "ta": 0.1, "va": 0.1}, T_CONTRASTIVE)
    for name, (m1, m2) in loss.CONTRASTIVE_PAIRS.items():
        valid = np.asarray(nonempty[m1] & nonempty[m2])
        a, b = np.asarray(emb[m1])[valid], np.asarray(emb[m2])[valid]
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        np.testing.assert_allclose(losses[name], _reference_norm_softmax(a @ b.T), rtol=1e-5)
    expected = (losses["tv"] + 0.1 * losses["ta"] + 0.1 * losses["va"]) / 1.2
    np.testing.assert_allclose(total, expected, rtol=1e-6)


def test_contrastive_objective_skips_zero_weights_and_rejects_all_zero():
    emb = {m: jnp.eye(3) for m in ("text", "video", "audio")}
    nonempty = {m: jnp.ones(3, bool) for m in emb}
    total, losses = loss.contrastive_objective(emb, nonempty, {"tv": 1.0, "ta": 0.0, "va": 0.0}, T_CONTRASTIVE)
    assert set(losses) == {"tv"}
    np.testing.assert_allclose(total, losses["tv"])
    with pytest.raises(ValueError, match="non-zero weight"):
        loss.contrastive_objective(emb, nonempty, {"tv": 0.0}, T_CONTRASTIVE)


def test_the_configuration_chooses_the_consistency_cost():
    from msk_jax import configs

    config = configs.get_config("howto", "demo")
    assert loss.ObjectiveConfig.from_config(config.objective).consistency_cost == "original"
    config.objective.consistency_cost = "softmax"
    assert loss.ObjectiveConfig.from_config(config.objective).consistency_cost == "softmax"
