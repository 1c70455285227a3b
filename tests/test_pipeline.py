"""The training pipeline: determinism, resumption, process shards, skipping bad videos; worker
processes (per-video slots and batch tasks) against threads, the lifetime of lent batches,
workers' signals, the shared memory of a killed process group; TFDS."""

import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest

from msk_jax.data.loader import InputPositionError, TrainingPipeline
from msk_jax.data.word2vec import load_word2vec_binary
from tests.conftest import REPO_ROOT
from tests.data_fixtures import segments, write_howto
from tests.paper_config import paper_clip_settings
from tests.test_howto100m import howto, large_vocabulary, reader  # noqa: F401 (fixtures)

SETTINGS = dict(n_clips=2, num_audio_frames=256)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """The caption vocabularies' word vectors of this module's sources go to a folder of its own."""
    with pytest.MonkeyPatch.context() as patch:
        folder = str(tmp_path_factory.mktemp("cache"))
        patch.setenv("MSK_JAX_CACHE_DIR", folder)
        yield folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline"))
    videos = [(f"demo/v{i:02d}", 12 + i, segments((1.0, 5.0, "a b"), (6.0, 9.0 + i / 2, "c d")), {})
              for i in range(10)]
    videos.append(("demo/empty", 15, segments(), {}))
    videos.append(("demo/gone", 15, segments((1.0, 2.0, "a")), {}))
    write_howto(root, videos)
    os.remove(os.path.join(root, "audio", "demo/gone", "gone_spec.npz"))
    return root


def _take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_deterministic_for_a_seed(corpus):
    first = _take(TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=3), 4)
    second = _take(TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=3, workers=1, prefetch=0), 4)
    other = _take(TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=4), 4)
    assert _same(first, second)
    assert not _same(first, other)
    assert first[0]["video"].shape[0] == 4 * 2  # videos x clips


def test_resume_continues_with_the_same_batches(corpus):
    uninterrupted = _take(TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=1), 7)  # crosses epochs
    pipeline = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=1)
    _take(pipeline, 3)
    state = pipeline.state()
    resumed = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=1)
    resumed.restore(state)
    assert _same(_take(resumed, 4), uninterrupted[3:])
    with pytest.raises(InputPositionError, match="resume with --config.seed=1"):
        TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=2).restore(state)


def shard(pipeline, epoch):
    """The first-choice videos of the pipeline's process's slots in `epoch`, in order."""
    local = range(pipeline.batches_per_epoch * pipeline.local_videos)
    return pipeline._order(epoch)[[pipeline._slot(i) for i in local]]


def test_processes_read_disjoint_shards(corpus):
    shards = [TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=0, process_index=p, process_count=2)
              for p in range(2)]
    epoch0 = [set(shard(s, 0)) for s in shards]
    assert not epoch0[0] & epoch0[1] and len(epoch0[0] | epoch0[1]) == 12
    # Without skips, the processes' batches together are the single-process batch.
    single = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=0)
    assert list(shard(single, 0)[:4]) == [*shard(shards[0], 0)[:2], *shard(shards[1], 0)[:2]]
    batch = next(shards[1])
    assert batch["video"].shape[0] == 2 * 2  # 4 videos over 2 processes, 2 clips each
    with pytest.raises(InputPositionError, match="cannot be split over 2 processes"):
        TrainingPipeline(reader(corpus, **SETTINGS), 3, process_count=2)


def _global(pipelines, n):
    """n global batches: the processes' batches concatenated in process order."""
    parts = [_take(p, n) for p in pipelines]
    return [{k: np.concatenate([part[i][k] for part in parts]) for k in parts[0][0]} for i in range(n)]


def test_the_stream_is_global_and_resumes_on_another_process_count(corpus):
    """With unreadable videos in the corpus (replaced within their slot), two processes build
    the single process's global batches, and a position saved on either count continues the
    same stream on the other (across an epoch boundary)."""
    def pipelines(count):
        return [TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=6, process_index=p, process_count=count)
                for p in range(count)]

    single = pipelines(1)
    want = _global(single, 8)
    assert sum(single[0].skipped.values()) >= 2
    two = pipelines(2)
    assert _same(_global(two, 3), want[:3])
    assert two[0].state() == two[1].state() == {"epoch": 0, "position": 12, "seed": 6, "videos_per_batch": 4}
    one = pipelines(1)
    one[0].restore(two[0].state())  # 2 -> 1
    assert _same(_global(one, 2), want[3:5])
    again = pipelines(2)
    for p in again:  # 1 -> 2
        p.restore(one[0].state())
    assert _same(_global(again, 3), want[5:8])
    with pytest.raises(ValueError, match="batch boundary"):
        one[0].restore({"epoch": 0, "position": 2, "seed": 6})


def test_positions_of_earlier_checkpoints_convert():
    from msk_jax.train import saved_input_position

    old = [{"epoch": 2, "position": 8, "seed": 1, "process_index": i, "process_count": 2} for i in range(2)]
    assert saved_input_position(old, 8) == ({"epoch": 2, "position": 16, "seed": 1, "videos_per_batch": 8}, None)
    old[1]["position"] = 9  # process 1 had skipped a video
    position, warning = saved_input_position(old, 8)
    assert position["position"] == 16 and "batch 2 of epoch 2" in warning
    assert saved_input_position(position, 8) == (position, None)


def test_bad_videos_are_skipped_and_counted(corpus):
    pipeline = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=0)
    _take(pipeline, 6)  # two epochs of 12 videos
    assert pipeline.skipped["no ASR segments"] >= 1 and pipeline.skipped["missing features"] >= 1
    summary = pipeline.summary()
    assert "skipped" in summary and "gone_spec.npz" in summary and "no ASR segments" in summary


def test_tfds_builder_round_trip(corpus, tmp_path, large_vocabulary):
    tfds_builders = pytest.importorskip("msk_jax.data.tfds_builders")
    import tensorflow_datasets as tfds

    builder = tfds_builders.Howto100mFeatures(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=corpus))
    words = load_word2vec_binary(os.path.join(corpus, "word2vec.bin"))
    source = tfds_builders.TFDSVideoSource.load(str(tmp_path), words, paper_clip_settings(**SETTINGS))
    assert len(source) == 10  # the two bad videos were skipped at build time
    raw = reader(corpus, **SETTINGS)
    index_of = {raw.video_id(i): i for i in range(len(raw))}
    for i in range(len(source)):
        example_id = source.data[i]["id"].decode()
        got = source.sample_clips(i, np.random.default_rng(7))
        want = raw.sample_clips(index_of[example_id], np.random.default_rng(7))
        for key in ("video", "audio", "text", "text_mask", "start"):
            np.testing.assert_array_equal(got[key], want[key])
    batches = _take(TrainingPipeline(source, 4, seed=0), 2)
    assert batches[1]["audio"].shape == (8, 40, 256)
    # Pickled for a worker: the dataset's place and the vectors of the words the build recorded.
    assert source.vocabulary == ["a", "b", "c", "d"]
    large = tfds_builders.TFDSVideoSource.load(str(tmp_path), load_word2vec_binary(large_vocabulary[0]),
                                               paper_clip_settings(**SETTINGS))
    data = pickle.dumps(large)
    assert len(data) < 1 << 20 and len(large.word_vectors) == 300_000
    worker = pickle.loads(data)
    assert sorted(worker.word_vectors.index) == ["a", "b", "c", "d"] and len(worker) == len(large)
    for i in range(len(large)):
        got, want = (s.sample_clips(i, np.random.default_rng(i)) for s in (worker, large))
        assert all(np.array_equal(got[k], want[k]) for k in ("video", "audio", "text", "text_mask", "raw_text"))


def _counts(pipeline):
    return dict(pipeline.skipped), dict(pipeline.skipped_videos)


def test_worker_processes_and_batch_tasks_give_the_batches_of_threads(corpus):
    """Threads, worker processes filling one slot per video and worker processes assembling the
    batches (tasks of 3 and 1 videos) give the same bits, the same skip counts and examples (the
    two unreadable videos replaced inside their tasks), across epochs and a restore; the workers
    ignore SIGTERM and SIGINT."""
    threads = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=2)
    want = _take(threads, 7)  # 21 slots over 12 videos, 2 epochs
    assert sum(threads.skipped.values()) >= 2
    slots = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=2, workers=2, processes=True)
    tasks = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=2, workers=2, processes=True, batch_tasks=True,
                             videos_per_task=3, keep_batches=7)
    try:
        assert not slots.lends_batches and tasks.lends_batches
        assert _same(_take(slots, 7), want) and _counts(slots) == _counts(threads)
        got = _take(tasks, 3)
        for worker in tasks._executor._processes:  # a job's stop signals are the training process's
            os.kill(worker, signal.SIGTERM)
            os.kill(worker, signal.SIGINT)
        tasks.restore(tasks.state())  # drops the batches in flight, continues at the same place
        got += _take(tasks, 4)
        assert _same(got, want) and _counts(tasks) == _counts(threads)
        assert tasks.worker_cpu_seconds > 0 and tasks.clips_served == 7 * 4 * 2
        assert len(tasks._pending[0][3]) == 2  # a batch's tasks: videos 0-2 and 3
    finally:
        slots.close()
        tasks.close()
    assert _same(got, want)  # the batches outlive the pipeline


def test_batch_tasks_resume_on_another_process_count_with_sample_videos(corpus, tmp_path):
    """The second of two hosts, resumed from a position saved on one, in one worker process
    through a source with `sample_videos` (the feature store of the same videos)."""
    from msk_jax.data.feature_store import FeatureStoreSource, build_feature_store

    build_feature_store(reader(corpus, **SETTINGS), str(tmp_path / "store"), progress=False)
    source = FeatureStoreSource(str(tmp_path / "store"), reader(corpus, **SETTINGS).settings)
    assert hasattr(source, "sample_videos")
    host = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=7, process_index=1, process_count=2)
    want = _take(host, 6)
    one = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=7)
    _take(one, 2)
    resumed = TrainingPipeline(source, 4, seed=7, process_index=1, process_count=2, processes=True, workers=1,
                               batch_tasks=True, keep_batches=4)
    try:
        resumed.restore(one.state())
        assert _same([{k: np.copy(v) for k, v in b.items()} for b in _take(resumed, 4)], want[2:])
        assert sum(resumed.skipped.values()) >= 1
    finally:
        resumed.close()


def test_a_lent_batch_stays_intact_for_keep_batches_calls(corpus):
    """A batch of batch tasks is views of a buffer that stays unchanged while `keep_batches`
    more batches are returned (across a restore too); the ring of buffers is no larger than
    that needs (prefetch + 1 + keep_batches), so the contract is what it says."""
    want = _take(TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=4), 9)
    pipeline = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=4, workers=2, processes=True, batch_tasks=True,
                                prefetch=1, keep_batches=1)
    try:
        first = next(pipeline)
        second = next(pipeline)  # keep_batches = 1 later: the first is intact
        assert _same([first, second], want[:2])
        third = next(pipeline)   # may overwrite the first
        pipeline.restore(pipeline.state())  # drops the batch in flight; the last returned stays
        fourth = next(pipeline)
        assert _same([third, fourth], want[2:4])
        assert np.shares_memory(fourth["video"], first["video"])  # 3 buffers in turn, not more
        for i in range(5, 9):
            batch = next(pipeline)
            assert _same([fourth, batch], [want[i - 2], want[i - 1]])
            fourth = batch
    finally:
        pipeline.close()


def test_device_batches_keep_to_the_lifetime_of_lent_batches(corpus):
    """The training loop's device batches of a lending pipeline: on CPU, copies (a device array
    may alias host memory), so a batch queued on the device stays right while the pipeline
    reuses its buffer."""
    import jax

    from msk_jax import sharding
    from msk_jax.train import DeviceBatches

    want = _take(TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=8), 6)
    pipeline = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=8, workers=1, processes=True, batch_tasks=True,
                                prefetch=0, keep_batches=0)
    mesh = sharding.create_mesh([("data", -1)])
    batches = DeviceBatches(pipeline, sharding.batch_sharding(mesh), ahead=3)
    try:
        got = []
        for _ in range(6):
            batch, position = batches.pop()
            batches.fill()
            got.append(batch)
        assert _same([{k: np.asarray(jax.device_get(v)) for k, v in b.items()} for b in got], want)
        assert position == {"epoch": 1, "position": 12, "seed": 8, "videos_per_batch": 4}  # after 2 epochs
    finally:
        pipeline.close()


_HOLD_A_PIPELINE = """
import sys, time
from msk_jax.data.loader import TrainingPipeline
from tests.test_howto100m import reader

if __name__ == "__main__":
    pipeline = TrainingPipeline(reader(sys.argv[1], n_clips=2, num_audio_frames=256), 4, workers=2, processes=True,
                                batch_tasks=True)
    next(pipeline)
    print(pipeline._slots.memory.name, flush=True)
    time.sleep(600)
"""


def test_shared_memory_of_a_killed_process_group_goes_at_the_next_start(corpus, tmp_path):
    """A training process, its workers and multiprocessing's resource tracker killed together
    (SIGKILL to the process group, as a scheduler kills a job's cgroup) leave the batch buffers
    in /dev/shm; the next pipeline that starts on the host removes them, and not a live one's."""
    from msk_jax.data import loader

    script = tmp_path / "hold.py"
    script.write_text(_HOLD_A_PIPELINE)
    proc = subprocess.Popen([sys.executable, str(script), corpus], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT), start_new_session=True)
    try:
        killed = "/dev/shm/" + proc.stdout.readline().strip()
        assert os.path.isfile(killed)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # nothing of the run is left to remove its memory
        proc.wait()
    try:
        pipeline = TrainingPipeline(reader(corpus, **SETTINGS), 4, workers=1, processes=True, batch_tasks=True)
        try:
            next(pipeline)
            assert not os.path.exists(killed)
            live = pipeline._slots.memory.name
            assert live not in loader.sweep_dead_segments() and os.path.isfile(f"/dev/shm/{live}")
        finally:
            pipeline.close()
    finally:
        if os.path.isfile(killed):
            os.unlink(killed)
