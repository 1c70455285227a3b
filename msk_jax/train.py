"""The training loop: data, sharded state, jitted step, checkpoints, metrics, evaluation.

`train_and_evaluate(config, workdir)` is what `python -m msk_jax.main` runs; the workdir is a
local folder or a gs:// URL. Restarting with the same workdir resumes from the last readable
checkpoint (state, input position, RNG) after checking that it was trained with a compatible
configuration, so a killed run continues with exactly the losses an uninterrupted one has.
SIGTERM (on any process of a multi-host run) and SIGINT (Ctrl-C) save and stop every process at
the same step (`StopRequest`); a second Ctrl-C stops at once. A save that fails stops the run at
its step (`checkpoints.SaveError`), and one training at a time holds the work directory
(`msk_jax.lease`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from clu import parameter_overview

from msk_jax import checkpoints, data_sources, evaluators, lease, metric_writers, sharding, storage, train_step
from msk_jax.configs.howto import RESUMABLE_CHANGES
from msk_jax.data.loader import InputPositionError, TrainingPipeline
from msk_jax.data_sources import sample_batch
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
    approximate. A checkpoint's position is global (epoch, slot), or one position per process
    within that process's shard (a list): without skipped videos a list converts exactly, else to the batch every process had reached (the stream then differs from
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


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM: a request to save a checkpoint of the step reached and stop.

    One process: Python handlers of both signals set a flag, which the run reads at every step,
    between the stages of its start-up, and before and during evaluations (which it cuts short).
    Several processes: the hosts are told at different steps, so they agree through JAX's
    preemption sync point (its coordination service catches SIGTERM on any host and picks one
    step for all); `reached` must then be called at every step with the same step number on
    every process, no Python SIGTERM handler may replace JAX's, and once training runs a SIGINT
    is passed on to it as a SIGTERM of this process.

    A second SIGINT stops at once. The command line (`exit_at_once=True`) also reads the signals
    in a thread, through Python's wakeup file descriptor, because the main thread runs no Python
    handler while it is inside XLA (a compilation can take minutes) and the thread does: it ends
    the process at a second SIGINT (one line, exit 130, the lease released), and at the first
    while the run says that nothing would be lost (`nothing_to_lose`: a compilation before any
    step). Elsewhere (a notebook) a second SIGINT raises KeyboardInterrupt."""

    def __init__(self, multihost: bool = False, exit_at_once: bool = False):
        self.multihost = multihost
        self.signal_name: str | None = None  # of the first stop request
        self.step: int | None = None  # the step the run has reached (for the line of a stop at once)
        self.last_checkpoint: int | None = None
        self.lease = None  # released by a stop at once
        self._exit_now: str | None = None
        self._forward = False
        self._lock = threading.Lock()
        self._previous: dict = {}
        self._watching, self._previous_wakeup, self._sockets = False, -1, ()
        try:
            for signum in (signal.SIGINT,) if multihost else (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        except ValueError:  # not the main thread: signals stay as they are
            return
        if exit_at_once:
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            self._sockets = (reader, writer)
            self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._watching = True
            threading.Thread(target=self._watch, name="msk-stop-signals", daemon=True).start()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _note(self, signum: int) -> bool:
        """Records a stop signal; True for the first."""
        with self._lock:
            if self.signal_name is not None:
                return False
            self.signal_name = signal.Signals(signum).name
            if self.multihost and self._forward and signum == signal.SIGINT:
                os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier
            return True

    def _handler(self, signum, frame):
        if not self._note(signum) and signum == signal.SIGINT and not self._watching:
            raise KeyboardInterrupt

    def _watch(self) -> None:
        reader, stops = self._sockets[0], 0
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                stops += 1
                self._note(signum)
                name = signal.Signals(signum).name
                if stops == 1:
                    with self._lock:
                        if self._exit_now is not None:
                            self._exit(self._exit_now.format(signal=name), 0, sys.stdout)
                elif signum == signal.SIGINT:
                    at = f" at step {self.step}" if self.step is not None else " during start-up"
                    last = (f"the last checkpoint is step {self.last_checkpoint}" if self.last_checkpoint is not None
                            else "no checkpoint was saved")
                    self._exit(f"stopped at once by a second SIGINT{at}, without saving; {last}.", 130, sys.stderr)

    def _exit(self, message: str, code: int, stream) -> None:
        try:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            print(message, file=stream, flush=True)
            if self.lease is not None:
                with contextlib.suppress(Exception):
                    self.lease.release()
        finally:
            os._exit(code)

    @contextlib.contextmanager
    def nothing_to_lose(self, step: int | None):
        """While in it (one process, the command line), a first stop request ends the process at
        once with exit 0: nothing was trained since `step`'s checkpoint or the start."""
        if self.multihost or not self._watching:
            yield
            return
        with self._lock:
            self._exit_now = _before_training("{signal}", step)
        try:
            yield
        finally:
            with self._lock:
                self._exit_now = None

    def training_starts(self) -> None:
        """From now on a SIGINT of a multi-host run goes to JAX's preemption notifier (it is
        installed, and every process calls `reached`)."""
        with self._lock:
            self._forward = True

    def before_training(self) -> bool:
        """Whether to stop at this stage of the start-up (every process calls it, and agrees)."""
        if not self.multihost:
            return self.requested
        return any(checkpoints.agree(int(self.requested)))

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (call once per step, on every process)."""
        self.step = step
        if self.multihost:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def restore(self) -> None:
        """Puts back the signal handlers this replaced (and stops the thread)."""
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._previous = {}
        if self._watching:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._previous_wakeup)
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._watching = False


def _before_training(name: str, step: int | None) -> str:
    at = f" at step {step}" if step is not None else ""
    return f"stopped{at} on {name} before training; nothing new to save."


class _EvaluationCut(Exception):
    """A stop request cut an evaluation short."""


class _StopChecked:
    """An evaluation set's array whose batch reads end the evaluation once a stop is requested
    (`msk_jax.evaluators.embedding.embed` reads an evaluation set batch by batch)."""

    def __init__(self, array, stop: StopRequest):
        self.array, self.stop = array, stop

    def __getitem__(self, index):
        if self.stop.requested:
            raise _EvaluationCut()
        return self.array[index]

    def __len__(self):
        return len(self.array)

    def __getattr__(self, name):
        return getattr(self.array, name)


def _closing(close):
    """An ExitStack exit callback that calls `close()`. While an error already stops the run,
    a failure of `close` is dropped: the first error is the one the run reports."""
    def exit_callback(exc_type, exc, tb):
        try:
            close()
        except Exception:  # noqa: BLE001
            if exc_type is None:
                raise
        return False

    return exit_callback


def _take_lease(workdir: str, is_main: bool):
    """Process 0's lease of the work directory (None on the others); every process raises
    LeaseError when process 0 could not take it."""
    held, error = None, None
    if is_main:
        try:
            held = lease.Lease.acquire(workdir, warn=lambda message: print(f"warning: {message}", file=sys.stderr,
                                                                             flush=True))
        except lease.LeaseError as err:
            error = err
    if jax.process_count() > 1 and checkpoints.agree(int(error is not None))[0] and error is None:
        raise lease.LeaseError(f"{workdir}: process 0 could not take the work directory's lease "
                               "(its message says why).")
    if error is not None:
        raise error
    return held


# --- the loop -----------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str, stop: StopRequest | None = None) -> dict:
    """Trains per `config`, checkpointing into and resuming from `workdir`; returns the final
    evaluation results ({dataset: {direction: metrics}}), empty without evaluation sets or when
    a stop request (SIGINT, SIGTERM: `StopRequest`) ended the run, after a checkpoint of the step
    it reached. The command line passes its own `stop`; without one the run handles the signals
    while it runs, and a Ctrl-C then ends in KeyboardInterrupt after the checkpoint, as a caller
    in Python (a notebook, a grid of runs) expects of it."""
    own = stop is None
    if own:
        stop = StopRequest(multihost=jax.process_count() > 1)
    try:
        with contextlib.ExitStack() as cleanup:
            results = _train(config, workdir, stop, cleanup)
    finally:
        if own:
            stop.restore()
    if own and stop.signal_name == "SIGINT":
        raise KeyboardInterrupt
    return results


def _train(config, workdir: str, stop: StopRequest, cleanup: contextlib.ExitStack) -> dict:
    storage.makedirs(workdir)
    is_main = jax.process_index() == 0
    held = _take_lease(workdir, is_main)
    if held is not None:
        stop.lease = held
        cleanup.push(_closing(held.release))
    model = MultiSKModel.from_config(config)
    objective = ObjectiveConfig.from_config(config.objective)
    source, words, evals = data_sources.build_data(config)
    if config.videos_per_batch > len(source):
        raise ValueError(f"config.videos_per_batch={config.videos_per_batch} exceeds the {len(source)} training videos.")
    steps_per_epoch = max(1, len(source) // config.videos_per_batch)
    num_steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
    schedule = train_step.epoch_decay_schedule(config.optimizer.lr, config.optimizer.lr_decay_per_epoch,
                                               steps_per_epoch)
    tx = train_step.adam(schedule, config.optimizer.b1, config.optimizer.b2, config.optimizer.eps)
    if stop.before_training():
        return _stopped_before_training(stop, None)

    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.rules_for(mesh, [tuple(r) for r in config.sharding_rules])
    batch_sharding = sharding.batch_sharding(mesh)
    with stop.nothing_to_lose(None):
        state, state_sharding = create_sharded_state(
            jax.random.PRNGKey(config.seed), model, objective, tx, sample_batch(config, words.dim), mesh, rules,
            config.ema_decay if config.ema_decay else None)
    step_fn = compile_train_step(state_sharding, batch_sharding)
    if stop.before_training():
        return _stopped_before_training(stop, None)

    pipeline = TrainingPipeline(source, config.videos_per_batch, seed=config.seed,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                workers=config.data.workers, prefetch=config.data.prefetch,
                                processes=config.data.worker_processes, batch_tasks=True,
                                keep_batches=max(1, config.data.prefetch))
    cleanup.push(_closing(pipeline.close))
    cleanup.push(_closing(lambda: _report_input(pipeline, workdir, is_main)))
    checkpointer = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints, clean_partial=True,
                                          resumable=RESUMABLE_CHANGES)
    cleanup.push(_closing(checkpointer.close))
    resumed = checkpointer.restore_latest(state, json.loads(config.to_json()))
    input_position = pipeline.state()
    if resumed is not None:
        state, meta, _ = resumed
        position, warning = saved_input_position(meta["input"], config.videos_per_batch)
        if warning and is_main:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        try:
            pipeline.restore(position)
        except InputPositionError as err:
            raise InputPositionError(f"checkpoint step {int(sharding.to_host(state.step))} in "
                                     f"{checkpointer.directory}: {err}") from None
        input_position = pipeline.state()
        if is_main:
            print(f"resumed from step {int(sharding.to_host(state.step))} in {checkpointer.directory}", flush=True)
    step = int(sharding.to_host(state.step))
    stop.step, stop.last_checkpoint = step, step if resumed is not None else None
    if is_main:
        print(parameter_overview.get_parameter_overview(state.params, include_stats=False), flush=True)
    if stop.before_training():
        return _stopped_before_training(stop, step)

    # Metrics continue from the step the run continues from (a resumed run's later rows are cut).
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, log_keys=LOG_KEYS,
                                                  resume_step=step)
    cleanup.push(_closing(writer.close))

    def write(step, scalars=None):
        """Writes (when given) and flushes metrics; a storage failure stops the run in one line."""
        try:
            if scalars is not None:
                writer.write_scalars(step, scalars)
            writer.flush()
        except OSError as err:
            raise checkpoints.SaveError(
                f"the metrics of step {step} could not be written to {workdir}: "
                f"{checkpoints.describe_write_failure(err)}; {checkpointer.resume_note()}.") from None

    def save(force=False):
        step_metrics.check_finite()  # raises before a state computed from a non-finite step is saved
        meta = {"input": input_position, "config": config.to_json(), "num_train_steps": num_steps}
        if checkpointer.save(state, meta, force=force):  # returns once committed; raises SaveError
            stop.last_checkpoint = step
        write(step)

    suite = evaluators.build(config, evals)  # config.evals: each evaluator with its sets and period

    def run_eval(step, final=True):
        """The evaluation of `step` by the evaluators due then (all of them when `final`): their
        retrieval results, {} when none is due; None when a stop request cut it short (one
        process: the request is read before each batch)."""
        due = evaluators.due(suite, step, final)
        if not due:
            return {}
        if stop.requested and not stop.multihost:
            return None
        step_metrics.check_finite()
        variables = {"params": state.ema_params if config.eval_ema and state.ema_params is not None
                     else state.params, "batch_stats": state.batch_stats}
        sets = {name: s for e in due for name, s in e.sets.items()}
        if is_main:
            print(f"evaluating step {step} on {', '.join(sets)}", flush=True)
        if not stop.multihost:
            sets = {name: dataclasses.replace(s, batch={k: _StopChecked(v, stop) for k, v in s.batch.items()})
                    for name, s in sets.items()}
        due = evaluators.build(config, sets, [e.name for e in due])
        try:
            results = evaluators.run(due, model, variables, config.eval_batch_size,
                                     sharding=sharding.batch_sharding(mesh))
        except _EvaluationCut:
            return None
        if is_main:
            for path in evaluators.report(due, results, workdir, step, writer):
                print(f"evaluation written to {path}", flush=True)
        return evaluators.retrieval_results(due, results)

    def stopped(step):
        """Saves `step` (unless saved) and reports the stop."""
        if checkpointer.latest_step() != step:
            save(force=True)
        checkpointer.wait()
        where = f" (process {jax.process_index()})" if jax.process_count() > 1 else ""
        print(f"stopped at step {step} on {stop.signal_name or 'SIGTERM'}{where}; checkpoint saved.", flush=True)
        return {}

    progress = metric_writers.ReportProgress(num_steps, every_steps=config.log_every_steps)
    profile = (metric_writers.Profile(storage.join(workdir, "tensorboard"), config.profile_first_step,
                                      config.profile_steps) if config.profile_steps > 0 and is_main else None)
    if profile is not None:  # a profile the run stopped in is written now
        cleanup.push(_closing(profile.close))
    batches = DeviceBatches(pipeline, batch_sharding, ahead=max(1, config.data.prefetch))
    batch_shapes = sample_batch(config, words.dim)
    metric_shapes = jax.eval_shape(step_fn, state, batch_shapes)[1]
    step_metrics = StepMetrics(metric_shapes)
    if is_main:
        print(f"training {num_steps} steps ({steps_per_epoch} per epoch) from step {step}; "
              f"mesh {dict(mesh.shape)}; {len(source)} videos", flush=True)
    stop.training_starts()
    if stop.before_training():
        return _stopped_before_training(stop, step)
    with stop.nothing_to_lose(step):  # compiled here, not inside the first step: a stop request exits cleanly
        step_fn = step_fn.lower(state, {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                                        for k, v in batch_shapes.items()}).compile()
    if stop.before_training():
        return _stopped_before_training(stop, step)
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
            write(step, scalars)
            if held is not None and jax.process_count() == 1:
                held.check()  # another training took the work directory over: stop writing it
        if profile is not None:
            profile(step)
        preempted = stop.reached(step)  # every step, on every process
        if step % config.checkpoint_every_steps == 0 or preempted:
            save(force=preempted)
        if preempted:
            return stopped(step)
        if step < num_steps and evaluators.due(suite, step, final=False):
            if run_eval(step, final=False) is None:
                return stopped(step)
    if checkpointer.latest_step() != step:
        save(force=True)
    checkpointer.wait()
    results = run_eval(step)
    if results is None:
        return stopped(step)
    write(step)
    return results


def _stopped_before_training(stop: StopRequest, step: int | None) -> dict:
    print(_before_training(stop.signal_name or "SIGTERM", step), flush=True)
    return {}


def _report_input(pipeline: TrainingPipeline, workdir: str, is_main: bool) -> None:
    """The pipeline's summary, and every skipped video in `<workdir>/input_skipped.txt` (the
    terminal shows the first hundred)."""
    if is_main:
        print(pipeline.summary(), flush=True)
        if pipeline.skipped_videos:
            storage.write_atomic(storage.join(workdir, "input_skipped.txt"),
                                 "\n".join(pipeline.skipped_lines()) + "\n")


def release_compiled_programs() -> None:
    """Drops every program JAX compiled in this process, for a caller that trains run after run
    (`msk_jax.experiments`, the tests) to call between runs. JAX keeps compiled programs in
    process-wide caches keyed by the run's model and optimizer, which no later run shares; kept,
    a tiny run's programs hold about 2,100 memory mappings on CPU, and Linux allows 65,530 before
    LLVM cannot map another and the process aborts. Training itself leaves the caches alone: they
    are the caller's too (a notebook's own jitted functions)."""
    jax.clear_caches()
