"""model_forward.npz and train_steps.npz: the model's forward pass (evaluation and training
mode) on the converted golden weights, and training steps from them (losses, final weights and
queues)."""

from __future__ import annotations

import json
import re
from typing import Iterable

import numpy as np

from msk_jax import convert, train_step
from msk_jax.model import MultiSKModel
from msk_jax.parity.golden import GoldenInputs, Output, prefixed
from msk_jax.queues import QUEUE_NAMES, FeatureQueues


def golden_model(inputs: GoldenInputs, sample_batch: dict):
    """The original config, the msk_jax model it describes and the converted golden weights."""
    import functools

    import jax


    config = json.loads(str(inputs["config_json"]))
    model = MultiSKModel(**convert.model_config_from_original(config))
    template = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), sample_batch)
    variables = convert.convert_state_dict(prefixed(inputs, "param/"), template)
    return config, model, variables


def check_model_forward(inputs: GoldenInputs) -> Iterable[Output]:
    import jax

    batch = prefixed(inputs, "input/")
    _, model, variables = golden_model(inputs, batch)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    outputs = {"eval": apply(variables, batch, train=False),
               "train": apply(variables, batch, train=True, mutable=("batch_stats",))[0]}
    for mode, out in outputs.items():
        for name, value in out.original_names().items():
            yield Output(f"{mode}/{name}", np.asarray(value), atol=1e-4)


# Golden info names -> msk_jax metric names.
_TRAIN_INFO = {"tv": "tv", "ta": "ta", "va": "va", "Retrieval": "contrastive", "anc_loss": "consistency",
               **{f"loss_pair_{i}_{j}": f"loss_pair_{i}_{j}" for i in range(1, 7) for j in range(1, 4)}}


def check_train_steps(inputs: GoldenInputs) -> Iterable[Output]:
    import jax
    import jax.numpy as jnp


    steps = sorted({int(m.group(1)) for k in inputs.keys() if (m := re.match(r"step(\d+)/input/", k))})
    config, model, variables = golden_model(inputs, prefixed(inputs, "step0/input/"))
    objective = convert.objective_config_from_original(config)
    # The golden runs start with full queues (consistency on) unless the config says otherwise.
    fill = int(config.get("queue_size", objective.queue_len))
    queues = FeatureQueues(features={n: jnp.asarray(inputs[f"queue/{n}_queue"]) for n in QUEUE_NAMES},
                           fill=jnp.asarray(fill, jnp.int32))
    opt = config["optimizer"]
    if opt.get("type", "adam") != "adam":
        raise ValueError(f"train_steps.npz: optimizer {opt['type']!r} is not supported.")
    tx = train_step.adam(opt["lr"], opt.get("b1", 0.9), opt.get("b2", 0.999), opt.get("eps", 1e-8),
                         opt.get("weight_decay", 0.0))
    state = train_step.create_train_state(jax.random.PRNGKey(0), model, objective, tx,
                                          prefixed(inputs, "step0/input/"), variables=variables, queues=queues)
    step_fn = jax.jit(train_step.train_step)
    for s in steps:
        state, metrics = step_fn(state, prefixed(inputs, f"step{s}/input/"))
        yield Output(f"step{s}/loss", np.asarray(metrics["loss"]), rtol=1e-4)
        for golden_name, name in _TRAIN_INFO.items():
            yield Output(f"step{s}/info/{golden_name}", np.asarray(metrics[name]), rtol=1e-4)
    for name, value in convert.export_state_dict({"params": state.params}).items():
        yield Output(f"final/{name}", value, atol=1e-4)
    for name in QUEUE_NAMES:
        yield Output(f"final_queue/{name}_queue", np.asarray(state.queues.features[name]), atol=1e-4)
