"""``plan``: the configs/howto.py train step compiled ahead of time per accelerator and mesh, each
accelerator's device count forced on the CPU: per-device memory (does it fit), FLOPs per step, the
step time at 40 % MFU and the input rate (videos/s per host) that asks for; then what that input
asks of a bucket (`request_budget`): read requests/s and bytes/s per host and per pod of several
hosts, per store layout, against a new bucket's documented read rate (~5,000 object reads/s,
raised by Cloud Storage as the load grows, at most doubling every 20 minutes), and the requests
a paper run reads (and what they cost). ``--config.plan.from_json=OUT`` takes the compiled rows
of an earlier ``bench plan --json=OUT`` instead of compiling again.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from msk_jax import configs, data_sources, sharding, storage, train, train_step
from msk_jax.loss import ObjectiveConfig
from msk_jax.model import MultiSKModel

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


def compile_paper_step(mesh_kind: str, config_arg: str = "", remat: str = "") -> dict:
    """AOT-compiles the train step of configs/howto.py[:config_arg] (with model.remat=`remat`
    unless empty) over all local devices with the given mesh, without allocating it: per-device
    memory_analysis and cost_analysis FLOPs."""
    config = configs.get_config("howto", config_arg)
    if remat:
        config.model.remat = remat
    devices = jax.device_count()
    mesh = sharding.create_mesh(_plan_mesh(mesh_kind, devices))
    rules = sharding.rules_for(mesh, [])
    model = MultiSKModel.from_config(config)
    objective = ObjectiveConfig.from_config(config.objective)
    tx = train_step.adam(config.optimizer.lr, config.optimizer.b1, config.optimizer.b2, config.optimizer.eps)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in data_sources.sample_batch(config, config.model.text_dim).items()}

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
    return {"mesh": dict(mesh.shape), "devices": devices, "remat": config.model.remat, "clips_per_step": int(batch["video"].shape[0]),
            "clips_per_device": int(batch["video"].shape[0]) // devices, "parameters": int(parameters),
            "compile_seconds": time.perf_counter() - start,
            "flops_per_device": float(cost.get("flops", 0.0)),
            "argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
            "alias_bytes": int(memory.alias_size_in_bytes), "temp_bytes": int(memory.temp_size_in_bytes),
            "peak_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                              - memory.alias_size_in_bytes + memory.temp_size_in_bytes)}


def run_plan(targets: tuple[str, ...] = tuple(ACCELERATORS), meshes: tuple[str, ...] = PLAN_MESHES,
             config_arg: str = "", store_videos_per_core: float | None = None, timeout: int = 1800,
             remats: tuple[str, ...] = ("",)) -> dict:
    """Each accelerator's device count forced on the CPU (one subprocess per target, mesh and
    remat setting), the paper step compiled, and the input rate it needs at 40 % MFU. Results
    are keyed "target/mesh" ("target/mesh/remat" when remat settings are given)."""
    results = {}
    for target, mesh_kind, remat in ((t, m, r) for t in targets for m in meshes for r in remats):
        spec = ACCELERATORS[target]
        key = f"{target}/{mesh_kind}" + (f"/{remat}" if remat else "")
        env = dict(os.environ, MSK_JAX_NATIVE="0", MSK_JAX_TCMALLOC="0", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={spec['devices']}")
        code = ("import json, sys; from msk_jax.bench import plan; "
                f"print('PLAN ' + json.dumps(plan.compile_paper_step({mesh_kind!r}, {config_arg!r}, {remat!r})))")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("PLAN ")]
        if proc.returncode or not lines:
            results[key] = {"error": (proc.stderr or proc.stdout)[-800:]}
            print(f"plan {key}: failed", flush=True)
            continue
        r = json.loads(lines[-1][5:])
        flops = r["flops_per_device"] * r["devices"]
        step_seconds = flops / (spec["devices"] * spec["peak_tflops"] * 1e12 * 0.4)
        videos = r["clips_per_step"] / 10
        r.update({"target": target, "memory_gib": spec["memory_gib"], "hosts": spec["hosts"], "flops_per_step": flops,
                  "fits": r["peak_bytes"] <= spec["memory_gib"] * 2**30,
                  "headroom": 1 - r["peak_bytes"] / (spec["memory_gib"] * 2**30),
                  "step_seconds_at_40pct_mfu": step_seconds,
                  "videos_per_second_needed": videos / step_seconds,
                  "videos_per_second_needed_per_host": videos / step_seconds / spec["hosts"]})
        if store_videos_per_core:
            r["input_cores_per_host"] = r["videos_per_second_needed_per_host"] / store_videos_per_core
        results[key] = r
        print(format_plan_row(r), flush=True)
    return results


def format_plan_row(r: dict) -> str:
    cores = f", {r['input_cores_per_host']:.1f} input cores/host" if "input_cores_per_host" in r else ""
    return (f"{r['target']:7s} mesh {r['mesh']}, remat {r.get('remat', 'none')}: {r['clips_per_device']} clips/device, "
            f"peak {r['peak_bytes'] / 2**30:.1f} GiB of {r['memory_gib']} ({'fits' if r['fits'] else 'does NOT fit'}, "
            f"{100 * r['headroom']:.0f}% headroom; "
            f"args {r['argument_bytes'] / 2**30:.1f}, temp {r['temp_bytes'] / 2**30:.1f}), "
            f"{r['flops_per_step'] / 1e12:.0f} TFLOP/step, {r['step_seconds_at_40pct_mfu']:.2f} s/step at 40% MFU, "
            f"{r['videos_per_second_needed_per_host']:.0f} videos/s per host{cores}")


# A new bucket's read capacity (Cloud Storage, "Request rate and access distribution
# guidelines"): ~5,000 object reads/s, raised as the load grows; ramping faster than doubling
# every 20 minutes meets higher latency and errors. A Class B operation (a GET) costs $0.0004 per
# 1,000 in Standard storage (Cloud Storage pricing examples).
BUCKET_READS_PER_SECOND = 5000
RAMP_DOUBLING_MINUTES = 20


def ramp_minutes(requests_per_second: float, start: float = BUCKET_READS_PER_SECOND,
                 doubling_minutes: float = RAMP_DOUBLING_MINUTES) -> float:
    """Minutes before a bucket that starts at `start` reads/s and doubles every `doubling_minutes`
    serves `requests_per_second` (0 when it does from the start)."""
    return doubling_minutes * math.log2(requests_per_second / start) if requests_per_second > start else 0.0


def request_budget(rows: dict, layouts: dict, pod_hosts: tuple = (1, 4, 16, 64), paper_videos: float = 1.22e6,
                   epochs: int = 15, dollars_per_1000_reads: float = 0.0004,
                   start: float = BUCKET_READS_PER_SECOND, doubling_minutes: float = RAMP_DOUBLING_MINUTES) -> dict:
    """What the input of each compiled row ({"target/mesh": plan row}) asks of a bucket per store
    layout (`layouts`: name -> (requests per video, bytes read per video)): read requests/s and
    bytes/s per host and per pod of each of `pod_hosts` hosts, each pod's minutes of ramp before
    the bucket serves it; and the paper run's reads (`paper_videos` x `epochs` videos)."""
    budget = {"start_reads_per_second": start, "doubling_minutes": doubling_minutes, "pod_hosts": list(pod_hosts),
              "rows": {}, "paper_run": {}}
    for key, row in rows.items():
        if "error" in row:
            continue
        videos = row["videos_per_second_needed_per_host"]
        budget["rows"][key] = {"videos_per_second_per_host": videos, "hosts": row.get("hosts"), "layouts": {}}
        for name, (requests, nbytes) in layouts.items():
            per_host = videos * requests
            budget["rows"][key]["layouts"][name] = {
                "requests_per_second_per_host": per_host, "bytes_per_second_per_host": videos * nbytes,
                "pods": {str(hosts): {"requests_per_second": per_host * hosts,
                                      "bytes_per_second": videos * nbytes * hosts, "of_start": per_host * hosts / start,
                                      "ramp_minutes": ramp_minutes(per_host * hosts, start, doubling_minutes)}
                         for hosts in pod_hosts}}
    for name, (requests, nbytes) in layouts.items():
        reads = paper_videos * epochs * requests
        budget["paper_run"][name] = {"videos": paper_videos * epochs, "requests": reads,
                                     "bytes": paper_videos * epochs * nbytes,
                                     "dollars": reads / 1000 * dollars_per_1000_reads}
    return budget


def format_budget(budget: dict) -> str:
    hosts = budget["pod_hosts"]
    lines = [f"input asked of a bucket (it starts at ~{budget['start_reads_per_second']:,.0f} reads/s, at most "
             f"doubling every {budget['doubling_minutes']:.0f} min): read requests/s per host, then per pod of "
             f"{', '.join(map(str, hosts))} hosts (minutes of ramp before the bucket serves it)",
             f"{'target/mesh':20s} {'layout':12s} {'videos/s/host':>13s} {'req/s/host':>11s} {'MB/s/host':>10s} "
             + " ".join(f"{f'{h} hosts':>17s}" for h in hosts)]
    for key, row in budget["rows"].items():
        for name, figures in row["layouts"].items():
            pods = " ".join(f"{p['requests_per_second']:>10,.0f} ({p['ramp_minutes']:3.0f}m)"
                            for p in figures["pods"].values())
            lines.append(f"{key:20s} {name:12s} {row['videos_per_second_per_host']:13,.0f} "
                         f"{figures['requests_per_second_per_host']:11,.0f} "
                         f"{figures['bytes_per_second_per_host'] / 1e6:10,.0f} {pods}")
    for name, run in budget["paper_run"].items():
        lines.append(f"paper run ({run['videos'] / 1e6:.1f} M video reads), {name}: {run['requests'] / 1e6:,.0f} M "
                     f"read requests (${run['dollars']:,.0f} at $0.0004 per 1,000), {run['bytes'] / 1e12:,.0f} TB read")
    return "\n".join(lines)


def cli(config) -> dict:
    c = config.plan
    names = c.layouts.split(",")
    if not len(names) == len(c.requests_per_video) == len(c.mb_per_video):
        raise ValueError("config.plan.layouts, requests_per_video and mb_per_video need one entry per layout.")
    if c.get("from_json", ""):
        try:
            results = json.loads(storage.read_bytes(c.from_json))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"config.plan.from_json='{c.from_json}': not the JSON of a `bench plan --json` run "
                             f"({err}).") from None
        results = {key: row for key, row in results.items() if isinstance(row, dict) and "target" in row}
        if not results:
            raise ValueError(f"config.plan.from_json='{c.from_json}': no compiled rows in it.")
        for row in results.values():
            print(format_plan_row(row), flush=True)
    else:
        results = run_plan(tuple(c.targets.split(",")), tuple(c.meshes.split(",")), c.howto,
                           c.store_videos_per_core or None, remats=tuple(c.get("remats", "").split(",")))
    budget = request_budget(results, {name: (requests, mb * 1e6) for name, requests, mb in
                                      zip(names, c.requests_per_video, c.mb_per_video)},
                            tuple(c.pod_hosts), c.paper_videos, configs.get_config("howto", c.howto).num_epochs,
                            c.dollars_per_1000_reads)
    print(format_budget(budget), flush=True)
    return {**results, "request_budget": budget}
