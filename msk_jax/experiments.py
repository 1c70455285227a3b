"""Experiment runner: trains a grid of config overrides x seeds and tabulates their retrieval.

    python -m msk_jax.experiments --config=configs/howto.py:demo --workdir=/tmp/ablation \\
        --grid=objective.consistency_scale=0,0.1,1 --grid=model.num_anchors=8,16 --seeds=0,1,2

Each run (one point of the grid's cartesian product, one seed) trains in its own folder under
`--workdir` and leaves `results.json` there when it has finished; a run with that file is
skipped, one without it resumes from its checkpoints, so the command can be restarted after an
interruption. The summary (`summary.json`: every run's overrides, seed and final metrics, and
`summary.md`: mean, standard deviation and 95 % interval over seeds of R@1/R@5/R@10 per setting,
evaluation set and direction) is written to `--workdir` after every run.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from msk_jax import storage

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program: importing this module next
    to `msk_jax.evaluate`, whose `--config` is another flag, must not clash)."""
    config_flags.DEFINE_config_file("config", None, "Base configuration (a configs/*.py[:variant]).",
                                    lock_config=False)
    flags.DEFINE_string("workdir", None, "Folder of the runs and the summary (resumable).")
    flags.DEFINE_multi_string("grid", [], "FIELD=V1,V2,... a config field and its values (repeat for more fields).")
    flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed) of every setting.")
    flags.DEFINE_list("directions", ["t2v", "t2v+a"], "Directions tabulated in summary.md.")
    flags.mark_flags_as_required(["config", "workdir"])

METRICS = ("R1", "R5", "R10")


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


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, sample standard deviation, half-width of the 95 % t interval) of the values."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    from scipy import stats

    sd = float(values.std(ddof=1))
    return mean, sd, float(stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values)))


def summarise(runs: Sequence[Mapping], directions: Sequence[str]) -> str:
    """Markdown: one row per setting, evaluation set and direction, mean (sd) and 95 % interval."""
    groups: dict[str, list[Mapping]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run["overrides"], sort_keys=True), []).append(run)
    lines = ["| setting | seeds | set | direction | " + " | ".join(f"{m} mean (sd) [95 % CI]" for m in METRICS) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    for key, members in groups.items():
        label = ", ".join(f"{k}={v}" for k, v in json.loads(key).items()) or "(base config)"
        for dataset in members[0]["metrics"]:
            for direction in directions:
                if direction not in members[0]["metrics"][dataset]:
                    continue
                cells = []
                for metric in METRICS:
                    mean, sd, half = interval([r["metrics"][dataset][direction][metric] for r in members])
                    cells.append(f"{mean:.1f} ({sd:.1f}) [{mean - half:.1f}, {mean + half:.1f}]" if len(members) > 1
                                 else f"{mean:.1f}")
                lines.append(f"| {label} | {len(members)} | {dataset} | {direction} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_grid(config, workdir: str, grid: Mapping[str, Sequence], seeds: Sequence[int],
             directions: Sequence[str] = ("t2v", "t2v+a"), train_fn=None) -> list[dict]:
    """Trains every (setting, seed) not yet finished under `workdir`; returns every run's
    {'overrides', 'seed', 'metrics'} and writes summary.json and summary.md."""
    if train_fn is None:
        from msk_jax import train
        train_fn = train.train_and_evaluate
    runs, todo = [], [(o, s) for o in settings(grid) for s in seeds]
    for overrides, seed in todo:  # every setting checked before any training
        apply_overrides(config, overrides, seed)
    for number, (overrides, seed) in enumerate(todo, 1):
        folder = storage.join(workdir, run_name(overrides, seed))
        result_path = storage.join(folder, "results.json")
        if storage.exists(result_path):
            run = json.loads(storage.read_bytes(result_path))
            print(f"[{number}/{len(todo)}] {run_name(overrides, seed)}: finished before, skipped", flush=True)
        else:
            print(f"[{number}/{len(todo)}] {run_name(overrides, seed)}: training in {folder}", flush=True)
            metrics = train_fn(apply_overrides(config, overrides, seed), folder)
            if not metrics:
                raise RuntimeError(f"run {folder} gave no evaluation results (no evaluation sets configured?)")
            run = {"overrides": dict(overrides), "seed": int(seed), "metrics": metrics}
            storage.write_atomic(result_path, json.dumps(run, indent=1))
        runs.append(run)
        storage.write_atomic(storage.join(workdir, "summary.json"), json.dumps({"runs": runs}, indent=1))
        storage.write_atomic(storage.join(workdir, "summary.md"), summarise(runs, directions))
    return runs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        grid = parse_grid(FLAGS.grid)
        runs = run_grid(FLAGS.config, FLAGS.workdir, grid, [int(s) for s in FLAGS.seeds], FLAGS.directions)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(summarise(runs, FLAGS.directions), flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
