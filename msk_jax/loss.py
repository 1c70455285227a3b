"""The Multi-SK objective: its terms as pure functions, and their sum.

- :func:`multisk_loss`: the full objective, L_con + the 18 weighted consistency terms, with
  the feature queues as explicit state (see :mod:`msk_jax.queues`).
- :func:`consistency_cost`: the anchor consistency cost, BCE-with-logits of exp(s / 0.1) against
  a Multi-SK target (the logits are exponentiated, exactly as in the original), or one of the
  two corrected costs of `CONSISTENCY_COSTS`; :func:`consistency_floor` is the least value it
  can take for a target.
- :func:`norm_softmax_loss`: the symmetric NormSoftmax (InfoNCE) loss over a cosine similarity
  matrix, restricted to the clips where both modalities are non-empty -- by masking, so every
  shape is static under jit.
- :func:`contrastive_objective`: the weighted combination of the text-video, text-audio and
  video-audio pairs, L_con = sum_p w_p L_p / sum_p w_p.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from msk_jax import sinkhorn
from msk_jax.model import MODALITIES, ModelOutputs, anchor_similarity, l2_normalize, matmul_precision
from msk_jax.queues import FeatureQueues

COSINE_EPS = 1e-8

# Pair name -> (first modality, second modality), in the original's order.
CONTRASTIVE_PAIRS = {"tv": ("text", "video"), "ta": ("text", "audio"), "va": ("video", "audio")}

_MASKED_LOGIT = -1e9  # finite, so masked rows and their gradients stay finite


# config.objective.consistency_cost: how a consistency term compares the similarities s of
# embeddings to anchors with their Multi-SK target, at temperature tau (consistency_temperature):
#   "original": BCE-with-logits of exp(s / tau) against the target, as the original code
#               (`calculate_cost`); its prediction sigmoid(exp(s / tau)) is above 0.5 for every s,
#               so it cannot represent target entries below 0.5;
#   "sigmoid":  BCE-with-logits of s / tau against the target (the mean over entries);
#   "softmax":  cross-entropy between the row-normalised target and softmax(s / tau) over the
#               anchors (the mean over rows), as SwAV predicts its Sinkhorn codes.
CONSISTENCY_COSTS = ("original", "sigmoid", "softmax")


def _bce_with_logits(x: jax.Array, y: jax.Array) -> jax.Array:
    """Stable BCE with logits per entry: max(x, 0) - x y + log(1 + exp(-|x|))."""
    return jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _distributions(target: jax.Array) -> jax.Array:
    """Each target row divided by its sum (an all-zero row stays zero): what "softmax" predicts."""
    return target / jnp.maximum(jnp.sum(target, axis=-1, keepdims=True), jnp.finfo(target.dtype).tiny)


def consistency_cost(similarity: jax.Array, target: jax.Array,
                     temperature: float, kind: str = "original") -> jax.Array:
    """One consistency term's cost (CONSISTENCY_COSTS); "original" is
    mean(BCE_with_logits(logits=exp(similarity / temperature), target)) over all entries.

    similarity: (B, K) cosine similarities of embeddings to anchors (carries the gradient).
    target: (B, K) Multi-SK target in [0, 1] (treated as a constant).
    """
    y = jax.lax.stop_gradient(target).astype(similarity.dtype)
    if kind == "original":
        return jnp.mean(_bce_with_logits(jnp.exp(similarity / temperature), y))
    if kind == "sigmoid":
        return jnp.mean(_bce_with_logits(similarity / temperature, y))
    if kind == "softmax":
        rows = _distributions(y)
        return jnp.mean(-jnp.sum(rows * jax.nn.log_softmax(similarity / temperature, axis=-1), axis=-1))
    raise ValueError(f"objective.consistency_cost must be one of {CONSISTENCY_COSTS}, got {kind!r}")


def consistency_floor(similarity: jax.Array | None, target: jax.Array, temperature: float,
                      kind: str = "original") -> jax.Array:
    """The least value `consistency_cost` can take for this target with every similarity free in
    [-1, 1] (entry by entry): what no model can get under. `similarity` is unused (the signature
    is `consistency_cost`'s, so `consistency_terms` can weigh floors as it weighs costs).

    "original": each entry's best prediction is its target clipped to what sigmoid(exp(s / tau))
    reaches, [sigmoid(exp(-1 / tau)), sigmoid(exp(1 / tau))], whose lower end is just above 0.5;
    "sigmoid": the same with sigmoid(s / tau), [sigmoid(-1 / tau), sigmoid(1 / tau)];
    "softmax": the entropy of the row-normalised target (a lower bound, reached where the row's
    log-ratios fit in 2 / tau).
    """
    del similarity
    y = jax.lax.stop_gradient(target).astype(jnp.float32)
    if kind in ("original", "sigmoid"):
        logit = jnp.log(y) - jnp.log1p(-y)  # the unconstrained best logit (+-inf at 0 and 1)
        if kind == "original":
            best = jnp.clip(logit, jnp.exp(-1.0 / temperature), jnp.exp(1.0 / temperature))
        else:
            best = jnp.clip(logit, -1.0 / temperature, 1.0 / temperature)
        return jnp.mean(_bce_with_logits(best, y))
    if kind == "softmax":
        rows = _distributions(y)
        return jnp.mean(-jnp.sum(jnp.where(rows > 0, rows * jnp.log(jnp.where(rows > 0, rows, 1.0)), 0.0), axis=-1))
    raise ValueError(f"objective.consistency_cost must be one of {CONSISTENCY_COSTS}, got {kind!r}")


def cosine_similarity_matrix(a: jax.Array, b: jax.Array, eps: float = COSINE_EPS,
                             precision: str = "highest") -> jax.Array:
    """(Na, Nb) cosine similarities between the rows of a and of b (rows divided by
    max(||row||, eps), eps 1e-8 as in the original's `sim_matrix`), with the matmul precision
    `precision` (model.matmul_precision)."""
    return jnp.matmul(l2_normalize(a, eps), l2_normalize(b, eps).T, precision=matmul_precision(precision))


def norm_softmax_loss(similarity: jax.Array, temperature: float, valid: jax.Array | None = None) -> jax.Array:
    """Symmetric NormSoftmax loss of a square (B, B) similarity matrix whose diagonal holds
    the positive pairs: -mean_i log_softmax_rows(S/T)_ii - mean_j log_softmax_cols(S/T)_jj.

    valid: optional (B,) bool; only valid rows and columns take part, as if the matrix had been
    indexed by the mask (the original's `embed[nonempty]`). With no valid sample the loss is 0
    (the original would return NaN).
    """
    logits = similarity / temperature
    if valid is None:
        valid = jnp.ones(similarity.shape[0], bool)
    pair_valid = valid[:, None] & valid[None, :]
    logits = jnp.where(pair_valid, logits, _MASKED_LOGIT)
    diag = jnp.diagonal(logits)
    row_log_softmax = diag - jax.nn.logsumexp(logits, axis=1)
    col_log_softmax = diag - jax.nn.logsumexp(logits, axis=0)
    count = jnp.maximum(jnp.sum(valid), 1).astype(logits.dtype)
    loss_rows = -jnp.sum(jnp.where(valid, row_log_softmax, 0.0)) / count
    loss_cols = -jnp.sum(jnp.where(valid, col_log_softmax, 0.0)) / count
    return loss_rows + loss_cols


def contrastive_objective(embeddings: Mapping[str, jax.Array], nonempty: Mapping[str, jax.Array],
                          pair_weights: Mapping[str, float],
                          temperature: float, precision: str = "highest",
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted NormSoftmax over modality pairs.

    embeddings: modality name ('text', 'video', 'audio') -> (B, D) joint embeddings.
    nonempty: modality name -> (B,) bool, False where the clip has no input of that modality.
    pair_weights: pair name ('tv', 'ta', 'va') -> weight; pairs with weight 0 are skipped.
    precision: of the similarity matmuls (their logits are divided by a temperature of 0.05).

    Returns (sum_p w_p L_p / sum_p w_p, {pair name: L_p}).
    """
    losses = {}
    weighted_sum = 0.0
    weight_sum = 0.0
    for name, (first, second) in CONTRASTIVE_PAIRS.items():
        weight = pair_weights.get(name, 0.0)
        if weight == 0:
            continue
        valid = nonempty[first] & nonempty[second]
        sims = cosine_similarity_matrix(embeddings[first], embeddings[second], precision=precision)
        losses[name] = norm_softmax_loss(sims, temperature, valid)
        weighted_sum = weighted_sum + weight * losses[name]
        weight_sum += weight
    if weight_sum == 0:
        raise ValueError(f"contrastive_objective: no pair has a non-zero weight in {dict(pair_weights)}.")
    return weighted_sum / weight_sum, losses


# ---------------------------------------------------------------------------------------------
# The full objective.

# A similarity of the batch: (space, modality of the embedding, modality of the anchors).
# The 12 Multi-SK problems of a step, one per similarity: input space sim(x_m, Z_m), joint space
# sim(y^_x, Z^_a) for every embedding x and anchors a; each with its queue and its anchors.
SK_PROBLEMS = tuple(
    [(f"in_{m}", ("input", m, m), f"input_anchors_{m}") for m in MODALITIES]
    + [(f"out_{x}", ("joint", x, a), f"joint_anchors_{a}") for x in MODALITIES for a in MODALITIES])


def similarity(outputs: ModelOutputs, key: tuple[str, str, str]) -> jax.Array:
    """The batch similarity `key` = (space, embedding modality, anchor modality)."""
    space, modality, anchors = key
    return outputs[modality].similarity(space, anchors)


def consistency_weights(text_video: float, audio: float) -> dict[str, float]:
    """Weights of the 18 terms c_loss_i_j (i = 1..6, j = 1..3; 1 text, 2 video, 3 audio):
    `audio` for any term involving audio, `text_video` otherwise (the paper: 1.0 and 0.1)."""
    weights = {}
    for i in range(1, 7):
        for j in range(1, 4):
            involves_audio = (i - 1) % 3 == 2 or j == 3
            weights[f"c_loss_{i}_{j}"] = audio if involves_audio else text_video
    return weights


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Settings of the full objective (hashable, so it can be a static jit argument); built from
    the configuration's `objective` block (`from_config`), which holds every value."""

    pair_weights: tuple[tuple[str, float], ...]  # sorted by name
    contrastive_temperature: float
    consistency: bool  # False: the EAO per-modality baseline (contrastive only)
    consistency_weights: tuple[tuple[str, float], ...]
    consistency_temperature: float  # tau of the consistency cost
    queue_len: int
    sinkhorn_eps: float
    sinkhorn_iters: int
    required_fraction: float
    sinkhorn_problems_at_once: int | None  # None: all of a step's problems together
    contrastive_scale: float   # the original's alpha_closs
    consistency_scale: float   # the original's beta_loss
    # Of the similarity matmuls (contrastive logits, queue-anchor similarities): "highest" keeps
    # them float32 on accelerators (model.matmul_precision).
    matmul_precision: str = "highest"
    consistency_cost: str = "original"  # CONSISTENCY_COSTS

    @classmethod
    def from_config(cls, objective: Any) -> "ObjectiveConfig":
        """From the `objective` block of a configs/ file (an ml_collections ConfigDict)."""
        return cls(
            pair_weights=tuple(sorted(dict(objective.pair_weights).items())),
            contrastive_temperature=objective.contrastive_temperature,
            consistency=objective.consistency,
            consistency_weights=tuple(sorted(dict(objective.consistency_weights).items())),
            consistency_temperature=objective.consistency_temperature,
            queue_len=objective.queue_len,
            sinkhorn_eps=objective.sinkhorn.eps,
            sinkhorn_iters=objective.sinkhorn.num_iters,
            required_fraction=objective.sinkhorn.required_fraction,
            sinkhorn_problems_at_once=objective.sinkhorn.problems_at_once,
            contrastive_scale=objective.contrastive_scale,
            consistency_scale=objective.consistency_scale,
            matmul_precision=objective.get("matmul_precision", "highest"),
            consistency_cost=objective.get("consistency_cost", "original"))


def multisk_targets(outputs: ModelOutputs, params: Mapping[str, Any], queues: FeatureQueues,
                    config: ObjectiveConfig) -> tuple[dict[tuple, jax.Array], sinkhorn.MultiSKResult]:
    """Solves the 12 Multi-SK problems of a step in one call on their stack.

    Problem p stacks [queue_p x current anchors_p ; batch similarities_p] and its target's last
    B rows belong to the batch. Returns ({similarity key: (B, K) target}, a result whose
    `iterations` and `marginal_error` hold one entry per problem; its `target` is None).
    """
    batch = outputs.batch_size
    solve = functools.partial(sinkhorn.multi_sinkhorn, eps=config.sinkhorn_eps,
                              num_iters=config.sinkhorn_iters, required_fraction=config.required_fraction,
                              last_rows=batch, problems_at_once=config.sinkhorn_problems_at_once)
    # Problems with the same anchor count (all 12 in the paper) are stacked into one call.
    by_count: dict[int, list] = {}
    for problem in SK_PROBLEMS:
        by_count.setdefault(params[problem[2]].shape[0], []).append(problem)
    targets, results = {}, []
    for problems in by_count.values():
        scores = []
        for queue, key, anchors in problems:
            queue_scores = anchor_similarity(queues.features[queue], params[anchors], config.matmul_precision)
            scores.append(jnp.concatenate([queue_scores, similarity(outputs, key).astype(queue_scores.dtype)], axis=0))
        result = solve(jnp.stack(scores))
        targets.update({key: result.target[p] for p, (_, key, _) in enumerate(problems)})
        results.append(result)
    result = sinkhorn.MultiSKResult(
        target=None, iterations=jnp.concatenate([r.iterations for r in results]),
        marginal_error=jnp.concatenate([r.marginal_error for r in results]))
    return targets, result


def consistency_terms(outputs: ModelOutputs, targets: Mapping[tuple, jax.Array],
                      config: ObjectiveConfig, cost=consistency_cost) -> dict[str, jax.Array]:
    """The 18 weighted consistency terms `loss_pair_i_j` (1 text, 2 video, 3 audio):

    i <= 3: L(sim(x_i, Z_i), P(sim(y^_j, Z^_i)))      -- input space guided by the joint space
    i > 3:  L(sim(y^_i', Z^_j), P(sim(x_j, Z_j)))     -- joint space guided by the input space

    `cost` is L (`consistency_floor` gives each term's floor instead).
    """
    weights = dict(config.consistency_weights)
    terms = {}
    for i, mi in enumerate(MODALITIES, start=1):
        for j, mj in enumerate(MODALITIES, start=1):
            pairs = ((i, ("input", mi, mi), ("joint", mj, mi)),
                     (3 + i, ("joint", mi, mj), ("input", mj, mj)))
            for row, guided, target in pairs:
                weight = weights.get(f"c_loss_{row}_{j}", 0.0)
                value = cost(similarity(outputs, guided), targets[target], config.consistency_temperature,
                             config.consistency_cost)
                terms[f"loss_pair_{row}_{j}"] = weight * value
    return dict(sorted(terms.items()))


def multisk_loss(outputs: ModelOutputs, params: Mapping[str, Any], queues: FeatureQueues | None,
                 config: ObjectiveConfig) -> tuple[jax.Array, dict[str, jax.Array], FeatureQueues | None]:
    """The full objective of one step.

    outputs: the model's outputs for the batch; params: the model parameters (for the anchors);
    queues: the feature queues before this step (None when the consistency loss is off).
    Returns (total, metrics, queues after this step). Metrics: `tv`, `ta`, `va`, `contrastive`
    (weighted L_con, times contrastive_scale), `loss_pair_i_j` (weighted), `consistency` (their
    sum times consistency_scale, 0 during warm-up),
    `loss` (the total), and the Multi-SK iterations and marginal error.
    """
    embeddings = {m: outputs[m].joint_embedding for m in MODALITIES}
    nonempty = {m: outputs[m].nonempty for m in MODALITIES}
    contrastive, pair_losses = contrastive_objective(embeddings, nonempty, dict(config.pair_weights),
                                                     config.contrastive_temperature, config.matmul_precision)
    metrics = dict(pair_losses)
    contrastive = config.contrastive_scale * contrastive
    metrics["contrastive"] = contrastive
    total = contrastive
    if config.consistency:
        if queues is None:
            raise ValueError("multisk_loss: the consistency loss needs the feature queues.")
        targets, result = multisk_targets(outputs, params, queues, config)
        on = queues.is_full.astype(contrastive.dtype)  # warm-up: off until the queue was filled
        terms = {name: on * value for name, value in consistency_terms(outputs, targets, config).items()}
        metrics.update(terms)
        metrics["consistency"] = config.consistency_scale * sum(terms.values())
        metrics["consistency_on"] = on
        metrics["sinkhorn_iterations"] = jnp.max(result.iterations)
        metrics["sinkhorn_marginal_error"] = jnp.max(result.marginal_error)
        total = total + metrics["consistency"]
        queues = queues.push(outputs)
    metrics["loss"] = total
    return total, metrics, queues
