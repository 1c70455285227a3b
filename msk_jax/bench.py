"""Benchmarks: ``python -m msk_jax.bench {sk,step,pipeline,loop,plan,all} [--config=configs/bench.py] [--json=OUT]``.

Their shapes are the config file's (``configs/bench.py:cpu_bench``, one section per command;
override a field with e.g. ``--config.step.repeats=7``).

``sk``  -- the Multi-SK solver at the production size ("sk-prod" in BENCH.md: N = 7660 rows,
           K = 64 anchors, R = 32, eps 0.07, 20 iterations, float32, 12 problems per step).
           Side by side in one run: the solver (``multi_sinkhorn`` on one problem and on a
           step's stack, with the config's ``problems_at_once`` and the others of
           ``at_once_sweep``), its JAX loop (the GPU/TPU path), the log-domain solver it
           replaced, a straightforward dense K x N x K solver, and a plain memory copy.
``step`` -- one train step of the paper architecture at CPU-sized widths ("cpu-bench" in
           BENCH.md: embed 512, 8 heads, projection 768, DAVEnet widths up to 1024, 64 anchors,
           queues of 512 filled by warm-up steps as in training, 64 clips,
           float32): median step time, clips/s, FLOP/s against the
           machine's float32 matmul peak measured in the same run, and where the time goes (the
           same step with the consistency loss off, i.e. without Multi-SK, side by side).
``pipeline`` -- the training input pipeline on the demo corpus (clips/s), or at HowTo100M's
           per-video sizes (``--config.pipeline.sizes=howto100m``).
``loop`` -- the train loop's time per step against the bare jitted step.
``plan`` -- the configs/howto.py step compiled ahead of time per accelerator and mesh.
``all`` -- every benchmark but ``plan``, one after the other.

Times are medians over ``repeats`` runs after a warm-up call (compilation excluded); the
variants are timed round-robin, so drift on a shared machine hits them alike. Memory is XLA's
compiled memory analysis of the jitted call: arguments + outputs + temporaries - aliased bytes,
i.e. the peak of the buffers XLA allocates for it (no host-side Python objects); MB = 1e6 bytes.

New benchmarks: write ``run_NAME(**options) -> dict`` and ``_cli_NAME(config) -> dict`` (reading
``config.NAME``), add its section to configs/bench.py and the pair to ``BENCHMARKS``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from msk_jax import allocator, multisk_reference, sinkhorn

MB = 1e6


# --- helpers ------------------------------------------------------------------------------------

def time_side_by_side(fns: dict[str, Callable[[], object]], repeats: int,
                      warm_calls: int = 0) -> dict[str, float]:
    """Median wall seconds per call of each zero-argument function, after one warm-up call each;
    the functions are timed round-robin. warm_calls: untimed calls just before each timed one
    (so a variant is timed with its own working set in the caches, not the previous one's)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(warm_calls):
                jax.block_until_ready(fn())
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def compile_for(fn: Callable, *args):
    """fn jitted and compiled for these arguments (a callable taking the same arguments)."""
    return jax.jit(fn).lower(*args).compile()


def peak_bytes(compiled) -> int:
    """Arguments + outputs + temporaries - aliased bytes of a compiled call, from XLA's analysis."""
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def copy_bandwidth(nbytes: int = 64 * 2**20, repeats: int = 20) -> float:
    """Bytes read + written per second by a numpy copy of an nbytes float32 array."""
    src = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / float(np.median(times))


# --- Multi-SK -------------------------------------------------------------------------------------

def dense_multi_sinkhorn(scores: jax.Array, eps: float, num_iters: int, required_fraction: float) -> jax.Array:
    """The straightforward solver's target (`msk_jax.multisk_reference`, float32 in JAX): the full
    K x N x K tensor, as the original builds it; the reference point for time and memory."""
    return multisk_reference.dense_multi_sinkhorn(scores, eps, num_iters, required_fraction, xp=jnp)[1]


def run_sk(n: int, k: int, problems: int, *, eps: float, num_iters: int, required_fraction: float,
           problems_at_once: int | None, at_once_sweep: tuple[int, ...] = (), repeats: int = 5,
           baseline: bool = True, dense: bool = True, batch_rows: int = 2160, seed: int = 0) -> dict:
    """Times and memory of the Multi-SK solvers on random cosine scores; see the module doc.

    Every variant is ``sinkhorn.multi_sinkhorn`` with its path pinned by its arguments. Returns
    seconds per problem (one (n, k) problem per call) and per step (``problems`` stacked problems
    per call, ``problems_at_once`` of them together), peak MB of a step, the achieved bandwidth
    and the copy bandwidth (GB/s), as ``{variant}_seconds_per_problem`` etc. for the variants
    ``sk`` (the solver; its step returns the targets of the last ``batch_rows`` rows, as the loss
    uses them), ``sk_full`` (the step returning all rows' targets), ``at_once_G`` for G in
    ``at_once_sweep`` (the step with G problems together: what the default is measured
    against), ``jax_linear`` (the linear domain as a JAX loop, the path on GPU/TPU and on CPU
    without the native kernel), ``baseline`` (the log-domain solver, the whole stack vmapped as
    the loss first called it) and ``dense`` (one problem).
    """
    settings = dict(eps=eps, num_iters=num_iters, required_fraction=required_fraction)
    num_required = sinkhorn.num_required_slots(k, required_fraction)
    stack = jnp.asarray(multisk_reference.random_cosine_scores(np.random.default_rng(seed), n, k, problems, dim=32))
    one = stack[0]
    rows = min(batch_rows, n)

    def solver(**options):
        return lambda s: sinkhorn.multi_sinkhorn(s, **settings, **options).target

    solve_one = compile_for(solver(), one)
    steps = {
        # As the training step calls it: only the batch rows' targets are used.
        "sk": compile_for(solver(last_rows=rows, problems_at_once=problems_at_once), stack),
        "sk_full": compile_for(solver(problems_at_once=problems_at_once), stack),
    }
    for at_once in at_once_sweep:
        steps[f"at_once_{at_once}"] = compile_for(solver(last_rows=rows, problems_at_once=at_once), stack)
    jax_linear = dict(domain="linear", backend="jax")
    jax_one = compile_for(solver(**jax_linear), one)
    steps["jax_linear"] = compile_for(solver(**jax_linear, last_rows=rows, problems_at_once=problems_at_once), stack)
    per_problem = {"sk": lambda: solve_one(one), "jax_linear": lambda: jax_one(one)}
    if baseline:
        log_one = compile_for(solver(domain="log"), one)
        steps["baseline"] = compile_for(solver(domain="log"), stack)
        per_problem["baseline"] = lambda: log_one(one)
    if dense:
        dense_one = compile_for(functools.partial(dense_multi_sinkhorn, **settings), one)
        per_problem["dense"] = lambda: dense_one(one)
    per_step = {name: functools.partial(step, stack) for name, step in steps.items()}

    # Agreement of the variants (the same targets), so that the timings compare like with like.
    reference = np.asarray(solve_one(one))
    max_diff = {name: float(np.max(np.abs(np.asarray(fn()) - reference)))
                for name, fn in per_problem.items() if name != "sk"}

    timed = ({f"{name}/problem": fn for name, fn in per_problem.items()}
             | {f"{name}/step": fn for name, fn in per_step.items()})
    # Warm: one untimed call before each timed one (the dense solver's 255 MB would otherwise
    # evict the others' working sets); cold: plain round-robin, reported alongside.
    seconds = time_side_by_side(timed, repeats, warm_calls=1)
    cold = time_side_by_side({name: timed[name] for name in ("sk/problem", "sk/step")}
                             | ({"dense/problem": timed["dense/problem"]} if dense else {}), repeats)
    copy_bytes_per_second = copy_bandwidth()

    # Bytes a solver must touch per iteration: read and write its state once (the linear domain:
    # x read and written, the fixed kernel read; the log domain: two matrices; dense: K x N x K).
    state_bytes = {"sk": 3 * n * k * 4, "jax_linear": 3 * n * k * 4, "baseline": 2 * 2 * n * k * 4,
                   "dense": 2 * k * n * k * 4}
    state_bytes.update({name: state_bytes["sk"] for name in steps if name.startswith("at_once_")})
    results: dict = {
        "shape": dict(n=n, k=k, problems=problems, num_required=num_required, **settings,
                      problems_at_once=problems_at_once, at_once_sweep=list(at_once_sweep)),
        "repeats": repeats, "machine": _machine(),
        "copy_gbps": copy_bytes_per_second / 1e9,
        "max_abs_diff_vs_sk": max_diff,
        "batch_rows": min(batch_rows, n),
        "sk_cold_seconds_per_problem": cold["sk/problem"],
        "sk_cold_seconds_per_step": cold["sk/step"],
    }
    for name in per_problem.keys() | per_step.keys():
        if f"{name}/problem" in seconds:
            results[f"{name}_seconds_per_problem"] = seconds[f"{name}/problem"]
            results[f"{name}_gbps"] = state_bytes[name] * num_iters / seconds[f"{name}/problem"] / 1e9
        if f"{name}/step" in seconds:
            results[f"{name}_seconds_per_step"] = seconds[f"{name}/step"]
            results[f"{name}_peak_mb"] = peak_bytes(steps[name]) / MB
            results[f"{name}_temp_mb"] = steps[name].memory_analysis().temp_size_in_bytes / MB
    if dense:
        results["dense_peak_mb_per_problem"] = peak_bytes(dense_one) / MB
    return results


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    allocator_name = "tcmalloc" if allocator.tcmalloc_loaded() else "system malloc"
    return (f"{model}, {os.cpu_count()} CPUs, {allocator_name}; jax {jax.__version__} on "
            f"{jax.device_count()} x {jax.devices()[0].device_kind}")


def format_sk(results: dict) -> str:
    """The short table printed by ``python -m msk_jax.bench sk``."""
    shape = results["shape"]
    at_once = shape.get("problems_at_once")
    rows = [("sk", f"Multi-SK solver; step returns last {results['batch_rows']} rows"),
            ("sk_full", "  same, step returns all rows' targets")]
    rows += [(f"at_once_{group}", f"  same, {group} problems at once") for group in shape.get("at_once_sweep", ())]
    rows += [("jax_linear", "linear domain as a JAX loop (GPU/TPU path)"),
            ("baseline", "log-domain solver (first version), vmap"),
            ("dense", "dense K x N x K, float32")]
    base_problem = results.get("baseline_seconds_per_problem")
    base_step = results.get("baseline_seconds_per_step")
    lines = [f"Multi-SK  N={shape['n']} K={shape['k']} R={shape['num_required']} eps={shape['eps']} "
             f"iters={shape['num_iters']}  step = {shape['problems']} problems, "
             f"{at_once or 'all'} at once  "
             f"(median of {results['repeats']})",
             f"{'solver':46s} {'ms/problem':>10s} {'ms/step':>8s} {'peak MB/step':>12s} "
             f"{'GB/s':>5s} {'x baseline':>10s}"]
    for name, label in rows:
        per_problem = results.get(f"{name}_seconds_per_problem")
        per_step = results.get(f"{name}_seconds_per_step")
        if per_problem is None and per_step is None:
            continue
        if name == "dense" and "dense_peak_mb_per_problem" in results:
            peak = f"{results['dense_peak_mb_per_problem']:.0f} (1 pb)"
        else:
            peak = _fmt(results.get(f"{name}_peak_mb"), "{:.1f}")
        if per_problem is not None and base_problem is not None:
            speedup = _ratio(base_problem / per_problem)
        elif per_step is not None and base_step is not None:
            speedup = _ratio(base_step / per_step) + " (step)"
        else:
            speedup = "-"
        lines.append(f"{label:46s} {_fmt(per_problem, '{:.2f}', 1e3):>10s} "
                     f"{_fmt(per_step, '{:.1f}', 1e3):>8s} {peak:>12s} "
                     f"{_fmt(results.get(f'{name}_gbps'), '{:.1f}'):>5s} {speedup:>10s}")
    lines.append("ms/problem: multi_sinkhorn on one problem; ms/step: multi_sinkhorn on the stack; "
                 "peak: XLA arguments + outputs + temporaries")
    lines.append(f"copy bandwidth (numpy, 64 MiB, read + write): {results['copy_gbps']:.1f} GB/s; "
                 f"GB/s above = state bytes read + written once per iteration x iterations / time")
    if "sk_cold_seconds_per_problem" in results:
        lines.append(f"timed warm (one untimed call before each timed one); plain round-robin"
                     f"{' with the dense solver' if 'dense_seconds_per_problem' in results else ''}: "
                     f"{results['sk_cold_seconds_per_problem'] * 1e3:.2f} ms/problem, "
                     f"{results['sk_cold_seconds_per_step'] * 1e3:.1f} ms/step")
    lines.append("max |target - sk target|: " + ", ".join(
        f"{name} {diff:.1e}" for name, diff in results["max_abs_diff_vs_sk"].items()))
    return "\n".join(lines)


def _fmt(value, pattern: str, scale: float = 1.0) -> str:
    return "-" if value is None else pattern.format(value * scale)


def _ratio(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _cli_sk(config) -> dict:
    c = config.sk
    sk = config.objective.sinkhorn
    results = run_sk(c.n, c.k, c.problems, eps=sk.eps, num_iters=sk.num_iters, required_fraction=sk.required_fraction,
                     problems_at_once=sk.problems_at_once, at_once_sweep=tuple(c.at_once_sweep),
                     repeats=c.repeats, baseline=c.baseline, dense=c.dense)
    print(format_sk(results), flush=True)
    return results


# --- step: the cpu-bench train step -------------------------------------------------------------

def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of this machine (XLA, all cores)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    seconds = time_side_by_side({"mm": lambda: f(a)}, repeats)["mm"]
    return 2 * size ** 3 / seconds


def cpu_bench_batch(clips: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"video": rng.normal(size=(clips, 12, 4096)).astype(np.float32),
            "video_mask": np.ones((clips, 12), np.float32),
            "text": rng.normal(size=(clips, 20, 300)).astype(np.float32),
            "text_mask": np.ones((clips, 20), np.float32),
            "audio": rng.normal(size=(clips, 40, 768)).astype(np.float32),
            "audio_mask": np.ones((clips, 768), np.float32)}


def run_step(model, objective, clips: int = 64, queue_len: int = 512, repeats: int = 5) -> dict:
    """Median seconds of the train step of `model` (configs/bench.py: the cpu-bench model), with
    and without the consistency loss.

    The queues are filled the way training fills them: the step runs from empty queues until
    they hold `queue_len` rows of the model's embeddings, and only then is it timed (the
    initial uniform noise would send every Multi-SK problem to the log-domain fallback, which
    real training meets only during warm-up). The step is jitted with the state donated, as in
    training.
    """
    import dataclasses

    from msk_jax import train_step

    batch = cpu_bench_batch(clips)
    results, steps = {}, {}
    for name, consistency in (("step", True), ("step_without_multisk", False)):
        variant = dataclasses.replace(objective, queue_len=queue_len, consistency=consistency)
        state = train_step.create_train_state(jax.random.PRNGKey(0), model, variant, train_step.adam(5e-5), batch)
        compiled = jax.jit(train_step.train_step, donate_argnums=0).lower(state, batch).compile()
        flops = compiled.cost_analysis()
        flops = flops[0] if isinstance(flops, (list, tuple)) else flops
        results[f"{name}_flops"] = float(flops.get("flops", 0.0))
        if consistency:
            results["parameters"] = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
            while not bool(state.queues.is_full):  # warm-up: fill the queues with embeddings
                state, _ = compiled(state, batch)
            results["warmup_steps"] = int(state.step)
        holder = {"state": state}

        def run(compiled=compiled, holder=holder):
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics["loss"]

        steps[name] = run
    times = time_side_by_side(steps, repeats)
    peak = matmul_peak()
    results.update({
        "step_seconds": times["step"], "clips_per_second": clips / times["step"],
        "step_without_multisk_seconds": times["step_without_multisk"],
        "multisk_share": 1 - times["step_without_multisk"] / times["step"],
        "achieved_flops_per_second": results["step_flops"] / times["step"], "matmul_peak_flops_per_second": peak,
        "clips": clips, "queue_len": queue_len, "machine": _machine()})
    results["flop_utilisation"] = results["achieved_flops_per_second"] / peak
    return results


def format_step(r: dict) -> str:
    return "\n".join([
        f"cpu-bench train step ({r['clips']} clips, queues {r['queue_len']}, {r['parameters'] / 1e6:.1f} M parameters)"
        f" on {r['machine']}",
        f"  step              {r['step_seconds'] * 1e3:9.1f} ms   {r['clips_per_second']:7.1f} clips/s",
        f"  without Multi-SK  {r['step_without_multisk_seconds'] * 1e3:9.1f} ms   (Multi-SK + consistency: "
        f"{100 * r['multisk_share']:.0f}% of the step)",
        f"  FLOP/s            {r['achieved_flops_per_second'] / 1e9:9.1f} G    of a measured matmul peak "
        f"{r['matmul_peak_flops_per_second'] / 1e9:.1f} G ({100 * r['flop_utilisation']:.0f}%)"])


def _cli_step(config) -> dict:
    from msk_jax.loss import ObjectiveConfig
    from msk_jax.model import MultiSKModel

    c = config.step
    results = run_step(MultiSKModel.from_config(config), ObjectiveConfig.from_config(config.objective), clips=c.clips,
                       queue_len=c.queue_len, repeats=c.repeats)
    print(format_step(results), flush=True)
    return results


# --- loop: the train loop against the bare step ------------------------------------------------

class _MemorySource:
    """A video source of cpu-bench clips kept in memory (10 clips per video)."""

    def __init__(self, videos: int, clips: dict[str, np.ndarray]):
        self.videos, self.clips = videos, clips

    def __len__(self) -> int:
        return self.videos

    def sample_clips(self, index: int, rng) -> dict[str, np.ndarray]:
        return self.clips


def run_loop(model, objective, clips: int = 64, queue_len: int = 512, steps: int = 10, repeats: int = 3,
             log_every: int = 10) -> dict:
    """Seconds per step of the cpu-bench step run bare (the same device batch, no host work, one
    wait at the end) against the training loop's machinery: batches from a `TrainingPipeline`
    (in-memory clips), transferred ahead (`train.DeviceBatches`), metrics accumulated on the
    device (`train.StepMetrics`) and read every `log_every` steps; and the loop before that, which
    transferred each batch when needed and read every metric after every step. Round-robin over
    `repeats` rounds of `steps` steps; medians."""
    from msk_jax import sharding, train, train_step
    import dataclasses

    from msk_jax.data.pipeline import TrainingPipeline

    host = cpu_bench_batch(clips)
    mesh = sharding.create_mesh([("data", 1)], jax.devices()[:1])
    batch_sharding = sharding.batch_sharding(mesh)
    objective = dataclasses.replace(objective, queue_len=queue_len)
    state = train_step.create_train_state(jax.random.PRNGKey(0), model, objective, train_step.adam(5e-5), host)
    state_sharding = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), state)
    step_fn = train.compile_train_step(state_sharding, batch_sharding)
    device_batch = train.global_batch(host, batch_sharding)
    while not bool(state.queues.is_full):  # as `run_step`: queues filled by the step itself
        state, _ = step_fn(state, device_batch)
    per_video = {k: v[:10] for k, v in host.items()}
    pipeline = TrainingPipeline(_MemorySource(10 * clips, per_video), clips // 10, seed=0, workers=1)
    batches = train.DeviceBatches(pipeline, batch_sharding, ahead=2)
    metrics_names = jax.eval_shape(step_fn, state, device_batch)[1]
    step_metrics = train.StepMetrics(metrics_names)
    holder = {"state": state}

    def bare():
        for _ in range(steps):
            holder["state"], metrics = step_fn(holder["state"], device_batch)
        return metrics["loss"]

    def loop():
        for i in range(steps):
            batch, _ = batches.pop()
            holder["state"], metrics = step_fn(holder["state"], batch)
            step_metrics.add(metrics, i)
            batches.fill()
            if (i + 1) % log_every == 0:
                step_metrics.read()
        return holder["state"].step

    def synchronous():
        for _ in range(steps):
            batch = train.global_batch(next(pipeline), batch_sharding)
            holder["state"], metrics = step_fn(holder["state"], batch)
            {k: float(v) for k, v in sharding.to_host(metrics).items()}
        return holder["state"].step

    times = time_side_by_side({"bare": bare, "loop": loop, "synchronous": synchronous}, repeats)
    pipeline.close()
    per_step = {k: v / steps for k, v in times.items()}
    return {"clips": clips, "steps": steps, "log_every": log_every, "bare_step_seconds": per_step["bare"],
            "loop_step_seconds": per_step["loop"], "synchronous_loop_step_seconds": per_step["synchronous"],
            "loop_overhead": per_step["loop"] / per_step["bare"] - 1,
            "synchronous_overhead": per_step["synchronous"] / per_step["bare"] - 1, "machine": _machine()}


def format_loop(r: dict) -> str:
    return "\n".join([
        f"train loop vs bare step (cpu-bench, {r['clips']} clips, {r['steps']} steps per round, metrics read every "
        f"{r['log_every']}) on {r['machine']}",
        f"  bare jitted step        {r['bare_step_seconds'] * 1e3:8.1f} ms",
        f"  loop (asynchronous)     {r['loop_step_seconds'] * 1e3:8.1f} ms  ({100 * r['loop_overhead']:+.1f}%)",
        f"  loop (sync every step)  {r['synchronous_loop_step_seconds'] * 1e3:8.1f} ms  "
        f"({100 * r['synchronous_overhead']:+.1f}%)"])


def _cli_loop(config) -> dict:
    from msk_jax.loss import ObjectiveConfig
    from msk_jax.model import MultiSKModel

    c = config.loop
    results = run_loop(MultiSKModel.from_config(config), ObjectiveConfig.from_config(config.objective), clips=c.clips, queue_len=c.queue_len, steps=c.steps,
                       repeats=c.repeats)
    print(format_loop(results), flush=True)
    return results


# --- pipeline: input clips/s ---------------------------------------------------------------------

def run_pipeline(settings, corpus_dir: str | None = None, size: str = "default", videos_per_batch: int = 8,
                 batches: int = 30, workers: tuple[int, ...] = (1, 2), feature_dim: int = 128) -> dict:
    """Clips/s of the training pipeline on the demo corpus (built if needed), per worker count."""
    from msk_jax.data.demo_corpus import build_demo_corpus, default_root
    from msk_jax.data.howto100m import HowTo100MReader
    from msk_jax.data.pipeline import TrainingPipeline
    from msk_jax.data.word2vec import load_word2vec_binary

    root = corpus_dir or default_root()
    paths = build_demo_corpus(root, size=size, feature_dim=feature_dim, progress=False)
    source = HowTo100MReader(paths.csv, paths.caption, paths.features_2d, paths.audio,
                             load_word2vec_binary(paths.word_vectors), features_3d=paths.features_3d,
                             settings=settings)
    results = {"videos_per_batch": videos_per_batch, "clips_per_batch": videos_per_batch * settings.n_clips}
    for count in workers:
        pipeline = TrainingPipeline(source, videos_per_batch, seed=0, workers=count)
        next(pipeline)  # warm-up
        start = time.perf_counter()
        clips = sum(len(next(pipeline)["video"]) for _ in range(batches))
        results[f"clips_per_second_workers_{count}"] = clips / (time.perf_counter() - start)
        pipeline.close()
    results["clips_per_second"] = max(v for k, v in results.items() if k.startswith("clips_per_second_"))
    return results


def _batch_bytes(batch: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in batch.values())


def _time_pipeline(make, videos_per_batch: int, batches: int) -> dict:
    """Times `batches` batches of a pipeline after two warm-up batches (worker start-up)."""
    pipeline = make()
    try:
        for _ in range(2):
            next(pipeline)
        wall, cpu = time.perf_counter(), time.process_time()
        worker_cpu, worker_read = pipeline.worker_cpu_seconds, pipeline.worker_bytes_read
        used = sum(_batch_bytes(next(pipeline)) for _ in range(batches))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu + pipeline.worker_cpu_seconds - worker_cpu
        videos = batches * videos_per_batch + sum(pipeline.skipped.values())
        return {"videos_per_second": videos / wall, "clips_per_second": batches * videos_per_batch * 10 / wall, "cpu_ms_per_video": 1e3 * cpu / videos,
                "used_bytes_per_video": used / videos, "worker_bytes_read": int(pipeline.worker_bytes_read - worker_read),
                "videos": videos}
    finally:
        pipeline.close()


class _GrainClips:
    """grain map: video index -> its clips (the model's arrays), or None when it cannot be read."""

    def __init__(self, source, seed: int = 0):
        self.source, self.seed = source, seed

    def __call__(self, index: int):
        from msk_jax.data.features import DataError
        from msk_jax.data.pipeline import MODEL_KEYS

        try:
            clips = self.source.sample_clips(int(index), np.random.default_rng([self.seed, 0, int(index)]))
        except DataError:
            return None
        return {k: clips[k] for k in MODEL_KEYS}


def _grain_pipeline(source, videos_per_batch: int, workers: int):
    """The same work with grain (optional, for comparison): shuffled indices, clips mapped in
    `workers` grain worker processes, batches of the clips of `videos_per_batch` videos."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags; this command line is argparse's
        flags.FLAGS.mark_as_parsed()

    def concatenate(videos):
        return {k: np.concatenate([v[k] for v in videos]) for k in videos[0]}

    dataset = (grain.MapDataset.range(len(source)).shuffle(seed=0).repeat().map(_GrainClips(source))
               .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * videos_per_batch))
               .filter(lambda clips: clips is not None)
               .batch(videos_per_batch, batch_fn=concatenate))
    return iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))


def _time_grain(source, videos_per_batch: int, batches: int, workers: int) -> dict:
    import psutil

    iterator = _grain_pipeline(source, videos_per_batch, workers)
    me = psutil.Process()

    def cpu():  # this process and its worker processes
        return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])

    for _ in range(2):
        next(iterator)
    wall, used = time.perf_counter(), cpu()
    for _ in range(batches):
        next(iterator)
    wall, used = time.perf_counter() - wall, cpu() - used
    videos = batches * videos_per_batch
    del iterator
    return {"videos_per_second": videos / wall, "clips_per_second": videos * 10 / wall,
            "cpu_ms_per_video": 1e3 * used / videos, "videos": videos}


def run_pipeline_howto100m(settings, corpus_dir: str | None = None, videos: int = 300, videos_per_batch: int = 16,
                           batches: int = 12, workers: tuple[int, ...] = (1, 2), dtype: str = "float32",
                           seconds: int = 396, dim: int = 2048, grain: bool = False) -> dict:
    """The input path at HowTo100M's per-video sizes (`msk_jax.data.synthetic`), read from the page
    cache: today's npz files read whole by threads, against the feature store read by window
    (threads, then worker processes), with 1 and 2 workers, in the same run; with `grain`, also
    the store through grain's worker processes (grain installed separately)."""
    from msk_jax.data import synthetic
    from msk_jax.data.demo_corpus import default_root
    from msk_jax.data.feature_store import FeatureStoreSource, build_feature_store
    from msk_jax.data.howto100m import HowTo100MReader
    from msk_jax.data.pipeline import TrainingPipeline
    from msk_jax.data.word2vec import load_word2vec_binary

    root = corpus_dir or os.path.join(os.path.dirname(default_root()), "bench_howto100m")
    paths = synthetic.write_synthetic_howto100m(os.path.join(root, "npz"), videos, seconds=seconds, dim_2d=dim,
                                                dim_3d=dim, progress=False)
    reader = HowTo100MReader(paths["csv"], paths["caption"], paths["features_2d"], paths["audio"],
                             load_word2vec_binary(paths["word_vectors"]), features_3d=paths["features_3d"],
                             settings=settings, dim_2d=dim, dim_3d=dim)
    store_dir = os.path.join(root, f"store_{dtype}_{videos}_{seconds}_{dim}")
    if not os.path.exists(os.path.join(store_dir, "meta.json")):
        build_feature_store(reader, store_dir, dtype=dtype, progress=False)
    store = FeatureStoreSource(store_dir, settings)
    npz_bytes = np.mean([sum(os.path.getsize(os.path.join(paths[k], reader.paths[i], f"{reader.video_id(i)}{suffix}"))
                             for k, suffix in (("features_2d", "_2d.npz"), ("features_3d", "_3d.npz"),
                                               ("audio", "_spec.npz")))
                         for i in range(len(reader))])
    for i in range(len(reader)):  # both formats into the page cache
        reader.video(i)
    paths_under_test = {"old": ("npz files, threads", reader, False), "store_threads": ("store, threads", store, False),
                        "new": ("store, processes", store, True)}
    results = {"videos": videos, "videos_per_batch": videos_per_batch, "npz_bytes_per_video": float(npz_bytes),
               "store_dtype": dtype}
    for name, (label, source, processes) in paths_under_test.items():
        rows = {}
        for count in workers:
            row = _time_pipeline(lambda: TrainingPipeline(source, videos_per_batch, seed=0, workers=count,
                                                          processes=processes), videos_per_batch, batches)
            if name == "old":
                row["read_per_used"] = npz_bytes / row["used_bytes_per_video"]
            elif processes:
                row["read_per_used"] = row["worker_bytes_read"] / row["videos"] / row["used_bytes_per_video"]
            rows[count] = row
        best = max(rows.values(), key=lambda r: r["videos_per_second"])
        results[name] = {"label": label, "workers": {str(k): v for k, v in rows.items()},
                         "videos_per_second": best["videos_per_second"], "clips_per_second": best["clips_per_second"],
                         "cpu_ms_per_video": rows[min(rows)]["cpu_ms_per_video"],
                         "read_per_used": best.get("read_per_used"),
                         "scaling_1_to_2": (rows[2]["videos_per_second"] / rows[1]["videos_per_second"]
                                            if 1 in rows and 2 in rows else None)}
    results.update({k: results["new"][k] for k in ("videos_per_second", "cpu_ms_per_video", "read_per_used",
                                                    "scaling_1_to_2")})
    if grain:
        rows = {count: _time_grain(store, videos_per_batch, batches, count) for count in workers}
        results["grain"] = {"label": "store, grain processes", "workers": {str(k): v for k, v in rows.items()},
                            "scaling_1_to_2": (rows[2]["videos_per_second"] / rows[1]["videos_per_second"]
                                               if 1 in rows and 2 in rows else None)}
    return results


def format_pipeline_howto100m(r: dict) -> str:
    lines = [f"input path at HowTo100M sizes: {r['videos']} videos, {r['npz_bytes_per_video'] / 1e6:.1f} MB of npz "
             f"each, {r['videos_per_batch']} videos (x 10 clips) per batch, page cache; {_machine()}",
             f"{'path':22s} {'workers':>7s} {'videos/s':>9s} {'clips/s':>8s} {'CPU-ms/video':>13s} {'read/used':>10s}"]
    for name in ("old", "store_threads", "new", "grain"):
        if name not in r:
            continue
        for count, row in r[name]["workers"].items():
            read = row.get("read_per_used")
            lines.append(f"{r[name]['label']:22s} {count:>7s} {row['videos_per_second']:9.0f} "
                         f"{row['clips_per_second']:8.0f} {row['cpu_ms_per_video']:13.2f} "
                         f"{'' if read is None else f'{read:.2f}x':>10s}")
        if r[name]["scaling_1_to_2"]:
            lines.append(f"{'':22s} 1 -> 2 workers: {r[name]['scaling_1_to_2']:.2f}x")
    return "\n".join(lines)


def _cli_pipeline(config) -> dict:
    from msk_jax import input_pipeline

    c = config.pipeline
    if c.sizes not in ("demo", "howto100m"):
        raise ValueError(f"config.pipeline.sizes='{c.sizes}': expected 'demo' or 'howto100m'.")
    if c.sizes == "howto100m":
        results = run_pipeline_howto100m(input_pipeline.clip_settings(config), c.corpus_dir or None, c.videos, batches=c.batches or 12, dtype=c.dtype,
                                         grain=c.grain)
        print(format_pipeline_howto100m(results), flush=True)
        return results
    results = run_pipeline(input_pipeline.clip_settings(config), c.corpus_dir or None, c.size, batches=c.batches or 30)
    for key, value in results.items():
        if key.startswith("clips_per_second_"):
            print(f"input pipeline, {key.rsplit('_', 1)[1]} worker(s): {value:8.0f} clips/s", flush=True)
    return results


# --- plan: the paper config compiled ahead of time per accelerator ------------------------------

# Chips a JAX process sees, their memory and dense bf16 matmul peak (vendor figures), hosts.
ACCELERATORS = {
    "v4-8": {"devices": 4, "memory_gib": 32, "peak_tflops": 275, "hosts": 1},
    "v5e-16": {"devices": 16, "memory_gib": 16, "peak_tflops": 197, "hosts": 4},
    "8xH100": {"devices": 8, "memory_gib": 80, "peak_tflops": 989, "hosts": 1},
}
PLAN_MESHES = ("data", "fsdp", "fsdp_model2")


def _plan_mesh(kind: str, devices: int) -> list:
    return {"data": [("data", devices)], "fsdp": [("fsdp", devices)],
            "fsdp_model2": [("fsdp", devices // 2), ("model", 2)]}[kind]


def compile_paper_step(mesh_kind: str, config_arg: str = "") -> dict:
    """AOT-compiles the train step of configs/howto.py[:config_arg] over all local devices with the
    given mesh, without allocating it: per-device memory_analysis and cost_analysis FLOPs."""
    import importlib.util

    from msk_jax import input_pipeline, sharding, train, train_step
    from msk_jax.loss import ObjectiveConfig
    from msk_jax.model import MultiSKModel

    spec = importlib.util.spec_from_file_location(
        "howto", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "howto.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(config_arg)
    devices = jax.device_count()
    mesh = sharding.create_mesh(_plan_mesh(mesh_kind, devices))
    rules = sharding.rules_for(mesh, [])
    model = MultiSKModel.from_config(config)
    objective = ObjectiveConfig.from_config(config.objective)
    tx = train_step.adam(config.optimizer.lr, config.optimizer.b1, config.optimizer.b2, config.optimizer.eps)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in input_pipeline.sample_batch(config, config.model.text_dim).items()}

    def init(rng):
        zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch.items()}
        return train_step.create_train_state(rng, model, objective, tx, zeros, ema_decay=config.ema_decay)

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sharding = sharding.tree_shardings(abstract, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh)
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()}
    start = time.perf_counter()
    compiled = train.compile_train_step(state_sharding, batch_sharding).lower(state, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    parameters = sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))
    return {"mesh": dict(mesh.shape), "devices": devices, "clips_per_step": int(batch["video"].shape[0]),
            "clips_per_device": int(batch["video"].shape[0]) // devices, "parameters": int(parameters),
            "compile_seconds": time.perf_counter() - start,
            "flops_per_device": float(cost.get("flops", 0.0)),
            "argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
            "alias_bytes": int(memory.alias_size_in_bytes), "temp_bytes": int(memory.temp_size_in_bytes),
            "peak_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                              - memory.alias_size_in_bytes + memory.temp_size_in_bytes)}


def run_plan(targets: tuple[str, ...] = tuple(ACCELERATORS), meshes: tuple[str, ...] = PLAN_MESHES,
             config_arg: str = "", store_videos_per_core: float | None = None, timeout: int = 1800) -> dict:
    """Each accelerator's device count forced on the CPU (one subprocess per target and mesh), the
    paper step compiled, and the input rate it needs at 40 % MFU."""
    import subprocess

    results = {}
    for target in targets:
        spec = ACCELERATORS[target]
        for mesh_kind in meshes:
            env = dict(os.environ, MSK_JAX_NATIVE="0", MSK_JAX_TCMALLOC="0", JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={spec['devices']}")
            code = ("import json, sys; from msk_jax import bench; "
                    f"print('PLAN ' + json.dumps(bench.compile_paper_step({mesh_kind!r}, {config_arg!r})))")
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("PLAN ")]
            if proc.returncode or not lines:
                results[f"{target}/{mesh_kind}"] = {"error": (proc.stderr or proc.stdout)[-800:]}
                print(f"plan {target} {mesh_kind}: failed", flush=True)
                continue
            r = json.loads(lines[-1][5:])
            flops = r["flops_per_device"] * r["devices"]
            step_seconds = flops / (spec["devices"] * spec["peak_tflops"] * 1e12 * 0.4)
            videos = r["clips_per_step"] / 10
            r.update({"target": target, "memory_gib": spec["memory_gib"], "flops_per_step": flops,
                      "fits": r["peak_bytes"] <= spec["memory_gib"] * 2**30,
                      "step_seconds_at_40pct_mfu": step_seconds,
                      "videos_per_second_needed": videos / step_seconds,
                      "videos_per_second_needed_per_host": videos / step_seconds / spec["hosts"]})
            if store_videos_per_core:
                r["input_cores_per_host"] = r["videos_per_second_needed_per_host"] / store_videos_per_core
            results[f"{target}/{mesh_kind}"] = r
            print(format_plan_row(r), flush=True)
    return results


def format_plan_row(r: dict) -> str:
    cores = f", {r['input_cores_per_host']:.1f} input cores/host" if "input_cores_per_host" in r else ""
    return (f"{r['target']:7s} mesh {r['mesh']}: {r['clips_per_device']} clips/device, "
            f"peak {r['peak_bytes'] / 2**30:.1f} GiB of {r['memory_gib']} ({'fits' if r['fits'] else 'does NOT fit'}; "
            f"args {r['argument_bytes'] / 2**30:.1f}, temp {r['temp_bytes'] / 2**30:.1f}), "
            f"{r['flops_per_step'] / 1e12:.0f} TFLOP/step, {r['step_seconds_at_40pct_mfu']:.2f} s/step at 40% MFU, "
            f"{r['videos_per_second_needed_per_host']:.0f} videos/s per host{cores}")


def _cli_plan(config) -> dict:
    c = config.plan
    return run_plan(tuple(c.targets.split(",")), tuple(c.meshes.split(",")), c.howto, c.store_videos_per_core or None)


BENCHMARKS: dict[str, tuple[Callable[..., dict], str]] = {
    "sk": (_cli_sk, "Multi-SK solver at the production size"),
    "step": (_cli_step, "cpu-bench train step"),
    "pipeline": (_cli_pipeline, "input pipeline clips/s (demo corpus, or HowTo100M sizes)"),
    "loop": (_cli_loop, "the train loop's time per step against the bare jitted step"),
    "plan": (_cli_plan, "the paper step compiled ahead of time per accelerator: memory, FLOPs"),
}
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "bench.py")


def run(command: str, config) -> dict:
    """Runs benchmark `command` (or "all": every one but plan) with `config` (configs/bench.py)."""
    if command == "all":  # plan: minutes of compilation per target, run it by name
        return {name: cli(config) for name, (cli, _) in BENCHMARKS.items() if name != "plan"}
    if command not in BENCHMARKS:
        raise ValueError(f"unknown benchmark '{command}'; choose from {sorted(BENCHMARKS) + ['all']}.")
    return BENCHMARKS[command][0](config)


def main(argv):
    from absl import app

    if len(argv) != 2:
        raise app.UsageError("usage: python -m msk_jax.bench COMMAND [--config=configs/bench.py] [--json=OUT]; "
                             "COMMAND: " + ", ".join(f"{n} ({h})" for n, (_, h) in BENCHMARKS.items())
                             + ", all (every one but plan)")
    try:
        results = run(argv[1], FLAGS.config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    allocator.use_tcmalloc()
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", CONFIG, "The benchmarks' shapes (configs/bench.py).")
    flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
    app.run(main)
