"""Zero-shot evaluation of a checkpoint: `python -m msk_jax.evaluate --config=... --checkpoint=...`.

    python -m msk_jax.evaluate --config=configs/howto.py:demo --checkpoint=/tmp/msk_demo
    python -m msk_jax.evaluate --config=configs/howto.py --checkpoint=RUN --weights=online
    python -m msk_jax.evaluate --config=configs/howto.py --torch_checkpoint=model_best.pth --output_dir=OUT
    python -m msk_jax.evaluate --config=configs/howto.py:demo --checkpoint=RUN --watch
    python -m msk_jax.evaluate --config=configs/howto.py --checkpoint=gs://bucket/run --watch
    python -m msk_jax.evaluate --config=configs/howto.py --checkpoint=RUN --evals=classification \
        --config.data.ucf101=ucf101_classification.pkl --config.data.hmdb51=hmdb51_classification.pkl

--checkpoint takes a training workdir (its latest checkpoint), its `checkpoints/` folder, or one
step folder, on disk or in a bucket (gs://...; so do --output_dir and the data paths).
--torch_checkpoint takes original PyTorch weights (.pth, needs torch) or a .npz of torch name ->
array. It runs the evaluators of `config.evals` (`msk_jax.evaluators`; --evals=NAME,... a subset).
Results: a table per evaluator on the terminal, a JSON file per evaluator in `<dir>/eval/`
(retrieval: `step_<step>-<weights>-<sets>.json`, e.g. `step_600-ema-MSRVTT+YouCook2.json`; the
others `step_<step>-<weights>-<evaluator>-<sets>.json`, e.g.
`step_600-ema-classification-Digits.json` with the confusion matrix `...-Digits.png` beside it;
training's own evaluation is `step_<step>.json`, `step_<step>-classification.json`, so neither
overwrites the other) and TensorBoard scalars in `<dir>/tensorboard`, where <dir> is the workdir
(or --output_dir). With --watch it follows a training workdir and evaluates each checkpoint whose
files (same weights, same sets) are missing; it stops once the run's last step has them, whoever
wrote them, at once on a finished run.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from msk_jax import allocator, checkpoint_reader, cli, data_sources, evaluators, metric_writers, sharding, storage
from msk_jax.checkpoints import CheckpointError
from msk_jax.errors import DataError
from msk_jax.model import MultiSKModel

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program, so that other tools can
    import this module's functions and define their own `--config`)."""
    config_flags.DEFINE_config_file("config", None, "The configuration the checkpoint was trained with.", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "Training workdir, its checkpoints/ folder, or a step folder.")
    flags.DEFINE_string("torch_checkpoint", None, "Original PyTorch weights (.pth) or a .npz of torch name -> array.")
    flags.DEFINE_enum("weights", "ema", ["ema", "online"], "Which msk_jax weights to evaluate (ema falls back "
                      "to online when the checkpoint has no EMA).")
    flags.DEFINE_string("output_dir", None, "Where eval/ and tensorboard/ go (default: the training workdir).")
    flags.DEFINE_bool("watch", False, "Follow a training workdir and evaluate every new checkpoint once.")
    flags.DEFINE_float("poll_seconds", 30.0, "With --watch: how often to look for new checkpoints.")
    flags.DEFINE_float("idle_timeout", 3600.0, "With --watch: stop after this long without a new checkpoint.")
    flags.DEFINE_list("evals", None, "Which evaluators of config.evals run (default: all of them).")


def result_path(output_dir: str, step: int, weights: str, sets, evaluator: str = evaluators.RETRIEVAL) -> str:
    """`<output_dir>/eval/step_<step>-<weights>-<set+set>.json` (other evaluators than retrieval:
    `step_<step>-<weights>-<evaluator>-<set+set>.json`): the binary's results, named apart from
    training's `step_<step>.json` (whose weights and sets are the training config's) and from an
    evaluation of other weights or sets."""
    return evaluators.result_path(output_dir, step, evaluator, list(sets), weights)


def evaluate_once(config, model, evals, variables, step, output_dir, writer, weights: str = "ema") -> dict:
    """Runs `evals` (evaluators), prints their tables, writes their files and scalars; returns
    the retrieval results (`evaluators.retrieval_results`)."""
    if not evals:
        raise DataError("config.data", "no evaluation set is configured (set config.data.msrvtt / "
                                       "config.data.youcook2, or a classification set of config.evals)",
                        "no evaluation set")
    # Each local device embeds a slice of every batch.
    batches = sharding.batch_sharding(sharding.create_mesh([("data", -1)]))
    results = evaluators.run(evals, model, variables, config.eval_batch_size, sharding=batches)
    paths = evaluators.report(evals, results, output_dir, step, writer, weights)
    writer.flush()
    print(f"evaluation of step {step} written to {', '.join(paths)}", flush=True)
    return evaluators.retrieval_results(evals, results)


def _evaluators(config, paths, words, names) -> list:
    """The evaluators of `config.evals` (of `names` only, when given) with their sets."""
    sets = data_sources.build_evaluation_sets(config, paths, words, names)
    return evaluators.build(config, sets, names)


def _evaluated(evals, out: str, step: int, weights: str) -> bool:
    """Whether every evaluator's file of `step` exists (written here or by another watcher)."""
    return all(storage.exists(e.result_path(out, step, weights)) for e in evals)


def run(config, checkpoint: str | None, torch_checkpoint: str | None, weights: str = "ema",
        output_dir: str | None = None, watch: bool = False, poll_seconds: float = 30.0,
        idle_timeout: float = 3600.0, evals: list[str] | None = None) -> dict:
    """Evaluates and returns {step: retrieval results} (with `watch`: of the steps evaluated
    here); every evaluator's results are in its files. `evals`: the names of the evaluators of
    `config.evals` to run (None: all)."""
    if bool(checkpoint) == bool(torch_checkpoint):
        raise CheckpointError("give exactly one of --checkpoint and --torch_checkpoint.")
    # A wrong path is told before the evaluation sets are read (or the demo corpus built).
    if torch_checkpoint and not storage.exists(torch_checkpoint):
        raise CheckpointError(f"PyTorch checkpoint '{torch_checkpoint}' does not exist.")
    located = checkpoint_reader.locate(checkpoint) if checkpoint else None
    paths = data_sources.data_paths(config, training=False)
    words = data_sources.load_words(config, paths)
    evals = _evaluators(config, paths, words, evals)
    model = MultiSKModel.from_config(config)
    template = checkpoint_reader.model_template(model, config, words.dim)
    if torch_checkpoint:
        out = output_dir or os.fspath(storage.path(torch_checkpoint).parent)
        writer = metric_writers.TensorBoardWriter(storage.join(out, "tensorboard"))
        variables = checkpoint_reader.load_torch_weights(torch_checkpoint, template)
        return {0: evaluate_once(config, model, evals, variables, 0, out, writer, "torch")}
    workdir, folder, step = located
    out = output_dir or workdir
    writer = metric_writers.TensorBoardWriter(storage.join(out, "tensorboard"))
    if not watch:
        variables, step = checkpoint_reader.load_msk_checkpoint(folder, step, template, weights)
        return {step: evaluate_once(config, model, evals, variables, step, out, writer, weights)}
    return _watch(config, model, evals, template, folder, out, writer, weights, poll_seconds, idle_timeout)


def _watch(config, model, evals, template, folder, out, writer, weights, poll_seconds, idle_timeout) -> dict:
    """Evaluates every complete checkpoint of `folder` whose result file is missing, until the
    run's last step has its file (written here or by another watcher of the same weights and
    sets) or no new checkpoint came for `idle_timeout` seconds."""
    seen, done, results, last_new = set(), set(), {}, time.monotonic()
    last_steps = {}  # step -> the run's last step, from that checkpoint's metadata
    while True:
        steps = checkpoint_reader.finished_steps(folder)
        if set(steps) - seen:
            seen.update(steps)
            last_new = time.monotonic()
        for s in steps:
            if s in done:
                continue
            if _evaluated(evals, out, s, weights):  # evaluated before, or by another watcher
                done.add(s)
                continue
            try:
                variables, _ = checkpoint_reader.load_msk_checkpoint(folder, s, template, weights)
            except (CheckpointError, ValueError, OSError) as err:  # e.g. still being written
                print(f"step {s}: not readable yet ({err}); will retry", flush=True)
                continue
            results[s] = evaluate_once(config, model, evals, variables, s, out, writer, weights)
            done.add(s)
        if steps:
            last = steps[-1]
            if last_steps.get(last) is None:  # read once per checkpoint (again if it could not be read)
                last_steps[last] = checkpoint_reader.final_step(folder, last)
            if last_steps[last] == last and last in done:
                unread = [s for s in steps if s not in done]
                print(f"step {last} is the run's last; stopping." + (f" Not evaluated (unreadable): steps {unread}."
                                                                     if unread else ""), flush=True)
                return results
        if time.monotonic() - last_new >= idle_timeout:
            print(f"no new checkpoint for {idle_timeout:.0f} s; stopping.", flush=True)
            return results
        time.sleep(poll_seconds)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    # CheckpointError, DataError, ConversionError and OSError end in one line (msk_jax.cli).
    run(FLAGS.config, FLAGS.checkpoint, FLAGS.torch_checkpoint, FLAGS.weights, FLAGS.output_dir, FLAGS.watch,
        FLAGS.poll_seconds, FLAGS.idle_timeout, FLAGS.evals)


if __name__ == "__main__":
    allocator.use_tcmalloc()
    _define_flags()
    flags.mark_flags_as_required(["config"])
    cli.run(main, config_flag="config")
