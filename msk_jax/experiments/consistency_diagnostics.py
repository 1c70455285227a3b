"""How the anchor consistency loss acts on a trained model: the evidence for what it does.

At a run's latest checkpoint (online weights, BatchNorm in training mode, the checkpoint's
feature queues) and on the batch the run would have trained on next, this measures:

- the gradient of the contrastive loss and of the consistency loss (at scale 1): their norms on
  the encoders (every parameter except the anchors) and on the anchors, the ratio of the scaled
  consistency gradient to the contrastive one on the encoders, and the cosine between the two
  (negative: the consistency loss pulls the encoders against the contrastive loss);
- the Multi-SK targets: the mean entropy of a clip's target row (normalised to a distribution)
  over log K (1: uniform, no information), and the mean number of anchors a clip is assigned to
  (target > 0.5);
- the consistency loss's value (at scale 1) against its floor (`loss.consistency_floor`: the
  least value any similarities in [-1, 1] could give these targets), and the share of target
  entries below 0.5, which the original cost's prediction `sigmoid(exp(s / T))`, above 0.5 for
  every similarity s, can never fit;
- the queue: how many steps a clip stays in it and how many of the corpus's videos it holds;
- `embedding_geometry` (EMA weights, evaluation sets): the effective rank of each modality's
  joint embeddings and their mean pairwise cosine similarity, i.e. how much of the space the
  clips spread over.

    python -m msk_jax.experiments.consistency_diagnostics --config=configs/howto.py:demo --checkpoint=RUN
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from msk_jax import checkpoints, data_sources, train_step
from msk_jax.checkpoint_reader import restore_for_evaluation
from msk_jax.data.loader import TrainingPipeline
from msk_jax.errors import DataError
from msk_jax.evaluators import embedding
from msk_jax.loss import ObjectiveConfig, consistency_floor, consistency_terms, multisk_loss, multisk_targets
from msk_jax.model import MultiSKModel
from msk_jax.train import saved_input_position


def _is_anchor(path) -> bool:
    return any("anchors" in str(getattr(entry, "key", entry)) for entry in path)


def _norms(grads) -> dict[str, jax.Array]:
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    encoders = sum(jnp.sum(g ** 2) for p, g in leaves if not _is_anchor(p))
    anchors = sum(jnp.sum(g ** 2) for p, g in leaves if _is_anchor(p))
    return {"encoders": jnp.sqrt(encoders), "anchors": jnp.sqrt(anchors)}


def _encoder_cosine(a, b) -> jax.Array:
    pairs = [(x, y) for (p, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                                               jax.tree_util.tree_flatten_with_path(b)[0]) if not _is_anchor(p)]
    dot = sum(jnp.sum(x * y) for x, y in pairs)
    return dot / jnp.sqrt(sum(jnp.sum(x ** 2) for x, _ in pairs) * sum(jnp.sum(y ** 2) for _, y in pairs))


@functools.partial(jax.jit, static_argnames=("model", "objective"))
def _measure(model, objective: ObjectiveConfig, params, batch_stats, queues, batch) -> dict[str, jax.Array]:
    """The measures with the consistency loss at scale 1 (one compile serves every scale)."""

    def terms(p):
        outputs, _ = model.apply({"params": p, "batch_stats": batch_stats}, batch, train=True, mutable=["batch_stats"])
        _, metrics, _ = multisk_loss(outputs, p, queues, objective)
        return (metrics["contrastive"], metrics["consistency"]), outputs

    # One forward pass, and one backward pass per loss term.
    losses, pullback, outputs = jax.vjp(terms, params, has_aux=True)
    one, zero = (jnp.ones_like(losses[0]), jnp.zeros_like(losses[0]))
    (contrastive,) = pullback((one, zero))
    (consistency,) = pullback((zero, one))
    targets, _ = multisk_targets(outputs, params, queues, objective)
    entropy, strong, unfit = [], [], []
    for target in targets.values():
        k = target.shape[-1]
        dist = target / jnp.maximum(target.sum(-1, keepdims=True), 1e-12)
        entropy.append(jnp.mean(-jnp.sum(dist * jnp.log(jnp.maximum(dist, 1e-12)), -1)) / jnp.log(k))
        strong.append(jnp.mean(jnp.sum(target > 0.5, -1)))
        unfit.append(jnp.mean(target < 0.5))
    floor = sum(consistency_terms(outputs, targets, objective, cost=consistency_floor).values())
    c, s = _norms(contrastive), _norms(consistency)
    return {"consistency_value": losses[1], "consistency_floor": floor,
            "contrastive_grad_encoders": c["encoders"], "consistency_grad_encoders": s["encoders"],
            "consistency_grad_anchors": s["anchors"], "encoder_grad_cosine": _encoder_cosine(contrastive, consistency),
            "target_entropy": jnp.mean(jnp.stack(entropy)), "anchors_per_clip": jnp.mean(jnp.stack(strong)),
            "targets_below_half": jnp.mean(jnp.stack(unfit))}


def diagnose(model, params: Mapping[str, Any], batch_stats: Mapping[str, Any], queues, objective: ObjectiveConfig,
             batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The gradient, target and prediction measures of one batch (see the module docstring)."""
    unscaled = dataclasses.replace(objective, consistency_scale=1.0)
    out = {k: float(v) for k, v in jax.device_get(_measure(model, unscaled, params, batch_stats, queues, batch)).items()}
    out["consistency_to_contrastive_encoders"] = (objective.consistency_scale * out["consistency_grad_encoders"]
                                                  / out["contrastive_grad_encoders"])
    return out


def queue_turnover(config, num_videos: int) -> dict[str, float]:
    """How long a clip stays in the feature queue and how much of the corpus the queue holds."""
    clips_per_step = config.videos_per_batch * config.data.n_clips
    steps = config.objective.queue_len / clips_per_step
    return {"queue_len": config.objective.queue_len, "clips_per_step": clips_per_step, "steps_in_queue": steps,
            "videos_in_queue": steps * config.videos_per_batch,
            "corpus_fraction_in_queue": min(1.0, steps * config.videos_per_batch / num_videos)}


def diagnose_run(config, workdir: str) -> dict[str, float]:
    """`diagnose` at the run's latest checkpoint on its next training batch, plus `queue_turnover`."""
    objective = ObjectiveConfig.from_config(config.objective)
    if not objective.consistency:
        raise ValueError(f"{workdir}: the consistency loss is off in this configuration: nothing to diagnose.")
    source, words, _ = data_sources.build_data(config)
    model = MultiSKModel.from_config(config)
    schedule = train_step.epoch_decay_schedule(config.optimizer.lr, config.optimizer.lr_decay_per_epoch, 1)
    tx = train_step.adam(schedule, config.optimizer.b1, config.optimizer.b2, config.optimizer.eps)  # (its state's shape)
    shapes = data_sources.sample_batch(config, words.dim)
    template = jax.jit(lambda rng, batch: train_step.create_train_state(  # (jitted: op-by-op init is slow)
        rng, model, objective, tx, batch, ema_decay=config.ema_decay or None))(jax.random.PRNGKey(config.seed), shapes)
    checkpointer = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise checkpoints.CheckpointError(f"no checkpoint in {workdir}.")
        state, meta = checkpointer.restore(template, step)
    finally:
        checkpointer.close()
    pipeline = TrainingPipeline(source, config.videos_per_batch, seed=config.seed, workers=1)
    try:
        pipeline.restore(saved_input_position(meta["input"], config.videos_per_batch)[0])
        batch = next(iter(pipeline))
    finally:
        pipeline.close()
    batch = {k: batch[k] for k in shapes}
    result = diagnose(model, state.params, state.batch_stats, state.queues, objective, batch)
    return {"step": step, **result, **queue_turnover(config, len(source))}


def effective_rank(x: np.ndarray) -> float:
    """exp(entropy of the normalised singular values) of the centred rows (Roy & Vetterli, 2007)."""
    singular = np.linalg.svd(x - x.mean(axis=0, keepdims=True), compute_uv=False)
    p = singular / singular.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def embedding_geometry(embeddings: Mapping[str, np.ndarray]) -> dict[str, float]:
    """{"{modality}_effective_rank", "{modality}_mean_cosine"} of L2-normalised joint embeddings."""
    out = {}
    for m, e in embeddings.items():
        unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        n = len(unit)
        gram = unit @ unit.T
        out[f"{m}_effective_rank"] = effective_rank(unit)
        out[f"{m}_mean_cosine"] = float((gram.sum() - np.trace(gram)) / (n * (n - 1)))
    return out


def geometry_run(config, checkpoint: str, weights: str = "ema") -> dict[str, dict[str, float]]:
    """`embedding_geometry` of a run's latest checkpoint on each configured evaluation set."""
    model, variables, eval_sets = restore_for_evaluation(config, checkpoint, weights)
    return {name: embedding_geometry(embedding.embed(model, variables, eval_set, config.eval_batch_size))
            for name, eval_set in eval_sets.items()}


def main(argv):
    from absl import app, logging


    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        result = diagnose_run(FLAGS.config, FLAGS.checkpoint)
    except (checkpoints.CheckpointError, FileNotFoundError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "The configuration the run was trained with.")
    flags.DEFINE_string("checkpoint", None, "The run's workdir.")
    flags.mark_flags_as_required(["config", "checkpoint"])
    from msk_jax import configs

    sys.argv = configs.resolve_argv(sys.argv)
    app.run(main)
