"""Checkpoints of the whole training state, with Orbax.

A checkpoint holds the arrays of the train state (parameters, optimiser state, BatchNorm
statistics, EMA parameters, feature queues and their fill, step, RNG) and a JSON item with the
input pipeline position and the configuration. Orbax writes each checkpoint to a temporary
folder and renames it when complete, so a crash mid-save never leaves a half checkpoint that
would be restored; the last `keep` checkpoints are kept. On multi-host runs every process calls
`save`; only process 0 writes the metadata.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from msk_jax.sharding import to_host
from msk_jax.train_step import TrainState


def state_arrays(state: TrainState) -> dict[str, Any]:
    """The parts of a TrainState that are saved (its static fields are rebuilt from the config)."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "queues": state.queues, "ema_params": state.ema_params,
            "rng": state.rng}


class Checkpointer:
    """Periodic and final checkpoints in `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict, force: bool = False) -> bool:
        step = int(to_host(state.step))
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_arrays(state)), meta=ocp.args.JsonSave(meta)), force=force)
        return bool(saved)

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores into the structure, dtypes and shardings of `template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_arrays(template))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return template.replace(**restored["state"]), dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
