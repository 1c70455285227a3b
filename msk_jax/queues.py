"""Feature queues: FIFO memories of past embeddings that enlarge every Multi-SK problem.

Six queues of `queue_len` rows: input-space embeddings x_t, x_v, x_a (`in_*`) and L2-normalised
joint embeddings y^_t, y^_v, y^_a (`out_*`). They start as uniform [0, 1) noise, as in the
original. Each step the oldest B rows are dropped and the batch is appended at the end.

`fill` is the original's `queue_size`: it grows by B per step while it is below `queue_len`;
the consistency loss is on only at steps that *begin* with fill >= queue_len, i.e. from the
step after the queue has been filled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from msk_jax.model import MODALITIES, ModelOutputs

# Queue name (the original's) -> (space, modality) of the embedding it stores.
QUEUES = {**{f"in_{m}": ("input", m) for m in MODALITIES}, **{f"out_{m}": ("joint", m) for m in MODALITIES}}
QUEUE_NAMES = tuple(QUEUES)


class FeatureQueues(struct.PyTreeNode):
    features: dict[str, jax.Array]
    fill: jax.Array  # int32 scalar

    @classmethod
    def create(cls, rng: jax.Array, queue_len: int, embed_dim: int, projection_dim: int,
               fill: int = 0) -> "FeatureQueues":
        keys = jax.random.split(rng, len(QUEUE_NAMES))
        features = {
            name: jax.random.uniform(key, (queue_len, embed_dim if QUEUES[name][0] == "input" else projection_dim))
            for name, key in zip(QUEUE_NAMES, keys)
        }
        return cls(features=features, fill=jnp.asarray(fill, jnp.int32))

    @property
    def length(self) -> int:
        return self.features["in_text"].shape[0]

    @property
    def is_full(self) -> jax.Array:
        """Whether this step's consistency loss is on (fill reached queue_len before the step)."""
        return self.fill >= self.length

    def push(self, outputs: ModelOutputs) -> "FeatureQueues":
        """Drops the oldest B rows of every queue and appends the batch (no gradient)."""
        features = {}
        for name, queue in self.features.items():
            space, modality = QUEUES[name]
            batch = jax.lax.stop_gradient(outputs[modality].queued(space)).astype(queue.dtype)
            b = batch.shape[0]
            if b > queue.shape[0]:
                raise ValueError(f"queue '{name}': batch of {b} rows is larger than the queue ({queue.shape[0]}).")
            features[name] = jnp.concatenate([queue[b:], batch], axis=0)
        fill = jnp.where(self.fill < self.length, self.fill + outputs.batch_size, self.fill)
        return self.replace(features=features, fill=fill)
