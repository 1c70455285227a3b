"""Odd and hostile input never stops a run: each odd video (a NaN caption time, an object or text
array, a forged zip bomb, a caption that asks for terabytes, a store entry outside its shard, a
reader that raises anything, a worker killed on a video) is skipped by name, once, and the other
videos' batches and losses are those of a run in which the same videos are plainly missing."""

import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from msk_jax import safe_load
from msk_jax.data.loader import TrainingPipeline
from msk_jax.errors import DataError
from tests.conftest import REPO_ROOT, run_env
from tests.data_fixtures import segments, write_howto
from tests.test_howto100m import reader

SETTINGS = dict(n_clips=2, num_audio_frames=256)
GOOD = [f"demo/v{i:02d}" for i in range(10)]
ODD = ["demo/nan_time", "demo/object_npz", "demo/text_npz", "demo/bomb_npz", "demo/huge_caption"]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MSK_JAX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


class _HugeArray:
    """Pickles as numpy.ndarray((2**40,)): a few bytes that ask for a terabyte when loaded."""

    def __reduce__(self):
        return np.ndarray, ((1 << 40,),)


def forged_npz(path: str, key: str, shape: tuple[int, ...]) -> None:
    """An npz whose member declares `shape` float32 (header and zip sizes agree) but holds a few
    zeros: read with np.load it allocates the whole array before finding out."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{key}.npy", header.getvalue() + bytes(4096))
    data = bytearray(open(path, "rb").read())
    declared = int(np.prod(shape)) * 4 + len(header.getvalue())
    struct.pack_into("<I", data, 22, declared)  # the local header's uncompressed size
    struct.pack_into("<I", data, data.rfind(b"PK\x01\x02") + 24, declared)  # the central directory's
    open(path, "wb").write(data)


def _feature(root: str, path: str, kind: str) -> str:
    vid = path.split("/")[-1]
    folder, suffix = {"2d": ("features_2d", "_2d.npz"), "3d": ("features_3d", "_3d.npz"),
                      "audio": ("audio", "_spec.npz")}[kind]
    return os.path.join(root, folder, path, vid + suffix)


def _write(root: str, odd: bool) -> None:
    """The corpus with its odd videos made odd (odd=True), or with their 2D files missing."""
    videos = [(p, 12 + i % 5, segments((1.0, 5.0, "a b"), (6.0, 10.0, "c d")), {}) for i, p in enumerate(GOOD + ODD)]
    write_howto(root, videos)
    captions = pickle.load(open(os.path.join(root, "caption.pickle"), "rb"))
    if not odd:
        for path in ODD:
            os.remove(_feature(root, path, "2d"))
        return
    captions["nan_time"] = segments((float("nan"), float("inf"), "a b"), (6.0, 10.0, "c d"))
    np.savez(_feature(root, "demo/object_npz", "2d"), features=np.array([{"a": 1}, None], dtype=object))
    np.savez(_feature(root, "demo/text_npz", "3d"), features=np.array([["a", "b"], ["c", "d"]]))
    forged_npz(_feature(root, "demo/bomb_npz", "audio"), "arr_0", (40, 25_000_000))
    captions["huge_caption"] = {"start": _HugeArray(), "end": [5.0], "text": ["a b"]}
    with open(os.path.join(root, "caption.pickle"), "wb") as f:
        pickle.dump(captions, f)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    odd, missing = (str(tmp_path_factory.mktemp(name)) for name in ("odd", "missing"))
    _write(odd, True)
    _write(missing, False)
    return odd, missing


def _take(pipeline, n):
    try:
        return [{k: v.copy() for k, v in next(pipeline).items()} for _ in range(n)]
    finally:
        pipeline.close()


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def _reasons(pipeline, names) -> dict[str, list[str]]:
    """name -> the reasons of the skipped videos whose file or caption names it."""
    return {name: [reason for path, (reason, _) in pipeline.skipped_videos.items() if f"/{name}/" in path
                   or f"[{name}]" in path] for name in names}


def test_each_odd_video_is_skipped_by_name_and_the_rest_is_unchanged(corpora):
    odd, missing = corpora
    want = _take(TrainingPipeline(reader(missing, **SETTINGS), 4, seed=5), 9)  # 3 epochs of 15 videos
    threads = TrainingPipeline(reader(odd, **SETTINGS), 4, seed=5)
    workers = TrainingPipeline(reader(odd, **SETTINGS), 4, seed=5, workers=2, processes=True, batch_tasks=True,
                               videos_per_task=2)
    got_threads, got_workers = _take(threads, 9), _take(workers, 9)
    assert _same(got_threads, want) and _same(got_workers, want)
    reasons = {"nan_time": "bad caption time", "object_npz": "bad dtype", "text_npz": "bad dtype",
               "bomb_npz": "too large", "huge_caption": "too large"}
    for pipeline in (threads, workers):
        assert _reasons(pipeline, reasons) == {name: [reason] for name, reason in reasons.items()}, \
            pipeline.summary()
        assert len(pipeline.skipped_videos) == 5
        summary = pipeline.summary()
        assert summary.startswith("input: skipped 5 videos")
        for name in reasons:  # each named once, in a line of its own
            assert sum(name in line for line in summary.splitlines()) == 1, summary


class _Raising:
    """A source whose reader raises a plain exception (not a DataError) on one video."""

    def __init__(self, source, victim: int, error: BaseException):
        self.source, self.victim, self.error, self.paths = source, victim, error, source.paths

    def __len__(self):
        return len(self.source)

    def sample_clips(self, index, rng, out=None):
        if index == self.victim:
            raise self.error
        return self.source.sample_clips(index, rng, out=out)


class _Killing(_Raising):
    """A source whose worker process dies (SIGKILL, as the kernel's out-of-memory killer ends it)
    whenever it reads one video; the training process itself reads it like any other."""

    def sample_clips(self, index, rng, out=None):
        import multiprocessing

        if index == self.victim and multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.source.sample_clips(index, rng, out=out)


def test_any_reader_exception_and_a_killed_worker_are_skips(corpora):
    _, missing = corpora
    victim = 3  # demo/v03
    gone = DataError("demo/v03", "stand-in", "missing")
    want = _take(TrainingPipeline(_Raising(reader(missing, **SETTINGS), victim, gone), 4, seed=5), 8)
    raising = TrainingPipeline(_Raising(reader(missing, **SETTINGS), victim, TypeError("odd dtype")), 4, seed=5)
    assert _same(_take(raising, 8), want)
    assert raising.skipped_videos["demo/v03"][0] == "reader error (TypeError)"
    for batch_tasks in (True, False):
        killing = TrainingPipeline(_Killing(reader(missing, **SETTINGS), victim, None), 4, seed=5, workers=1,
                                   processes=True, batch_tasks=batch_tasks, videos_per_task=2)
        assert _same(_take(killing, 8), want), batch_tasks
        assert killing.skipped_videos["demo/v03"][0] == "worker died" and killing.worker_restarts >= 2
        assert "demo/v03" in killing.summary()


def test_a_worker_killed_from_outside_mid_batch_changes_nothing(corpora):
    _, missing = corpora
    want = _take(TrainingPipeline(reader(missing, **SETTINGS), 4, seed=8), 8)
    pipeline = TrainingPipeline(reader(missing, **SETTINGS), 4, seed=8, workers=2, processes=True, batch_tasks=True,
                                videos_per_task=1, keep_batches=8)
    try:
        got = [next(pipeline) for _ in range(3)]
        os.kill(next(iter(pipeline._executor._processes)), signal.SIGKILL)  # tasks of 3 batches in flight
        got += [next(pipeline) for _ in range(5)]
        assert _same(got, want) and pipeline.worker_restarts >= 1
        assert "v02" not in pipeline.summary() and pipeline.summary().count("worker died") == 0
    finally:
        pipeline.close()


def test_a_store_entry_outside_its_shard_is_skipped(corpora, tmp_path):
    from msk_jax.data.feature_store import FeatureStoreSource, build_feature_store
    from tests.paper_config import paper_clip_settings

    odd, missing = corpora
    store = str(tmp_path / "store")
    build_feature_store(reader(odd, **SETTINGS), store, progress=False)
    with np.load(os.path.join(store, "index.npz")) as index:
        tables = dict(index)
    tables["offset"][3, 1] = 1 << 40  # demo/v03's 3D rows, far past the end of its shard
    np.savez(os.path.join(store, "index.npz"), **tables)
    source = FeatureStoreSource(store, paper_clip_settings(**SETTINGS))
    assert source.reason[3] == "bad store entry" and "demo/v03" in source.where[3]
    # The same videos as the npz files with v03 gone too.
    plain = str(tmp_path / "plain")
    shutil.copytree(missing, plain)
    os.remove(_feature(plain, "demo/v03", "2d"))
    want = _take(TrainingPipeline(reader(plain, **SETTINGS), 4, seed=5), 6)
    pipeline = TrainingPipeline(source, 4, seed=5)
    assert _same(_take(pipeline, 6), want)
    assert sorted(reason for reason, _ in pipeline.skipped_videos.values()).count("bad store entry") == 1
    meta = json.load(open(os.path.join(store, "meta.json")))
    meta["shards"] = ["../../etc/passwd"]
    json.dump(meta, open(os.path.join(store, "meta.json"), "w"))
    with pytest.raises(DataError, match="not a file name inside the store"):
        FeatureStoreSource(store, paper_clip_settings(**SETTINGS))


def test_a_forged_npz_is_refused_before_any_allocation(tmp_path):
    path = str(tmp_path / "bomb.npz")
    forged_npz(path, "features", (1_000_000, 900))  # 3.6 GB declared, 4 KB held
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="refused before inflating") as err:
            safe_load.load_npz(path, ("features",))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20 and str(err.value).startswith(path)
    # Below the bound but larger than what the file holds: refused when the data ends.
    forged_npz(path, "features", (1000, 900))
    with pytest.raises(DataError, match="truncated"):
        safe_load.load_npz(path, ("features",))


class _HugeBytes:
    """Pickles as bytearray(2**40)."""

    def __reduce__(self):
        return bytearray, (1 << 40,)


def test_a_pickle_cannot_allocate_far_beyond_its_size():
    for bomb in (_HugeArray(), _HugeBytes()):
        data = pickle.dumps({"x": bomb})
        tracemalloc.start()
        try:
            with pytest.raises(DataError, match="refused before allocating") as err:
                safe_load.loads(data, "caption.pickle")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20 and str(err.value).startswith("caption.pickle:")


@pytest.mark.slow
def test_a_training_run_over_odd_videos_reaches_its_last_step(corpora, tmp_path):
    """`python -m msk_jax.main` over the odd corpus (worker processes) trains to its last step and
    names each odd video once (its batches are those of the corpus without them: above)."""
    from tests.train_fixtures import losses, overrides

    root, workdir = corpora[0], str(tmp_path / "odd")
    args = [sys.executable, "-m", "msk_jax.main", "--config=configs/howto.py:demo", f"--workdir={workdir}"]
    settings = {**overrides(root, 6), "data.source": "files", "data.csv": f"{root}/howto_train.csv",
                "data.caption": f"{root}/caption.pickle", "data.features_2d": f"{root}/features_2d",
                "data.features_3d": f"{root}/features_3d", "data.audio": f"{root}/audio",
                "data.word_vectors": f"{root}/word2vec.bin", "data.dim_2d": 4, "data.dim_3d": 6,
                "model.video_dim": 10, "model.text_dim": 5, "data.worker_processes": True,
                "data.workers": 2, "checkpoint_every_steps": 6}
    args += [f"--config.{key}={value}" for key, value in settings.items()]
    done = subprocess.run(args, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "input: skipped 5 videos" in done.stdout
    assert sorted(losses(workdir)) == list(range(1, 7))
    listed = open(os.path.join(workdir, "input_skipped.txt")).read().splitlines()
    assert len(listed) == 5 and all(sum(f"/{p.split('/')[1]}" in line or f"[{p.split('/')[1]}]" in line
                                        for line in listed) == 1 for p in ODD), listed
