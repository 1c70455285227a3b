"""Several processes on localhost, started as clusters start them, train like one process.

Two `msk_jax.main --multihost` processes under the environment SLURM sets for a job step of two
tasks on one node (JAX's SLURM detection finds the coordinator, process count and index there),
or with --coordinator flags; gloo collectives, 8 CPU devices in all; videos loaded by worker
processes. Preempted by SIGTERM to the whole process group (as SLURM and GCE signal a job: the
data workers too); resumed on one process, and a one-process run resumed on two.
The losses are those of the single-process uninterrupted run. A process whose own view of the
bucket cannot read the newest checkpoint makes every process resume from the previous one."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from msk_jax import metric_writers, storage
from msk_jax.checkpoint_reader import finished_steps
from tests.conftest import REPO_ROOT, UNINTERRUPTED_STEPS, free_port, run_env
from tests.train_fixtures import logged_steps, losses, main_args

pytestmark = pytest.mark.slow

WORKERS = {"data.worker_processes": True, "data.workers": 1}
LONG = 10_000  # runs stopped by SIGTERM (the losses do not depend on the run length)


def slurm_env(job_id: int, rank: int, tasks: int = 2) -> dict:
    """What SLURM sets for task `rank` of a job step of `tasks` tasks on one node, with the
    node's two GPUs (here, names only: JAX runs on the CPU) shared by its tasks."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_JOB_NAME": "msk_jax",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_STEP_NUM_NODES": "1",
            "SLURM_NTASKS": str(tasks), "SLURM_NPROCS": str(tasks), "SLURM_STEP_NUM_TASKS": str(tasks),
            "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_TASKS_PER_NODE": str(tasks),
            "SLURM_STEP_TASKS_PER_NODE": str(tasks), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0", "SLURM_STEP_ID": "0", "SLURM_CPUS_PER_TASK": "1", "SLURMD_NODENAME": "localhost",
            "SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}


def slurm_job_id() -> int:
    """A job id whose coordinator port (JAX: 61440 + id % 4096) is free here."""
    for job_id in range(int(time.time()) % 4096, 8192):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 61440 + job_id % 4096))
            except OSError:
                continue
            return job_id
    raise RuntimeError("no free port in 61440-65535")


def start(args_of, count, how, env_of=lambda rank: {}):
    """`count` training processes in one new process group (the job's), 8 CPU devices in all,
    started `how`: 'slurm' (SLURM's variables), 'flags' (--coordinator) or 'single'."""
    devices = 8 // count
    job_id, port = (slurm_job_id(), None) if how == "slurm" else (None, free_port())
    processes = []
    for rank in range(count):
        env = run_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                      **env_of(rank))
        args = list(args_of(rank))
        if how == "slurm":
            env.update(slurm_env(job_id, rank, count))
            args += ["--multihost", "--cpu_collectives=gloo"]
        elif how == "flags":
            args += [f"--coordinator=127.0.0.1:{port}", f"--num_processes={count}", f"--process_id={rank}",
                     "--cpu_collectives=gloo"]
        group = 0 if rank == 0 else processes[0].pid
        processes.append(subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, process_group=group))
    return processes


def finish(processes, timeout=300):
    """Every process's (stdout, stderr), once all exited 0; kills them all after `timeout` s."""
    deadline, outputs = time.time() + timeout, []
    for p in processes:
        try:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            outputs += [q.communicate() for q in processes[len(outputs):]]
            pytest.fail("the processes did not finish:\n" + "\n".join(
                f"--- process {i}:\n{out[-1500:]}\n{err[-3000:]}" for i, (out, err) in enumerate(outputs)))
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, (out[-2000:], err[-3000:])
    return outputs


def stop_after(processes, workdir, step, signal_to):
    """Waits until `workdir` has logged `step`, sends SIGTERM (`signal_to(processes)`); returns
    the step every process stopped at (they must agree) and their (stdout, stderr)."""
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in processes) and logged_steps(workdir) < step:
        time.sleep(0.02)
    signal_to(processes)
    outputs = finish(processes)
    stops = {tuple(re.findall(r"stopped at step (\d+) on SIGTERM", out)) for out, _ in outputs}
    assert len(stops) == 1 and len(next(iter(stops))) == 1, outputs
    stopped = int(next(iter(stops))[0])
    assert finished_steps(storage.join(workdir, "checkpoints"))[-1] == stopped  # complete, with every shard
    return stopped, outputs


def to_group(processes):
    os.killpg(processes[0].pid, signal.SIGTERM)  # the job's process group: trainers and data workers


def assert_same_losses(workdir, reference, steps):
    """The losses up to float32 summation order. One process sums the global batch on one
    device, several sum their parts and all-reduce them; through 10 steps with the consistency
    loss on, that has measured up to 1.3e-4 relative (step 9, 2026-11-27), while a wrong shard,
    batch or resume changes the losses by a percent or more."""
    want, got = losses(reference), losses(workdir)
    assert set(range(1, steps + 1)) <= set(got)
    np.testing.assert_allclose([got[s] for s in range(1, steps + 1)], [want[s] for s in range(1, steps + 1)],
                               rtol=1e-3)


def test_slurm_layout_preemptions_and_other_process_counts(uninterrupted_run, tiny_corpus, tmp_path):
    """Two SLURM tasks stopped by SIGTERM to the job's process group -> continued by one process
    (8 devices: 2 -> 1), stopped the same way: each time every process saves the same step and
    exits 0, and the losses continue the uninterrupted run's. (1 -> 2 processes: the next test.)"""
    workdir = str(tmp_path / "run")
    args = main_args(workdir, tiny_corpus, LONG, **WORKERS)

    processes = start(lambda rank: args, 2, "slurm")
    first, outputs = stop_after(processes, workdir, 2, to_group)
    (out0, err0), (out1, _) = outputs
    assert out0.splitlines()[0] == "layout: 2 processes x 4 cpu devices = 8 devices (SLURM, 2 tasks per node)", out0
    # Each task drives its share of the node's GPUs (JAX's SLURM detection alone gives GPU SLURM_LOCALID).
    assert "layout: process 0 drives 4 cpu devices, GPUs 0 of those it sees" in out0
    assert "layout: process 1 drives 4 cpu devices, GPUs 1 of those it sees" in out1
    assert "mesh {'data': 8, 'model': 1}" in out0 and "SIGTERM caught" in err0

    processes = start(lambda rank: args, 1, "single")  # 2 -> 1 process
    second, [(out, _)] = stop_after(processes, workdir, first + 1, to_group)
    assert f"resumed from step {first}" in out and out.startswith("layout: 1 process x 8 cpu devices = 8 devices")
    assert first < second <= UNINTERRUPTED_STEPS, "stopped too late to compare: more steps are needed"
    assert_same_losses(workdir, uninterrupted_run, second)
    rows = [r for r in metric_writers.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    assert sorted({r["step"] for r in rows}) == list(range(1, second + 1))  # once each: process 0 alone wrote


def _serve_faults(upstream, fails):
    port = free_port()
    args = [sys.executable, "-m", "tests.storage_faults", "--port", str(port), "--upstream", upstream]
    for rule in fails:
        args += ["--fail", rule]
    server = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/msk-test", timeout=2).read()
            return server, url
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError("the fault proxy did not start")
            time.sleep(0.1)


def test_a_checkpoint_one_process_cannot_read_is_skipped_by_all(uninterrupted_run, tiny_corpus, gcs_bucket):
    """A one-process run continued by two processes (1 -> 2), one of which cannot read its newest
    checkpoint. The uninterrupted run's checkpoints (one process) in a bucket; two processes continue it,
    process 1 through its own view of the bucket, in which step 15's objects are not found and
    step 12's first reads fail with 503. Both resume from step 12 (the newest step both can
    read; the 503s are retried, not taken for a broken checkpoint), process 0 moves step 15
    aside, and they train steps 13 and 14 with the uninterrupted losses. (Not step 15: this view
    of the bucket would not find the new step 15 either.)"""
    import gcsfs

    last = UNINTERRUPTED_STEPS
    workdir = f"{gcs_bucket}/runs/agree"
    fs = gcsfs.GCSFileSystem()
    fs.put(os.path.join(uninterrupted_run, "checkpoints"), f"{workdir[5:]}/checkpoints", recursive=True)
    rows = metric_writers.read_jsonl(os.path.join(uninterrupted_run, "metrics.jsonl"))
    kept = "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= last - 3)  # what step 12 had written
    fs.pipe(f"{workdir[5:]}/metrics.jsonl", kept.encode())

    upstream = os.environ["STORAGE_EMULATOR_HOST"]
    proxy, view = _serve_faults(upstream, [f"agree/checkpoints/{last}/=404", f"agree/checkpoints/{last - 3}/=503x2"])
    try:
        own_view = {"STORAGE_EMULATOR_HOST": view, "TENSORSTORE_GCS_HTTP_URL": view,
                    "CLOUD_STORAGE_EMULATOR_ENDPOINT": view}
        processes = start(lambda rank: main_args(workdir, tiny_corpus, last - 1), 2, "flags",
                          env_of=lambda rank: own_view if rank == 1 else {})
        (out0, err0), (out1, err1) = finish(processes, timeout=120)
    finally:
        proxy.kill()
        proxy.wait()
    assert f"resumed from step {last - 3}" in out0, (out0, err0)
    assert re.search(rf"process 1: checkpoint step {last}: .*; trying the previous one", err1), err1
    assert f"checkpoint step {last} (unreadable on process(es) 1); trying the previous one" in err0, err0
    assert f"resuming from step {last - 3}, the newest checkpoint" in err0
    assert "Traceback" not in err0 + err1
    moved = fs.ls(f"{workdir[5:]}/unreadable_checkpoints")
    assert [os.path.basename(m).split(".")[0] for m in moved] == [str(last)]
    assert finished_steps(f"{workdir}/checkpoints") == [last - 6, last - 3, last - 1]  # saved by both
    assert_same_losses(workdir, uninterrupted_run, last - 1)
    assert "evaluation written" in out0 and "evaluation written" not in out1  # only process 0 writes
