"""The training pipeline: determinism, resumption, process shards, skipping bad videos; TFDS."""

import os

import numpy as np
import pytest

from msk_jax.data.pipeline import InputPositionError, TrainingPipeline
from msk_jax.data.word2vec import load_word2vec_binary
from tests.data_fixtures import segments, write_howto
from tests.paper_config import paper_clip_settings
from tests.test_howto100m import reader

SETTINGS = dict(n_clips=2, num_audio_frames=256)


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


def test_processes_read_disjoint_shards(corpus):
    shards = [TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=0, process_index=p, process_count=2)
              for p in range(2)]
    epoch0 = [set(s._shard(0)) for s in shards]
    assert not epoch0[0] & epoch0[1] and len(epoch0[0] | epoch0[1]) == 12
    # Without skips, the processes' batches together are the single-process batch.
    single = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=0)
    assert list(single._shard(0)[:4]) == [*shards[0]._shard(0)[:2], *shards[1]._shard(0)[:2]]
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


def test_tfds_builder_round_trip(corpus, tmp_path):
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
