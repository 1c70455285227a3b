"""The runner's report: the summary tables (`summary.md`) and the plot (`plot.png`) of a grid's runs.

`summary.md` holds, per setting, the mean, standard deviation and 95 % interval over seeds of
R@1/R@5/R@10 per evaluation set and direction, then (where the runs were analysed) the
end-of-training losses, the anchors' semantics, the embeddings' geometry and the consistency
diagnostics. A run is {'overrides', 'seed', 'metrics', ...} as `runner.run_grid` returns it.

`paired_differences` and `plot_series` compare runs with a baseline among them, seed by seed
(`python -m msk_jax.experiments.compare` for runs of several grids).
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

from msk_jax import storage

METRICS = ("R1", "R5", "R10")


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


def _label(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(base config)"


def _is(run: Mapping, overrides: Mapping[str, Any]) -> bool:
    """Whether the run's overrides are exactly these (a baseline's, say)."""
    return dict(run["overrides"]) == dict(overrides)


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


DIAGNOSTICS = ("consistency_value", "consistency_floor", "consistency_to_contrastive_encoders", "encoder_grad_cosine",
               "target_entropy", "anchors_per_clip", "targets_below_half")


def summarise_diagnostics(runs: Sequence[Mapping]) -> str:
    """Markdown: per setting, the mean over seeds of the consistency diagnostics ('-' where the
    runs were measured before a diagnostic existed); '' without any."""
    runs = [r for r in runs if "diagnostics" in r]
    if not runs:
        return ""
    lines = ["| setting | " + " | ".join(DIAGNOSTICS) + " |", "| --- | " + " | ".join("---" for _ in DIAGNOSTICS) + " |"]
    for label, members in _groups(runs).items():
        cells = []
        for k in DIAGNOSTICS:
            values = [r["diagnostics"][k] for r in members if k in r["diagnostics"]]
            cells.append(f"{np.mean(values):.3f}" if len(values) == len(members) else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_differences(runs: Sequence[Mapping], baseline: Mapping[str, Any], dataset: str, direction: str,
                       metric: str = "R10") -> dict[str, dict[str, Any]]:
    """Per setting other than the baseline (the runs whose overrides are `baseline`): its
    `metric` minus the baseline's on the same seed, for every seed both have, with the mean and
    the 95 % t interval of those paired differences ({'seeds', 'differences', 'mean', 'low',
    'high'}). Pairing by seed removes what the seed does to both (the data order, the
    initialisation) from the comparison."""
    base = {r["seed"]: r["metrics"][dataset][direction][metric] for r in runs if _is(r, baseline)}
    if not base:
        raise ValueError(f"no run has the baseline's overrides {dict(baseline)}.")
    out = {}
    for label, members in _groups([r for r in runs if not _is(r, baseline)]).items():
        pairs = sorted((r["seed"], r["metrics"][dataset][direction][metric] - base[r["seed"]])
                       for r in members if r["seed"] in base)
        if not pairs:
            continue
        mean, _, half = interval([d for _, d in pairs])
        out[label] = {"seeds": [s for s, _ in pairs], "differences": [d for _, d in pairs], "mean": mean,
                      "low": mean - half, "high": mean + half}
    return out


def summarise_paired(runs: Sequence[Mapping], baseline: Mapping[str, Any], directions: Sequence[str] = ("t2v",),
                     metric: str = "R10") -> str:
    """Markdown: per setting, evaluation set and direction, `paired_differences` against the
    baseline: each seed's difference, their mean and 95 % interval, and whether the interval
    excludes zero."""
    lines = [f"{metric} minus the baseline's ({_label(baseline)}) on the same seed\n",
             "| setting | set | direction | per seed | mean [95 % CI] | interval |", "| --- | --- | --- | --- | --- | --- |"]
    for dataset in runs[0]["metrics"]:
        for direction in directions:
            if direction not in runs[0]["metrics"][dataset]:
                continue
            for label, d in paired_differences(runs, baseline, dataset, direction, metric).items():
                seeds = ", ".join(f"{x:+.1f}" for x in d["differences"])
                verdict = ("above 0" if d["low"] > 0 else "below 0" if d["high"] < 0
                           else "includes 0" if np.isfinite(d["low"]) else "one seed")
                lines.append(f"| {label} | {dataset} | {direction} | {seeds} | {d['mean']:+.1f} "
                             f"[{d['low']:+.1f}, {d['high']:+.1f}] | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[Mapping], field: str, path: str, directions: Sequence[str] = ("t2v", "t2v+a"),
         metric: str = "R10") -> None:
    """`metric` against the values of `field` (mean and 95 % interval over seeds), one panel per
    evaluation set; where the field's value 0 is among them (e.g. consistency_scale=0, the
    baseline) its mean +- sd is drawn as a band across the panel."""
    runs = [r for r in runs if field in r["overrides"]]
    values = sorted({r["overrides"][field] for r in runs})
    datasets = list(runs[0]["metrics"])
    plt, fig, axes = _panels(len(datasets))
    for ax, dataset in zip(axes, datasets):
        for direction, color in zip(directions, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            stats = [interval([r["metrics"][dataset][direction][metric] for r in runs if r["overrides"][field] == v])
                     for v in values]
            shown = [(v, s) for v, s in zip(values, stats) if v != 0] if 0 in values else list(zip(values, stats))
            ax.errorbar([v for v, _ in shown], [s[0] for _, s in shown], yerr=[np.nan_to_num(s[2]) for _, s in shown],
                        marker="o", capsize=3, color=color, label=direction)
            if 0 in values:
                _band(ax, stats[values.index(0)], color, f"{direction}, {field.split('.')[-1]}=0", alpha=0.15)
        ax.set_xscale("log" if all(v > 0 for v, _ in shown) and len(shown) > 2 else "linear")
        ax.set_ylabel(f"{metric} (mean, 95 % interval over seeds)")
        _finish_panel(ax, field, dataset)
    _save(plt, fig, path)


def _panels(n: int):
    """(pyplot, figure, its n panels side by side), drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    return plt, fig, axes[0]


def _band(ax, stats: tuple[float, float, float], color: str, label: str, alpha: float) -> None:
    """A reference's mean (dashed) and mean +- sd (shaded) across the panel; stats from `interval`."""
    mean, sd, _ = stats
    ax.axhspan(mean - np.nan_to_num(sd), mean + np.nan_to_num(sd), color=color, alpha=alpha)
    ax.axhline(mean, color=color, linestyle="--", linewidth=1, label=label)


def _finish_panel(ax, field: str, title: str) -> None:
    ax.set_xlabel(field)
    ax.set_title(title)
    ax.legend(fontsize=8)


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    storage.write_atomic(path, buffer.getvalue())


def plot_series(runs: Sequence[Mapping], field: str, series: str, path: str, baseline: Mapping[str, Any] | None = None,
                direction: str = "t2v", metric: str = "R10") -> None:
    """`metric` of `direction` against the values of `field`, one line per value of `series`
    (mean and 95 % interval over seeds), one panel per evaluation set; the baseline's runs (those
    whose overrides are `baseline`) as a band of their mean +- sd across each panel."""
    swept = [r for r in runs if field in r["overrides"] and series in r["overrides"]]
    if not swept:
        raise ValueError(f"no run sets both {field} and {series}.")
    base = [r for r in runs if baseline is not None and _is(r, baseline)]
    datasets = list(swept[0]["metrics"])
    plt, fig, axes = _panels(len(datasets))
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    lines = list(dict.fromkeys(r["overrides"][series] for r in swept))
    for ax, dataset in zip(axes, datasets):
        for line, color in zip(lines, colors):
            members = [r for r in swept if r["overrides"][series] == line]
            values = sorted({r["overrides"][field] for r in members})
            stats = [interval([r["metrics"][dataset][direction][metric] for r in members if r["overrides"][field] == v])
                     for v in values]
            ax.errorbar(values, [s[0] for s in stats], yerr=[np.nan_to_num(s[2]) for s in stats], marker="o",
                        capsize=3, color=color, label=f"{series.split('.')[-1]}={line}")
        if base:
            _band(ax, interval([r["metrics"][dataset][direction][metric] for r in base]), "gray",
                  f"baseline ({_label(baseline)})", alpha=0.2)
        if all(r["overrides"][field] > 0 for r in swept):
            ax.set_xscale("log")
        ax.set_ylabel(f"{direction} {metric} (mean, 95 % interval over seeds)")
        _finish_panel(ax, field, dataset)
    _save(plt, fig, path)

