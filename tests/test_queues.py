"""Feature queues: FIFO order, fill, and the warm-up of the consistency loss."""

import jax
import jax.numpy as jnp
import numpy as np

from msk_jax.loss import multisk_loss
from msk_jax.model import MODALITIES
from msk_jax.queues import QUEUE_NAMES, QUEUES, FeatureQueues
from tests.paper_config import paper_objective
from tests.test_model import outputs_from_original_names


def _outputs(seed, batch=4, dim=6, proj=5, anchors=(3, 3, 3)):
    rng = np.random.default_rng(seed)
    counts = dict(zip(MODALITIES, anchors))
    out = {}
    for m in MODALITIES:
        out[f"in_{m}_embed"] = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
        out[f"{m}_embed"] = jnp.asarray(rng.normal(size=(batch, proj)), jnp.float32)
        out[f"{m}_embed_norm"] = out[f"{m}_embed"] / jnp.linalg.norm(out[f"{m}_embed"], axis=1, keepdims=True)
        out[f"{m}_nonempty_input_mask"] = jnp.ones(batch, bool)
        out[f"in_{m}_assignment"] = jnp.asarray(rng.uniform(-1, 1, size=(batch, counts[m])), jnp.float32)
        for n in MODALITIES:
            out[f"trans_{m}_a{n}_assignment"] = jnp.asarray(rng.uniform(-1, 1, size=(batch, counts[n])), jnp.float32)
    return outputs_from_original_names(out)


def _anchors(anchors=(3, 3, 3), dim=6, proj=5):
    rng = np.random.default_rng(9)
    params = {}
    for m, k in zip(MODALITIES, anchors):
        params[f"input_anchors_{m}"] = jnp.asarray(rng.normal(size=(k, dim)), jnp.float32)
        params[f"joint_anchors_{m}"] = jnp.asarray(rng.normal(size=(k, proj)), jnp.float32)
    return params


def test_create_is_uniform_noise():
    queues = FeatureQueues.create(jax.random.PRNGKey(0), 10, 6, 5)
    assert queues.features["in_text"].shape == (10, 6) and queues.features["out_audio"].shape == (10, 5)
    for q in queues.features.values():
        assert float(q.min()) >= 0 and float(q.max()) < 1
    assert int(queues.fill) == 0 and not bool(queues.is_full)


def test_push_is_fifo():
    queues = FeatureQueues.create(jax.random.PRNGKey(0), 10, 6, 5)
    first, second = _outputs(1), _outputs(2)
    pushed = queues.push(first).push(second)
    for name in QUEUE_NAMES:
        q = np.asarray(pushed.features[name])
        np.testing.assert_array_equal(q[:2], np.asarray(queues.features[name])[8:])  # oldest survivors
        space, modality = QUEUES[name]  # in_*: x_m, out_*: y^_m
        np.testing.assert_array_equal(q[2:6], first[modality].queued(space))
        np.testing.assert_array_equal(q[6:], second[modality].queued(space))
    assert int(pushed.fill) == 8


def test_fill_stops_growing_once_full():
    queues = FeatureQueues.create(jax.random.PRNGKey(0), 10, 6, 5)
    fills = []
    for step in range(5):
        fills.append(int(queues.fill))
        queues = queues.push(_outputs(step))
    assert fills == [0, 4, 8, 12, 12]


def test_warm_up_turns_consistency_on_after_the_queue_is_filled():
    """queue_len 8, batch 4: two steps fill the queue; the loss is on from the third step."""
    config = paper_objective(queue_len=8, sinkhorn_iters=5)
    queues = FeatureQueues.create(jax.random.PRNGKey(0), 8, 6, 5)
    params = _anchors()
    on = []
    for step in range(4):
        total, metrics, queues = multisk_loss(_outputs(step), params, queues, config)
        on.append(float(metrics["consistency_on"]))
        pair_terms = [v for k, v in metrics.items() if k.startswith("loss_pair_")]
        assert len(pair_terms) == 18
        if on[-1] == 0:
            assert all(float(v) == 0 for v in pair_terms)
            np.testing.assert_allclose(total, metrics["contrastive"])
        else:
            assert all(float(v) > 0 for v in pair_terms)
            np.testing.assert_allclose(total, metrics["contrastive"] + sum(pair_terms), rtol=1e-6)
    assert on == [0.0, 0.0, 1.0, 1.0]


def test_baseline_has_no_consistency_and_no_queues():
    config = paper_objective(consistency=False)
    total, metrics, queues = multisk_loss(_outputs(0), _anchors(), None, config)
    assert queues is None
    assert not any(k.startswith("loss_pair_") for k in metrics)
    np.testing.assert_allclose(total, metrics["contrastive"])


def test_anchor_counts_may_differ_per_modality():
    counts = (2, 3, 5)
    queues = FeatureQueues.create(jax.random.PRNGKey(0), 8, 6, 5, fill=8)
    total, metrics, _ = multisk_loss(_outputs(0, anchors=counts), _anchors(counts), queues,
                                     paper_objective(queue_len=8, sinkhorn_iters=5))
    assert np.isfinite(float(total)) and float(metrics["consistency"]) > 0
