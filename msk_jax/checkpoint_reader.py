"""Reading a trained run: where its checkpoints are, which steps are complete, and one set of
its weights (EMA or online) restored as host arrays for a model built from the config; original
PyTorch weights converted into the same variables. Evaluation, search and the analysis tools use
it; training restores its whole state through `checkpoints`."""

from __future__ import annotations

import functools
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from msk_jax import convert, data_sources, safe_load, storage
from msk_jax.checkpoints import CheckpointError, open_manager, shape_differences
from msk_jax.model import MultiSKModel


def locate(path: str) -> tuple[str, str, int | None]:
    """(workdir, checkpoints folder, step or None for the latest) for any accepted --checkpoint
    (a local path or a URL such as gs://bucket/run)."""
    path = os.fspath(storage.path(path))
    if not storage.exists(path):
        raise CheckpointError(f"checkpoint path '{path}' does not exist.")
    name, parent = storage.path(path).name, os.fspath(storage.path(path).parent)
    if storage.isdir(storage.join(path, "checkpoints")):
        return path, storage.join(path, "checkpoints"), None
    if re.fullmatch(r"\d+", name):
        return os.fspath(storage.path(parent).parent), parent, int(name)
    if name == "checkpoints":
        return parent, path, None
    raise CheckpointError(f"'{path}' is not a training workdir, a checkpoints/ folder or a step folder.")


def finished_steps(folder: str) -> list[int]:
    """Steps whose checkpoint is complete (Orbax marks a checkpoint complete when done: on disk
    by renaming it into place, in a bucket with a commit marker)."""
    storage.refresh(folder)
    if not storage.isdir(folder):
        return []
    with open_manager(folder, create=False) as manager:
        return sorted(manager.all_steps())


def _check_shapes(restored, template, what: str) -> None:
    problems = shape_differences(restored, template)
    if problems:
        raise CheckpointError(f"{what} does not fit the configured model (check --config and its overrides; "
                              "checkpoint -> config):\n  " + "\n  ".join(problems[:20]))


def final_step(folder: str, step: int) -> int | None:
    """The run's last step, from the checkpoint's metadata (None if unknown)."""
    try:
        with open_manager(folder, create=False) as manager:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return int(meta.get("num_train_steps"))
    except Exception:  # metadata is informational here
        return None


def load_msk_checkpoint(folder: str, step: int | None, template: dict, weights: str) -> tuple[dict, int]:
    """({'params', 'batch_stats'}, step) from an msk_jax checkpoint."""
    steps = finished_steps(folder)
    if not steps:
        raise CheckpointError(f"no checkpoint in '{folder}'.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in '{folder}' (have {steps}).")
    state_dir = storage.path(folder) / str(step) / "state"
    stored = _stored_items(state_dir)
    name = "ema_params" if weights == "ema" and "ema_params" in stored else "params"
    restored = _restore_items(state_dir, {name: template["params"], "batch_stats": template.get("batch_stats", {})})
    variables = {"params": restored[name], "batch_stats": restored.get("batch_stats") or {}}
    _check_shapes(variables, template, f"checkpoint {folder}/{step}")
    return variables, step


def _stored_items(state_dir) -> set[str]:
    """The top-level items of a saved state (`params`, `ema_params`, `opt_state`, ...), from its
    tree metadata file alone: Orbax's `metadata()` (`checkpoints.Checkpointer._stored_tree`)
    also reads every array's own metadata, the optimiser's and the queues' included, which
    evaluation must not need."""
    try:
        tree = json.loads((state_dir / "_METADATA").read_text())["tree_metadata"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot read the saved state's metadata {state_dir}/_METADATA: {err}") from None
    return {entry["key_metadata"][0]["key"] for entry in tree.values() if entry.get("key_metadata")}


def _restore_items(state_dir, wanted: dict) -> dict:
    """Only the items of `wanted` (name -> tree of arrays or shapes) from the saved state, as
    host arrays (an Orbax partial restore): evaluation reads one set of weights and the
    BatchNorm statistics, not the optimiser's moments, the other weights or the queues."""
    wanted = {k: v for k, v in wanted.items() if jax.tree_util.tree_leaves(v)}
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), wanted)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=True))
    finally:
        handler.close()


def load_torch_weights(path: str, template: dict) -> dict:
    if not storage.exists(path):
        raise CheckpointError(f"PyTorch checkpoint '{path}' does not exist.")
    if path.endswith(".npz"):
        data = safe_load.load_npz(path)  # sizes and headers checked before anything is inflated
        state = {k.removeprefix("param/"): v for k, v in data.items() if not k.startswith(("input/", "eval/", "train/"))
                 and k != "config_json"}
    else:
        state = convert.load_torch_state_dict(path)
    return convert.convert_state_dict(state, template)


def model_template(model, config, words_dim: int) -> dict:
    batch = {k: v[:1] for k, v in data_sources.sample_batch(config, words_dim).items()}
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), batch)


def restore_for_evaluation(config, checkpoint: str, weights: str = "ema"):
    """(model, variables, {name: EvalSet}) of a run's checkpoint (a workdir, its checkpoints/
    folder or a step folder) and the configured evaluation sets: what the analysis tools need."""
    paths = data_sources.data_paths(config, training=False)
    words = data_sources.load_words(config, paths)
    eval_sets = data_sources.build_eval_sets(config, paths, words)
    model = MultiSKModel.from_config(config)
    _, folder, step = locate(checkpoint)
    variables, _ = load_msk_checkpoint(folder, step, model_template(model, config, words.dim), weights)
    return model, variables, eval_sets
