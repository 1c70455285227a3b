"""``fed``: the paper-width train step on this host's devices, fed by the training input pipeline
(worker processes assembling batches, as training does) from a feature store of synthetic videos at HowTo100M's per-video sizes.

What an accelerator run needs to know before a long job: the step's time and clips/s once the
queues are full (Multi-SK on), its model FLOP utilisation against the chip's peak, the devices'
peak memory, and whether the input keeps up (the same step on one device batch, repeated,
beside it: the difference is time spent waiting for input).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import numpy as np

from msk_jax import configs, data_sources, sharding, train, train_step
from msk_jax.bench.common import machine
from msk_jax.data import synthetic
from msk_jax.data.feature_store import FeatureStoreSource, build_feature_store
from msk_jax.data.howto100m import HowTo100MReader
from msk_jax.data.loader import TrainingPipeline
from msk_jax.data.word2vec import load_word2vec_binary
from msk_jax.demo.corpus import default_root
from msk_jax.loss import ObjectiveConfig
from msk_jax.model import MultiSKModel

# Dense bf16 matmul peaks (vendor figures, TFLOP/s) by the device kind JAX reports.
PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197,
               "TPU v5p": 459, "TPU v6 lite": 918}


def chip_peak_flops(device) -> float | None:
    """The dense bf16 peak of `device` (FLOP/s), None when its kind is not listed."""
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in device.device_kind.lower():
            return tflops * 1e12
    return None


def paper_config(remat: str = "", dtype: str = "bfloat16", queue_len: int = 0):
    """configs/howto.py at the paper's widths, with `model.remat`, the compute dtype and the queue
    length overridden where given."""
    config = configs.get_config("howto", "")
    if remat:
        config.model.remat = remat
    config.model.dtype = dtype
    if queue_len:
        config.objective.queue_len = queue_len
    return config


def synthetic_store(settings, root: str, videos: int, dtype: str, seconds: int = 396, dim: int = 2048) -> str:
    """A feature store of `videos` synthetic videos at HowTo100M's sizes under `root` (built once)."""
    store_dir = os.path.join(root, f"store_time_blocks_{dtype}_{videos}_{seconds}_{dim}")
    if not os.path.exists(os.path.join(store_dir, "meta.json")):
        paths = synthetic.write_synthetic_howto100m(os.path.join(root, f"npz_{videos}_{seconds}_{dim}"), videos,
                                                    seconds=seconds, dim_2d=dim, dim_3d=dim, progress=False)
        reader = HowTo100MReader(paths["csv"], paths["caption"], paths["features_2d"], paths["audio"],
                                 load_word2vec_binary(paths["word_vectors"]), features_3d=paths["features_3d"],
                                 settings=settings, dim_2d=dim, dim_3d=dim)
        build_feature_store(reader, store_dir, dtype=dtype, progress=False)
    return store_dir


def run_fed(videos_per_batch: int = 27, steps: int = 10, workers: int = 8, store_videos: int = 120,
            store_dtype: str = "float16", remat: str = "", dtype: str = "bfloat16", queue_len: int = 0,
            corpus_dir: str | None = None, config=None, store_seconds: int = 396, store_dim: int = 2048,
            keep_batches: int = 0):
    """Trains the paper-width model (or `config`'s) from the store until its queues are full,
    then times `steps` fed steps (input from worker processes, transferred ahead) and `steps`
    steps on one device batch repeated; reports medians, clips/s, MFU and peak device memory.
    With `keep_batches`, returns (results, session): the state after the timed steps and that
    many more of the pipeline's batches (host copies), for more steps from the same state."""
    config = config if config is not None else paper_config(remat, dtype, queue_len)
    dtype = config.model.dtype
    settings = data_sources.clip_settings(config)
    root = corpus_dir or os.path.join(os.path.dirname(default_root()), "bench_howto100m")
    started = time.perf_counter()
    source = FeatureStoreSource(synthetic_store(settings, root, store_videos, store_dtype, store_seconds, store_dim),
                                settings)
    store_build_seconds = time.perf_counter() - started

    mesh = sharding.create_mesh([("data", -1)])
    batch_sharding = sharding.batch_sharding(mesh)
    model = MultiSKModel.from_config(config)
    objective = ObjectiveConfig.from_config(config.objective)
    tx = train_step.adam(config.optimizer.lr, config.optimizer.b1, config.optimizer.b2, config.optimizer.eps)
    pipeline = TrainingPipeline(source, videos_per_batch, seed=0, workers=workers, processes=True, prefetch=2,
                                batch_tasks=True, keep_batches=2)  # as training reads it
    try:
        first = {k: np.array(v) for k, v in next(pipeline).items()}
        state, state_sharding = train.create_sharded_state(
            jax.random.PRNGKey(0), model, objective, tx, first, mesh, sharding.rules_for(mesh, []), config.ema_decay)
        step_fn = train.compile_train_step(state_sharding, batch_sharding)
        device_batch = train.global_batch(first, batch_sharding)
        started = time.perf_counter()
        lowered = step_fn.lower(state, device_batch)
        lowered.compile()
        compile_seconds = time.perf_counter() - started
        # FLOPs of the step as written (before the backend's compilation: a GPU's compiled
        # module hands its matmuls to cuBLAS calls, which its cost analysis does not count).
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0))

        batches = train.DeviceBatches(pipeline, batch_sharding, ahead=2)
        warmup = 0
        while not bool(state.queues.is_full):  # Multi-SK starts once the queues are full
            batch, _ = batches.pop()
            state, metrics = step_fn(state, batch)
            batches.fill()
            warmup += 1
        jax.block_until_ready(metrics["loss"])

        def timed(next_batch):
            nonlocal state
            times, waits = [], []
            for _ in range(steps):
                start = time.perf_counter()
                batch = next_batch()
                waited = time.perf_counter() - start
                state, metrics = step_fn(state, batch)
                jax.block_until_ready(metrics["loss"])
                times.append(time.perf_counter() - start)
                waits.append(waited)
            return statistics.median(times), statistics.median(waits), float(metrics["loss"])

        def fed_batch():
            batch, _ = batches.pop()
            batches.fill()
            return batch

        fed_seconds, input_wait, loss = timed(fed_batch)
        bare_seconds, _, _ = timed(lambda: device_batch)
        memory = jax.local_devices()[0].memory_stats() or {}
        kept = [{k: np.array(v) for k, v in next(pipeline).items()} for _ in range(keep_batches)]
    finally:
        pipeline.close()
    device = jax.local_devices()[0]
    peak = chip_peak_flops(device)
    clips = videos_per_batch * settings.n_clips
    results = {"device": device.device_kind, "devices": len(mesh.devices.flat), "machine": machine(),
            "remat": config.model.remat, "dtype": dtype, "videos_per_batch": videos_per_batch, "clips_per_step": clips,
            "queue_len": config.objective.queue_len, "warmup_steps": warmup, "steps": steps, "workers": workers,
            "store_videos": store_videos, "store_dtype": store_dtype, "store_seconds": store_build_seconds,
            "compile_seconds": compile_seconds, "flops_per_step": flops,
            "fed_step_seconds": fed_seconds, "bare_step_seconds": bare_seconds, "input_wait_seconds": input_wait,
            "clips_per_second": clips / fed_seconds, "videos_per_second": videos_per_batch / fed_seconds,
            "mfu": flops / fed_seconds / (peak * len(mesh.devices.flat)) if peak else None,
            "peak_bytes_in_use": memory.get("peak_bytes_in_use"), "bytes_limit": memory.get("bytes_limit"),
            "loss": loss}
    if not keep_batches:
        return results
    return results, {"config": config, "state": state, "state_sharding": state_sharding, "step_fn": step_fn,
                     "batch_sharding": batch_sharding, "batches": kept}


def format_fed(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (unknown chip peak)"
    memory = (f"{r['peak_bytes_in_use'] / 2**30:.1f} GiB of {r['bytes_limit'] / 2**30:.1f}"
              if r.get("peak_bytes_in_use") else "n/a")
    return "\n".join([
        f"paper-width step fed from a synthetic store ({r['store_videos']} videos, {r['store_dtype']}) by "
        f"{r['workers']} worker processes on {r['devices']} x {r['device']}: {r['clips_per_step']} clips/step, "
        f"{r['dtype']}, remat {r['remat']}, queues {r['queue_len']} (full after {r['warmup_steps']} steps)",
        f"  fed step       {r['fed_step_seconds'] * 1e3:9.1f} ms  ({r['clips_per_second']:.0f} clips/s, "
        f"{r['videos_per_second']:.0f} videos/s; waiting for input {r['input_wait_seconds'] * 1e3:.1f} ms)",
        f"  same batch     {r['bare_step_seconds'] * 1e3:9.1f} ms",
        f"  FLOPs/step     {r['flops_per_step'] / 1e12:9.2f} T   MFU {mfu}",
        f"  peak memory    {memory}   (compile {r['compile_seconds']:.0f} s)"])


def cli(config) -> dict:
    c = config.fed
    results = run_fed(c.videos_per_batch, c.steps, c.workers, c.store_videos, c.store_dtype, c.remat, c.dtype,
                      c.queue_len, c.corpus_dir or None)
    print(format_fed(results), flush=True)
    return results
