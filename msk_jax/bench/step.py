"""``step``: one train step of the paper architecture at CPU-sized widths ("cpu-bench"): median
step time, clips/s, FLOP/s against the machine's float32 matmul peak measured in the same run, and
the share of Multi-SK (the same step with the consistency loss off, side by side).
"""

from __future__ import annotations

import jax
import numpy as np

from msk_jax import train_step
from msk_jax.bench.common import init_state, machine, matmul_peak, time_side_by_side
from msk_jax.data import batch as batch_spec
from msk_jax.loss import ObjectiveConfig
from msk_jax.model import MultiSKModel


def cpu_bench_batch(clips: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Random cpu-bench inputs (12 video tokens, 20 words, 768 log-mel frames) with full masks."""
    rng = np.random.default_rng(seed)
    shapes = batch_spec.shapes(clips, video_tokens=12, video_dim=4096, audio_bins=40, audio_frames=768, words=20,
                          word_dim=300)
    return {k: np.ones(shape, np.float32) if k.endswith("_mask") else rng.normal(size=shape).astype(np.float32)
            for k, shape in shapes.items()}


def run_step(model, objective, clips: int = 64, queue_len: int = 512, repeats: int = 5,
             compare_precision: bool = False) -> dict:
    """Median seconds of the train step of `model` (configs/bench.py: the cpu-bench model), with
    and without the consistency loss, and with `compare_precision` also with the objective's
    similarity matmuls at the default precision instead of `objective.matmul_precision`.

    The queues are filled the way training fills them: the step runs from empty queues until
    they hold `queue_len` rows of the model's embeddings, and only then is it timed (the
    initial uniform noise would send every Multi-SK problem to the log-domain fallback, which
    real training meets only during warm-up). The step is jitted with the state donated, as in
    training.
    """
    import dataclasses


    batch = cpu_bench_batch(clips)
    results, steps = {}, {}
    variants = [("step", True, objective.matmul_precision), ("step_without_multisk", False, objective.matmul_precision)]
    if compare_precision:
        variants.append(("step_default_precision", True, "default"))
    for name, consistency, precision in variants:
        variant = dataclasses.replace(objective, queue_len=queue_len, consistency=consistency,
                                      matmul_precision=precision)
        state = init_state(model.clone(similarity_precision=precision), variant, batch)
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
        "clips": clips, "queue_len": queue_len, "machine": machine()})
    results["flop_utilisation"] = results["achieved_flops_per_second"] / peak
    if compare_precision:
        results["matmul_precision"] = objective.matmul_precision
        results["step_default_precision_seconds"] = times["step_default_precision"]
    return results


def format_step(r: dict) -> str:
    return "\n".join([
        f"cpu-bench train step ({r['clips']} clips, queues {r['queue_len']}, {r['parameters'] / 1e6:.1f} M parameters)"
        f" on {r['machine']}",
        f"  step              {r['step_seconds'] * 1e3:9.1f} ms   {r['clips_per_second']:7.1f} clips/s",
        f"  without Multi-SK  {r['step_without_multisk_seconds'] * 1e3:9.1f} ms   (Multi-SK + consistency: "
        f"{100 * r['multisk_share']:.0f}% of the step)",
        f"  FLOP/s            {r['achieved_flops_per_second'] / 1e9:9.1f} G    of a measured matmul peak "
        f"{r['matmul_peak_flops_per_second'] / 1e9:.1f} G ({100 * r['flop_utilisation']:.0f}%)"]
        + ([f"  similarity matmuls at precision {r['matmul_precision']!r}: {r['step_seconds'] * 1e3:.1f} ms, at "
            f"'default': {r['step_default_precision_seconds'] * 1e3:.1f} ms"] if "step_default_precision_seconds" in r else []))


def cli(config) -> dict:
    c = config.step
    results = run_step(MultiSKModel.from_config(config), ObjectiveConfig.from_config(config.objective), clips=c.clips,
                       queue_len=c.queue_len, repeats=c.repeats, compare_precision=c.get("compare_precision", False))
    print(format_step(results), flush=True)
    return results
