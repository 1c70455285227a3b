"""Training, evaluation and data in a bucket: gs:// paths against a real Cloud Storage API on
localhost (gcp-storage-emulator, see the `gcs_bucket` fixture and tests/gcs_server.py), reached
only through the clients' standard environment variables."""

import json
import os
import subprocess

import numpy as np
import pytest

from msk_jax import checkpoint_reader, evaluate, metric_writers, storage
from tests.conftest import REPO_ROOT, run_env
from tests.train_fixtures import kill_after_checkpoint, losses, main_args, tiny_config

BUCKET_STEPS = 12  # the first steps of the uninterrupted run (the run's length does not change its steps)



def _fs():
    """gcsfs, imported after the `gcs_bucket` fixture has set its environment."""
    gcsfs = pytest.importorskip("gcsfs")
    return gcsfs.GCSFileSystem()


def _bucket_data(corpus_url):
    """config.data overrides that read the tiny demo corpus (copied into a bucket) as plain files."""
    howto = f"{corpus_url}/howto"
    return {"data.source": "files", "data.csv": f"{howto}/howto_train.csv", "data.caption": f"{howto}/caption.pickle",
            "data.features_2d": f"{howto}/features_2d", "data.features_3d": f"{howto}/features_3d",
            "data.audio": f"{howto}/audio", "data.word_vectors": f"{corpus_url}/word2vec.bin",
            "data.msrvtt": f"{corpus_url}/msrvtt_jsfusion_test.pkl", "data.youcook2": f"{corpus_url}/youcook_val.pkl"}


@pytest.fixture(scope="module")
def bucket_run(gcs_bucket, tiny_corpus):
    """The tiny demo with its data and its workdir in the bucket, SIGKILLed after a checkpoint
    and restarted: (workdir URL, data overrides, the restart's stdout)."""
    corpus = f"{gcs_bucket}/corpus"
    _fs().put(tiny_corpus.rstrip("/") + "/", corpus.removeprefix("gs://"), recursive=True)
    data = _bucket_data(corpus)
    workdir = f"{gcs_bucket}/runs/killed"
    args = main_args(workdir, tiny_corpus, BUCKET_STEPS, **data)
    env = run_env()
    interrupted_at = kill_after_checkpoint(args, env, f"{workdir}/checkpoints", min_step=3)
    assert interrupted_at < BUCKET_STEPS
    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {interrupted_at} in {workdir}/checkpoints" in result.stdout
    return workdir, data, result.stdout


def test_bucket_data_and_workdir_resume_with_the_uninterrupted_losses(bucket_run, uninterrupted_run):
    workdir, _, _ = bucket_run
    # Data read from the bucket, killed and resumed there: the losses of one run from local disk.
    want, got = losses(uninterrupted_run), losses(workdir)
    assert sorted(got) == list(range(1, BUCKET_STEPS + 1))
    np.testing.assert_array_equal([got[s] for s in sorted(got)], [want[s] for s in sorted(got)])
    # Every artefact is in the bucket, nothing in a local "gs:" folder.
    assert checkpoint_reader.finished_steps(f"{workdir}/checkpoints") == [6, 9, 12]
    results = json.loads(storage.read_bytes(f"{workdir}/eval/step_12.json"))
    assert set(results) == {"MSRVTT", "YouCook2"}
    events = storage.listdir(f"{workdir}/tensorboard")
    assert len(events) == 2 and all(e.startswith("events.out.tfevents.") for e in events)  # one per start
    assert not os.path.exists(os.path.join(REPO_ROOT, "gs:"))


def test_tensorboard_events_in_the_bucket_are_readable(bucket_run, tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    workdir, _, _ = bucket_run
    steps = set()
    for name in storage.listdir(f"{workdir}/tensorboard"):
        local = tmp_path / name
        local.write_bytes(storage.read_bytes(f"{workdir}/tensorboard/{name}"))
        events = list(EventFileLoader(str(local)).Load())
        assert events[0].file_version == "brain.Event:2"
        steps |= {e.step for e in events[1:] if any(v.tag == "loss" for v in e.summary.value)}
    assert steps == set(range(1, BUCKET_STEPS + 1))


def test_evaluate_a_bucket_checkpoint_and_watch_a_bucket(bucket_run, tiny_corpus, gcs_bucket, tmp_path, capsys):
    workdir, data, _ = bucket_run
    config = tiny_config(tiny_corpus)
    for key, value in data.items():
        config.data[key.split(".")[1]] = value
    # --checkpoint=gs://...: the same numbers as the same checkpoint copied to disk.
    local = tmp_path / "run"
    _fs().get(f"{workdir}/checkpoints/12".removeprefix("gs://"), str(local / "checkpoints" / "12"), recursive=True)
    from_disk = evaluate.run(config, str(local), None)
    from_bucket = evaluate.run(config, workdir, None, output_dir=f"{gcs_bucket}/evaluations/once")
    assert from_bucket[12] == from_disk[12]
    assert json.loads(storage.read_bytes(f"{gcs_bucket}/evaluations/once/eval/step_12-ema-MSRVTT+YouCook2.json")) == from_bucket[12]

    # --watch on the bucket: every complete checkpoint once, stopping at the run's last.
    out = f"{gcs_bucket}/evaluations/watch"
    capsys.readouterr()
    watched = evaluate.run(config, workdir, None, output_dir=out, watch=True, poll_seconds=0.2, idle_timeout=60)
    assert list(watched) == [6, 9, 12] and watched[12] == from_bucket[12]
    assert "step 12 is the run's last; stopping." in capsys.readouterr().out
    assert storage.listdir(f"{out}/eval") == [f"step_{n}-ema-MSRVTT+YouCook2.json" for n in (12, 6, 9)]
    assert storage.listdir(f"{out}/tensorboard")

    # A checkpoint that appears in the bucket after a first look is seen at the next poll.
    folder = f"{workdir}/checkpoints"
    assert checkpoint_reader.finished_steps(folder) == [6, 9, 12]
    fs = _fs()
    fs.copy(f"{folder}/12".removeprefix("gs://"), f"{folder}/15".removeprefix("gs://"), recursive=True)
    try:
        assert checkpoint_reader.finished_steps(folder) == [6, 9, 12, 15]
    finally:
        fs.rm(f"{folder}/15".removeprefix("gs://"), recursive=True)


def test_metrics_log_in_a_bucket_keeps_what_was_written_before(gcs_bucket):
    path = f"{gcs_bucket}/logs/metrics.jsonl"
    first = metric_writers.JsonlWriter(path)
    first.write_scalars(1, {"loss": 2.0})
    first.close()
    second = metric_writers.JsonlWriter(path)  # a resumed run appends to the same log
    second.write_scalars(2, {"loss": 1.5})
    second.flush()
    assert metric_writers.read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_bucket_objects_come_back_byte_for_byte(gcs_bucket):
    """Whatever their last bytes, written by the product (a file closed: one resumable upload) or
    put by gcsfs as the tests and `LocalBucket` fill a bucket (one multipart upload with bare-LF
    line breaks, so an object ending in CR, as an Orbax manifest can, reaches the server as
    "...\\r\\n--boundary"; tests/gcs_server.py reads it as the body's line breaks say)."""
    from msk_jax import storage

    fs = _fs()
    for name, data in {"cr": b"manifest\r", "crlf": b"rows\r\n", "lf": b"rows\n", "all": bytes(range(256)),
                       "empty": b""}.items():
        written, put = f"{gcs_bucket}/bytes/written/{name}", f"{gcs_bucket}/bytes/put/{name}"
        storage.write_atomic(written, data)
        fs.pipe(put.removeprefix("gs://"), data)
        assert storage.read_bytes(written) == data and storage.read_bytes(put) == data, name


def test_tfds_data_dir_in_a_bucket(gcs_bucket, tmp_path):
    """Built TFDS datasets are read from a bucket (TFDS metadata through epath, the array_record
    shards through array_record's own Cloud Storage reader)."""
    tfds_builders = pytest.importorskip("msk_jax.data.tfds_builders")
    from msk_jax.data import eval_sets
    from tests.data_fixtures import write_eval_pickle
    from tests.test_eval_sets import WORDS

    manual = tmp_path / "manual"
    manual.mkdir()
    write_eval_pickle(str(manual / "youcook_val.pkl"), "youcook", 5, rng=np.random.default_rng(0), drop_2d=1)
    local = str(tmp_path / "tfds")
    tfds_builders.build("youcook2_retrieval", str(manual), local)
    remote = f"{gcs_bucket}/tfds"
    _fs().put(local + "/", remote.removeprefix("gs://"), recursive=True)
    want = tfds_builders.read_tfds_eval_set("youcook2_retrieval", local, eval_sets.YOUCOOK2, WORDS)
    got = tfds_builders.read_tfds_eval_set("youcook2_retrieval", remote, eval_sets.YOUCOOK2, WORDS)
    assert got.ids == want.ids and got.dropped == want.dropped == 1
    for key in want.batch:
        np.testing.assert_array_equal(got.batch[key], want.batch[key])


def test_bucket_server_answers_concurrent_requests_after_its_latency(gcs_bucket):
    """tests/gcs_server.py: each request waits the set latency, concurrent requests together; the
    server counts what it answered."""
    import time

    from msk_jax.bench.bucket import request_counts, set_latency

    fs, endpoint, latency = _fs(), os.environ["STORAGE_EMULATOR_HOST"], 0.2
    path = f"{gcs_bucket}/latency/blob".removeprefix("gs://")
    data = bytes(range(256)) * 64
    fs.pipe(path, data)
    starts = list(range(0, len(data), 1024))
    set_latency(endpoint, latency * 1e3)
    try:
        start = time.perf_counter()
        assert fs.cat_file(path, start=0, end=10) == data[:10]
        assert time.perf_counter() - start >= latency
        before, start = request_counts(endpoint), time.perf_counter()
        parts = fs.cat_ranges([path] * len(starts), starts, [s + 100 for s in starts])
        took = time.perf_counter() - start
    finally:
        set_latency(endpoint, 0)
    assert parts == [data[s:s + 100] for s in starts]
    assert len(starts) == 16 and took < 5 * latency  # one at a time: 16 x latency
    after = request_counts(endpoint)
    assert after["ranged_reads"] - before["ranged_reads"] == 16 and after["requests"] - before["requests"] == 16
    assert request_counts(endpoint, reset=True) and request_counts(endpoint) == {"requests": 0, "ranged_reads": 0}
