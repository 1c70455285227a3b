"""The runner: trains a grid of config overrides x seeds, one folder per run, resumable.

Each run (one point of the grid's cartesian product, one seed) trains in its own folder under
the work folder and leaves `results.json` there when it has finished; a run with that file is
skipped, one without it resumes from its checkpoints. After every run the summary
(`summary.json` and `summary.md`, see `report`) is rewritten.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from msk_jax import metric_writers, storage, train
from msk_jax.experiments import anchor_semantics, consistency_diagnostics
from msk_jax.experiments.report import (summarise, summarise_anchors, summarise_diagnostics, summarise_geometry,
                                        summarise_training, summarise_wide)


def parse_value(text: str) -> Any:
    """A grid value: JSON (numbers, true/false, lists, quoted strings) or else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_grid(specs: Iterable[str]) -> dict[str, list]:
    """['field=v1,v2', ...] -> {field: [v1, v2]} (field order kept)."""
    grid: dict[str, list] = {}
    for spec in specs:
        field, sep, values = spec.partition("=")
        if not sep or not field or not values:
            raise ValueError(f"--grid '{spec}': expected FIELD=V1,V2,...")
        grid[field.strip()] = [parse_value(v.strip()) for v in values.split(",")]
    return grid


def settings(grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as {field: value}."""
    fields = list(grid)
    return [dict(zip(fields, values)) for values in itertools.product(*(grid[f] for f in fields))] or [{}]


def run_name(overrides: Mapping[str, Any], seed: int) -> str:
    parts = [f"{field.split('.')[-1]}={value}" for field, value in overrides.items()]
    return "_".join(parts + [f"seed={seed}"]).replace("/", "-").replace(" ", "")


def apply_overrides(config, overrides: Mapping[str, Any], seed: int):
    """A copy of `config` with the overrides (dotted fields) and the seed set; unknown fields and
    values of the wrong type are ValueErrors naming the field."""
    config = config.copy_and_resolve_references()
    for field, value in {**overrides, "seed": seed}.items():
        *parents, leaf = field.split(".")
        target = config
        for name in parents + [leaf]:
            if name not in target:
                raise ValueError(f"--grid field '{field}': the config has no '{name}'.")
            if name != leaf:
                target = target[name]
        try:
            target[leaf] = value
        except TypeError as err:
            raise ValueError(f"--grid field '{field}': {err}") from err
    return config


ANALYSES = ("training", "anchors", "geometry", "diagnostics")
TRAINING_TAIL = 5  # logged steps averaged for the end-of-training losses


def training_losses(folder: str) -> dict[str, float]:
    """The run's losses at the end of training (mean of its last TRAINING_TAIL logged steps):
    `contrastive`, `tv`, and `consistency_unscaled`, the sum of the 18 weighted consistency
    terms before consistency_scale (logged even when the scale is 0; 0 with the loss off)."""
    rows = [r for r in metric_writers.read_jsonl(storage.join(folder, "metrics.jsonl")) if "contrastive" in r]
    if not rows:
        raise ValueError(f"{folder}/metrics.jsonl has no logged training step.")
    tail = rows[-TRAINING_TAIL:]
    terms = [sum(v for k, v in r.items() if k.startswith("loss_pair_")) for r in tail]
    return {"contrastive": float(np.mean([r["contrastive"] for r in tail])), "tv": float(np.mean([r["tv"] for r in tail])),
            "consistency_unscaled": float(np.mean(terms)), "steps": [int(tail[0]["step"]), int(tail[-1]["step"])]}


def analyse(config, folder: str, done: Sequence[str] = ()) -> dict:
    """A finished run's anchor semantics (`anchor_semantics`), the geometry of its embeddings and,
    when the consistency loss is on, its diagnostics (`consistency_diagnostics`); those in `done`
    are skipped. Anchor semantics needs digit-word captions (the demo corpus)."""
    out = {}
    if "training" not in done:
        out["training"] = training_losses(folder)
    if "anchors" not in done:
        out["anchors"] = anchor_semantics.measure_run(config, folder)
    if "geometry" not in done:
        out["geometry"] = consistency_diagnostics.geometry_run(config, folder)
    if "diagnostics" not in done and config.objective.consistency:
        out["diagnostics"] = consistency_diagnostics.diagnose_run(config, folder)
    return out


def run_grid(config, workdir: str, grid: Mapping[str, Sequence], seeds: Sequence[int],
             directions: Sequence[str] = ("t2v", "t2v+a"), train_fn=None, analyse_fn=None) -> list[dict]:
    """Trains every (setting, seed) not yet finished under `workdir`; returns every run's
    {'overrides', 'seed', 'metrics'} (plus what `analyse_fn(config, folder, done)` returns for the
    ANALYSES a run lacks, finished runs included) and writes summary.json and summary.md."""
    train_fn = train_fn or train.train_and_evaluate
    runs, todo = [], [(o, s) for o in settings(grid) for s in seeds]
    for overrides, seed in todo:  # every setting checked before any training
        apply_overrides(config, overrides, seed)
    for number, (overrides, seed) in enumerate(todo, 1):
        folder = storage.join(workdir, run_name(overrides, seed))
        result_path = storage.join(folder, "results.json")
        run_config = apply_overrides(config, overrides, seed)
        if storage.exists(result_path):
            run = json.loads(storage.read_bytes(result_path))
            print(f"[{number}/{len(todo)}] {run_name(overrides, seed)}: finished before, skipped", flush=True)
        else:
            print(f"[{number}/{len(todo)}] {run_name(overrides, seed)}: training in {folder}", flush=True)
            metrics = train_fn(run_config, folder)
            if not metrics:
                raise RuntimeError(f"run {folder} gave no evaluation results (no evaluation sets configured?)")
            run = {"overrides": dict(overrides), "seed": int(seed), "metrics": metrics}
            storage.write_atomic(result_path, json.dumps(run, indent=1))
        missing = [a for a in ANALYSES if a not in run and (a != "diagnostics" or run_config.objective.consistency)]
        if analyse_fn is not None and missing:
            print(f"[{number}/{len(todo)}] {run_name(overrides, seed)}: measuring {', '.join(missing)}", flush=True)
            run.update(analyse_fn(run_config, folder, done=[a for a in ANALYSES if a in run]))
            storage.write_atomic(result_path, json.dumps(run, indent=1))
        train.release_compiled_programs()  # the run's and its analyses' programs serve no later run
        runs.append(run)
        storage.write_atomic(storage.join(workdir, "summary.json"), json.dumps({"runs": runs}, indent=1))
        storage.write_atomic(storage.join(workdir, "summary.md"), "\n".join(
            part for part in (summarise_wide(runs, directions), summarise(runs, directions), summarise_training(runs),
                              summarise_anchors(runs), summarise_geometry(runs), summarise_diagnostics(runs)) if part))
    return runs


def plot_field(grid: Mapping[str, Sequence]) -> str | None:
    """The first grid field with several numeric values."""
    for field, values in grid.items():
        if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return field
    return None
