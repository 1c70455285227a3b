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

import sys

from absl import app, flags
from ml_collections import config_flags

from msk_jax import storage
from msk_jax.experiments.report import plot
from msk_jax.experiments.runner import analyse, parse_grid, plot_field, run_grid

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program: importing the runner next
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
    from msk_jax import cli

    _define_flags()
    cli.run(main, config_flag="config")
