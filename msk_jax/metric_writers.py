"""Metric writers: TensorBoard event files, a JSON-lines log and the terminal; progress reports
and profiles of a few steps.

(clu's writers need TensorFlow; these write TensorBoard event records with the `tensorboard`
package.) Files go to a local folder or a bucket (`msk_jax.storage`). Only process 0 writes
files: other processes get a terminal-only writer. `flush()` makes what was written durable (in
a bucket: uploads it); the training loop flushes at log and checkpoint steps.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from typing import Mapping

from msk_jax import storage


class MetricWriter:
    """Interface: scalars per step; flush; close."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class LoggingWriter(MetricWriter):
    """Prints selected scalars on one line per write."""

    def __init__(self, keys: tuple[str, ...] | None = None, stream=sys.stdout):
        self.keys, self.stream = keys, stream

    def write_scalars(self, step, scalars):
        items = [(k, v) for k, v in scalars.items() if self.keys is None or k in self.keys]
        if items:
            text = "  ".join(f"{k} {v:.4g}" for k, v in items)
            print(f"[step {step}] {text}", file=self.stream, flush=True)


class JsonlWriter(MetricWriter):
    """Appends {"step": .., <name>: ..} lines to a file (easy to read back in tests and notebooks)."""

    def __init__(self, path: str):
        self.path = path
        self._file = storage.AppendableFile(path)

    def write_scalars(self, step, scalars):
        self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class TensorBoardWriter(MetricWriter):
    """Scalar summaries in a TensorBoard event file (one new file per writer, as TensorBoard's
    own writers do; TensorBoard reads all files of the folder)."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary = event_pb2, summary_pb2
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self.path = storage.join(logdir, name)
        self._file = storage.AppendableFile(self.path)
        self._writer = RecordWriter(self._file)
        self._write_event(self._event.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write_event(self, event) -> None:
        self._writer.write(event.SerializeToString())

    def write_scalars(self, step, scalars):
        values = [self._summary.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        self._write_event(self._event.Event(wall_time=time.time(), step=int(step),
                                            summary=self._summary.Summary(value=values)))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class MultiWriter(MetricWriter):
    def __init__(self, writers: list[MetricWriter]):
        self.writers = writers

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def create_default_writer(workdir: str, just_logging: bool, log_keys: tuple[str, ...] | None = None,
                          resume_step: int | None = None) -> MetricWriter:
    """TensorBoard (`<workdir>/tensorboard`) + `<workdir>/metrics.jsonl` + terminal; terminal only
    when `just_logging` (processes other than 0). `resume_step`: the step the run continues from
    (0 for a new one); `metrics.jsonl` is first cut to it (`cut_jsonl`)."""
    if just_logging:
        return LoggingWriter(log_keys)
    metrics = storage.join(workdir, "metrics.jsonl")
    if resume_step is not None:
        cut_jsonl(metrics, resume_step)
    return MultiWriter([LoggingWriter(log_keys), TensorBoardWriter(storage.join(workdir, "tensorboard")),
                        JsonlWriter(metrics)])


def cut_jsonl(path: str, last_step: int) -> bool:
    """Cuts a JSON-lines log, as a run resumed from `last_step` continues it: to its rows up to
    that step (those after it are trained again and written again) and to complete lines (a
    crash can leave half of the last one, which the next append would run into). Rows that are
    not JSON are dropped. The file is truncated where what it keeps is its beginning, else
    rewritten whole (atomically). Returns whether it changed."""
    if not storage.exists(path):
        return False
    data = storage.read_bytes(path)
    kept, start, prefix = [], 0, True
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            break  # half a line
        line = data[start:end + 1]
        start = end + 1
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            prefix = False
            continue
        if row["step"] > last_step:
            break
        kept.append(line)
    content = b"".join(kept)
    if len(content) == len(data):
        return False
    if prefix and not storage.is_remote(path):
        os.truncate(path, len(content))
    else:
        storage.write_atomic(path, content)
    return True


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines log (a local path or a URL). A last line cut short (a crash while
    it was written) is left out; any other line that is not JSON raises ValueError naming it."""
    lines = storage.read_bytes(path).decode(errors="replace").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            if number == len(lines):  # no newline after it: written in part
                break
            raise ValueError(f"{path}, line {number}: not a JSON row ({err})") from None
    return rows


class ReportProgress:
    """Steps per second and ETA, reported every `every_steps` steps.

    (What `clu.periodic_actions.ReportProgress` reports; clu's cannot be used without TensorFlow:
    `clu.periodic_actions` imports `clu.metric_writers`, which imports TensorFlow, in clu 0.0.12.)"""

    def __init__(self, num_train_steps: int, every_steps: int = 10):
        self.num_train_steps, self.every_steps = num_train_steps, every_steps
        self._last_step, self._last_time = None, None

    def __call__(self, step: int) -> dict[str, float] | None:
        now = time.monotonic()
        if self._last_step is None:
            self._last_step, self._last_time = step, now
            return None
        if step - self._last_step < self.every_steps and step < self.num_train_steps:
            return None
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        remaining = max(self.num_train_steps - step, 0)
        return {"steps_per_sec": rate, "eta_minutes": remaining / rate / 60 if rate > 0 else math.inf}


class Profile:
    """A `jax.profiler` trace of `num_steps` steps from step `first_step`, written to `logdir`
    (`<workdir>/tensorboard`: TensorBoard's profile tab reads `plugins/profile/<run>/` there).
    Call once per step, after the step; `close()` ends a trace the run stopped in.

    (What `clu.periodic_actions.Profile` does, without clu's TensorFlow import, see ReportProgress.)"""

    def __init__(self, logdir: str, first_step: int, num_steps: int):
        self.logdir, self.first_step, self.num_steps = logdir, first_step, num_steps
        self.stop_at: int | None = None  # set while the trace runs
        self.done = False

    def __call__(self, step: int) -> None:
        import jax

        if self.stop_at is None and not self.done and step >= self.first_step:
            jax.profiler.start_trace(self.logdir)
            self.stop_at = step + self.num_steps
        elif self.stop_at is not None and step >= self.stop_at:
            self.close()

    def close(self) -> None:
        import jax

        if self.stop_at is not None:
            jax.profiler.stop_trace()
            self.stop_at, self.done = None, True
