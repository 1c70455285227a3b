"""Experiments around the method: a runner that trains a grid of config overrides x seeds
(resumable) and summarises their retrieval over seeds, and the analyses it measures each run with.

    python -m msk_jax.experiments --config=configs/howto.py:demo --workdir=/tmp/ablation \\
        --grid=objective.consistency_scale=0,0.1,1 --seeds=0,1,2

Modules:
  runner                  -- the grid, its runs and their analysis (`run_grid`, `analyse`).
  report                  -- the summary tables (`summary.md`), the plots, the paired differences.
  compare                 -- runs of several grids against a baseline, seed by seed;
                             `python -m msk_jax.experiments.compare`.
  anchor_semantics        -- what a trained model's anchors know about the demo clips' digits (NMI);
                             `python -m msk_jax.experiments.anchor_semantics`.
  consistency_diagnostics -- how the consistency loss acts on a trained model (gradients, targets,
                             embedding geometry); `python -m msk_jax.experiments.consistency_diagnostics`.
  __main__                -- the runner's command line (`python -m msk_jax.experiments --help`).
"""

from msk_jax.experiments.report import (DIAGNOSTICS, METRICS, interval, paired_differences, plot, plot_series,
                                        summarise, summarise_anchors, summarise_diagnostics, summarise_geometry,
                                        summarise_paired, summarise_training, summarise_wide)
from msk_jax.experiments.runner import (ANALYSES, TRAINING_TAIL, analyse, apply_overrides, parse_grid, parse_value,
                                        plot_field, run_grid, run_name, settings, training_losses)

__all__ = ["ANALYSES", "DIAGNOSTICS", "METRICS", "TRAINING_TAIL", "analyse", "apply_overrides",
           "interval", "paired_differences", "parse_grid", "parse_value", "plot", "plot_field", "plot_series",
           "run_grid", "run_name", "settings", "summarise", "summarise_anchors", "summarise_diagnostics",
           "summarise_geometry", "summarise_paired", "summarise_training", "summarise_wide", "training_losses"]
