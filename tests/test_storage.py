"""Paths on disk (the bucket side is in test_cloud.py), byte ranges from a bucket through either
client, and the resume check of configurations."""

import json
import os
import pickle

import pytest

from msk_jax import checkpoints, metric_writers, storage
from msk_jax.configs.howto import RESUMABLE_CHANGES
from tests.train_fixtures import load_config


def test_local_paths_are_absolute_and_urls_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.join("run", "eval", "step_1.json") == os.path.join(str(tmp_path), "run", "eval", "step_1.json")
    assert storage.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
    assert storage.is_remote("gs://bucket/x") and not storage.is_remote("/tmp/x")


def test_appendable_file_and_atomic_writes_on_disk(tmp_path):
    log = metric_writers.JsonlWriter(str(tmp_path / "logs" / "metrics.jsonl"))
    log.write_scalars(1, {"loss": 3.0})
    log.close()
    again = metric_writers.JsonlWriter(str(tmp_path / "logs" / "metrics.jsonl"))
    again.write_scalars(2, {"loss": 2.0})
    again.flush()
    assert metric_writers.read_jsonl(str(tmp_path / "logs" / "metrics.jsonl")) == [
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
    storage.write_atomic(tmp_path / "a" / "b.json", json.dumps({"x": 1}))
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": 1}
    assert os.listdir(tmp_path / "a") == ["b.json"]  # no temporary file left


def test_atomic_write_syncs_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """The file and then its folder are fsynced (a crash after the write keeps it); the temporary
    file has a name of its own, not the process id another host's container may share; a failed
    write leaves the target and the folder as they were."""
    synced, real_fsync = [], os.fsync

    def fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    folder = tmp_path / "run"
    folder.mkdir()
    # What another writer's temporary file of the old name would be: not touched, not in the way.
    (folder / f"b.json.tmp{os.getpid()}").mkdir()
    storage.write_atomic(folder / "b.json", "{}")
    assert (folder / "b.json").read_text() == "{}"
    assert (folder / "b.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    mine = [p for p in synced if p.startswith(str(folder))]
    assert len(mine) == 2 and os.path.dirname(mine[0]) == str(folder) and mine[1] == str(folder)
    assert sorted(os.listdir(folder)) == ["b.json", f"b.json.tmp{os.getpid()}"]
    (folder / "taken").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(IsADirectoryError):
        storage.write_atomic(folder / "taken", b"x")
    assert sorted(os.listdir(folder)) == ["b.json", f"b.json.tmp{os.getpid()}", "taken"]


@pytest.mark.parametrize("client", ["tensorstore", "fsspec"])
def test_byte_ranges_of_a_bucket_object(gcs_bucket, client):
    data = bytes(range(256)) * 64  # 16 KiB
    url = f"{gcs_bucket}/ranges/object.bin"
    storage.write_atomic(url, data)
    reader = pickle.loads(pickle.dumps(storage.RangeReader(max_gap=100, client=client)))  # as a worker gets it
    assert reader.client == client and reader.max_gap == 100
    assert bytes(reader.read(url, 10, 20)) == data[10:30]
    pending = reader.read_ranges([(url, 5000, 100), (url, 0, 10), (url, 50, 10), (url, 16000, 384), (url, 7, 0)])
    assert [bytes(pending[i]) for i in range(5)] == [data[5000:5100], data[:10], data[50:60], data[16000:], b""]
    # The first two ranges 40 bytes apart are one request; 1 + 3 requests, the gap's bytes counted.
    assert reader.requests == 4 and reader.bytes_read == 20 + 60 + 100 + 384
    with pytest.raises(OSError, match="object.bin"):
        reader.read(url, 16000, 1000)  # past the end
    with pytest.raises(OSError, match="missing.bin"):
        reader.read_ranges([(f"{gcs_bucket}/ranges/missing.bin", 0, 10)])[0]


def test_the_range_client_of_a_path(monkeypatch):
    assert storage.range_client("/tmp/x") == "local"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)
    assert storage.range_client("gs://b/x") == "fsspec"  # an emulator that only gcsfs is pointed at
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:1")
    assert storage.range_client("gs://b/x") == "tensorstore"
    assert storage.range_client("s3://b/x") == storage.range_client("gs://b/x", "fsspec") == "fsspec"
    with pytest.raises(ValueError, match="the tensorstore client reads gs:// URLs, not 's3://b/x'"):
        storage.range_client("s3://b/x", "tensorstore")
    with pytest.raises(ValueError, match="client 'curl', expected one of auto, tensorstore, fsspec"):
        storage.RangeReader(client="curl")


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_stored(config):
    return json.loads(config.to_json())


def test_config_differences_name_what_changes_the_state():
    old = load_config("demo")
    new = load_config("demo")
    # The run's length, cadence, data locations and layout may change on resume.
    new.num_train_steps, new.log_every_steps, new.data.csv, new.data.workers = 99, 7, "gs://b/x.csv", 8
    new.mesh = [("data", 2), ("model", 4)]
    assert checkpoints.config_differences(_as_stored(old), _as_stored(new), RESUMABLE_CHANGES) == []
    new.model.embed_dim, new.objective.sinkhorn.eps, new.seed, new.data.n_clips = 64, 0.5, 3, 4
    assert checkpoints.config_differences(_as_stored(old), _as_stored(new), RESUMABLE_CHANGES) == [
        "data.n_clips: 10 -> 4", "model.embed_dim: 128 -> 64", "objective.sinkhorn.eps: 0.07 -> 0.5", "seed: 0 -> 3"]
    baseline = load_config("demo,baseline")
    assert checkpoints.config_differences(_as_stored(old), _as_stored(baseline), RESUMABLE_CHANGES) == [
        "objective.consistency: true -> false"]
    stored = _as_stored(old)
    del stored["objective"]["queue_len"]  # a field the checkpoint's version did not have
    assert checkpoints.config_differences(stored, _as_stored(old), RESUMABLE_CHANGES) == ['objective.queue_len: "(absent)" -> 256']
