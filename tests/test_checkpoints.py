"""Checkpoints in this process, on a small state: what an unreadable checkpoint is called, that
only the echoes of its failed reads are silenced, and that checkpoints of earlier versions (with their unused
`rng` item) still restore."""

import asyncio
import gc
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from msk_jax import checkpoints
from msk_jax.train_step import TrainState

CONFIG = {"model": {"embed_dim": 4}, "num_train_steps": 10}


def _state(step, value):
    return TrainState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full((3,), value, jnp.float32)},
                      batch_stats={}, opt_state={"mu": jnp.zeros((3,), jnp.float32)}, queues=None)


def _save(workdir, steps):
    checkpointer = checkpoints.Checkpointer(str(workdir))
    for step in steps:
        checkpointer.save(_state(step, float(step)), {"input": [], "config": CONFIG})
    checkpointer.close()


def _unretrieved_task_failing_with(message):
    """Makes asyncio report a task whose exception nobody retrieved, as Orbax's pending reads
    do after one read of a checkpoint failed."""
    async def fail():
        raise ValueError(message)

    loop = asyncio.new_event_loop()
    task = loop.create_task(fail())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    del task
    gc.collect()


def test_an_unreadable_metadata_file_is_named_and_only_its_echoes_are_dropped(tmp_path, caplog):
    _save(tmp_path, [1, 2])
    meta = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:5])  # cut short
    warnings = []
    checkpointer = checkpoints.Checkpointer(str(tmp_path))
    try:
        state, _, step = checkpointer.restore_latest(_state(0, 0.0), CONFIG, warn=warnings.append)
    finally:
        checkpointer.close()
    assert step == 1 and float(state.params["w"][0]) == 1.0
    assert f"step 2: {tmp_path}/checkpoints/2/meta: JSONDecodeError" in warnings[0], warnings
    assert "resuming from step 1" in warnings[1]
    assert os.listdir(tmp_path / "unreadable_checkpoints")[0].startswith("2.")


    # Echoes of the failed step's reads, reported later (when collected), are dropped; the same
    # report about anything else still reaches the log.
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _unretrieved_task_failing_with(f'OUT_OF_RANGE: Error reading "{tmp_path}/checkpoints/2/state/d/0"')
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
        _unretrieved_task_failing_with(f"an unrelated failure in {tmp_path}/elsewhere")
        assert [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_checkpoint_with_the_rng_of_earlier_versions_restores(tmp_path):
    folder = str(tmp_path / "checkpoints")
    state = _state(4, 4.0)
    manager = checkpoints.open_manager(folder, create=True)
    arrays = {**checkpoints.state_arrays(state), "rng": jax.random.PRNGKey(7)}
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                            meta=ocp.args.JsonSave({"input": [], "config": CONFIG})))
    manager.wait_until_finished()
    manager.close()
    checkpointer = checkpoints.Checkpointer(str(tmp_path))
    try:
        restored, _, step = checkpointer.restore_latest(_state(0, 0.0), CONFIG)
    finally:
        checkpointer.close()
    assert step == 4 and int(restored.step) == 4
    np.testing.assert_array_equal(restored.params["w"], state.params["w"])
    # Another shape still stops the resume, naming the array.
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match=r"params/w: \(3,\) -> \(5,\)"):
        wide = _state(0, 0.0).replace(params={"w": jnp.zeros((5,), jnp.float32)})
        checkpoints.Checkpointer(str(tmp_path)).restore_latest(wide, CONFIG)


class _Flaky:
    """Reads of `step`'s metadata that fail `times` times with `error` (a storage fault of
    this process), then read normally."""

    def __init__(self, checkpointer, step, times, error):
        self.step, self.left, self.error = step, times, error
        self.real = checkpointer.read_meta

    def read_meta(self, step):
        if step == self.step and self.left > 0:
            self.left -= 1
            raise self.error
        return self.real(step)


def test_transient_storage_errors_are_retried_and_never_move_a_checkpoint(tmp_path):
    _save(tmp_path, [1, 2])
    checkpointer = checkpoints.Checkpointer(str(tmp_path), read_attempts=4, backoff_seconds=0.01)
    unavailable = ValueError("UNAVAILABLE: HTTP response code: 503 with body: Service Unavailable")
    try:
        flaky = _Flaky(checkpointer, 2, 3, unavailable)
        checkpointer.read_meta = flaky.read_meta
        warnings = []
        _, _, step = checkpointer.restore_latest(_state(0, 0.0), CONFIG, warn=warnings.append)
        assert step == 2 and flaky.left == 0 and warnings == []  # three failures, the fourth read worked
        flaky.left = 10  # more than the attempts: the run stops, nothing is moved
        with pytest.raises(checkpoints.CheckpointError, match="outlasted 4 attempts.*nothing was moved"):
            checkpointer.restore_latest(_state(0, 0.0), CONFIG, warn=warnings.append)
        flaky.left, flaky.error = 2, ValueError("NOT_FOUND: Error reading local file: No such file")
        _, _, step = checkpointer.restore_latest(_state(0, 0.0), CONFIG, warn=warnings.append)
        assert step == 1 and flaky.left == 0  # failed twice (a fresh read too): unreadable
    finally:
        checkpointer.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert [n.split(".")[0] for n in os.listdir(tmp_path / "unreadable_checkpoints")] == ["2"]


@pytest.mark.parametrize("error, transient", [
    (TimeoutError("read timed out"), True),
    (ConnectionResetError(104, "Connection reset by peer"), True),
    (ValueError("DEADLINE_EXCEEDED: waiting for gs://b/x"), True),
    (OSError("HTTP status 502 Bad Gateway"), True),
    (ValueError("NOT_FOUND: gs://b/run/checkpoints/503/state"), False),  # a step number is no status
    (ValueError("Expecting value: line 1 column 1 (char 0)"), False),
])
def test_which_errors_are_transient(error, transient):
    assert checkpoints.is_transient(error) is transient


@pytest.mark.parametrize("error, cause", [
    (ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/6.orbax-checkpoint-tmp/state/_sharding": '
                "Failed to write 176889 bytes to file 6: No space left on device [os_error_code='28']"),
     "No space left on device"),
    (OSError(30, "Read-only file system", "/w/checkpoints/6.orbax-checkpoint-tmp"), "Read-only file system"),
    (ValueError('PERMISSION_DENIED: Error writing "state/_METADATA" in gs://b/run/checkpoints/6: HTTP response code: '
                '403 with body: {"error": "denied"}'), "permission denied (HTTP 403: PERMISSION_DENIED: Error writing"),
])
def test_a_failed_write_is_named_by_its_cause(error, cause):
    assert checkpoints.describe_write_failure(RuntimeError("wrapped")).startswith("RuntimeError: wrapped")
    wrapped = RuntimeError("Save Finalize thread failed")
    wrapped.__cause__ = error
    assert checkpoints.describe_write_failure(wrapped).startswith(cause)


def test_a_save_into_a_read_only_folder_stops_in_one_line(tmp_path):
    """The work directory's disk turns read-only between two saves: the second save raises
    SaveError naming the cause and the last good checkpoint, and leaves nothing behind."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    checkpointer = None
    try:
        checkpointer = checkpoints.Checkpointer(str(disk))
        checkpointer.save(_state(1, 1.0), {"input": [], "config": CONFIG})
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(checkpoints.SaveError) as raised:
            checkpointer.save(_state(2, 2.0), {"input": [], "config": CONFIG})
        message = str(raised.value)
        assert "the checkpoint of step 2 cannot be written" in message and "Read-only file system" in message
        assert "the last good checkpoint is step 1" in message and "\n" not in message
        assert sorted(os.listdir(disk / "checkpoints")) == ["1"]
    finally:
        if checkpointer is not None:
            checkpointer.close()
        subprocess.run(["umount", "-l", str(disk)], check=False)
