"""Stopping and saving as a user meets them, with real processes and real signals.

Ctrl-C is SIGINT to the terminal's foreground process group, and clusters send SIGTERM to the
whole group: each run here is started in a session of its own (as a terminal starts a job) and
signalled through its process group. A stop request saves a checkpoint of the step reached and
ends with one line; one during compilation ends at once, and a second Ctrl-C ends at once. A
save that fails (a work directory on a small tmpfs that fills up) stops the run at that step in
one line; `metrics.jsonl` continues where the checkpoint does; one training at a time holds a
work directory (`msk_jax.lease`, on disk and in a bucket)."""

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from msk_jax import checkpoints, lease, metric_writers
from msk_jax.checkpoint_reader import finished_steps
from msk_jax.experiments import runner
from tests.conftest import REPO_ROOT, UNINTERRUPTED_STEPS, run_env
from tests.train_fixtures import losses, main_args

LONG = 100_000  # runs that a signal ends


class Run:
    """`python -m msk_jax.main` in a session of its own, its output read as it comes."""

    def __init__(self, args, env=None):
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=env or run_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out, self.err, self._lines = [], [], queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(self.process.stdout, self.out, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.process.stderr, self.err, False), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines, queued):
        for line in stream:
            lines.append(line)
            if queued:
                self._lines.put(line)
        if queued:
            self._lines.put(None)

    def wait_for(self, pattern, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            if re.search(pattern, line):
                return line
        self.process.kill()
        self.finish()
        pytest.fail(f"no line matching {pattern!r}; the run said:\n{self.output[-4000:]}")

    def signal(self, sig):
        os.killpg(self.process.pid, sig)  # the whole group, as a terminal or a cluster sends it

    def finish(self, timeout=300) -> int:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for reader in self._readers:
            reader.join()
        return self.process.returncode

    @property
    def output(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def lines(self, word) -> list[str]:
        return [line for line in self.out + self.err if word in line]

    @property
    def said(self) -> list[str]:
        """stderr's lines, but the demo corpus's note that it is built."""
        return [line for line in self.err if not line.startswith("[demo corpus]")]


def run(args, env=None, timeout=300) -> Run:
    done = Run(args, env)
    done.finish(timeout)
    return done


def training_steps(workdir) -> list[int]:
    """The steps of metrics.jsonl's training rows, in file order (evaluation rows have no loss)."""
    return [row["step"] for row in metric_writers.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in row]


def assert_clean(done: Run):
    assert "Traceback" not in done.output and "Fatal Python error" not in done.output, done.output[-4000:]
    assert "never retrieved" not in done.output, done.output[-4000:]


# --- stop requests ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_while_compiling_stops_at_once_and_cleanly(tiny_corpus, tmp_path):
    """Ctrl-C while XLA compiles the training step: nothing to save, so the run ends at once
    (the compilation would otherwise run to its end), exit 0, one line. (It was a
    KeyboardInterrupt traceback and "Fatal Python error: Segmentation fault", exit 139.)"""
    workdir = str(tmp_path / "run")
    started = Run(main_args(workdir, tiny_corpus, LONG))
    started.wait_for(r"^training \d+ steps")  # printed just before the step is compiled
    started.signal(signal.SIGINT)
    sent = time.time()
    assert started.finish() == 0, started.output[-4000:]
    assert time.time() - sent < 10
    assert started.lines("stopped") == ["stopped at step 0 on SIGINT before training; nothing new to save.\n"]
    assert_clean(started)
    assert finished_steps(os.path.join(workdir, "checkpoints")) == []
    assert not os.path.exists(os.path.join(workdir, "lease.json"))


@pytest.mark.slow
def test_ctrl_c_in_training_saves_the_step_and_a_second_training_is_refused(tiny_corpus, tmp_path):
    """While a run trains, a second training of its work directory stops at once, naming the
    first (host, pid, since when). Ctrl-C then checkpoints the step the run reached: exit 0, one
    line, nothing trained past it."""
    workdir = str(tmp_path / "run")
    first = Run(main_args(workdir, tiny_corpus, LONG, checkpoint_every_steps=1000))
    first.wait_for(r"^\[step 2\]")
    second = run(main_args(workdir, tiny_corpus, LONG), timeout=120)
    assert second.process.returncode == 1
    refused = second.lines("error:")
    assert len(refused) == 1 and "in use by another training" in refused[0], second.output[-3000:]
    assert f"host {socket.gethostname()}, pid {first.process.pid}, since " in refused[0]
    assert_clean(second)
    assert first.process.poll() is None  # untouched by the refused one

    first.signal(signal.SIGINT)
    assert first.finish() == 0, first.output[-4000:]
    stops = first.lines("stopped")
    assert len(stops) == 1 and re.fullmatch(r"stopped at step \d+ on SIGINT; checkpoint saved.\n", stops[0]), stops
    stopped = int(re.search(r"step (\d+)", stops[0]).group(1))
    assert_clean(first)
    assert finished_steps(os.path.join(workdir, "checkpoints")) == [stopped]
    assert training_steps(workdir) == list(range(1, stopped + 1))
    assert not os.path.exists(os.path.join(workdir, "lease.json"))


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tiny_corpus, tmp_path):
    """The first Ctrl-C asks for a checkpoint; a second one, while it is being written, ends the
    run at once: exit 130, one line naming the last checkpoint, no traceback."""
    workdir = str(tmp_path / "run")
    started = Run(main_args(workdir, tiny_corpus, LONG))
    started.wait_for(r"^\[step 4\]")  # a checkpoint at step 3
    started.signal(signal.SIGINT)
    time.sleep(0.05)
    started.signal(signal.SIGINT)
    assert started.finish() == 130, started.output[-4000:]
    lines = started.lines("stopped")
    assert len(lines) == 1 and "by a second SIGINT" in lines[0] and "the last checkpoint is step " in lines[0], lines
    assert_clean(started)
    assert started.said == lines  # on stderr


@pytest.mark.slow
def test_sigterm_during_an_evaluation_saves_within_seconds(tiny_corpus, tmp_path):
    """A cluster's SIGTERM during an in-loop evaluation cuts it short: the step's checkpoint is
    written within seconds (it was written only after the evaluation and one more step)."""
    workdir = str(tmp_path / "run")
    started = Run(main_args(workdir, tiny_corpus, LONG, eval_every_steps=3, checkpoint_every_steps=1000,
                            eval_batch_size=2))
    started.wait_for(r"^evaluating step 3 ")
    started.signal(signal.SIGTERM)
    sent = time.time()
    assert started.finish() == 0, started.output[-4000:]
    assert time.time() - sent < 10
    assert started.lines("stopped") == ["stopped at step 3 on SIGTERM; checkpoint saved.\n"]
    assert finished_steps(os.path.join(workdir, "checkpoints")) == [3]
    assert not os.path.exists(os.path.join(workdir, "eval", "step_3.json"))  # cut short, not written
    assert_clean(started)


# --- a disk that fills up -------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(folder, size="64m"):
    """A tmpfs of `size` mounted at `folder` (unmounted afterwards)."""
    os.makedirs(folder)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=False)


def fill(disk, leave: int) -> str:
    """Takes the disk's free space but `leave` bytes with one file; returns its path."""
    stat = os.statvfs(disk)
    path = os.path.join(disk, "filler")
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize - leave)
    return path


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_the_failed_save(tiny_corpus, uninterrupted_run, tmp_path):
    """A work directory on a small tmpfs. A save that does not fit stops the run at its step in
    one line naming the cause: nothing trained past it, its temporary folder removed, none of
    Orbax's or asyncio's echoes (1,474 lines and 10 more steps before). Where a checkpoint is
    known to need more than the free space, the run stops before the save. Once space is freed,
    the run resumes from the last good checkpoint; metrics.jsonl, whose last line a crash cut in
    half, has every step once and reads; the dead run's lease is taken over."""
    with small_disk(str(tmp_path / "disk")) as disk:
        # A new run on a disk with 0.3 MB free: its first checkpoint (1-3 MB) fails while written.
        filler = fill(disk, 300_000)
        fresh = os.path.join(disk, "fresh")
        done = run(main_args(fresh, tiny_corpus, 9))
        assert done.process.returncode == 1, done.output[-4000:]
        assert len(done.said) == 1 and done.said[0].startswith("error: the checkpoint of step 3 could not be written")
        assert "No space left on device" in done.said[0] and "no checkpoint was saved before it" in done.said[0]
        assert_clean(done)
        assert training_steps(fresh) == [1, 2, 3]
        assert os.listdir(os.path.join(fresh, "checkpoints")) == []  # no N.orbax-checkpoint-tmp
        os.remove(filler)

        # A run resumed at step 12 (its copy on this disk), with less space than a checkpoint takes.
        workdir = os.path.join(disk, "run")
        shutil.copytree(uninterrupted_run, workdir)
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(UNINTERRUPTED_STEPS)))
        needed = checkpoints.folder_size(os.path.join(workdir, "checkpoints", "12"))
        filler = fill(disk, needed // 2)
        steps = UNINTERRUPTED_STEPS + 3
        done = run(main_args(workdir, tiny_corpus, steps))
        assert done.process.returncode == 1, done.output[-4000:]
        assert len(done.said) == 1, done.said
        assert done.said[0].startswith(f"error: no space for the checkpoint of step {UNINTERRUPTED_STEPS} in ")
        assert "the last good checkpoint is step 12" in done.said[0]
        assert_clean(done)
        assert training_steps(workdir) == list(range(1, UNINTERRUPTED_STEPS + 1))

        # Space freed, after a crash that cut metrics.jsonl's last line in half and left the lease.
        os.remove(filler)
        metrics = os.path.join(workdir, "metrics.jsonl")
        with open(metrics, "rb") as f:
            data = f.read()
        with open(metrics, "wb") as f:
            f.write(data[:-len(data.splitlines()[-1]) // 2])
        assert runner.training_losses(workdir)["steps"][-1] == UNINTERRUPTED_STEPS - 1  # experiments read it
        gone = subprocess.Popen(["true"])
        gone.wait()
        with open(os.path.join(workdir, "lease.json"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": gone.pid, "since": time.time() - 60,
                       "refreshed": time.time() - 10, "token": "crashed"}, f)
        done = run(main_args(workdir, tiny_corpus, steps))
        assert done.process.returncode == 0, done.output[-4000:]
        assert "resumed from step 12" in "".join(done.out)
        assert len(done.said) == 1 and f"process {gone.pid} is gone" in done.said[0], done.said
        assert training_steps(workdir) == list(range(1, steps + 1))
        want, got = losses(uninterrupted_run), losses(workdir)
        np.testing.assert_array_equal([got[s] for s in (13, 14, 15)], [want[s] for s in (13, 14, 15)])


# --- metrics.jsonl ---------------------------------------------------------------------------------

def test_metrics_are_cut_to_complete_lines_and_the_restored_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)] + [{"step": 4, "MSRVTT/t2v/R1": 1.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with open(path, "w") as f:
        f.write(text + '{"step": 5, "lo')
    assert metric_writers.read_jsonl(path) == rows  # the half line is left out
    assert metric_writers.cut_jsonl(path, 4)
    with open(path) as f:
        assert f.read() == text
    assert metric_writers.cut_jsonl(path, 2) and [r["step"] for r in metric_writers.read_jsonl(path)] == [1, 2]
    assert not metric_writers.cut_jsonl(path, 2)
    with open(path, "a") as f:
        f.write('{"step": 3, "lo\n{"step": 3}\n')  # a line that is not JSON, mid-file
    with pytest.raises(ValueError, match="metrics.jsonl, line 3: not a JSON row"):
        metric_writers.read_jsonl(path)
    assert metric_writers.cut_jsonl(path, 5) and metric_writers.read_jsonl(path)[-1] == {"step": 3}


# --- the work directory's lease --------------------------------------------------------------------

def _lease_checks(workdir):
    """What a lease must do wherever it lives (`workdir`: a local folder or a gs:// URL)."""
    warnings = []
    held = lease.Lease.acquire(workdir, warn=warnings.append)
    try:
        with pytest.raises(lease.LeaseError, match=rf"in use by another training: host {socket.gethostname()}, "
                                                   rf"pid {os.getpid()}, since .* UTC, refreshed 0 s ago"):
            lease.Lease.acquire(workdir)
        held.refresh()
        held.check()
    finally:
        held.release()
    assert lease.holder_of(workdir) is None and warnings == []

    # A lease not refreshed for longer than the timeout (another host: its process cannot be asked).
    stale = lease.Lease.acquire(workdir)
    stale._stop.set()  # hung: refreshes no more
    store = lease._store(workdir)
    data, version = store.read()
    store.write(json.dumps({**json.loads(data), "host": "elsewhere", "refreshed": time.time() - 7200}).encode(),
                version, create=False)
    # Several starts at once: one takes it over, the others find it held.
    taken, refused = [], []

    def start():
        try:
            taken.append(lease.Lease.acquire(workdir, warn=warnings.append))
        except lease.LeaseError as err:
            refused.append(str(err))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(taken) == 1 and len(refused) == 5, (taken, refused)
        assert len(warnings) == 1 and "host elsewhere" in warnings[0] and "not refreshed for 2.0 h" in warnings[0]
        stale.refresh()  # the old holder learns it lost the lease, and stops
        with pytest.raises(lease.LeaseError, match="was taken over by another training"):
            stale.check()
    finally:
        for held in taken:
            held.release()
    assert lease.holder_of(workdir) is None


def test_one_training_holds_a_local_work_directory(tmp_path):
    _lease_checks(str(tmp_path))


def test_one_training_holds_a_work_directory_in_a_bucket(gcs_bucket):
    """gs://: conditional writes on the object's generation (the test server honours them)."""
    _lease_checks(f"{gcs_bucket}/leases/run")
