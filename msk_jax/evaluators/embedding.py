"""Zero-shot retrieval evaluation: embed an evaluation set, rank, report every direction.

Directions, as the original reports them: t2v, v2t, t2a, a2t, v2a, a2v and the fused
t2v+a, v+a2t, v2t+a, t+a2v, a2t+v, t+v2a, where x+y is the mean of the L2-normalised x and y
embeddings; similarities are cosine. Clips sharing an id are averaged first (ids then sorted,
as the original's `np.unique`). Recalls are over the set's complete dataset size.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from msk_jax import retrieval
from msk_jax.data import batch as batch_spec
from msk_jax.data.eval_sets import EvalSet
from msk_jax.data.model_inputs import l2_normalize_rows
from msk_jax.sharding import to_host

SHORT = {"text": "t", "video": "v", "audio": "a"}
DIRECTIONS = ("t2v", "v2t", "t2a", "a2t", "v2a", "a2v",
              "t2v+a", "v+a2t", "v2t+a", "t+a2v", "a2t+v", "t+v2a")
REPORTED = ("R1", "R5", "R10", "R50", "MedR", "MeanR")


def _embed(model, variables, batch):
    out = model.apply(variables, batch, train=False)
    return {m: out[m].joint_embedding.astype(jnp.float32) for m in SHORT}


_embed_batch = jax.jit(_embed, static_argnums=0)


@functools.lru_cache(maxsize=8)
def _sharded_embed_batch(model, mesh):
    """`_embed_batch` with its embeddings gathered on every device of `mesh` (replicated), so
    each process reads the whole batch's embeddings while each device embedded its slice."""
    return jax.jit(_embed, static_argnums=0, out_shardings=NamedSharding(mesh, P()))


def batch_shards(sharding) -> int:
    """Into how many slices a batch sharding splits the batch axis."""
    size = len(sharding.device_set)
    return len({index[0].start for index in sharding.devices_indices_map((size,)).values()})


def embed(model, variables: Mapping[str, Any], eval_set: EvalSet, batch_size: int = 64,
          sharding=None) -> dict[str, np.ndarray]:
    """Joint embeddings {'text', 'video', 'audio'} -> (N, D) of an evaluation set (BatchNorm in
    evaluation mode). The last batch is padded to `batch_size` (one compiled shape).

    With a batch `sharding` (training's `sharding.batch_sharding(mesh)`), each device embeds its
    slice of every batch (`batch_size` is rounded up to a multiple of the slices) and the
    embeddings are gathered; every process passes the whole evaluation set and gets all of its
    embeddings. Without one, the batch runs on the default device."""
    n = len(eval_set)
    if sharding is not None:
        shards = batch_shards(sharding)
        batch_size = -(-batch_size // shards) * shards
        embed_batch = functools.partial(_sharded_embed_batch(model, sharding.mesh), model)
    else:
        embed_batch = functools.partial(_embed_batch, model)
    chunks = {m: [] for m in SHORT}
    for start in range(0, n, batch_size):
        batch = {k: eval_set.batch[k][start:start + batch_size] for k in batch_spec.KEYS}
        real = len(batch["video"])
        if real < batch_size:
            batch = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        if sharding is not None:  # every process holds the whole batch: each places its devices' slices
            batch = {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
                     for k, v in batch.items()}
        out = to_host(embed_batch(variables, batch))
        for m in SHORT:
            chunks[m].append(out[m][:real])
    return {m: np.concatenate(chunks[m]) for m in SHORT}


def average_by_id(ids: list[str], embeddings: dict[str, np.ndarray]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Averages the embeddings of clips that share an id (the original's `average_embeddings`)."""
    unique, inverse = np.unique(np.asarray(ids), return_inverse=True)
    if len(unique) == len(ids):
        return list(ids), embeddings
    counts = np.bincount(inverse).astype(np.float64)[:, None]
    averaged = {}
    for name, x in embeddings.items():
        total = np.zeros((len(unique), x.shape[1]), np.float64)
        np.add.at(total, inverse, x)
        averaged[name] = (total / counts).astype(x.dtype)
    return [str(u) for u in unique], averaged


def direction_embeddings(embeddings: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Single (t, v, a) and fused (v+a, t+a, t+v) embeddings."""
    single = {SHORT[m]: embeddings[m] for m in SHORT}
    fused = {f"{x}+{y}": (l2_normalize_rows(single[x]) + l2_normalize_rows(single[y])) / 2
             for x, y in (("v", "a"), ("t", "a"), ("t", "v"))}
    return {**single, **fused}


def retrieval_results(embeddings: dict[str, np.ndarray], complete_dataset_size: int | None) -> dict[str, dict]:
    """{direction: metrics} for every direction of DIRECTIONS."""
    emb = direction_embeddings(embeddings)
    results = {}
    for direction in DIRECTIONS:
        query, item = direction.split("2")
        sims = l2_normalize_rows(emb[query]) @ l2_normalize_rows(emb[item]).T
        metrics = retrieval.retrieval_metrics(sims, complete_dataset_size)
        results[direction] = {k: float(metrics[k]) for k in REPORTED}
    return results


def evaluate(model, variables: Mapping[str, Any], eval_sets: Mapping[str, EvalSet], batch_size: int = 64,
             sharding=None) -> dict[str, dict[str, dict[str, float]]]:
    """{dataset name: {direction: {R1, R5, R10, R50, MedR, MeanR}}}."""
    results = {}
    for name, eval_set in eval_sets.items():
        embeddings = embed(model, variables, eval_set, batch_size, sharding)
        _, embeddings = average_by_id(eval_set.ids, embeddings)
        results[name] = retrieval_results(embeddings, eval_set.complete_dataset_size)
    return results


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    lines = []
    for name, directions in results.items():
        lines.append(f"{name}")
        lines.append(f"  {'direction':<8}" + "".join(f"{k:>8}" for k in REPORTED))
        for direction, m in directions.items():
            lines.append(f"  {direction:<8}" + "".join(f"{m[k]:>8.1f}" for k in REPORTED))
    return "\n".join(lines)


def scalars(results: Mapping) -> dict[str, float]:
    """Flat names for metric writers: '<dataset>/<direction>/<metric>'."""
    return {f"{name}/{direction}/{k}": v for name, directions in results.items()
            for direction, m in directions.items() for k, v in m.items()}
