"""Runs a few train steps of a tiny model on several device meshes and prints the results as JSON.

Used by tests/test_sharding.py in a subprocess started with 8 host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): one device, and every axis at once (data,
FSDP and model parallel, 2 x 2 x 2), one compile each; then the evaluation embeddings of the
trained state, sharded over the batch axes and on one device.
"""

import json
import sys

import jax
import numpy as np

from msk_jax import sharding, train, train_step
from msk_jax.data.eval_sets import EvalSet
from msk_jax.evaluators import embedding
from msk_jax.model import MultiSKModel
from tests.conftest import TINY_MODEL, tiny_batch
from tests.paper_config import paper_objective

MESHES = {"one_device": [("data", 1)], "data2_fsdp2_model2": [("data", 2), ("fsdp", 2), ("model", 2)]}


def run(mesh_axes, steps=3):
    devices = jax.devices()[: int(np.prod([s for _, s in mesh_axes]))]
    mesh = sharding.create_mesh(mesh_axes, devices)
    model = MultiSKModel(**TINY_MODEL)
    objective = paper_objective(queue_len=16, sinkhorn_iters=5)
    batches = [tiny_batch(seed, batch=16) for seed in range(steps)]
    shapes = {k: np.zeros(v.shape, v.dtype) for k, v in batches[0].items()}
    state, state_sharding = train.create_sharded_state(jax.random.PRNGKey(0), model, objective,
                                                       train_step.adam(1e-3), shapes, mesh,
                                                       sharding.rules_for(mesh), ema_decay=0.9)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = train.compile_train_step(state_sharding, batch_sharding)
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, train.global_batch(batch, batch_sharding))
        losses.append(float(metrics["loss"]))
    kernel = state.params["text_proj"]["fc"]["kernel"]
    # Evaluation embeds each batch sharded over the batch axes (13 clips in batches of 5, rounded
    # up to the slices): the same embeddings as one device embedding whole batches.
    clips = tiny_batch(9, batch=13)
    eval_set = EvalSet("eval", clips, [str(i) for i in range(13)], [""] * 13, 13)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    sharded = embedding.embed(model, variables, eval_set, batch_size=5, sharding=batch_sharding)
    plain = embedding.embed(model, jax.device_get(variables), eval_set, batch_size=5)
    return {"losses": losses,
            "eval_shards": embedding.batch_shards(batch_sharding),
            "eval_difference": max(float(np.abs(sharded[m] - plain[m]).max()) for m in plain),
            "eval_rows": {m: len(v) for m, v in sharded.items()},
            "param_sum": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree_util.tree_leaves(state.params))),
            "kernel": np.asarray(kernel).ravel()[:64].tolist(),
            "kernel_spec": str(kernel.sharding.spec),
            "split_over": sorted({axis for x in jax.tree_util.tree_leaves(state.params)
                                  for axis in jax.tree_util.tree_leaves(tuple(x.sharding.spec)) if axis}),
            "queue_fill": int(state.queues.fill)}


if __name__ == "__main__":
    names = sys.argv[1:] or list(MESHES)
    print(json.dumps({name: run(MESHES[name]) for name in names}))
