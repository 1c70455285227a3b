"""``sk``: the Multi-SK solver at the production size ("sk-prod"), side by side in one run: the
solver on one problem and on a step's stack (with the config's ``problems_at_once`` and the others
of ``at_once_sweep``), its JAX loop (the GPU/TPU path), the log-domain solver it replaced, a
straightforward dense K x N x K solver, and a plain memory copy; seconds, peak MB and GB/s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from msk_jax import multisk_reference, sinkhorn
from msk_jax.bench.common import MB, compile_for, copy_bandwidth, machine, peak_bytes, time_side_by_side


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
        "repeats": repeats, "machine": machine(),
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


def cli(config) -> dict:
    c = config.sk
    sk = config.objective.sinkhorn
    results = run_sk(c.n, c.k, c.problems, eps=sk.eps, num_iters=sk.num_iters, required_fraction=sk.required_fraction,
                     problems_at_once=sk.problems_at_once, at_once_sweep=tuple(c.at_once_sweep),
                     repeats=c.repeats, baseline=c.baseline, dense=c.dense)
    print(format_sk(results), flush=True)
    return results
