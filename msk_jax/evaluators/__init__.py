"""Evaluators, one module per evaluation (as big_vision keeps them): `retrieval` (zero-shot
retrieval in every direction, `msk_jax.evaluators.embedding`) and `classification` (zero-shot
classification of videos by their class names).

Which evaluators run, on which data and how often during training is configuration:
`config.evals.<name>` with `kind` (retrieval or classification), `sets` (the `config.data`
fields of its data, comma-separated) and `every_steps` (0: `config.eval_every_steps`; < 0: only
at the end of training). `msk_jax.data_sources.build_evaluation_sets` builds the sets of every
configured evaluator, one dict {set name: set}; `build` gives the evaluators that own them.

Each evaluator's `run` gives {set name: metrics}; `table`, `scalars` and `write` turn them into
the printed table, TensorBoard scalars and its own JSON file (plus pictures) under `eval/`:

- training: `step_<N>.json` for the evaluator named `retrieval` (its name since before there
  were several), `step_<N>-<evaluator>.json` for the others;
- `msk_jax.evaluate`: `step_<N>-<weights>-<sets>.json` for `retrieval`,
  `step_<N>-<weights>-<evaluator>-<sets>.json` for the others.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from msk_jax import data_sources, storage

RETRIEVAL = "retrieval"  # the evaluator whose files keep the names they had before evaluators


class Evaluator:
    """One configured evaluation: its name (the `config.evals` key), sets and period."""

    kind = ""

    def __init__(self, name: str, sets: Mapping[str, Any], every_steps: int):
        self.name, self.sets, self.every_steps = name, dict(sets), every_steps

    def due(self, step: int) -> bool:
        """Whether it runs at training step `step` (before the last; it always runs at the end)."""
        return self.every_steps > 0 and step % self.every_steps == 0

    def run(self, model, variables, batch_size: int, sharding=None) -> dict[str, dict]:
        raise NotImplementedError

    def table(self, results: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def scalars(self, results: Mapping[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def write(self, results: Mapping[str, Any], output_dir: str, step: int, weights: str | None = None) -> list[str]:
        """Writes the JSON (and what else the evaluator draws) and returns the paths."""
        raise NotImplementedError

    def result_path(self, output_dir: str, step: int, weights: str | None = None) -> str:
        return result_path(output_dir, step, self.name, list(self.sets), weights)


def result_path(output_dir: str, step: int, evaluator: str, sets: Sequence[str], weights: str | None = None,
                suffix: str = ".json") -> str:
    """`<output_dir>/eval/<file>` (see the module's docstring): training's files when `weights` is
    None, else the evaluate binary's, named by weights and sets."""
    tag = "" if evaluator == RETRIEVAL else f"-{evaluator}"
    if weights is None:
        name = f"step_{step}{tag}"
    else:
        name = f"step_{step}-{weights}{tag}-{'+'.join(sets)}"
    return storage.join(output_dir, "eval", name + suffix)


def _kinds() -> dict[str, type]:
    from msk_jax.evaluators.classification import ClassificationEvaluator
    from msk_jax.evaluators.retrieval import RetrievalEvaluator

    return {RetrievalEvaluator.kind: RetrievalEvaluator, ClassificationEvaluator.kind: ClassificationEvaluator}


def build(config, sets: Mapping[str, Any], names: Sequence[str] | None = None) -> list[Evaluator]:
    """The configured evaluators (those of `names` only, when given) that have a set in `sets`
    (the output of `data_sources.build_evaluation_sets`), each with its own sets, in the
    configuration's order."""
    kinds = _kinds()
    out = []
    for entry in data_sources.evaluator_entries(config, names):
        own = {name: sets[name] for name in entry.set_names if name in sets}
        if own:
            every = config.eval_every_steps if entry.every_steps == 0 else entry.every_steps
            out.append(kinds[entry.kind](entry.name, own, every))
    return out


def due(evaluators: Sequence[Evaluator], step: int, final: bool) -> list[Evaluator]:
    """Those that run at `step`: all of them at the end of training (`final`)."""
    return list(evaluators) if final else [e for e in evaluators if e.due(step)]


def run(evaluators: Sequence[Evaluator], model, variables, batch_size: int, sharding=None) -> dict[str, dict]:
    """{evaluator name: {set name: metrics}}."""
    return {e.name: e.run(model, variables, batch_size, sharding=sharding) for e in evaluators}


def retrieval_results(evaluators: Sequence[Evaluator], results: Mapping[str, dict]) -> dict:
    """The retrieval evaluators' results as one {set name: {direction: metrics}}: what
    `train.train_and_evaluate` and `msk_jax.evaluate.run` return (the other evaluators' results
    are in their files)."""
    merged = {}
    for e in evaluators:
        if e.kind == RETRIEVAL and e.name in results:
            merged.update(results[e.name])
    return merged


def report(evaluators: Sequence[Evaluator], results: Mapping[str, dict], output_dir: str, step: int, writer,
           weights: str | None = None) -> list[str]:
    """Prints each evaluator's table, writes its files and its TensorBoard scalars (through
    `writer`); returns the paths written."""
    paths, scalars = [], {}
    for e in evaluators:
        if e.name not in results:
            continue
        print(e.table(results[e.name]), flush=True)
        paths += e.write(results[e.name], output_dir, step, weights)
        scalars.update(e.scalars(results[e.name]))
    writer.write_scalars(step, scalars)
    return paths
