"""The train step: warm-up, learning, state threading, and the contrastive-only baseline."""

import dataclasses
import functools
import json
import os
import re

import jax
import numpy as np

from msk_jax import convert, train_step
from msk_jax.loss import multisk_loss
from msk_jax.model import MultiSKModel
from tests.conftest import TINY_MODEL, tiny_batch
from tests.paper_config import paper_objective


def _state(objective):
    model = MultiSKModel(**TINY_MODEL)
    init = jax.jit(lambda rng, batch: train_step.create_train_state(rng, model, objective, train_step.adam(3e-3), batch))
    return init(jax.random.PRNGKey(0), tiny_batch(0))


def test_steps_warm_up_then_learn():
    state = _state(paper_objective(queue_len=12, sinkhorn_iters=10))
    step = jax.jit(train_step.train_step)
    batch = tiny_batch(5)
    initial_stats = state.batch_stats
    history = []
    for _ in range(8):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert [h["consistency_on"] for h in history[:4]] == [0.0, 0.0, 1.0, 1.0]
    assert int(state.step) == 8 and int(state.queues.fill) == 12
    assert all(np.isfinite(h["loss"]) for h in history)
    assert history[0]["consistency"] == 0.0 and history[2]["consistency"] > 0
    assert history[-1]["loss"] < history[2]["loss"]  # learning on a repeated batch
    assert history[-1]["sinkhorn_iterations"] == 10
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), state.batch_stats, initial_stats)
    assert all(jax.tree_util.tree_leaves(changed))


def test_baseline_step_is_contrastive_only():
    state = _state(paper_objective(consistency=False))
    assert state.queues is None
    state, metrics = jax.jit(train_step.train_step)(state, tiny_batch(6))
    assert not any(k.startswith("loss_pair_") for k in metrics)
    np.testing.assert_allclose(metrics["loss"], metrics["contrastive"])
    np.testing.assert_allclose(metrics["contrastive"],
                               (metrics["tv"] + 0.1 * metrics["ta"] + 0.1 * metrics["va"]) / 1.2, rtol=1e-6)


def test_baseline_matches_the_original_contrastive_terms(golden_dir):
    """With the consistency loss switched off, the contrastive terms still equal the original's."""
    with np.load(os.path.join(golden_dir, "train_steps.npz")) as npz:
        data = {k: npz[k] for k in npz.files}
    config = json.loads(str(data["config_json"]))
    model = MultiSKModel(**convert.model_config_from_original(config))
    objective = dataclasses.replace(convert.objective_config_from_original(config), consistency=False)
    batch = {k[len("step0/input/"):]: v for k, v in data.items() if k.startswith("step0/input/")}
    template = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), batch)
    variables = convert.convert_state_dict({k[6:]: v for k, v in data.items() if k.startswith("param/")}, template)

    @jax.jit
    def contrastive_only(variables, batch):
        outputs, _ = model.apply(variables, batch, train=True, mutable=["batch_stats"])
        return multisk_loss(outputs, variables["params"], None, objective)[:2]

    total, metrics = contrastive_only(variables, batch)
    for golden, ours in (("tv", "tv"), ("ta", "ta"), ("va", "va"), ("Retrieval", "contrastive")):
        np.testing.assert_allclose(metrics[ours], data[f"step0/info/{golden}"], rtol=1e-4)
    np.testing.assert_allclose(total, data["step0/info/Retrieval"], rtol=1e-4)
    assert not np.isclose(float(total), float(data["step0/loss"]), rtol=1e-2)  # the original adds anc_loss


def _dot_precisions(precision):
    """The precision of every dot in the lowered train step (tiny model, paper objective)."""
    model = MultiSKModel(**TINY_MODEL, similarity_precision=precision)
    objective = paper_objective(queue_len=12, sinkhorn_iters=2, matmul_precision=precision)
    batch = tiny_batch(0)
    state = jax.eval_shape(lambda rng, b: train_step.create_train_state(rng, model, objective, train_step.adam(1e-3), b),
                           jax.random.PRNGKey(0), batch)
    text = jax.jit(train_step.train_step).lower(state, batch).as_text()
    return [("HIGHEST" in line) for line in re.findall(r"stablehlo\.dot_general[^\n]*", text)]


def test_the_objectives_similarity_matmuls_follow_the_precision_policy():
    """config.objective.matmul_precision sets the precision of the similarity matmuls in the
    lowered step: 3 contrastive pairs, 12 batch-anchor and 12 queue-anchor similarities forward,
    and the two gradient matmuls of each of the 15 differentiable ones (the queue-anchor scores
    only feed the Multi-SK targets, which are constants): 27 + 30 = 57 dots. The solver's own
    dots are HIGHEST either way; the model's layers keep the default."""
    highest, default = _dot_precisions("highest"), _dot_precisions("default")
    assert len(highest) == len(default)
    solver = sum(default)
    assert solver > 0
    assert sum(highest) - solver == 3 + 12 + 12 + 2 * (3 + 12)
    assert sum(highest) < len(highest)  # not every dot: the layers' matmuls are not forced


def test_remat_recomputes_the_same_step():
    """config.model.remat: "block" and "full" give the step of "none" (same parameter names and
    values after two steps, the second with the consistency loss on), with the recomputed parts marked in the
    step (one `remat` per DAVEnet residual block and transformer block, or one per DAVEnet
    and per modality transformer)."""
    objective = paper_objective(queue_len=6, sinkhorn_iters=3)
    batch = tiny_batch(3)
    results = {}
    for remat in ("none", "block", "full"):
        model = MultiSKModel(**TINY_MODEL, remat=remat)
        state = jax.jit(lambda rng, b: train_step.create_train_state(rng, model, objective, train_step.adam(3e-3), b)
                        )(jax.random.PRNGKey(0), batch)
        jaxpr = str(jax.make_jaxpr(train_step.train_step)(state, batch))
        step = jax.jit(train_step.train_step)
        for _ in range(2):  # the first fills the queues, the second has the consistency loss
            state, metrics = step(state, batch)
        results[remat] = (len(re.findall(r"= remat2?\[", jaxpr)), float(metrics["consistency"]), jax.device_get(state.params))
    blocks = sum(TINY_MODEL["davenet_layers"]) + 3 * TINY_MODEL["depth"]
    assert results["none"][0] == 0 and results["block"][0] == blocks and results["full"][0] == 1 + 3
    assert results["none"][1] > 0
    for remat in ("block", "full"):
        assert jax.tree_util.tree_structure(results[remat][2]) == jax.tree_util.tree_structure(results["none"][2])
        np.testing.assert_allclose(results[remat][1], results["none"][1], rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(results[remat][2]), jax.tree_util.tree_leaves(results["none"][2])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
