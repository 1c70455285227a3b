"""The process and device layout of a run: which GPUs each process drives, and the first line a
run prints (processes x local devices = global devices), so a wrong layout shows at once.

Under SLURM, JAX expects one process per GPU: `jax.distributed.initialize()` reads the process
count and index from SLURM's variables and, unless told otherwise, gives each process the single
GPU numbered by its `SLURM_LOCALID`. That is right when every task of a node sees all of the
node's GPUs (`--gpus-per-node`), and wrong in two common cases this module handles:

- tasks given their own GPUs (`--gpus-per-task`, or `--gpu-bind`): CUDA numbers a task's GPUs
  from 0, so local id 3 names a GPU the task cannot see. Each process uses all GPUs it sees.
- one task per node seeing all of them (`--ntasks-per-node=1`): JAX would use GPU 0 only, the
  other seven idle. Each process uses all GPUs it sees; with several tasks sharing the node's
  GPUs, each takes an equal share by its local id.
"""

from __future__ import annotations

import re
from typing import Mapping


class LayoutError(ValueError):
    """GPUs that cannot be split evenly over the tasks of a node."""


def tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks of this job step on this node (SLURM_NTASKS_PER_NODE, else the node's entry of
    SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE, e.g. '8(x2)' or '2,1')."""
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else None


def visible_gpus(env: Mapping[str, str]) -> list[str] | None:
    ids = env.get("CUDA_VISIBLE_DEVICES")
    if ids is None or not ids.strip() or ids.strip() in ("-1", "NoDevFiles"):
        return None
    return [i for i in ids.split(",") if i.strip()]


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """The GPUs (CUDA ordinals as this process sees them) that this SLURM task should drive;
    None outside SLURM or when JAX's own choice (GPU `SLURM_LOCALID`) is right."""
    if not all(k in env for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID")):
        return None
    visible = visible_gpus(env)
    if visible is None:  # no GPU binding known: JAX's one GPU per task
        return None
    tasks = tasks_on_node(env) or 1
    own = bool(env.get("SLURM_GPUS_PER_TASK")) or "single:" in env.get("SLURM_GPU_BIND", "")
    if own or tasks == 1:
        return list(range(len(visible)))  # this task's GPUs, numbered from 0
    if len(visible) % tasks:
        raise LayoutError(f"{len(visible)} GPUs (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}) are shared by "
                          f"{tasks} tasks on this node: ask for one task per GPU (--ntasks-per-node equal to the "
                          "GPUs per node, --gpus-per-task=1), or pass --local_device_ids.")
    share, local = len(visible) // tasks, int(env["SLURM_LOCALID"])
    return list(range(local * share, (local + 1) * share))


def describe(jax, device_ids: list[int] | None, env: Mapping[str, str]) -> list[str]:
    """The lines a process prints at start: on process 0 the layout ('layout: 2 processes x 8 gpu
    devices = 16 devices'); with several processes, on each one the devices it drives (and
    which of the GPUs it sees); a warning when the layout looks wrong (processes with different
    device counts, GPUs of the node that no process uses)."""
    processes, local, total = jax.process_count(), jax.local_device_count(), jax.device_count()
    platform = jax.local_devices()[0].platform
    lines = []
    if jax.process_index() == 0:
        plural = "es" if processes > 1 else ""
        line = f"layout: {processes} process{plural} x {local} {platform} device{'s' if local > 1 else ''} = {total} device{'s' if total > 1 else ''}"
        if "SLURM_JOB_ID" in env and processes > 1:
            line += f" (SLURM, {tasks_on_node(env) or '?'} tasks per node)"
        lines.append(line)
    if processes > 1:  # each process: what it drives
        gpus = f", GPUs {','.join(map(str, device_ids))} of those it sees" if device_ids is not None else ""
        lines.append(f"layout: process {jax.process_index()} drives {local} {platform} device{'s' if local > 1 else ''}{gpus}")
    if processes * local != total:
        lines.append(f"warning: process {jax.process_index()} has {local} of the {total} devices, which is not "
                     f"1/{processes} of them: the processes drive different numbers of devices.")
    gpus_on_node, tasks = env.get("SLURM_GPUS_ON_NODE", ""), tasks_on_node(env)
    if platform == "gpu" and gpus_on_node.isdigit() and tasks and tasks * local < int(gpus_on_node):
        lines.append(f"warning: this node has {gpus_on_node} GPUs and {tasks} task(s) driving {local} each: "
                     f"{int(gpus_on_node) - tasks * local} idle. Start one task per GPU "
                     "(launch/slurm_gpu.sbatch: --ntasks-per-node equal to --gpus-per-node, --gpus-per-task=1).")
    return lines
