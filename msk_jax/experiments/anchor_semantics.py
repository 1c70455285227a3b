"""Anchor semantics: how much a trained model's anchors say about what a clip contains.

The paper claims that the anchor consistency objective learns semantically meaningful anchors.
On the demo corpus the content of every evaluation clip is known: its caption is the digit
string it shows and speaks ("three one four"). Each clip is assigned, per modality and space, to
the anchor it is most similar to (argmax of sim(x_m, Z_m), the input space, or of
sim(y^_m, Z^_m), the joint space), and the normalised mutual information (NMI)
between that anchor and the clip's content measures how much the anchors know:

- `nmi_first`: NMI between the anchor and the string's first digit (10 classes);
- `nmi_present`: the mean over the ten digits of NMI between the anchor and "digit d occurs";
- `chance_*`: the same with the labels shuffled (mean of 20 permutations): NMI is biased upwards
  on 200 clips, so this is the level of an anchor that knows nothing;
- `random_*`: the same embeddings assigned to fresh random anchors (the initialiser's N(0, 1)
  draws): what the embedding's own structure gives without learned anchors;
- `anchors_used` and `perplexity` (exp of the entropy of the anchors' usage): a collapsed
  assignment uses few anchors.

The baseline (consistency loss off) trains no anchor at all: its anchors are their
initialisation, a built-in control for the Multi-SK model's.

    python -m msk_jax.experiments.anchor_semantics --config=configs/howto.py:demo --checkpoint=/tmp/msk_demo
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msk_jax import checkpoints, storage
from msk_jax.checkpoint_reader import restore_for_evaluation
from msk_jax.data import batch as batch_spec
from msk_jax.data.eval_sets import EvalSet
from msk_jax.demo.corpus import DIGIT_WORDS
from msk_jax.errors import DataError
from msk_jax.model import MODALITIES
from msk_jax.sharding import to_host

SPACES = ("input", "joint")
ANCHOR_PARAMS = {"input": "input_anchors_{m}", "joint": "joint_anchors_{m}"}
SHUFFLES = 20


def digit_labels(captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(first digit (N,), digit present (N, 10) bool) of digit-word captions; a caption without a
    digit word is a ValueError naming it."""
    index = {w: d for d, w in enumerate(DIGIT_WORDS)}
    first, present = np.zeros(len(captions), np.int64), np.zeros((len(captions), 10), bool)
    for i, caption in enumerate(captions):
        digits = [index[w] for w in caption.lower().split() if w in index]
        if not digits:
            raise ValueError(f"caption {i} '{caption}' holds no digit word: anchor semantics needs the demo corpus.")
        first[i] = digits[0]
        present[i, digits] = True
    return first, present


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information: I(a; b) over the arithmetic mean of the entropies, with
    scikit-learn's limits (1 when neither labelling splits the data, 0 without information);
    `sklearn.metrics.normalized_mutual_info_score`'s default, computed from one contingency
    table (it is called thousands of times per run)."""
    _, x = np.unique(a, return_inverse=True)
    _, y = np.unique(b, return_inverse=True)
    nx, ny = int(x.max()) + 1, int(y.max()) + 1
    if nx == ny == 1:
        return 1.0
    joint = np.bincount(x * ny + y, minlength=nx * ny).reshape(nx, ny) / len(x)
    px, py = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mi = float((joint[nonzero] * np.log(joint[nonzero] / np.outer(px, py)[nonzero])).sum())
    if mi <= 0:
        return 0.0
    hx, hy = -float((px * np.log(px)).sum()), -float((py * np.log(py)).sum())
    return mi / max((hx + hy) / 2, np.finfo(np.float64).eps)


def content_nmi(anchor: np.ndarray, first: np.ndarray, present: np.ndarray) -> tuple[float, float]:
    """(NMI with the first digit, mean over digits of NMI with "digit present")."""
    return nmi(anchor, first), float(np.mean([nmi(anchor, present[:, d]) for d in range(present.shape[1])]))


def usage(anchor: np.ndarray) -> tuple[int, float]:
    """(number of distinct anchors used, perplexity of their usage)."""
    _, counts = np.unique(anchor, return_counts=True)
    p = counts / counts.sum()
    return int(len(counts)), float(np.exp(-(p * np.log(p)).sum()))


def describe(anchor: np.ndarray, first: np.ndarray, present: np.ndarray, rng: np.random.Generator) -> dict:
    """The measures of one assignment (see the module docstring), chance level included."""
    nmi_first, nmi_present = content_nmi(anchor, first, present)
    chance = np.array([content_nmi(anchor, first[p], present[p])
                       for p in (rng.permutation(len(anchor)) for _ in range(SHUFFLES))])
    used, perplexity = usage(anchor)
    return {"nmi_first": nmi_first, "nmi_present": nmi_present, "chance_first": float(chance[:, 0].mean()),
            "chance_present": float(chance[:, 1].mean()), "anchors_used": used, "perplexity": perplexity}


@functools.partial(jax.jit, static_argnames=("model",))
def _similarities(model, variables, batch):
    out = model.apply(variables, batch, train=False)
    return {(m, space): out[m].similarity(space, m) for m in MODALITIES for space in SPACES}


def anchor_similarities(model, variables: Mapping[str, Any], eval_set: EvalSet,
                        batch_size: int = 64) -> dict[tuple[str, str], np.ndarray]:
    """{(modality, space): (N, K) cosine similarities of the clips to that modality's anchors}."""
    chunks: dict[tuple[str, str], list] = {}
    for start in range(0, len(eval_set), batch_size):
        batch = {k: eval_set.batch[k][start:start + batch_size] for k in batch_spec.KEYS}
        real = len(batch["video"])
        batch = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        for key, value in to_host(_similarities(model, variables, batch)).items():
            chunks.setdefault(key, []).append(value[:real])
    return {key: np.concatenate(parts) for key, parts in chunks.items()}


def with_random_anchors(variables: Mapping[str, Any], seed: int) -> dict:
    """The variables with every anchor replaced by fresh N(0, 1) draws (the initialiser's law)."""
    params = dict(variables["params"])
    keys = jax.random.split(jax.random.PRNGKey(seed), len(MODALITIES) * len(ANCHOR_PARAMS))
    names = [name.format(m=m) for m in MODALITIES for name in ANCHOR_PARAMS.values()]
    for key, name in zip(keys, names):
        params[name] = jax.random.normal(key, jnp.shape(params[name]), jnp.asarray(params[name]).dtype)
    return {**variables, "params": params}


def measure(model, variables: Mapping[str, Any], eval_sets: Mapping[str, EvalSet], seed: int = 0,
            batch_size: int = 64) -> dict:
    """{set: {"modality/space": describe(...) + random_nmi_first/random_nmi_present}} for every
    evaluation set (whose captions must be digit words)."""
    rng = np.random.default_rng(seed)
    random_variables = with_random_anchors(variables, seed)
    results = {}
    for name, eval_set in eval_sets.items():
        first, present = digit_labels(eval_set.raw_text)
        trained = anchor_similarities(model, variables, eval_set, batch_size)
        random = anchor_similarities(model, random_variables, eval_set, batch_size)
        results[name] = {}
        for (m, space), similarity in trained.items():
            row = describe(similarity.argmax(axis=1), first, present, rng)
            row["random_nmi_first"], row["random_nmi_present"] = content_nmi(
                random[(m, space)].argmax(axis=1), first, present)
            results[name][f"{m}/{space}"] = row
    return results


def digit_heatmap(anchor: np.ndarray, present: np.ndarray, num_anchors: int) -> tuple[np.ndarray, np.ndarray]:
    """(P(digit d occurs | anchor k) as (K, 10), clips per anchor (K,)); rows of unused anchors are 0."""
    counts = np.bincount(anchor, minlength=num_anchors)
    sums = np.zeros((num_anchors, present.shape[1]))
    np.add.at(sums, anchor, present.astype(np.float64))
    return sums / np.maximum(counts, 1)[:, None], counts


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    lines = ["| set | modality/space | NMI first digit (chance, random anchors) | NMI digit present "
             "(chance, random anchors) | anchors used (perplexity) |", "| --- | --- | --- | --- | --- |"]
    for name, rows in results.items():
        for key, r in rows.items():
            lines.append(f"| {name} | {key} | {r['nmi_first']:.3f} ({r['chance_first']:.3f}, {r['random_nmi_first']:.3f})"
                         f" | {r['nmi_present']:.3f} ({r['chance_present']:.3f}, {r['random_nmi_present']:.3f})"
                         f" | {r['anchors_used']} ({r['perplexity']:.1f}) |")
    return "\n".join(lines) + "\n"


def measure_run(config, checkpoint: str, weights: str = "ema", seed: int = 0) -> dict:
    """Anchor semantics of a training run's latest checkpoint on the configured evaluation sets."""
    model, variables, eval_sets = restore_for_evaluation(config, checkpoint, weights)
    return measure(model, variables, eval_sets, seed, config.eval_batch_size)


def main(argv):
    from absl import app, logging


    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        results = measure_run(FLAGS.config, FLAGS.checkpoint, FLAGS.weights)
    except (checkpoints.CheckpointError, FileNotFoundError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(format_table(results), flush=True)
    if FLAGS.output:
        storage.write_atomic(FLAGS.output, json.dumps(results, indent=1))
        print(f"written to {FLAGS.output}", flush=True)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "The configuration the checkpoint was trained with.")
    flags.DEFINE_string("checkpoint", None, "Training workdir, its checkpoints/ folder, or a step folder.")
    flags.DEFINE_enum("weights", "ema", ["ema", "online"], "Which weights to measure.")
    flags.DEFINE_string("output", None, "Also write the results as JSON here.")
    flags.mark_flags_as_required(["config", "checkpoint"])
    from msk_jax import configs

    sys.argv = configs.resolve_argv(sys.argv)
    app.run(main)
