"""``loop``: the train loop's time per step (batches from a `TrainingPipeline`, transferred ahead,
metrics accumulated on the device) against the bare jitted cpu-bench step, and against the older
loop that transferred each batch when needed and read every metric after every step.
"""

from __future__ import annotations

import jax
import numpy as np

from msk_jax import sharding, train
from msk_jax.bench.common import init_state, machine, time_side_by_side
from msk_jax.bench.step import cpu_bench_batch
from msk_jax.data.loader import TrainingPipeline
from msk_jax.loss import ObjectiveConfig
from msk_jax.model import MultiSKModel


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
    import dataclasses


    host = cpu_bench_batch(clips)
    mesh = sharding.create_mesh([("data", 1)], jax.devices()[:1])
    batch_sharding = sharding.batch_sharding(mesh)
    objective = dataclasses.replace(objective, queue_len=queue_len)
    state = init_state(model, objective, host)
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
            "synchronous_overhead": per_step["synchronous"] / per_step["bare"] - 1, "machine": machine()}


def format_loop(r: dict) -> str:
    return "\n".join([
        f"train loop vs bare step (cpu-bench, {r['clips']} clips, {r['steps']} steps per round, metrics read every "
        f"{r['log_every']}) on {r['machine']}",
        f"  bare jitted step        {r['bare_step_seconds'] * 1e3:8.1f} ms",
        f"  loop (asynchronous)     {r['loop_step_seconds'] * 1e3:8.1f} ms  ({100 * r['loop_overhead']:+.1f}%)",
        f"  loop (sync every step)  {r['synchronous_loop_step_seconds'] * 1e3:8.1f} ms  "
        f"({100 * r['synchronous_overhead']:+.1f}%)"])


def cli(config) -> dict:
    c = config.loop
    results = run_loop(MultiSKModel.from_config(config), ObjectiveConfig.from_config(config.objective), clips=c.clips, queue_len=c.queue_len, steps=c.steps,
                       repeats=c.repeats)
    print(format_loop(results), flush=True)
    return results
