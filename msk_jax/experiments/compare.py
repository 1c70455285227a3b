"""Runs of several grids compared with a baseline among them, seed by seed: the wide R@10 table,
the paired differences with their 95 % intervals, the analyses' tables, a plot of one field's
values with one line per value of another, and the merged runs.

    python -m msk_jax.experiments.compare --runs=/tmp/costs/summary.json,/tmp/base/summary.json \\
        --baseline=objective.consistency_scale=0 --field=objective.consistency_scale \\
        --series=objective.consistency_cost --plot=/tmp/costs.png --out=/tmp/costs
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from msk_jax import storage
from msk_jax.experiments.report import (plot_series, summarise_anchors, summarise_diagnostics, summarise_geometry,
                                        summarise_paired, summarise_training, summarise_wide)
from msk_jax.experiments.runner import parse_grid


def compare(runs: Sequence[Mapping], baseline: Mapping[str, Any], directions: Sequence[str] = ("t2v", "t2v+a")) -> str:
    """Markdown of runs from several grids: the wide R@10 table, the paired differences against
    the baseline, and the analyses' tables."""
    return "\n".join(part for part in (summarise_wide(runs, directions), summarise_paired(runs, baseline, directions),
                                       summarise_training(runs), summarise_anchors(runs), summarise_geometry(runs),
                                       summarise_diagnostics(runs)) if part)


def main(argv: Sequence[str] | None = None) -> int:
    import json
    import sys

    from msk_jax import cli

    parser = cli.ArgumentParser(prog="python -m msk_jax.experiments.compare", description=compare.__doc__)
    parser.add_argument("--runs", required=True, help="Comma-separated summary.json files (or JSON of {'runs': [...]}).")
    parser.add_argument("--baseline", required=True, help="FIELD=VALUE[;FIELD=VALUE]: the baseline's overrides.")
    parser.add_argument("--directions", default="t2v,t2v+a")
    parser.add_argument("--field", help="Plot R@10 against this field ...")
    parser.add_argument("--series", help="... one line per value of this one.")
    parser.add_argument("--plot", help="Where to write the plot (with --field and --series).")
    parser.add_argument("--out", help="Also write the tables (markdown) and the merged runs (JSON) to OUT.md / OUT.json.")
    args = parser.parse_args(argv)
    try:
        runs = []
        for path in args.runs.split(","):
            try:
                runs += json.loads(storage.read_bytes(path))["runs"]
            except (KeyError, TypeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}: not a summary.json of runs ({err}).") from err
        baseline = {field: values[0] for field, values in parse_grid(args.baseline.split(";")).items()}
        text = compare(runs, baseline, args.directions.split(","))
        if args.plot:
            if not (args.field and args.series):
                raise ValueError("--plot needs --field and --series.")
            plot_series(runs, args.field, args.series, args.plot, baseline)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        storage.write_atomic(args.out + ".md", text)
        storage.write_atomic(args.out + ".json", json.dumps({"runs": runs}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    from msk_jax import cli

    raise SystemExit(cli.call(main))
