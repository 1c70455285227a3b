"""The feature store: the clips of the npz files, read by window, in both layouts (time blocks,
and the kinds layout of older stores); stored videos that cannot be used skip as in the npz
files; worker processes give the batches of threads; a store in a bucket, read through either
client; the windows of several videos read at once (the same clips as one window at a time),
coalesced into fewer requests, and in flight together against a bucket's latency."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from msk_jax.bench.bucket import request_counts, set_latency
from msk_jax.data.feature_store import FORMAT, FORMAT_KINDS, FeatureStoreSource, TimeBlocks, build_feature_store
from msk_jax.data.howto100m import clip_shapes
from msk_jax.data.loader import TrainingPipeline
from msk_jax.errors import DataError
from tests.conftest import REPO_ROOT
from tests.data_fixtures import DIM_2D, DIM_3D, WORD_DIM, segments, write_howto
from tests.paper_config import paper_clip_settings
from tests.test_howto100m import reader

SETTINGS = {"n_clips": 3, "num_audio_frames": 256}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Videos of different lengths (some shorter than a clip), one without ASR segments, one
    without its log-mel file."""
    root = str(tmp_path_factory.mktemp("store_corpus"))
    videos = [(f"demo/v{i:02d}", 6 + 3 * i, segments((1.0, 5.0, "a b"), (6.0, 9.0 + i / 2, "c d e"),
                                                       (12.0 + i, 14.0 + i, "p q")), {}) for i in range(8)]
    videos.append(("demo/empty", 15, segments(), {}))
    videos.append(("demo/gone", 15, segments((1.0, 2.0, "a")), {}))
    write_howto(root, videos)
    os.remove(os.path.join(root, "audio", "demo/gone", "gone_spec.npz"))
    return root


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "float32")
    build_feature_store(reader(corpus, **SETTINGS), path, shard_bytes=1 << 14, progress=False)
    return path


@pytest.fixture(scope="module")
def kinds_store(corpus, tmp_path_factory):
    """The layout of format 1 (each video's 2D, 3D and log-mel blocks one after the other): what
    stores built before the time blocks hold."""
    path = str(tmp_path_factory.mktemp("store") / "kinds")
    build_feature_store(reader(corpus, **SETTINGS), path, shard_bytes=1 << 14, progress=False, layout="kinds")
    return path


def _same_clips(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_store_gives_the_clips_of_the_npz_files(corpus, store):
    raw, stored = reader(corpus, **SETTINGS), FeatureStoreSource(store, paper_clip_settings(**SETTINGS))
    assert stored.meta["format"] == FORMAT and stored.meta["block_rows"] == [4, 6, 400]
    assert stored.meta["block_lead"] == [4, 6, 0]  # the clips' audio starts 4 s after their video
    assert len(stored.meta["shards"]) > 1 and stored.meta["usable"] == 8
    assert stored.meta["skipped"] == {"no ASR segments": 1, "missing features": 1}
    for i in range(len(raw)):
        for seed in range(3):
            try:
                want = raw.sample_clips(i, np.random.default_rng(seed))
            except DataError as err:
                with pytest.raises(DataError) as got:
                    stored.sample_clips(i, np.random.default_rng(seed))
                assert got.value.reason == err.reason and str(got.value) == str(err)
                continue
            assert _same_clips(want, stored.sample_clips(i, np.random.default_rng(seed)))
    # A clip reads its window only: fewer bytes than the videos hold.
    assert 0 < stored.bytes_read
    with pytest.raises(FileExistsError):
        build_feature_store(raw, store, progress=False)


def test_half_precision_store(corpus, tmp_path):
    raw = reader(corpus, **SETTINGS)
    build_feature_store(raw, str(tmp_path / "f16"), dtype="float16", progress=False)
    build_feature_store(raw, str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    full = build_feature_store(raw, str(tmp_path / "f32"), progress=False)
    for name, tolerance in (("f16", 2e-3), ("bf16", 1.6e-2)):
        half = FeatureStoreSource(str(tmp_path / name), paper_clip_settings(**SETTINGS))
        assert half.meta["bytes"] == full["bytes"] // 2
        want, got = raw.sample_clips(3, np.random.default_rng(0)), half.sample_clips(3, np.random.default_rng(0))
        assert got["video"].dtype == got["audio"].dtype == np.float32
        np.testing.assert_allclose(got["video"], want["video"], rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(got["audio"], want["audio"], rtol=tolerance)
        assert not np.array_equal(got["video"], want["video"])
        np.testing.assert_array_equal(got["text"], want["text"])


def test_store_checks_the_config(store):
    with pytest.raises(DataError, match="dim_2d is 4 but the config expects 2048"):
        FeatureStoreSource(store, paper_clip_settings(**SETTINGS), dim_2d=2048)
    with pytest.raises(DataError, match="no meta.json"):
        FeatureStoreSource(os.path.dirname(store), paper_clip_settings(**SETTINGS))


@pytest.mark.parametrize("field, value, message", [
    ("format", "msk_jax.feature_store/9", "format 'msk_jax.feature_store/9', expected 'msk_jax.feature_store/2'"),
    ("block_rows", [2, 0, 200], "'block_rows' must be 3 integers of at least 1, got \\[2, 0, 200\\]"),
    ("block_lead", [4, 6], "'block_lead' must be 3 integers of at least 0")])
def test_a_store_with_a_bad_layout_is_refused_in_one_line(store, tmp_path, field, value, message):
    copy = str(tmp_path / "store")
    shutil.copytree(store, copy)
    meta_path = pathlib.Path(copy, "meta.json")
    meta = json.loads(meta_path.read_text())
    meta[field] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=message) as err:
        FeatureStoreSource(copy, paper_clip_settings(**SETTINGS))
    assert "meta.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("rows, lead, counts", [
    ((4, 6, 40), (4, 6, 0), (39, 59, 160)),        # HowTo100M's video rates, video rows stored 4 s later
    ((2, 3, 20), (0, 0, 0), (7, 9, 150)),          # audio longer than the video
    ((1, 2, 5), (3, 0, 11), (0, 4, 23)),           # no 2D rows, leads longer than a block
    ((4, 1, 3), (1, 2, 0), (9, 1, 2))])
def test_time_blocks_place_every_row_where_the_layout_says(rows, lead, counts):
    """Every row of every kind, written in time blocks, is found at its `position`; a window's
    rows come back from its `span` (a view or gathered), and the blocks hold the same seconds."""
    widths = (3, 2, 1)
    arrays = [np.arange(n * w, dtype=np.float32).reshape(n, w) + 1e4 * k
              for k, (n, w) in enumerate(zip(counts, widths))]
    layout = TimeBlocks(rows, lead, [w * 4 for w in widths])
    data = b"".join(bytes(piece) for piece in layout.write(arrays))
    assert len(data) == sum(a.nbytes for a in arrays)
    n = list(counts)
    video = layout.of(n)
    for kind, array in enumerate(arrays):
        for row in range(len(array)):
            at = video.position(kind, row)
            assert at == layout.position(n, kind, row)  # full blocks' arithmetic, the general rule
            assert np.frombuffer(data, np.float32, widths[kind], at).tolist() == array[row].tolist()
            block = (row + lead[kind]) // rows[kind]  # the block of the row's time
            assert layout.before(n, block)[kind] <= row < layout.before(n, block + 1)[kind]
        for lo in range(len(array)):
            for hi in range(lo + 1, min(len(array), lo + 3 * rows[kind]) + 1):
                at, length = video.span(kind, lo, hi)
                got = video.rows(memoryview(data)[at:at + length], kind, lo, hi, np.dtype(np.float32), widths[kind])
                np.testing.assert_array_equal(got, array[lo:hi])
    first = layout.first_positions(np.array([counts]))
    assert first.tolist() == [[layout.position(n, k, 0) for k in range(3)]]


def _take(pipeline, n):
    batches = [next(pipeline) for _ in range(n)]
    return batches, pipeline


def test_worker_processes_give_the_batches_of_threads(corpus, store):
    threads, pipeline = _take(TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=5), 6)  # crosses epochs
    pipeline.close()
    source = FeatureStoreSource(store, paper_clip_settings(**SETTINGS))
    processes = TrainingPipeline(source, 4, seed=5, workers=2, processes=True)
    try:
        first, _ = _take(processes, 2)
        state = processes.state()
        processes.restore(state)  # drops the loads in flight, continues at the same place
        rest, _ = _take(processes, 4)
        assert all(_same_clips(a, b) for a, b in zip(threads, first + rest))
        assert processes.skipped == pipeline.skipped and sum(processes.skipped.values()) >= 2
        assert processes.worker_cpu_seconds > 0 and processes.worker_bytes_read > 0
    finally:
        processes.close()
    # The second of two hosts, resumed from a saved position, in worker processes.
    host = TrainingPipeline(reader(corpus, **SETTINGS), 4, seed=5, process_index=1, process_count=2)
    want, _ = _take(host, 3)
    resumed = TrainingPipeline(source, 4, seed=5, process_index=1, process_count=2, processes=True, workers=1)
    try:
        resumed.restore(host.state() | {"epoch": 0, "position": 0})
        got, _ = _take(resumed, 3)
        assert all(_same_clips(a, b) for a, b in zip(want, got))
    finally:
        resumed.close()
        host.close()


def _expected(raw, index, seed):
    """The npz reader's clips of (index, seed), or the DataError it raises."""
    try:
        return raw.sample_clips(index, np.random.default_rng(seed))
    except DataError as err:
        return err


def _check(want, got):
    if isinstance(want, DataError):
        assert isinstance(got, DataError) and got.reason == want.reason and str(got) == str(want)
    else:
        assert not isinstance(got, DataError) and got.keys() == want.keys() and _same_clips(want, got)


# Every video (two unusable) with two seeds, and a video twice in one call.
REQUESTS = [(i, seed) for seed in (0, 1) for i in range(10)] + [(3, 0)]


def _sample_videos(source, requests, outs=None):
    return source.sample_videos([(i, np.random.default_rng(seed)) for i, seed in requests], outs)


def test_sample_videos_gives_the_clips_of_sample_clips(corpus, store, kinds_store):
    raw, settings = reader(corpus, **SETTINGS), paper_clip_settings(**SETTINGS)
    want = [_expected(raw, i, seed) for i, seed in REQUESTS]
    assert sum(isinstance(w, DataError) for w in want) == 4
    assert FeatureStoreSource(kinds_store, settings).meta["format"] == FORMAT_KINDS  # an older store reads too
    for source in (FeatureStoreSource(store, settings), FeatureStoreSource(store, settings, concurrent_reads=False),
                   FeatureStoreSource(store, settings, max_gap=0), FeatureStoreSource(kinds_store, settings),
                   FeatureStoreSource(kinds_store, settings, concurrent_reads=False)):
        got = _sample_videos(source, REQUESTS)
        assert len(got) == len(REQUESTS)
        for w, g in zip(want, got):
            _check(w, g)
        # Into given arrays (as the pipeline's shared memory): the clips are written there.
        shapes = clip_shapes(settings, DIM_2D + DIM_3D, WORD_DIM)
        outs = [{k: np.full(shape, np.nan, np.float32) for k, shape in shapes.items()} for _ in REQUESTS]
        for w, g, out in zip(want, _sample_videos(source, REQUESTS, outs), outs):
            _check(w, g)
            if not isinstance(g, DataError):
                assert all(g[k] is out[k] for k in out)
        # One video at a time, into given arrays.
        i, seed = REQUESTS[3]
        out = {k: np.empty(shape, np.float32) for k, shape in shapes.items()}
        _check(want[3], source.sample_clips(i, np.random.default_rng(seed), out=out))
        assert all(np.array_equal(out[k], want[3][k]) for k in out)


@pytest.fixture(scope="module")
def bucket_store(corpus, gcs_bucket):
    url = f"{gcs_bucket}/feature_store"
    build_feature_store(reader(corpus, **SETTINGS), url, progress=False)
    return url


@pytest.mark.parametrize("client", ["tensorstore", "fsspec"])
def test_store_in_a_bucket(corpus, store, bucket_store, client):
    settings = paper_clip_settings(**SETTINGS)
    local, remote = FeatureStoreSource(store, settings), FeatureStoreSource(bucket_store, settings, client=client)
    for i in (0, 7):
        assert _same_clips(local.sample_clips(i, np.random.default_rng(i)), remote.sample_clips(i, np.random.default_rng(i)))
    assert remote.bytes_read == local.bytes_read
    # Several videos at once, and one window at a time: the clips of the npz files.
    raw = reader(corpus, **SETTINGS)
    want = [_expected(raw, i, seed) for i, seed in REQUESTS]
    for source in (remote, FeatureStoreSource(bucket_store, settings, concurrent_reads=False, client=client)):
        for w, g in zip(want, _sample_videos(source, REQUESTS)):
            _check(w, g)
    with pytest.raises(DataError, match="no ASR segments"):
        remote.sample_clips(8, np.random.default_rng(0))


def test_windows_that_overlap_or_lie_within_the_gap_are_read_by_one_request(bucket_store):
    endpoint, settings = os.environ["STORAGE_EMULATOR_HOST"], paper_clip_settings(**SETTINGS)
    requests, served, read = {}, {}, {}
    for name, options in (("one at a time", {"concurrent_reads": False}), ("overlapping", {"max_gap": 0}),
                          ("within 64 KiB", {"max_gap": 64 << 10}), ("default gap", {})):
        source = FeatureStoreSource(bucket_store, settings, **options)
        before = request_counts(endpoint)["ranged_reads"]
        _sample_videos(source, REQUESTS)
        requests[name], served[name] = source.requests, request_counts(endpoint)["ranged_reads"] - before
        read[name] = source.bytes_read
    assert served == requests  # what the reader counts is what the server answered
    # In time blocks a clip's three windows overlap: at most one request per clip, fewer when
    # clips overlap; a gap read costs bytes, and the default (1.125 MiB) spans this whole small store.
    assert requests["default gap"] == 1 < requests["within 64 KiB"] < requests["overlapping"] <= 17 * 3
    assert requests["overlapping"] < requests["one at a time"]
    assert read["overlapping"] < read["within 64 KiB"] < read["default gap"]


LONG = {"n_clips": 10, "num_audio_frames": 256}


@pytest.fixture(scope="module")
def long_video_store(tmp_path_factory, gcs_bucket):
    """One 300 s video, narrated every 10 s, in the bucket in the kinds layout: ten clips read
    ~30 windows."""
    root = str(tmp_path_factory.mktemp("long_video"))
    write_howto(root, [("demo/long", 300, segments(*[(10.0 * k + 1, 10.0 * k + 4, "a b c") for k in range(30)]), {})])
    url = f"{gcs_bucket}/long_video_store"
    build_feature_store(reader(root, **LONG), url, progress=False, layout="kinds")
    return url


def test_windows_are_read_concurrently_against_the_bucket_latency(long_video_store):
    endpoint, latency = os.environ["STORAGE_EMULATOR_HOST"], 0.2
    source = FeatureStoreSource(long_video_store, paper_clip_settings(**LONG), max_gap=0)
    want = [source.sample_clips(0, np.random.default_rng(seed)) for seed in range(4)]  # no latency yet
    set_latency(endpoint, latency * 1e3)
    try:
        start = time.perf_counter()
        source.read_rows(0, 0, 0, 1)
        assert time.perf_counter() - start >= latency  # every request waits
        made, start = source.requests, time.perf_counter()
        got = source.sample_clips(0, np.random.default_rng(0))
        took, requests = time.perf_counter() - start, source.requests - made
        assert requests >= 20 and took < 10 * latency, (requests, took)  # one at a time: >= 20 x latency
        assert _same_clips(want[0], got)
        made, start = source.requests, time.perf_counter()
        got = source.sample_videos([(0, np.random.default_rng(seed)) for seed in range(4)])
        took, requests = time.perf_counter() - start, source.requests - made
        assert requests >= 40 and took < 10 * latency, (requests, took)  # windows of one video overlap
        assert all(_same_clips(w, g) for w, g in zip(want, got))
    finally:
        set_latency(endpoint, 0)


_HOLD_A_PIPELINE = """
import os, sys, time
from msk_jax.data.feature_store import FeatureStoreSource
from msk_jax.data.loader import TrainingPipeline
from tests.paper_config import paper_clip_settings

if __name__ == "__main__":
    pipeline = TrainingPipeline(FeatureStoreSource(sys.argv[1], paper_clip_settings(n_clips=3, num_audio_frames=256)), 4,
                                workers=2, processes=True)
    next(pipeline)
    print(pipeline._slots.memory.name, *pipeline._executor._processes, flush=True)
    time.sleep(600)
"""


def test_workers_and_shared_memory_go_when_the_training_process_is_killed(store, tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(_HOLD_A_PIPELINE)
    proc = subprocess.Popen([sys.executable, str(script), store], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    memory, *workers = proc.stdout.readline().split()
    assert len(workers) == 2 and os.path.exists(f"/dev/shm/{memory}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and (any(_alive(int(w)) for w in workers) or os.path.exists(f"/dev/shm/{memory}")):
        time.sleep(0.2)
    assert not any(_alive(int(w)) for w in workers)
    assert not os.path.exists(f"/dev/shm/{memory}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
