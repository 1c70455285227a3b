"""What several benchmarks share: round-robin timing, AOT compilation and XLA's memory analysis of
a compiled call, the machine's copy bandwidth and float32 matmul peak, and a one-line description
of the machine for the reports. MB = 1e6 bytes.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from msk_jax import allocator, train_step

MB = 1e6


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


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of this machine (XLA, all cores)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    seconds = time_side_by_side({"mm": lambda: f(a)}, repeats)["mm"]
    return 2 * size ** 3 / seconds


def init_state(model, objective, batch):
    """The benchmarks' TrainState (Adam 5e-5, seed 0), initialised in one jitted call (op by op,
    the model's initialisation takes seconds)."""
    return jax.jit(lambda rng, batch: train_step.create_train_state(
        rng, model, objective, train_step.adam(5e-5), batch))(jax.random.PRNGKey(0), batch)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    allocator_name = "tcmalloc" if allocator.tcmalloc_loaded() else "system malloc"
    return (f"{model}, {os.cpu_count()} CPUs, {allocator_name}; jax {jax.__version__} on "
            f"{jax.device_count()} x {jax.devices()[0].device_kind}")
