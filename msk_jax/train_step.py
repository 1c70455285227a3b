"""The train step: a pure function (state, batch) -> (state, metrics).

`TrainState` carries everything that changes during training: the step count, parameters,
BatchNorm statistics, the optimiser state, the feature queues (with their fill), the EMA of the
parameters and an RNG key. The step runs the model in training mode (batch statistics),
computes the full Multi-SK objective, applies the optimiser (Adam, no weight decay), updates the
EMA and pushes the batch into the queues.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from msk_jax.loss import ObjectiveConfig, multisk_loss
from msk_jax.queues import FeatureQueues


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    queues: FeatureQueues | None
    ema_params: Any = None
    model: nn.Module = struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)
    objective: ObjectiveConfig = struct.field(pytree_node=False, default=None)
    ema_decay: float | None = struct.field(pytree_node=False, default=None)


def adam(lr: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0):
    """The original's optimiser: Adam (the paper uses no weight decay; PyTorch's `weight_decay`
    adds weight_decay * param to the gradient, which is what a non-zero value does here)."""
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr, b1=b1, b2=b2, eps=eps))
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def epoch_decay_schedule(lr: float, decay_per_epoch: float, steps_per_epoch: int) -> optax.Schedule:
    """lr * decay ** epoch, the epoch being step // steps_per_epoch (the original's per-epoch decay)."""
    return optax.exponential_decay(lr, transition_steps=max(1, steps_per_epoch), decay_rate=decay_per_epoch,
                                   staircase=True)


def create_train_state(rng: jax.Array, model: nn.Module, objective: ObjectiveConfig,
                       tx: optax.GradientTransformation, sample_batch: dict,
                       variables: dict | None = None, queues: FeatureQueues | None = None,
                       ema_decay: float | None = None) -> TrainState:
    """Initialises (or takes) the model variables, the optimiser state and the queues.

    sample_batch fixes the input shapes; `variables` (e.g. converted PyTorch weights) and
    `queues` override the fresh initialisation. With `ema_decay`, an EMA of the parameters
    (decay 0.9999 in the paper) is kept in `ema_params`.
    """
    init_rng, queue_rng, _ = jax.random.split(rng, 3)  # a seed's initial weights and queues come from this split
    if variables is None:
        variables = model.init(init_rng, sample_batch, train=False)
    params = variables["params"]
    if queues is None and objective.consistency:
        queues = FeatureQueues.create(queue_rng, objective.queue_len, model.embed_dim, model.projection_dim)
    ema_params = jax.tree_util.tree_map(jnp.array, params) if ema_decay is not None else None
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      queues=queues, ema_params=ema_params, model=model, tx=tx,
                      objective=objective, ema_decay=ema_decay)


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on the full objective; returns the new state and every loss term."""

    def objective_fn(params):
        outputs, updates = state.model.apply({"params": params, "batch_stats": state.batch_stats},
                                             batch, train=True, mutable=["batch_stats"])
        total, metrics, queues = multisk_loss(outputs, params, state.queues, state.objective)
        return total, (metrics, queues, updates["batch_stats"])

    grads, (metrics, queues, batch_stats) = jax.grad(objective_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    ema_params = state.ema_params
    if state.ema_decay is not None:
        decay = state.ema_decay
        ema_params = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, queues=queues, ema_params=ema_params)
    return new_state, metrics
