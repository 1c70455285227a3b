"""The Multi-SK objective: its terms as pure functions, and their sum.

- :func:`consistency_cost`: the anchor consistency cost, BCE-with-logits of exp(s / 0.1) against
  a Multi-SK target (the logits are exponentiated, exactly as in the original).
- :func:`norm_softmax_loss`: the symmetric NormSoftmax (InfoNCE) loss over a cosine similarity
  matrix, restricted to the clips where both modalities are non-empty -- by masking, so every
  shape is static under jit.
- :func:`contrastive_objective`: the weighted combination of the text-video, text-audio and
  video-audio pairs, L_con = sum_p w_p L_p / sum_p w_p.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

CONSISTENCY_TEMPERATURE = 0.1
CONTRASTIVE_TEMPERATURE = 0.05
COSINE_EPS = 1e-8

# Pair name -> (first modality, second modality), in the original's order.
CONTRASTIVE_PAIRS = {"tv": ("text", "video"), "ta": ("text", "audio"), "va": ("video", "audio")}

_MASKED_LOGIT = -1e9  # finite, so masked rows and their gradients stay finite


def consistency_cost(similarity: jax.Array, target: jax.Array,
                     temperature: float = CONSISTENCY_TEMPERATURE) -> jax.Array:
    """mean(BCE_with_logits(logits=exp(similarity / temperature), target)) over all entries.

    similarity: (B, K) cosine similarities of embeddings to anchors (carries the gradient).
    target: (B, K) Multi-SK target in [0, 1] (treated as a constant).
    """
    x = jnp.exp(similarity / temperature)
    y = jax.lax.stop_gradient(target).astype(x.dtype)
    # Stable BCE with logits: max(x, 0) - x y + log(1 + exp(-|x|)).
    per_entry = jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.mean(per_entry)


def l2_normalize(x: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
    """x / max(||x||, eps) along the last axis (the original's `sim_matrix` normalisation)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


def cosine_similarity_matrix(a: jax.Array, b: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
    """(Na, Nb) cosine similarities between the rows of a and of b."""
    return l2_normalize(a, eps) @ l2_normalize(b, eps).T


def norm_softmax_loss(similarity: jax.Array, valid: jax.Array | None = None,
                      temperature: float = CONTRASTIVE_TEMPERATURE) -> jax.Array:
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
                          temperature: float = CONTRASTIVE_TEMPERATURE,
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted NormSoftmax over modality pairs.

    embeddings: modality name ('text', 'video', 'audio') -> (B, D) joint embeddings.
    nonempty: modality name -> (B,) bool, False where the clip has no input of that modality.
    pair_weights: pair name ('tv', 'ta', 'va') -> weight; pairs with weight 0 are skipped.

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
        sims = cosine_similarity_matrix(embeddings[first], embeddings[second])
        losses[name] = norm_softmax_loss(sims, valid, temperature)
        weighted_sum = weighted_sum + weight * losses[name]
        weight_sum += weight
    if weight_sum == 0:
        raise ValueError(f"contrastive_objective: no pair has a non-zero weight in {dict(pair_weights)}.")
    return weighted_sum / weight_sum, losses
