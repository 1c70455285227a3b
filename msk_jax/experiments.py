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

import io
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
    flags.DEFINE_enum("analyse", "auto", ["auto", "yes", "no"], "Measure every run's anchor semantics and "
                      "consistency diagnostics (auto: on the demo corpus, whose captions name each clip's digits).")
    flags.DEFINE_string("plot_field", None, "Plot R@10 against this grid field into plot.png (default: the first "
                        "numeric grid field with several values).")
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
    lines = ["| setting | seeds | set | direction | " + " | ".join(f"{m} mean (sd) [95 % CI]" for m in METRICS) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    for label, members in _groups(runs).items():
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


ANALYSES = ("training", "anchors", "geometry", "diagnostics")
TRAINING_TAIL = 5  # logged steps averaged for the end-of-training losses


def training_losses(folder: str) -> dict[str, float]:
    """The run's losses at the end of training (mean of its last TRAINING_TAIL logged steps):
    `contrastive`, `tv`, and `consistency_unscaled`, the sum of the 18 weighted consistency
    terms before consistency_scale (logged even when the scale is 0; 0 with the loss off)."""
    from msk_jax import metric_writers

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
    from msk_jax import anchor_semantics, consistency_diagnostics

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


def summarise_wide(runs: Sequence[Mapping], directions: Sequence[str] = ("t2v", "t2v+a"), metric: str = "R10") -> str:
    """Markdown: one row per setting, one column per evaluation set and direction, each cell
    `metric` as mean (sd) and the half-width of its 95 % interval over seeds."""
    groups = _groups(runs)
    columns = [(d, t) for d in runs[0]["metrics"] for t in directions if t in runs[0]["metrics"][d]]
    lines = ["| setting | seeds | " + " | ".join(f"{d} {t} {metric}" for d, t in columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for label, members in groups.items():
        cells = []
        for d, t in columns:
            mean, sd, half = interval([r["metrics"][d][t][metric] for r in members])
            cells.append(f"{mean:.1f} ({sd:.1f}) ±{half:.1f}" if len(members) > 1 else f"{mean:.1f}")
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_grid(config, workdir: str, grid: Mapping[str, Sequence], seeds: Sequence[int],
             directions: Sequence[str] = ("t2v", "t2v+a"), train_fn=None, analyse_fn=None) -> list[dict]:
    """Trains every (setting, seed) not yet finished under `workdir`; returns every run's
    {'overrides', 'seed', 'metrics'} (plus what `analyse_fn(config, folder, done)` returns for the
    ANALYSES a run lacks, finished runs included) and writes summary.json and summary.md."""
    if train_fn is None:
        from msk_jax import train
        train_fn = train.train_and_evaluate
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
        runs.append(run)
        storage.write_atomic(storage.join(workdir, "summary.json"), json.dumps({"runs": runs}, indent=1))
        storage.write_atomic(storage.join(workdir, "summary.md"), "\n".join(
            part for part in (summarise_wide(runs, directions), summarise(runs, directions), summarise_training(runs),
                              summarise_anchors(runs), summarise_geometry(runs), summarise_diagnostics(runs)) if part))
    return runs


def _label(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(base config)"


def _groups(runs: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    groups: dict[str, list[Mapping]] = {}
    for run in runs:
        groups.setdefault(_label(run["overrides"]), []).append(run)
    return groups


def summarise_anchors(runs: Sequence[Mapping]) -> str:
    """Markdown: per setting and evaluation set, the mean over seeds of the anchors' NMI with
    "digit present" per modality/space, learned anchors vs random anchors; '' without analyses."""
    runs = [r for r in runs if "anchors" in r]
    if not runs:
        return ""
    keys = list(next(iter(runs[0]["anchors"].values())))
    lines = ["| setting | set | " + " | ".join(keys) + " |", "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for label, members in _groups(runs).items():
        for dataset in members[0]["anchors"]:
            cells = []
            for key in keys:
                rows = [r["anchors"][dataset][key] for r in members]
                cells.append(f"{np.mean([x['nmi_present'] for x in rows]):.3f} / "
                             f"{np.mean([x['random_nmi_present'] for x in rows]):.3f} / "
                             f"{np.mean([x['chance_present'] for x in rows]):.3f}")
            lines.append(f"| {label} | {dataset} | " + " | ".join(cells) + " |")
    return ("NMI of the assigned anchor with \"digit d occurs\" (mean over digits and seeds): "
            "learned anchors / random anchors / shuffled labels\n\n" + "\n".join(lines) + "\n")


def summarise_geometry(runs: Sequence[Mapping]) -> str:
    """Markdown: per setting and evaluation set, the mean over seeds of the joint embeddings'
    effective rank and mean pairwise cosine per modality; '' without any."""
    runs = [r for r in runs if "geometry" in r]
    if not runs:
        return ""
    modalities = [k.removesuffix("_effective_rank") for k in next(iter(runs[0]["geometry"].values()))
                  if k.endswith("_effective_rank")]
    lines = ["| setting | set | " + " | ".join(f"{m} eff. rank (mean cos)" for m in modalities) + " |",
             "| --- | --- | " + " | ".join("---" for _ in modalities) + " |"]
    for label, members in _groups(runs).items():
        for dataset in members[0]["geometry"]:
            cells = [f"{np.mean([r['geometry'][dataset][f'{m}_effective_rank'] for r in members]):.1f} "
                     f"({np.mean([r['geometry'][dataset][f'{m}_mean_cosine'] for r in members]):.3f})"
                     for m in modalities]
            lines.append(f"| {label} | {dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise_training(runs: Sequence[Mapping]) -> str:
    """Markdown: per setting, the mean over seeds of the end-of-training losses; '' without any."""
    runs = [r for r in runs if "training" in r]
    if not runs:
        return ""
    keys = ("contrastive", "tv", "consistency_unscaled")
    lines = ["| setting | " + " | ".join(f"final {k}" for k in keys) + " |", "| --- | " + " | ".join("---" for _ in keys) + " |"]
    for label, members in _groups(runs).items():
        lines.append(f"| {label} | " + " | ".join(f"{np.mean([r['training'][k] for r in members]):.3f}" for k in keys)
                     + " |")
    return "\n".join(lines) + "\n"


DIAGNOSTICS = ("consistency_to_contrastive_encoders", "encoder_grad_cosine", "target_entropy", "anchors_per_clip",
               "targets_below_half")


def summarise_diagnostics(runs: Sequence[Mapping]) -> str:
    """Markdown: per setting, the mean over seeds of the consistency diagnostics; '' without any."""
    runs = [r for r in runs if "diagnostics" in r]
    if not runs:
        return ""
    lines = ["| setting | " + " | ".join(DIAGNOSTICS) + " |", "| --- | " + " | ".join("---" for _ in DIAGNOSTICS) + " |"]
    for label, members in _groups(runs).items():
        lines.append(f"| {label} | " + " | ".join(f"{np.mean([r['diagnostics'][k] for r in members]):.3f}"
                                                  for k in DIAGNOSTICS) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[Mapping], field: str, path: str, directions: Sequence[str] = ("t2v", "t2v+a"),
         metric: str = "R10") -> None:
    """`metric` against the values of `field` (mean and 95 % interval over seeds), one panel per
    evaluation set; where the field's value 0 is among them (e.g. consistency_scale=0, the
    baseline) its mean +- sd is drawn as a band across the panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if field in r["overrides"]]
    values = sorted({r["overrides"][field] for r in runs})
    datasets = list(runs[0]["metrics"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for direction, color in zip(directions, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            stats = [interval([r["metrics"][dataset][direction][metric] for r in runs if r["overrides"][field] == v])
                     for v in values]
            shown = [(v, s) for v, s in zip(values, stats) if v != 0] if 0 in values else list(zip(values, stats))
            ax.errorbar([v for v, _ in shown], [s[0] for _, s in shown], yerr=[np.nan_to_num(s[2]) for _, s in shown],
                        marker="o", capsize=3, color=color, label=direction)
            if 0 in values:
                mean, sd, _ = stats[values.index(0)]
                ax.axhspan(mean - np.nan_to_num(sd), mean + np.nan_to_num(sd), color=color, alpha=0.15)
                ax.axhline(mean, color=color, linestyle="--", linewidth=1, label=f"{direction}, {field.split('.')[-1]}=0")
        ax.set_xscale("log" if all(v > 0 for v, _ in shown) and len(shown) > 2 else "linear")
        ax.set_xlabel(field)
        ax.set_ylabel(f"{metric} (mean, 95 % interval over seeds)")
        ax.set_title(dataset)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    storage.write_atomic(path, buffer.getvalue())


def plot_field(grid: Mapping[str, Sequence]) -> str | None:
    """The first grid field with several numeric values."""
    for field, values in grid.items():
        if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return field
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # library INFO chatter (checkpoint restores) off the terminal
    try:
        grid = parse_grid(FLAGS.grid)
        field = FLAGS.plot_field or plot_field(grid)
        if field and field not in grid:
            raise ValueError(f"--plot_field={field} is not a --grid field.")
        wanted = FLAGS.analyse == "yes" or (FLAGS.analyse == "auto" and FLAGS.config.data.source == "demo")
        runs = run_grid(FLAGS.config, FLAGS.workdir, grid, [int(s) for s in FLAGS.seeds], FLAGS.directions,
                        analyse_fn=analyse if wanted else None)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if field:
        try:
            plot(runs, field, storage.join(FLAGS.workdir, "plot.png"), FLAGS.directions)
            print(f"plot: {storage.join(FLAGS.workdir, 'plot.png')}", flush=True)
        except ImportError:
            print("no plot: matplotlib is not installed (pip install -r requirements-dev.txt)", flush=True)
    print(storage.read_bytes(storage.join(FLAGS.workdir, "summary.md")).decode(), flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
