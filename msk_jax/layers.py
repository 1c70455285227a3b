"""Building blocks of the Multi-SK model, with the original implementation's exact semantics.

- :class:`GatedEmbeddingUnit`: Linear, then context gating ``x * sigmoid(Linear(x))``.
- :class:`BatchNorm`: batch statistics in training (biased variance for normalising, unbiased
  for the running estimate, momentum 0.1), running statistics in evaluation.
- :class:`TransformerBlock`: one pre-LayerNorm block (multi-head self-attention with a key
  padding mask, then a GELU MLP), both with residual connections.
- :func:`masked_mean`: the token average ``sum(x * mask) / (sum(mask) + 1e-5)``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LAYER_NORM_EPS = 1e-6
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1  # weight of the new batch in the running statistics
MASKED_MEAN_EPS = 1e-5


def torch_linear_init(fan_in: int):
    """PyTorch's default Linear initialisation: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


VIT_INIT = nn.initializers.normal(0.02)
"""Transformer weights and tokens: N(0, 0.02) (timm's truncation at +-2 never binds at this std)."""


def torch_dense(features: int, fan_in: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    init = torch_linear_init(fan_in)
    return nn.Dense(features, use_bias=use_bias, kernel_init=init, bias_init=init, dtype=dtype, name=name)


def vit_dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, kernel_init=VIT_INIT, bias_init=nn.initializers.zeros, dtype=dtype, name=name)


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


class GatedEmbeddingUnit(nn.Module):
    """Linear(in -> features) followed by context gating (no activation)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = torch_dense(self.features, x.shape[-1], "fc", self.dtype)(x)
        gate = torch_dense(self.features, self.features, "gate", self.dtype)(x)
        return x * jax.nn.sigmoid(gate)


class BatchNorm(nn.Module):
    """BatchNorm over every axis but the last (channels), with PyTorch's semantics.

    Training: normalise with the batch mean and biased variance; update the running mean and
    the running *unbiased* variance with momentum 0.1. Evaluation: use the running statistics.
    Statistics live in the 'batch_stats' collection and are kept in float32.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if train:
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if not self.is_initializing():
                count = x.size // channels
                unbiased = var * count / max(count - 1, 1)
                running_mean.value = (1 - BATCH_NORM_MOMENTUM) * running_mean.value + BATCH_NORM_MOMENTUM * mean
                running_var.value = (1 - BATCH_NORM_MOMENTUM) * running_var.value + BATCH_NORM_MOMENTUM * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) * scale + bias
        return y.astype(self.dtype)


def masked_mean(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Average of the tokens (B, T, D) where mask (B, T) is 1: sum / (count + 1e-5)."""
    mask = mask.astype(tokens.dtype)[..., None]
    return jnp.sum(tokens * mask, axis=1) / (jnp.sum(mask, axis=1) + MASKED_MEAN_EPS)


class SelfAttention(nn.Module):
    """Multi-head self-attention; keys where mask == 0 are ignored. qkv has a bias."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = vit_dense(3 * dim, "qkv", self.dtype)(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim ** -0.5)
        key_valid = (mask != 0)[:, None, None, :]
        logits = jnp.where(key_valid, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, dim)
        return vit_dense(dim, "proj", self.dtype)(out)


class Mlp(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = vit_dense(self.hidden, "fc1", self.dtype)(x)
        h = jax.nn.gelu(h, approximate=False)
        return vit_dense(x.shape[-1], "fc2", self.dtype)(h)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

    num_heads: int
    mlp_ratio: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        x = x + SelfAttention(self.num_heads, self.dtype, name="attn")(layer_norm("norm1", self.dtype)(x), mask)
        hidden = int(x.shape[-1] * self.mlp_ratio)
        return x + Mlp(hidden, self.dtype, name="mlp")(layer_norm("norm2", self.dtype)(x))
