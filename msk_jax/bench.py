"""Benchmarks: ``python -m msk_jax.bench {sk,all} [--json OUT]``.

``sk``  -- the Multi-SK solver at the production size ("sk-prod" in BENCH.md: N = 7660 rows,
           K = 64 anchors, R = 32, eps 0.07, 20 iterations, float32, 12 problems per step).
           Side by side in one run: the solver (``multi_sinkhorn`` for one problem,
           ``multi_sinkhorn_batched`` for a step), the log-domain solver it replaced (``vmap``
           over the stack, as the loss called it), a straightforward dense K x N x K solver,
           and a plain memory copy for the bandwidth.
``all`` -- every benchmark above, one after the other.

Times are medians over ``--repeats`` runs after a warm-up call (compilation excluded); the
variants are timed round-robin, so drift on a shared machine hits them alike. Memory is XLA's
compiled memory analysis of the jitted call: arguments + outputs + temporaries - aliased bytes,
i.e. the peak of the buffers XLA allocates for it (no host-side Python objects); MB = 1e6 bytes.

New benchmarks: write ``run_NAME(**options) -> dict`` and ``_cli_NAME(args) -> dict`` and add
them to ``BENCHMARKS`` with their command-line options.
"""

from __future__ import annotations

import argparse
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

from msk_jax import sinkhorn

MB = 1e6


# --- helpers ------------------------------------------------------------------------------------

def time_side_by_side(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds per call of each zero-argument function, after one warm-up call each;
    the functions are timed round-robin."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
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


def random_cosine_scores(seed: int, problems: int, n: int, k: int, dim: int = 32) -> np.ndarray:
    """(problems, n, k) cosine similarities of random unit vectors, float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(problems, n, dim))
    z = rng.normal(size=(problems, k, dim))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return np.einsum("pnd,pkd->pnk", x, z).astype(np.float32)


# --- Multi-SK -------------------------------------------------------------------------------------

def dense_multi_sinkhorn(scores: jax.Array, eps: float, num_iters: int,
                         required_fraction: float) -> jax.Array:
    """The straightforward solver: the full K x N x K tensor, as the original builds it (float32).

    Same math as :func:`msk_jax.sinkhorn.multi_sinkhorn` (whose target it returns), no shortcuts;
    the reference point for time and memory. Jit it with the settings static.
    """
    n, k = scores.shape
    r = sinkhorn.num_required_slots(k, required_fraction)
    weights = np.full(k, sinkhorn.OPTIONAL_SLOT_WEIGHT, np.float32)
    weights[k - r:] = sinkhorn.REQUIRED_SLOT_WEIGHT
    c = jnp.asarray(sinkhorn.anchor_marginal(n, k))
    q = jnp.exp(jnp.asarray(weights)[:, None, None] * scores[None] / eps)  # (K, N, K)
    q = q / jnp.sum(q)

    def iteration(_, a):
        a = a * (c / (jnp.sum(a, axis=1, keepdims=True) + sinkhorn.DAMPING))
        a = a / (jnp.sum(a, axis=0, keepdims=True) + sinkhorn.DAMPING)
        return a / (jnp.sum(a, axis=2, keepdims=True) + sinkhorn.DAMPING)

    a = jax.lax.fori_loop(0, num_iters, iteration, q)
    a = a / jnp.sum(a, axis=2, keepdims=True)
    return sinkhorn.minmax_normalize_rows(jnp.sum(a[k - r:], axis=0))


def _log_domain_target(scores, eps, num_iters, num_required):
    """The solver before this benchmark existed: log domain, one problem."""
    final, _, _ = sinkhorn._solve(scores, eps, num_iters, num_required, None, method="log")
    return sinkhorn.minmax_normalize_rows(num_required * final[-1])


def _linear_target(scores, eps, num_iters, num_required):
    final, _, _ = sinkhorn._solve(scores, eps, num_iters, num_required, None, method="linear")
    return sinkhorn.minmax_normalize_rows(num_required * final[-1])


def run_sk(n: int = 7660, k: int = 64, problems: int = 12, eps: float = 0.07, num_iters: int = 20,
           required_fraction: float = 0.5, repeats: int = 5, baseline: bool = True,
           dense: bool = True, stacked: bool = True, batch_rows: int = 2160, seed: int = 0) -> dict:
    """Times and memory of the Multi-SK solvers on random cosine scores; see the module doc.

    Returns seconds per problem (one (n, k) problem per call) and per step (``problems`` stacked
    problems per call), peak MB of a step, the achieved bandwidth and the copy bandwidth (GB/s),
    as ``{variant}_seconds_per_problem`` etc. for the variants ``sk`` (the solver; its step
    returns the targets of the last ``batch_rows`` rows, as the loss uses them), ``sk_full``
    (the step returning all rows' targets), ``baseline`` (the log-domain solver, vmapped as the
    loss called it), ``stacked`` (the linear-domain solver vmapped over the stack instead of
    mapped) and ``dense`` (one problem).
    """
    settings = dict(eps=eps, num_iters=num_iters, required_fraction=required_fraction)
    num_required = sinkhorn.num_required_slots(k, required_fraction)
    static = dict(eps=eps, num_iters=num_iters, num_required=num_required)
    stack = jnp.asarray(random_cosine_scores(seed, problems, n, k))
    one = stack[0]

    solve_one = compile_for(lambda s: sinkhorn.multi_sinkhorn(s, **settings).target, one)
    steps = {
        # As the training step calls it: only the batch rows' targets are used.
        "sk": compile_for(lambda s: sinkhorn.multi_sinkhorn_batched(
            s, **settings, last_rows=min(batch_rows, n)).target, stack),
        "sk_full": compile_for(lambda s: sinkhorn.multi_sinkhorn_batched(s, **settings).target,
                               stack),
    }
    if stacked:
        steps["stacked"] = compile_for(jax.vmap(functools.partial(_linear_target, **static)), stack)
    per_problem = {"sk": lambda: solve_one(one)}
    if baseline:
        log_one = compile_for(functools.partial(_log_domain_target, **static), one)
        steps["baseline"] = compile_for(jax.vmap(functools.partial(_log_domain_target, **static)),
                                        stack)
        per_problem["baseline"] = lambda: log_one(one)
    if dense:
        dense_one = compile_for(functools.partial(dense_multi_sinkhorn, **settings), one)
        per_problem["dense"] = lambda: dense_one(one)
    per_step = {name: functools.partial(step, stack) for name, step in steps.items()}

    # Agreement of the variants (the same targets), so that the timings compare like with like.
    reference = np.asarray(solve_one(one))
    max_diff = {name: float(np.max(np.abs(np.asarray(fn()) - reference)))
                for name, fn in per_problem.items() if name != "sk"}

    seconds = time_side_by_side({f"{name}/problem": fn for name, fn in per_problem.items()}
                                | {f"{name}/step": fn for name, fn in per_step.items()}, repeats)
    copy_bytes_per_second = copy_bandwidth()

    # Bytes a solver must touch per iteration: read and write its state once.
    state_bytes = {"sk": 2 * 2 * n * k * 4, "baseline": 2 * 2 * n * k * 4,
                   "dense": 2 * k * n * k * 4}
    results: dict = {
        "shape": dict(n=n, k=k, problems=problems, num_required=num_required, **settings),
        "repeats": repeats, "machine": _machine(),
        "copy_gbps": copy_bytes_per_second / 1e9,
        "max_abs_diff_vs_sk": max_diff,
        "batch_rows": min(batch_rows, n),
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
    return (f"{model}, {os.cpu_count()} CPUs; jax {jax.__version__} on "
            f"{jax.device_count()} x {jax.devices()[0].device_kind}")


def format_sk(results: dict) -> str:
    """The short table printed by ``python -m msk_jax.bench sk``."""
    shape = results["shape"]
    rows = [("sk", f"Multi-SK solver; step returns last {results['batch_rows']} rows"),
            ("sk_full", "  same, step returns all rows' targets"),
            ("stacked", "  same, one vmap over the 12 (no pairs)"),
            ("baseline", "log-domain solver (before), vmap"),
            ("dense", "dense K x N x K, float32")]
    base_problem = results.get("baseline_seconds_per_problem")
    base_step = results.get("baseline_seconds_per_step")
    lines = [f"Multi-SK  N={shape['n']} K={shape['k']} R={shape['num_required']} eps={shape['eps']} "
             f"iters={shape['num_iters']}  step = {shape['problems']} problems  "
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
    lines.append("ms/problem: one call on one problem (multi_sinkhorn); ms/step: one call on the "
                 "stack (multi_sinkhorn_batched); peak: XLA arguments + outputs + temporaries")
    lines.append(f"copy bandwidth (numpy, 64 MiB, read + write): {results['copy_gbps']:.1f} GB/s; "
                 f"GB/s above = state bytes read + written once per iteration x iterations / time")
    lines.append("max |target - sk target|: " + ", ".join(
        f"{name} {diff:.1e}" for name, diff in results["max_abs_diff_vs_sk"].items()))
    return "\n".join(lines)


def _fmt(value, pattern: str, scale: float = 1.0) -> str:
    return "-" if value is None else pattern.format(value * scale)


def _ratio(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _add_sk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=7660, help="rows per problem (queue + batch)")
    parser.add_argument("--k", type=int, default=64, help="anchors")
    parser.add_argument("--problems", type=int, default=12, help="problems per step")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-baseline", action="store_true", help="skip the log-domain solver")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense solver")
    parser.add_argument("--no-stacked", action="store_true", help="skip the vmapped variant")


def _cli_sk(args: argparse.Namespace) -> dict:
    results = run_sk(n=args.n, k=args.k, problems=args.problems, num_iters=args.iters,
                     repeats=args.repeats, baseline=not args.no_baseline, dense=not args.no_dense,
                     stacked=not args.no_stacked)
    print(format_sk(results), flush=True)
    return results


BENCHMARKS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                            Callable[[argparse.Namespace], dict], str]] = {
    "sk": (_add_sk_arguments, _cli_sk, "Multi-SK solver at the production size"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msk_jax.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in BENCHMARKS.items():
        sub = commands.add_parser(name, help=help_text)
        add_arguments(sub)
        sub.add_argument("--json", metavar="OUT", help="write the results to this JSON file")
    every = commands.add_parser("all", help="run every benchmark with its default settings")
    every.add_argument("--json", metavar="OUT", help="write the results to this JSON file")
    args = parser.parse_args(argv)

    if args.command == "all":
        results = {}
        for name, (add_arguments, run, _) in BENCHMARKS.items():
            sub = argparse.ArgumentParser()
            add_arguments(sub)
            results[name] = run(sub.parse_args([]))
    else:
        results = BENCHMARKS[args.command][1](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
