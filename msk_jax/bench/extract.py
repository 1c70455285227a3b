"""``extract``: throughput of the HowTo100M feature extractor's backbones (msk_jax.extract.backbones)
on this host: ResNet-152 on batches of 2D frames (224 x 398, what a 16:9 video gives with its
shorter side resized to 224) and ResNeXt-101 on batches of 3D clips (16 x 112 x 112), each in
float32 and bfloat16 compute. Reports seconds per batch, frames/s, for 3D clips/s (frames/s =
16 x clips/s), and the FLOP rate by XLA's count of the compiled call. Weights follow the golden
recipe (realistic activation scales); the inputs are random pixels, preprocessed outside the timed
call.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from msk_jax.bench.common import machine
from msk_jax.extract import backbones
from msk_jax.parity.backbones import recipe_array


def _recipe_variables(kind: str) -> dict:
    """The backbone's variables from the golden weight recipe (seed 0), through the torch import."""
    sample = jnp.zeros((1, 32, 32, 3) if kind == "2d" else (1, 16, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(backbones.backbone(kind).init, jax.random.PRNGKey(0), sample)
    names = backbones.export_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes))
    return backbones.variables_from_state_dict(
        {name: recipe_array(0, name, value.shape, kind) for name, value in names.items()}, kind)


def run_extract(batch: int = 64, frame_size: tuple[int, int] = (224, 398), clip_frames: int = 16,
                clip_size: int = 112, kinds: tuple[str, ...] = ("2d", "3d"),
                dtypes: tuple[str, ...] = ("float32", "bfloat16"), repeats: int = 2) -> dict:
    """Median seconds per batch of each backbone and compute dtype (compiled ahead of time, then
    timed `repeats` times round-robin over the variants, no extra warm-up: one ResNet-152 batch
    at 224 x 398 takes tens of seconds on a few CPU cores), and the derived frames/s and clips/s."""
    rng = np.random.default_rng(0)
    inputs = {"2d": backbones.preprocess_2d(rng.integers(0, 256, (batch, *frame_size, 3), np.uint8)),
              "3d": backbones.preprocess_3d(rng.integers(0, 256, (batch, clip_frames, clip_size, clip_size, 3),
                                                         np.uint8))}
    results: dict = {"batch": batch, "frame_size": list(frame_size), "clip_shape": [clip_frames, clip_size, clip_size],
                     "repeats": repeats, "machine": machine()}
    calls = {}
    for kind in kinds:
        variables = jax.device_put(_recipe_variables(kind))
        x = jax.device_put(inputs[kind])
        for dtype in dtypes:
            model = backbones.backbone(kind, dtype=dtype)
            start = time.perf_counter()
            compiled = jax.jit(model.apply).lower(variables, x).compile()
            results[f"{kind}_{dtype}_compile_seconds"] = time.perf_counter() - start
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            results[f"{kind}_{dtype}_flops_per_batch"] = float((cost or {}).get("flops", 0.0))
            calls[f"{kind}_{dtype}"] = lambda compiled=compiled, variables=variables, x=x: compiled(variables, x)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            out = jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
            if not np.all(np.isfinite(np.asarray(out))):
                raise FloatingPointError(f"extract benchmark: {name} gave non-finite features.")
    for name, t in times.items():
        seconds = float(np.median(t))
        results[f"{name}_seconds_per_batch"] = seconds
        results[f"{name}_flops_per_second"] = results[f"{name}_flops_per_batch"] / seconds
        if name.startswith("2d"):
            results[f"{name}_frames_per_second"] = batch / seconds
        else:
            results[f"{name}_clips_per_second"] = batch / seconds
            results[f"{name}_frames_per_second"] = batch * clip_frames / seconds
    return results


def format_extract(r: dict) -> str:
    h, w = r["frame_size"]
    t, s, _ = r["clip_shape"]
    lines = [f"feature extractor backbones, batch {r['batch']}, median of {r['repeats']} on {r['machine']}"]
    for key in sorted(k for k in r if k.endswith("_seconds_per_batch")):
        name = key[:-len("_seconds_per_batch")]
        kind, dtype = name.split("_", 1)
        what = f"ResNet-152   frames {h}x{w}" if kind == "2d" else f"ResNeXt-101  clips {t}x{s}x{s}"
        line = (f"  {what}  {dtype:<9} {r[key]:8.2f} s/batch  {r[f'{name}_frames_per_second']:8.2f} frames/s")
        if kind == "3d":
            line += f"  ({r[f'{name}_clips_per_second']:.2f} clips/s)"
        lines.append(line + f"  {r[f'{name}_flops_per_second'] / 1e9:6.1f} GFLOP/s (XLA's count: "
                     f"{r[f'{name}_flops_per_batch'] / r['batch'] / 1e9:.1f} GFLOP per {kind.upper()} input)"
                     f"  compile {r[f'{name}_compile_seconds']:.1f} s")
    return "\n".join(lines)


def cli(config) -> dict:
    c = config.extract
    results = run_extract(batch=c.batch, frame_size=tuple(c.frame_size), clip_frames=c.clip_frames,
                          clip_size=c.clip_size, kinds=tuple(c.kinds), dtypes=tuple(c.dtypes), repeats=c.repeats)
    print(format_extract(results), flush=True)
    return results
