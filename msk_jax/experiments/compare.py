"""Runs of several grids compared with a baseline among them, seed by seed: the wide R@10 table,
the paired differences with their 95 % intervals, the analyses' tables, a plot of one field's
values with one line per value of another, and the merged runs.

    python -m msk_jax.experiments.compare --runs=/tmp/costs/summary.json,/tmp/base/summary.json \\
        --baseline=objective.consistency_scale=0 --field=objective.consistency_scale \\
        --series=objective.consistency_cost --plot=/tmp/costs.png --out=/tmp/costs
"""

from __future__ import annotations

import json
import sys
from typing import Any, Mapping, Sequence

from absl import app, flags

from msk_jax import cli, storage
from msk_jax.experiments.report import (plot_series, summarise_anchors, summarise_diagnostics, summarise_geometry,
                                        summarise_paired, summarise_training, summarise_wide)
from msk_jax.experiments.runner import parse_grid

FLAGS = flags.FLAGS


def compare(runs: Sequence[Mapping], baseline: Mapping[str, Any], directions: Sequence[str] = ("t2v", "t2v+a")) -> str:
    """Markdown of runs from several grids: the wide R@10 table, the paired differences against
    the baseline, and the analyses' tables."""
    return "\n".join(part for part in (summarise_wide(runs, directions), summarise_paired(runs, baseline, directions),
                                       summarise_training(runs), summarise_anchors(runs), summarise_geometry(runs),
                                       summarise_diagnostics(runs)) if part)


def compare_files(paths: Sequence[str], baseline: str, directions: Sequence[str] = ("t2v", "t2v+a"),
                  field: str | None = None, series: str | None = None, plot: str | None = None,
                  out: str | None = None) -> str:
    """`compare` of the runs in summary.json files `paths` against the runs whose overrides are
    `baseline` (FIELD=VALUE[;FIELD=VALUE]); with `plot` also the plot of `field` by `series`,
    with `out` the tables and the merged runs in OUT.md and OUT.json."""
    runs = []
    for path in paths:
        try:
            runs += json.loads(storage.read_bytes(path))["runs"]
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a summary.json of runs ({err}).") from None
    wanted = {name: values[0] for name, values in parse_grid(baseline.split(";")).items()}
    text = compare(runs, wanted, directions)
    if plot:
        if not (field and series):
            raise ValueError("--plot needs --field and --series.")
        plot_series(runs, field, series, plot, wanted)
    if out:
        storage.write_atomic(out + ".md", text)
        storage.write_atomic(out + ".json", json.dumps({"runs": runs}, indent=1))
    return text


def _define_flags() -> None:
    flags.DEFINE_list("runs", None, "summary.json files of the runs (or JSON of {'runs': [...]}).")
    flags.DEFINE_string("baseline", None, "FIELD=VALUE[;FIELD=VALUE]: the baseline's overrides.")
    flags.DEFINE_list("directions", ["t2v", "t2v+a"], "Directions of the tables.")
    flags.DEFINE_string("field", None, "Plot R@10 against this field ...")
    flags.DEFINE_string("series", None, "... one line per value of this one.")
    flags.DEFINE_string("plot", None, "Where to write the plot (with --field and --series).")
    flags.DEFINE_string("out", None, "Also write the tables (markdown) and the merged runs (JSON) to OUT.md / OUT.json.")
    flags.mark_flags_as_required(["runs", "baseline"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        text = compare_files(FLAGS.runs, FLAGS.baseline, FLAGS.directions, FLAGS.field, FLAGS.series, FLAGS.plot,
                             FLAGS.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(text, flush=True)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
