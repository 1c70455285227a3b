"""Checkpoints of the whole training state, with Orbax, on disk or in a bucket.

A checkpoint holds the arrays of the train state (parameters, optimiser state, BatchNorm
statistics, EMA parameters, feature queues and their fill, step) and a JSON item with the
input pipeline position and the configuration. Orbax writes each checkpoint to a temporary
folder and renames it when complete (in a bucket: marks it complete), so a crash mid-save never
leaves a half checkpoint that would be restored; the last `keep` checkpoints are kept. On
multi-host runs every process calls `save`; only process 0 writes the metadata.

Resuming is safe: `restore_latest` compares the checkpoint's stored configuration with the
run's and refuses (`IncompatibleCheckpointError`, listing the fields) when they differ in
anything that changes the state's shapes or meaning; a checkpoint that cannot be read is named
and the next older one is used.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from msk_jax import storage
from msk_jax.sharding import to_host
from msk_jax.train_step import TrainState

# Configuration fields that may change when a run is resumed: how long it runs, how often it
# logs, evaluates and saves, where the data is read from, how it is laid out on the devices and
# how fast it is read. Every other field changes the state's shapes or meaning.
RESUMABLE_CHANGES = (
    "variant", "num_train_steps", "num_epochs", "log_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "eval_every_steps", "profile_steps", "profile_first_step", "eval_batch_size", "eval_ema", "mesh", "sharding_rules",
    "model.dtype", "data.source", "data.tfds_data_dir", "data.csv", "data.caption", "data.features_2d",
    "data.features_3d", "data.audio", "data.word_vectors", "data.msrvtt", "data.youcook2", "data.demo_dir",
    "data.store_dir", "data.workers", "data.worker_processes", "data.prefetch", "data.msrvtt_complete_size", "data.youcook2_complete_size",
    "data.eval_video_tokens", "data.eval_audio_frames", "objective.sinkhorn.problems_at_once",
)


def open_manager(directory: str, **options) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over `directory` for msk_jax's two items: the state's arrays
    and the JSON metadata (training writes through it; evaluation reads through it)."""
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read, or does not fit the configured model."""


class IncompatibleCheckpointError(CheckpointError):
    """The work directory's checkpoint was trained with a configuration this run cannot continue."""


def state_arrays(state: TrainState) -> dict[str, Any]:
    """The parts of a TrainState that are saved (its static fields are rebuilt from the config)."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "queues": state.queues, "ema_params": state.ema_params}


# Saved by earlier versions and never used: read (and dropped) when present, never compared.
LEGACY_ITEMS = ("rng",)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(stored: dict, current: dict, allowed: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """'field: old -> new' for every field (outside `allowed`) that differs between two
    configurations given as JSON-style dicts."""
    old, new = _flatten(stored), _flatten(current)
    missing = "(absent)"
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in allowed or key.split(".")[0] in allowed:
            continue
        if old.get(key, missing) != new.get(key, missing):
            lines.append(f"{key}: {json.dumps(old.get(key, missing))} -> {json.dumps(new.get(key, missing))}")
    return lines


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def shape_differences(stored: Any, template: Any) -> list[str]:
    """'path: stored shape -> template shape' for arrays (or array metadata) whose shapes differ,
    or that exist on one side only."""
    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
        return {"/".join(map(_key_name, k)): tuple(v.shape) for k, v in leaves if hasattr(v, "shape")}

    old, new = shapes(stored), shapes(template)
    lines = [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return lines


def _describe_failure(err: BaseException, what: str) -> str:
    """What could not be read: the deepest cause of an Orbax/TensorStore error when it names the
    file (e.g. 'Error reading "params.x/0.0" in OCDBT database at local file
    ".../checkpoints/8/state/": ...'), else `what` (the item being read, e.g. the step's `meta`
    folder) with the error's type and first line (e.g. a JSON decode error of a truncated file)."""
    causes = [err]
    while causes[-1].__cause__ is not None and len(causes) < 10:
        causes.append(causes[-1].__cause__)
    for cause in reversed(causes):
        text = str(cause).strip()
        if text:
            first = text.splitlines()[0][:400]
            if os.path.dirname(what) in first:  # names a file of the step
                return first
            return f"{what}: {type(cause).__name__}: {first}"
    return f"{what}: {type(err).__name__}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class _QuietFailedReads(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for Orbax's other pending reads of a
    checkpoint whose read failed (the failure itself is reported once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("never retrieved" in message and ("reading array index" in message or "orbax" in message))


@contextlib.contextmanager
def _quiet_failed_reads(settle_seconds: float = 0.25, max_wait_seconds: float = 5.0):
    """Within one restore: drops the echoes of a failed read. When one array of a checkpoint
    cannot be read, Orbax's other pending reads still finish (in TensorStore's threads) and each
    reports to a closed event loop, through `sys.unraisablehook` and the `asyncio` logger. The
    failure itself is reported once, by `restore_latest`. After a failure this waits until no
    echo has come for `settle_seconds` (at most `max_wait_seconds`), then puts the previous hook
    and the logger back: nothing outlives the restore."""
    previous = sys.unraisablehook
    last_echo = [time.monotonic()]

    def hook(unraisable) -> None:
        if ((isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value))
                or "_read_array_index_and_device_put" in repr(unraisable.object)):
            last_echo[0] = time.monotonic()
            return
        previous(unraisable)

    quiet = _QuietFailedReads()
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(quiet)
    try:
        yield
    except BaseException:
        last_echo[0] = time.monotonic()  # wait at least settle_seconds after the failure
        deadline = last_echo[0] + max_wait_seconds
        while time.monotonic() < deadline:
            gc.collect()  # pending reads' coroutines report when collected
            if time.monotonic() - last_echo[0] >= settle_seconds:
                break
            time.sleep(settle_seconds / 5)
        raise
    finally:
        sys.unraisablehook = previous
        logging.getLogger("asyncio").removeFilter(quiet)


class Checkpointer:
    """Periodic and final checkpoints in `<workdir>/checkpoints` (a local folder or a URL)."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = storage.join(workdir, "checkpoints")
        self.manager = open_manager(self.directory, max_to_keep=keep, create=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, meta: dict, force: bool = False) -> bool:
        step = int(to_host(state.step))
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_arrays(state)), meta=ocp.args.JsonSave(meta)), force=force)
        return bool(saved)

    def read_meta(self, step: int) -> dict:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, template: TrainState, step: int | None = None,
                stored: dict | None = None) -> tuple[TrainState, dict]:
        """Restores into the structure, dtypes and shardings of `template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_arrays(template))
        stored = (self._stored_tree(step) if stored is None else stored) or {}
        for name in LEGACY_ITEMS:
            if name in stored:
                abstract[name] = jax.ShapeDtypeStruct(stored[name].shape, stored[name].dtype,
                                                      sharding=template.step.sharding)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        arrays = {k: v for k, v in restored["state"].items() if k not in LEGACY_ITEMS}
        return template.replace(**arrays), dict(restored["meta"])

    def _stored_tree(self, step: int) -> dict | None:
        """The saved state's array metadata (shapes, dtypes), None when it cannot be read."""
        try:
            metadata = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore reports it
            return None
        return None if metadata is None else getattr(metadata, "tree", metadata)

    def restore_latest(self, template: TrainState, config: dict,
                       warn: Callable[[str], None] | None = None) -> tuple[TrainState, dict, int] | None:
        """(state, meta, step) from the newest checkpoint that can be read, None without any.

        Raises IncompatibleCheckpointError when the checkpoint's configuration (or its arrays'
        shapes) differ from `config` (a JSON-style dict) in what the state depends on, and
        CheckpointError when checkpoints exist but none can be read. Unreadable newer
        checkpoints are reported through `warn` (default: stderr)."""
        warn = warn or _warn
        steps = self.all_steps()
        failures = []
        for step in reversed(steps):
            folder = storage.join(self.directory, str(step))
            what = storage.join(folder, "meta")
            try:
                with _quiet_failed_reads():
                    meta = self.read_meta(step)
                    stored = self._check_compatible(step, meta, config, template)
                    what = storage.join(folder, "state")
                    state, meta = self.restore(template, step, stored)
            except IncompatibleCheckpointError:
                raise
            except Exception as err:  # noqa: BLE001 - any read failure: fall back to an older one
                failures.append(f"step {step}: {_describe_failure(err, what)}")
                warn(f"checkpoint {failures[-1]}; trying the previous one.")
                continue
            if failures:
                moved = self._move_aside([s for s in steps if s > step])
                warn(f"resuming from step {step}, the newest readable checkpoint in {self.directory}; "
                     f"the unreadable ones were moved to {moved}.")
            return state, meta, step
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} can be read, so the run does not start "
                                  "from scratch over them:\n  " + "\n  ".join(failures)
                                  + "\nRemove the broken step folders to start again, or use a new --workdir.")
        return None

    def _move_aside(self, steps: list[int]) -> str:
        """Moves unreadable step folders out of the way (to `<workdir>/unreadable_checkpoints/`),
        so the run can save those steps again and a later restart does not trip over them."""
        target = storage.join(storage.path(self.directory).parent, "unreadable_checkpoints")
        if jax.process_index() == 0:
            storage.makedirs(target)
            for step in steps:
                destination = storage.path(target) / f"{step}.{int(time.time())}"
                storage.path(storage.join(self.directory, str(step))).rename(destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("msk_jax: unreadable checkpoints moved")
        self.manager.reload()
        return target

    def _check_compatible(self, step: int, meta: dict, config: dict, template: TrainState) -> dict | None:
        """Raises IncompatibleCheckpointError on a differing configuration or array shape; returns
        the saved state's array metadata (`_stored_tree`, read once for the restore too)."""
        stored = meta.get("config")
        stored = json.loads(stored) if isinstance(stored, str) else stored
        problems = config_differences(stored, config) if stored is not None else []
        tree = None
        if not problems:
            tree = self._stored_tree(step)
            if tree is not None:
                arrays = {k: v for k, v in dict(tree).items() if k not in LEGACY_ITEMS}
                problems = shape_differences(arrays, state_arrays(template))
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} was trained with another configuration "
                f"(checkpoint -> this run):\n  " + "\n  ".join(shown) +
                "\nEither resume with the configuration it was trained with, or start a new run with "
                "another --workdir.")
        return tree

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
