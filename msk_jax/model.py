"""The Multi-SK model (the original's `TransformerPerModalityModel2`).

Per modality m in (text, video, audio):
  tokens    = LayerNorm(GatedEmbeddingUnit(features))     (audio: DAVEnet-v2 tokens first)
  empty     : a clip whose mask is all zero gets the masking token in slot 0 (mask 1)
  x_m       = l2norm(masked_mean(tokens))                  input-space embedding
  y_m       = GatedEmbeddingUnit(masked_mean(Transformer_m(tokens)))   joint embedding
Anchors: `input_anchors_m` (K, embed_dim) and `joint_anchors_m` (K, projection_dim), used with
L2-normalised rows. Similarities: sim(x_m, Z_m) for each m (3) and sim(y^_j, Z^_i) for every
pair (9), where y^ = l2norm(y).

The outputs are a `ModelOutputs`: one `ModalityOutputs` per modality, indexed by field
(`outputs["video"].joint_similarity["text"]` is sim(y^_v, Z^_t)); `original_names()` gives
the original's flat names (`in_{m}_embed`, `trans_{m}_a{n}_assignment`, ...) for comparisons
with its numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from msk_jax.davenet import DAVEnet
from msk_jax.layers import VIT_INIT, Dtype, GatedEmbeddingUnit, TransformerBlock, layer_norm, masked_mean

MODALITIES = ("text", "video", "audio")
L2_EPS = 1e-12  # torch.nn.functional.normalize


@struct.dataclass
class ModalityOutputs:
    """What the model computes for one modality m of a batch of B clips."""

    input_embedding: jax.Array    # x_m (B, embed_dim), L2-normalised (the original's in_{m}_embed)
    joint_embedding: jax.Array    # y_m (B, projection_dim), float32 ({m}_embed)
    joint_normalized: jax.Array   # y^_m = l2norm(y_m) ({m}_embed_norm)
    nonempty: jax.Array           # (B,) bool: the clip has some input of m ({m}_nonempty_input_mask)
    input_similarity: jax.Array   # sim(x_m, Z_m) (B, K_m) (in_{m}_assignment)
    joint_similarity: dict[str, jax.Array]  # n -> sim(y^_m, Z^_n) (B, K_n) (trans_{m}_a{n}_assignment)

    def similarity(self, space: str, anchors: str) -> jax.Array:
        """sim to the anchors of modality `anchors` in `space` ("input": only m's own anchors)."""
        if space == "input":
            return self.input_similarity
        return self.joint_similarity[anchors]

    def queued(self, space: str) -> jax.Array:
        """The embedding the feature queue of `space` stores: x_m ("input") or y^_m ("joint")."""
        return self.input_embedding if space == "input" else self.joint_normalized


@struct.dataclass
class ModelOutputs:
    """The model's outputs, one `ModalityOutputs` per modality (a pytree: jit returns it)."""

    text: ModalityOutputs
    video: ModalityOutputs
    audio: ModalityOutputs

    def __getitem__(self, modality: str) -> ModalityOutputs:
        if modality not in MODALITIES:
            raise KeyError(f"no modality '{modality}'; the model has {MODALITIES}")
        return getattr(self, modality)

    @property
    def batch_size(self) -> int:
        return self.text.input_similarity.shape[0]

    def original_names(self) -> dict[str, jax.Array]:
        """The outputs under the original implementation's names."""
        out = {}
        for m in MODALITIES:
            o = self[m]
            out.update({f"in_{m}_embed": o.input_embedding, f"{m}_embed": o.joint_embedding,
                        f"{m}_embed_norm": o.joint_normalized, f"{m}_nonempty_input_mask": o.nonempty,
                        f"in_{m}_assignment": o.input_similarity})
            out.update({f"trans_{m}_a{n}_assignment": o.joint_similarity[n] for n in MODALITIES})
        return out


def l2_normalize(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
              "default": jax.lax.Precision.DEFAULT}


def matmul_precision(name: str) -> jax.lax.Precision:
    """`config.objective.matmul_precision` -> the precision of the objective's similarity
    matmuls: "highest" (float32: 6 bf16 passes on TPU, no TF32 on GPUs), "high" (3 passes) or
    "default" (one bf16 pass on TPU, TF32 on Ampere and newer)."""
    if name not in PRECISIONS:
        raise ValueError(f"objective.matmul_precision must be one of {sorted(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def anchor_similarity(embeddings: jax.Array, anchors: jax.Array, precision: str = "highest") -> jax.Array:
    """Cosine-style similarity of (already normalised) embeddings to L2-normalised anchor rows."""
    return jnp.matmul(embeddings, l2_normalize(anchors.astype(embeddings.dtype)).T,
                      precision=matmul_precision(precision))


def anchor_counts(num_anchors: int | Sequence[int]) -> dict[str, int]:
    """Anchors per modality (the same in the input and the joint space)."""
    if isinstance(num_anchors, int):
        return {m: num_anchors for m in MODALITIES}
    if len(num_anchors) != len(MODALITIES):
        raise ValueError(f"num_anchors: one count or one per modality {MODALITIES}, got {num_anchors}.")
    return dict(zip(MODALITIES, (int(k) for k in num_anchors)))


def pool_audio_mask(mask: jax.Array, num_tokens: int) -> jax.Array:
    """Max-pools the (B, frames) frame mask to the token rate, as the original does
    (window ceil(frames / tokens), stride the same)."""
    frames = mask.shape[1]
    window = math.ceil(frames / num_tokens)
    if frames // window != num_tokens:
        raise ValueError(f"audio: {frames} frames give {num_tokens} tokens but a pooled mask of "
                         f"{frames // window}; use a frame count divisible by the DAVEnet stride.")
    return mask[:, : num_tokens * window].reshape(mask.shape[0], num_tokens, window).max(axis=-1)


# config.model.remat: what the backward pass recomputes instead of keeping from the forward pass.
#   "none":  nothing (fastest, most memory);
#   "block": each transformer block and DAVEnet residual block (keeps only the blocks' inputs);
#   "full":  DAVEnet and each modality's transformer whole (keeps only their inputs and outputs).
# The parameters, their names and the computed values are the same in every setting.
REMAT = ("none", "block", "full")


class ModalityTransformer(nn.Module):
    """`depth` transformer blocks; output is the masked mean of the tokens."""

    depth: int
    num_heads: int
    mlp_ratio: float
    dtype: Dtype = jnp.float32
    remat_blocks: bool = False  # recompute each block in the backward pass (model.remat)

    @nn.compact
    def __call__(self, tokens, mask):
        block = nn.remat(TransformerBlock) if self.remat_blocks else TransformerBlock
        for i in range(self.depth):
            tokens = block(self.num_heads, self.mlp_ratio, self.dtype, name=f"block_{i}")(tokens, mask)
        return masked_mean(tokens, mask)


class MultiSKModel(nn.Module):
    """Video-audio-text embedding model with input-space and joint-space anchors."""

    # Every width and count comes from the configuration (configs/howto.py: `config.model`).
    video_dim: int
    text_dim: int
    audio_feat_dim: int
    davenet_layers: Sequence[int]
    davenet_widths: Sequence[int]
    davenet_kernel: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    depth: int
    projection_dim: int
    num_anchors: int | Sequence[int]  # one count, or (text, video, audio)
    dtype: Dtype = jnp.float32  # compute dtype; parameters stay float32
    # Of the anchor similarities (Multi-SK's input): config.objective.matmul_precision.
    similarity_precision: str = "highest"
    remat: str = "none"  # REMAT: what the backward pass recomputes

    def _encoder(self, module_class, static_argnums=()):
        """`module_class`, recomputed whole in the backward pass when remat is "full"."""
        if self.remat not in REMAT:
            raise ValueError(f"model.remat must be one of {REMAT}, got {self.remat!r}")
        return nn.remat(module_class, static_argnums=static_argnums) if self.remat == "full" else module_class

    def _tokens(self, name: str, features, mask, masking_token):
        """Token projection + LayerNorm, then the masking token for empty clips."""
        x = GatedEmbeddingUnit(self.embed_dim, self.dtype, name=f"{name}_token_proj")(features)
        x = layer_norm(f"{name}_norm", self.dtype)(x)
        nonempty = jnp.sum(mask, axis=-1) != 0
        first = jnp.where(nonempty[:, None], x[:, 0], masking_token.astype(x.dtype)[None])
        x = x.at[:, 0].set(first)
        mask = mask.at[:, 0].set(jnp.where(nonempty, mask[:, 0], jnp.ones_like(mask[:, 0])))
        return x, mask, nonempty

    @classmethod
    def from_config(cls, config) -> "MultiSKModel":
        """The model of `config.model` (the whole run configuration is passed)."""
        fields = dict(config.model)
        fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
        for key in ("davenet_layers", "davenet_widths"):
            fields[key] = tuple(fields[key])
        if isinstance(fields["num_anchors"], (list, tuple)):
            fields["num_anchors"] = tuple(fields["num_anchors"])
        fields["similarity_precision"] = config.objective.get("matmul_precision", "highest")
        return cls(**fields)

    @nn.compact
    def __call__(self, batch, train: bool = False):
        """batch: video (B, Tv, video_dim) + video_mask (B, Tv); text (B, Tt, text_dim) +
        text_mask (B, Tt); audio (B, bins, frames) log-mel + audio_mask (B, frames)."""
        masking_token = self.param("masking_token", VIT_INIT, (self.embed_dim,))
        blocks = self.remat == "block"
        davenet = self._encoder(DAVEnet, static_argnums=(2,))(
            self.davenet_layers, self.davenet_widths, self.davenet_kernel, self.dtype, blocks, name="davenet")
        audio = davenet(jnp.swapaxes(jnp.asarray(batch["audio"], self.dtype), 1, 2), train)
        inputs = {
            "text": (batch["text"], batch["text_mask"]),
            "video": (batch["video"], batch["video_mask"]),
            "audio": (audio, pool_audio_mask(jnp.asarray(batch["audio_mask"]), audio.shape[1])),
        }
        encoded = {}
        for m in MODALITIES:
            features, mask = inputs[m]
            tokens, mask, nonempty = self._tokens(m, jnp.asarray(features, self.dtype),
                                                  jnp.asarray(mask, jnp.float32), masking_token)
            pooled = self._encoder(ModalityTransformer)(self.depth, self.num_heads, self.mlp_ratio, self.dtype,
                                                        blocks, name=f"{m}_transformer")(tokens, mask)
            joint = GatedEmbeddingUnit(self.projection_dim, self.dtype, name=f"{m}_proj")(pooled)
            joint = joint.astype(jnp.float32)  # the objective runs in float32
            encoded[m] = dict(input_embedding=l2_normalize(masked_mean(tokens, mask).astype(jnp.float32)),
                              joint_embedding=joint, joint_normalized=l2_normalize(joint), nonempty=nonempty)

        normal = nn.initializers.normal(1.0)
        counts = anchor_counts(self.num_anchors)
        input_anchors = {m: self.param(f"input_anchors_{m}", normal, (counts[m], self.embed_dim))
                         for m in MODALITIES}
        joint_anchors = {m: self.param(f"joint_anchors_{m}", normal, (counts[m], self.projection_dim))
                         for m in MODALITIES}
        return ModelOutputs(**{m: ModalityOutputs(
            **encoded[m],
            input_similarity=anchor_similarity(encoded[m]["input_embedding"], input_anchors[m], self.similarity_precision),
            joint_similarity={n: anchor_similarity(encoded[m]["joint_normalized"], joint_anchors[n],
                                                   self.similarity_precision) for n in MODALITIES})
            for m in MODALITIES})
