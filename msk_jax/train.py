"""The training loop: data, sharded state, jitted step, checkpoints, metrics, evaluation.

`train_and_evaluate(config, workdir)` is what `python -m msk_jax.main` runs; the workdir is a
local folder or a gs:// URL. Restarting with the same workdir resumes from the last readable
checkpoint (state, input position, RNG) after checking that it was trained with a compatible
configuration, so a killed run continues with exactly the losses an uninterrupted one has.
SIGTERM (on any process of a multi-host run) saves and stops every process at the same step.
"""

from __future__ import annotations

import collections
import json
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from clu import parameter_overview

from msk_jax import checkpoints, evaluation, input_pipeline, metric_writers, sharding, storage, train_step
from msk_jax.data.pipeline import InputPositionError, TrainingPipeline
from msk_jax.input_pipeline import sample_batch
from msk_jax.loss import ObjectiveConfig
from msk_jax.model import MultiSKModel

LOG_KEYS = ("loss", "contrastive", "consistency", "tv", "learning_rate", "steps_per_sec", "eta_minutes")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the run stops without checkpointing that state."""


def create_sharded_state(rng, model, objective: ObjectiveConfig, tx, batch_shapes: dict, mesh, rules,
                         ema_decay: float | None):
    """The initial TrainState, born sharded by the rules (jit with out_shardings)."""
    zeros = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_shapes.items()}

    def init(rng):
        batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in zeros.items()}
        return train_step.create_train_state(rng, model, objective, tx, batch, ema_decay=ema_decay)

    abstract = jax.eval_shape(init, rng)
    state_sharding = sharding.tree_shardings(abstract, mesh, rules)
    state = jax.jit(init, out_shardings=state_sharding)(rng)
    return state, state_sharding


def compile_train_step(state_sharding, batch_sharding):
    """jax.jit(train_step) with in/out shardings (metrics replicated) and the state donated."""
    return jax.jit(train_step.train_step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, sharding.replicated(batch_sharding.mesh)), donate_argnums=0)


def global_batch(local: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
    """This process's part of the batch -> global arrays split over the mesh's batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


class StepMetrics:
    """The step's metrics accumulated on the devices (a `clu.metrics.Collection` of `Average`s),
    read by the host only at log steps, so the host never waits for a step to finish.

    It also keeps, per metric, the first step whose value was not finite; `check_finite` (at log,
    evaluation and checkpoint steps) raises `NonFiniteLossError` naming that step and the terms,
    before any state computed from it is saved."""

    def __init__(self, names):
        self.names = tuple(sorted(names))
        self.collection_type = clu_metrics.Collection.create(
            **{name: clu_metrics.Average.from_output(name) for name in self.names})

        def add(collection, first_bad, metrics, step):
            update = self.collection_type.single_from_model_output(**metrics)
            first_bad = {k: jnp.where((first_bad[k] < 0) & ~jnp.isfinite(metrics[k]), step, first_bad[k])
                         for k in self.names}
            return collection.merge(update), first_bad

        self._add = jax.jit(add, donate_argnums=(0, 1))
        self.first_bad = {k: jnp.int32(-1) for k in self.names}
        self.reset()

    def reset(self) -> None:
        self.collection = self.collection_type.empty()

    def add(self, metrics: dict, step) -> None:
        """Adds one step's metrics (device arrays; `step` is the step that computed them)."""
        self.collection, self.first_bad = self._add(self.collection, self.first_bad, metrics, step)

    def check_finite(self) -> None:
        first_bad = {k: int(v) for k, v in sharding.to_host(self.first_bad).items()}
        bad = [k for k, v in first_bad.items() if v >= 0]
        if bad:
            step = min(first_bad[k] for k in bad)
            terms = sorted(k for k in bad if first_bad[k] == step)
            raise NonFiniteLossError(f"step {step}: non-finite value in {', '.join(terms)}; no checkpoint was "
                                     "written from this state.")

    def read(self) -> dict[str, float]:
        """The means since the last `read` (checks finiteness first), and starts again."""
        self.check_finite()
        values = {k: float(v) for k, v in sharding.to_host(self.collection.compute()).items()}
        self.reset()
        return values


class DeviceBatches:
    """The pipeline's batches as global device arrays, `ahead` of the step that uses them: the
    host reads and transfers the next batches while the devices run the current step. Each
    comes with the pipeline's position after it (what a checkpoint of that step must store).

    A pipeline that lends its batches (`TrainingPipeline.lends_batches`: views of buffers it
    overwrites once `keep_batches` more batches have been returned) is kept to that: on CPU,
    where a device array may alias the host memory it was made from, each batch is copied first;
    elsewhere, before the pipeline may overwrite a batch, its transfer is waited for (long done
    when `keep_batches` >= `ahead`)."""

    def __init__(self, pipeline: TrainingPipeline, batch_sharding, ahead: int = 2):
        self.pipeline, self.batch_sharding, self.ahead = pipeline, batch_sharding, max(1, ahead)
        self._queue: collections.deque = collections.deque()
        self._lent = bool(getattr(pipeline, "lends_batches", False))
        self._copy = self._lent and any(d.platform == "cpu" for d in batch_sharding.device_set)
        self._transfers: collections.deque = collections.deque()  # device batches of lent buffers

    def fill(self) -> None:
        while len(self._queue) < self.ahead:
            if self._lent and not self._copy:
                while len(self._transfers) > self.pipeline.keep_batches:  # its buffer may be reused now
                    jax.block_until_ready(self._transfers.popleft())
            local = next(self.pipeline)
            if self._copy:
                local = {k: np.array(v) for k, v in local.items()}
            batch = global_batch(local, self.batch_sharding)
            if self._lent and not self._copy:
                self._transfers.append(batch)
            self._queue.append((batch, self.pipeline.state()))

    def pop(self):
        """(global batch, input position after it)."""
        if not self._queue:
            self.fill()
        return self._queue.popleft()


def saved_input_position(saved, videos_per_batch: int) -> tuple[dict, str | None]:
    """The global input position of a checkpoint's `meta["input"]`, and a warning when it is
    approximate. Checkpoints store the global position (epoch, slot); those of earlier versions
    stored one position per process, within that process's shard: without skipped videos they
    convert exactly, else to the batch every process had reached (the stream then differs from
    an uninterrupted run's from there)."""
    if isinstance(saved, dict):
        return saved, None
    local = videos_per_batch // max(1, int(saved[0].get("process_count", len(saved))))
    epochs = {int(p["epoch"]) for p in saved}
    positions = [int(p["position"]) for p in saved]
    batch = min(positions) // local
    position = {"epoch": min(epochs), "position": batch * videos_per_batch, "seed": saved[0]["seed"],
                "videos_per_batch": videos_per_batch}
    if len(epochs) == 1 and len(set(positions)) == 1 and positions[0] % local == 0:
        return position, None
    return position, (f"this checkpoint's input positions ({positions} in epoch(s) {sorted(epochs)}) are per process, "
                      f"from an earlier msk_jax with skipped videos; training continues at batch {batch} of epoch "
                      f"{min(epochs)}, so its input differs from an uninterrupted run's from here.")


class Preemption:
    """SIGTERM -> checkpoint and stop at a step boundary, on every process at the same step.

    One process: a Python SIGTERM handler sets a flag. Several processes (a pod, SLURM): the
    hosts are told at different steps, so they agree through JAX's preemption sync point (the
    coordination service catches SIGTERM on any host and picks one step for all); `reached`
    must then be called at every step with the same step number on every process, and no
    Python SIGTERM handler may replace JAX's."""

    def __init__(self):
        self.multihost = jax.process_count() > 1
        self._requested, self._previous = False, None
        if not self.multihost:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self._requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (call once per step, on every process)."""
        if self.multihost:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# --- the loop -----------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict:
    """Trains per `config`, checkpointing into and resuming from `workdir`; returns the final
    evaluation results ({dataset: {direction: metrics}}), empty without evaluation sets."""
    storage.makedirs(workdir)
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, log_keys=LOG_KEYS)
    model = MultiSKModel.from_config(config)
    objective = ObjectiveConfig.from_config(config.objective)
    source, words, evals = input_pipeline.build_data(config)
    if config.videos_per_batch > len(source):
        raise ValueError(f"config.videos_per_batch={config.videos_per_batch} exceeds the {len(source)} training videos.")
    steps_per_epoch = max(1, len(source) // config.videos_per_batch)
    num_steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
    schedule = train_step.epoch_decay_schedule(config.optimizer.lr, config.optimizer.lr_decay_per_epoch,
                                               steps_per_epoch)
    tx = train_step.adam(schedule, config.optimizer.b1, config.optimizer.b2, config.optimizer.eps)

    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.rules_for(mesh, [tuple(r) for r in config.sharding_rules])
    batch_sharding = sharding.batch_sharding(mesh)
    state, state_sharding = create_sharded_state(
        jax.random.PRNGKey(config.seed), model, objective, tx, sample_batch(config, words.dim), mesh, rules,
        config.ema_decay if config.ema_decay else None)
    step_fn = compile_train_step(state_sharding, batch_sharding)

    pipeline = TrainingPipeline(source, config.videos_per_batch, seed=config.seed,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                workers=config.data.workers, prefetch=config.data.prefetch,
                                processes=config.data.worker_processes, batch_tasks=True,
                                keep_batches=max(1, config.data.prefetch))
    checkpointer = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        resumed = checkpointer.restore_latest(state, json.loads(config.to_json()))
    except checkpoints.CheckpointError:
        pipeline.close()
        checkpointer.close()
        raise
    input_position = pipeline.state()
    if resumed is not None:
        state, meta, _ = resumed
        position, warning = saved_input_position(meta["input"], config.videos_per_batch)
        if warning and is_main:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        try:
            pipeline.restore(position)
        except InputPositionError as err:
            pipeline.close()
            checkpointer.close()
            raise InputPositionError(f"checkpoint step {int(sharding.to_host(state.step))} in "
                                     f"{checkpointer.directory}: {err}") from None
        input_position = pipeline.state()
        if is_main:
            print(f"resumed from step {int(sharding.to_host(state.step))} in {checkpointer.directory}", flush=True)
    if is_main:
        print(parameter_overview.get_parameter_overview(state.params, include_stats=False), flush=True)

    def save(force=False):
        step_metrics.check_finite()  # raises before a state computed from a non-finite step is saved
        meta = {"input": input_position, "config": config.to_json(), "num_train_steps": num_steps}
        checkpointer.save(state, meta, force=force)

    def run_eval(step):
        if not evals:
            return {}
        step_metrics.check_finite()
        variables = {"params": state.ema_params if config.eval_ema and state.ema_params is not None
                     else state.params, "batch_stats": state.batch_stats}
        results = evaluation.evaluate(model, variables, evals, config.eval_batch_size,
                                      sharding=sharding.batch_sharding(mesh))
        if is_main:
            path = evaluation.write_json(results, workdir, step)
            writer.write_scalars(step, evaluation.scalars(results))
            print(evaluation.format_table(results), flush=True)
            print(f"evaluation written to {path}", flush=True)
        return results

    progress = metric_writers.ReportProgress(num_steps, every_steps=config.log_every_steps)
    profile = (metric_writers.Profile(storage.join(workdir, "tensorboard"), config.profile_first_step,
                                      config.profile_steps) if config.profile_steps > 0 and is_main else None)
    preemption = Preemption()
    batches = DeviceBatches(pipeline, batch_sharding, ahead=max(1, config.data.prefetch))
    metric_shapes = jax.eval_shape(step_fn, state, sample_batch(config, words.dim))[1]
    step_metrics = StepMetrics(metric_shapes)
    step = int(sharding.to_host(state.step))
    if is_main:
        print(f"training {num_steps} steps ({steps_per_epoch} per epoch) from step {step}; "
              f"mesh {dict(mesh.shape)}; {len(source)} videos", flush=True)
    try:
        while step < num_steps:
            batch, position = batches.pop()
            state, metrics = step_fn(state, batch)  # dispatched; the host goes on while it runs
            step_metrics.add(metrics, step)
            step, input_position = step + 1, position
            if step < num_steps:
                batches.fill()  # the next batches, read and transferred during this step
            log_step = step % config.log_every_steps == 0 or step == num_steps
            if log_step:
                scalars = step_metrics.read()  # waits for this step; raises on a non-finite value
                scalars["learning_rate"] = float(schedule(step - 1))
                scalars["epoch"] = (step - 1) // steps_per_epoch
                scalars.update(progress(step) or {})
                writer.write_scalars(step, scalars)
                writer.flush()
            if profile is not None:
                profile(step)
            preempted = preemption.reached(step)  # every step, on every process
            if step % config.checkpoint_every_steps == 0 or preempted:
                save(force=preempted)
                writer.flush()
            if preempted:
                checkpointer.wait()
                where = f" (process {jax.process_index()})" if jax.process_count() > 1 else ""
                print(f"stopped at step {step} on SIGTERM{where}; checkpoint saved.", flush=True)
                return {}
            if config.eval_every_steps > 0 and step % config.eval_every_steps == 0 and step < num_steps:
                run_eval(step)
        if checkpointer.latest_step() != step:
            save(force=True)
        checkpointer.wait()
        results = run_eval(step)
    finally:
        if profile is not None:  # a profile the run stopped in is written now
            profile.close()
        preemption.restore()
        writer.flush()
        if is_main:
            print(pipeline.summary(), flush=True)
            if pipeline.skipped_videos:  # every one, where the terminal shows the first hundred
                storage.write_atomic(storage.join(workdir, "input_skipped.txt"),
                                     "\n".join(pipeline.skipped_lines()) + "\n")
        pipeline.close()
        checkpointer.close()
        release_compiled_programs()
    writer.close()
    return results


def release_compiled_programs() -> None:
    """Drops the programs JAX compiled for a run that is over. JAX keeps them in process-wide
    caches keyed by the run's model and optimizer, which no later run shares, so a process that
    trains run after run (a notebook, `msk_jax.experiments`, the tests) would keep them all:
    about 2,100 memory mappings per tiny run on CPU, until LLVM cannot map another and the process
    aborts ("Unable to allocate section memory"; Linux allows 65,530 mappings by default)."""
    jax.clear_caches()
