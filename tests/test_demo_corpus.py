"""Tests of the spoken-digit-strings demo corpus (tiny size) and of the log-mel features."""

import csv
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from msk_jax.data.audio import log_mel_spectrogram, mel_filterbank, resample
from msk_jax.data.word2vec import load_word2vec_binary
from msk_jax.demo import corpus as demo_corpus
from msk_jax.demo.corpus import DIGIT_WORDS, build_demo_corpus
from msk_jax.errors import DataError
from tests.conftest import REPO_ROOT, run_env

WORD_TO_DIGIT = {w: str(d) for d, w in enumerate(DIGIT_WORDS)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    paths = build_demo_corpus(str(tmp_path_factory.mktemp("demo")), size="tiny", seed=0, progress=False)
    with open(paths.meta) as f:
        meta = json.load(f)
    return paths, meta


def _load_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _digits_of(text):
    return "".join(WORD_TO_DIGIT[w] for w in re.findall(r"[\w']+", text) if w in WORD_TO_DIGIT)


def _training_rows(paths):
    with open(paths.csv, newline="") as f:
        return [row["path"] for row in csv.DictReader(f)]


def test_every_file_exists(corpus):
    paths, meta = corpus
    for path in (paths.csv, paths.caption, paths.msrvtt, paths.youcook2, paths.word_vectors, paths.meta):
        assert os.path.isfile(path), path
    for folder in (paths.features_2d, paths.features_3d, paths.audio):
        assert os.path.isdir(folder), folder
    assert meta["complete"] is True and meta["version"] == demo_corpus.CORPUS_VERSION


def test_training_videos_have_features_at_the_original_rates(corpus):
    paths, meta = corpus
    rows = _training_rows(paths)
    assert len(rows) == meta["counts"]["train_videos"] == 4
    dim = meta["feature_dim"]
    for rel in rows:
        vid = rel.split("/")[-1]
        duration = meta["train_durations"][vid]
        f2d = np.load(os.path.join(paths.features_2d, rel, f"{vid}_2d.npz"))["features"]
        f3d = np.load(os.path.join(paths.features_3d, rel, f"{vid}_3d.npz"))["features"]
        spec = np.load(os.path.join(paths.audio, rel, f"{vid}_spec.npz"))["arr_0"]
        assert f2d.dtype == f3d.dtype == spec.dtype == np.float32
        assert f2d.shape == (int(duration), dim)
        assert f3d.shape == (int(1.5 * duration), dim)
        assert spec.shape[0] == 40 and abs(spec.shape[1] - 100 * duration) <= 2
        assert np.isfinite(spec).all() and np.isfinite(f2d).all() and np.isfinite(f3d).all()


def test_captions_are_sorted_and_inside_the_video(corpus):
    paths, meta = corpus
    captions = _load_pickle(paths.caption)
    assert sorted(captions) == sorted(r.split("/")[-1] for r in _training_rows(paths))
    for vid, cap in captions.items():
        start, end, text = cap["start"], cap["end"], cap["text"]
        assert isinstance(start, np.ndarray) and isinstance(end, np.ndarray) and isinstance(text, list)
        assert len(start) == len(end) == len(text) > 0
        assert np.all(np.diff(start) > 0) and np.all(end > start) and np.all(end[:-1] <= start[1:])
        assert start[0] >= 0 and end[-1] <= meta["train_durations"][vid]
        for s, e, t in zip(start, end, text):
            assert len(_digits_of(t)) == e - s  # one digit shown per second of the segment


def test_in_domain_test_set(corpus):
    paths, meta = corpus
    entries = _load_pickle(paths.msrvtt)
    assert len(entries) == meta["counts"]["msrvtt"] == 12
    for e in entries:
        assert set(e) == {"id", "2d", "3d", "audio", "eval_caption", "caption"}
        duration = meta["msrvtt_durations"][e["id"]]
        assert 3 <= duration <= 8
        assert e["2d"].shape == (int(duration), meta["feature_dim"]) and e["2d"].dtype == np.float32
        assert e["3d"].shape == (int(1.5 * duration), meta["feature_dim"]) and e["3d"].dtype == np.float32
        assert e["audio"].shape[0] == 40 and abs(e["audio"].shape[1] - 100 * duration) <= 2
        assert e["audio"].dtype == np.float32
        assert isinstance(e["eval_caption"], str) and all(isinstance(c, str) for c in e["caption"])
        assert _digits_of(e["eval_caption"]) == meta["msrvtt_strings"][e["id"]]
        assert meta["msrvtt_languages"][e["id"]] in meta["languages"]["train"]


def test_test_strings_never_seen_in_training(corpus):
    paths, meta = corpus
    trained = {_digits_of(t) for cap in _load_pickle(paths.caption).values() for t in cap["text"]}
    assert trained == set(meta["train_strings"])
    assert not trained & set(meta["msrvtt_strings"].values())
    assert not trained & set(meta["youcook_strings"].values())


def test_out_of_domain_test_set(corpus):
    paths, meta = corpus
    entries = _load_pickle(paths.youcook2)
    without = [e["id"] for e in entries if "2d_full" not in e]
    assert len(without) == 3 and sorted(without) == meta["youcook_without_2d_full"]
    kept = [e for e in entries if "2d_full" in e]
    assert len(kept) == meta["counts"]["youcook"] == 12
    for e in kept:
        assert set(e) == {"id", "2d_full", "3d_full", "audio", "caption"}
        duration = meta["youcook_durations"][e["id"]]
        assert e["2d_full"].shape == (int(duration), meta["feature_dim"])
        assert e["3d_full"].shape == (int(1.5 * duration), meta["feature_dim"])
        assert e["audio"].shape[0] == 40 and e["audio"].dtype == np.float32
        assert _digits_of(e["caption"]) == meta["youcook_strings"][e["id"]]
    assert set(meta["youcook_languages"].values()) == {"it"} == set(meta["languages"]["youcook"])
    assert "it" not in meta["languages"]["train"] and "it" not in meta["train_segments_per_language"]


def test_image_pools_are_disjoint():
    _, labels = demo_corpus.load_digit_images()
    pools = {k: set(np.concatenate(v).tolist()) for k, v in demo_corpus.image_pools(labels).items()}
    assert not pools["train"] & pools["msrvtt"] and not pools["train"] & pools["youcook"]
    assert not pools["msrvtt"] & pools["youcook"]
    assert min(pools["youcook"]) >= int(0.8 * len(labels)) - 1


def test_word_vectors_round_trip(corpus):
    paths, meta = corpus
    vectors = load_word2vec_binary(paths.word_vectors)
    assert len(vectors) == meta["counts"]["vocabulary"] and vectors.dim == 50
    assert all(w in vectors for w in DIGIT_WORDS)
    assert vectors.lookup(["one", "two"]).shape == (2, 50)
    texts = [t for cap in _load_pickle(paths.caption).values() for t in cap["text"]]
    words = {w for t in texts for w in re.findall(r"[\w']+", t)}
    for oov in meta["oov_words"]:
        assert oov in words and oov not in vectors
        assert meta["train_oov_word_counts"][oov] > 0


def test_second_call_is_cached(corpus):
    paths, _ = corpus
    probe = os.path.join(paths.features_2d, "demo", "video_0000", "video_0000_2d.npz")
    before = (os.path.getmtime(paths.meta), os.path.getmtime(probe))
    began = time.perf_counter()
    again = build_demo_corpus(paths.root, size="tiny", seed=0, progress=False)
    assert time.perf_counter() - began < 0.5
    assert again == paths
    assert (os.path.getmtime(paths.meta), os.path.getmtime(probe)) == before


def test_same_seed_same_arrays_and_force_rebuilds(corpus, tmp_path):
    paths, _ = corpus
    other = build_demo_corpus(str(tmp_path / "again"), size="tiny", seed=0, progress=False)
    rel = os.path.join("demo", "video_0001", "video_0001_spec.npz")
    a, b = np.load(os.path.join(paths.audio, rel))["arr_0"], np.load(os.path.join(other.audio, rel))["arr_0"]
    assert np.array_equal(a, b)
    ma, mb = _load_pickle(paths.msrvtt), _load_pickle(other.msrvtt)
    assert all(np.array_equal(x["3d"], y["3d"]) for x, y in zip(ma, mb))
    stamp = os.path.getmtime(other.meta)
    time.sleep(0.01)
    build_demo_corpus(other.root, size="tiny", seed=0, force=True, progress=False)
    assert os.path.getmtime(other.meta) > stamp


def test_unknown_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        build_demo_corpus(str(tmp_path), size="huge", progress=False)


def test_window_3d_covers_two_thirds_of_a_second():
    x = np.arange(4, dtype=np.float64)[:, None]  # frame k has value k
    w = demo_corpus.window_3d(x, 6)  # tokens at 0, 2/3, 4/3, 2, 8/3, 10/3 s
    np.testing.assert_allclose(w[:, 0], [0, 0.5, 1, 2, 2.5, 3])
    np.testing.assert_allclose(w[:, 1], [0, 1, 0, 0, 1, 0])


def _slaney_hz(mel):
    """Slaney's mel scale, written out independently: 200/3 Hz per mel below 1 kHz, log above."""
    return np.where(mel < 15, mel * 200 / 3, 1000 * np.exp((mel - 15) * np.log(6.4) / 27))


def _slaney_mel(hz):
    return hz / (200 / 3) if hz < 1000 else 15 + 27 * np.log(hz / 1000) / np.log(6.4)


@pytest.mark.parametrize("band", [8, 15, 24, 33])
def test_log_mel_of_a_pure_tone_peaks_at_its_band(band):
    centres = _slaney_hz(np.linspace(_slaney_mel(20.0), _slaney_mel(8000.0), 42))[1:-1]
    sr, n = 16000, 16000 + 123
    tone = np.sin(2 * np.pi * centres[band] * np.arange(n) / sr).astype(np.float32)
    spec = log_mel_spectrogram(tone)
    assert spec.shape == (40, 1 + n // 160) and spec.dtype == np.float32
    assert np.argmax(spec[:, 5:-5].mean(axis=1)) == band
    assert spec.max() == 0.0 and spec.min() >= -80.0  # dB relative to the maximum, 80 dB range


def test_mel_filterbank_shape_and_area():
    fb = mel_filterbank()
    assert fb.shape == (40, 201) and (fb >= 0).all()
    # Slaney normalisation: each triangle has (approximately) unit area in Hz
    areas = fb.sum(axis=1) * 16000 / 400
    np.testing.assert_allclose(areas[5:], 1.0, rtol=0.1)


def test_resample_doubles_the_length():
    x = np.sin(np.arange(8000) / 10).astype(np.float32)
    y = resample(x, 8000, 16000)
    assert y.shape == (16000,) and y.dtype == np.float32


def test_the_readers_read_it(corpus):
    from msk_jax.data.eval_sets import MSRVTT, YOUCOOK2
    from msk_jax.data.howto100m import HowTo100MReader
    from tests.data_fixtures import read_eval_pickle
    from tests.paper_config import paper_clip_settings

    paths, meta = corpus
    vectors = load_word2vec_binary(paths.word_vectors)
    reader = HowTo100MReader(paths.csv, paths.caption, paths.features_2d, paths.audio, vectors,
                             features_3d=paths.features_3d)
    with pytest.raises(ValueError, match="cutting clips needs settings="):  # a reader of whole videos only
        reader.sample_clips(0, np.random.default_rng(0))
    reader.settings = paper_clip_settings()
    batch = reader.sample_clips(0, np.random.default_rng(0))
    assert batch["video"].shape[-1] == 2 * meta["feature_dim"] and batch["text"].shape[-1] == 50
    msrvtt = read_eval_pickle(paths.msrvtt, MSRVTT, vectors, complete_dataset_size=meta["counts"]["msrvtt"])
    assert len(msrvtt) == meta["counts"]["msrvtt"] and msrvtt.dropped == 0
    youcook = read_eval_pickle(paths.youcook2, YOUCOOK2, vectors,
                               complete_dataset_size=meta["counts"]["youcook_entries"])
    assert len(youcook) == meta["counts"]["youcook"] and youcook.dropped == 3


def test_missing_voices_stop_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_corpus, "SOUNDS_ROOT", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"\['it'\] not found.*sudo apt-get install -y asterisk-core-sounds-en-wav"):
        demo_corpus.ensure_voices(["it"])


def test_worker_processes_write_the_same_training_videos(corpus, tmp_path):
    """The large corpus's build path (training videos rendered by spawned processes) writes the
    files of the sequential build; the large size keeps the default's test sets and rates and
    has ten times its training videos (its first 120 are the default's: seeded per video)."""
    paths, meta = corpus
    cfg = demo_corpus.SIZES["tiny"]
    src = demo_corpus.load_sources(0, 128, False)
    again = demo_corpus.corpus_paths(str(tmp_path / "again"))
    held_out = set(meta["msrvtt_strings"]) | set(meta["youcook_strings"])
    sequential = demo_corpus.corpus_paths(str(tmp_path / "sequential"))
    for target, workers in ((sequential, 0), (again, 2)):
        os.makedirs(os.path.dirname(target.csv), exist_ok=True)
        demo_corpus.build_training(target, src, cfg, 0, held_out, False, workers=workers)
    for folder in ("features_2d", "features_3d", "audio"):
        for root, _, names in os.walk(getattr(sequential, folder)):
            for name in names:
                one = os.path.join(root, name)
                other = os.path.join(getattr(again, folder), os.path.relpath(one, getattr(sequential, folder)))
                with open(one, "rb") as a, open(other, "rb") as b:
                    assert a.read() == b.read(), one
    with open(sequential.caption, "rb") as a, open(again.caption, "rb") as b:
        assert a.read() == b.read()
    large, default = demo_corpus.SIZES["large"], demo_corpus.SIZES["default"]
    assert large.train_videos == 10 * default.train_videos
    assert (large.msrvtt_clips, large.youcook_clips, large.train_seconds) == \
        (default.msrvtt_clips, default.youcook_clips, default.train_seconds)


def _tree(root):
    """{relative path: sha256} of every file under `root` (folders end with '/')."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root) + "/"] = ""
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _same_corpus(built, reference):
    """Asserts that the corpus at `built` is the reference's, file by file: the same data (meta.json
    but its build time), the builder's marker, and nothing else of the builder's left behind."""
    own = {demo_corpus.MARKER, demo_corpus.LOCK, "meta.json"}
    mine, theirs = _tree(built.root), _tree(reference.root)
    assert {k: v for k, v in mine.items() if k not in own} == {k: v for k, v in theirs.items() if k not in own}
    assert set(mine) - set(theirs) <= own
    metas = []
    for paths in (built, reference):
        with open(paths.meta) as f:
            metas.append({k: v for k, v in json.load(f).items() if k != "build_seconds"})
    assert metas[0] == metas[1] and metas[0]["complete"] is True
    with open(os.path.join(built.root, demo_corpus.MARKER)) as f:
        assert json.load(f) == metas[0]["settings"]


def test_a_folder_of_someone_elses_files_is_left_untouched(tmp_path):
    """A demo_dir that holds HowTo100M-named data without the builder's marker (a user's real
    data): neither the library call nor the command line writes, moves or removes anything in it,
    and both say in one line which folder and what to do."""
    root = tmp_path / "data"
    (root / "howto" / "features_2d" / "cooking").mkdir(parents=True)
    (root / "howto" / "howto_train.csv").write_text("path\ncooking/v1\n")
    (root / "howto" / "features_2d" / "cooking" / "v1_2d.npz").write_bytes(os.urandom(256))
    (root / "meta.json").write_text('{"mine": true}')
    before = _tree(root)
    for force in (False, True):
        with pytest.raises(DataError) as raised:
            build_demo_corpus(str(root), size="tiny", force=force, progress=False)
        assert str(raised.value).startswith(f"{root}: holds files the demo corpus builder did not write "
                                            "(howto/, meta.json;")
        assert "point config.data.demo_dir" in str(raised.value)
    done = subprocess.run([sys.executable, "-m", "msk_jax.demo.corpus", f"--out={root}", "--size=tiny"],
                          cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {raised.value}"]
    assert _tree(root) == before


_BUILD_WHEN_TOLD = """
import os, sys, time
from msk_jax.demo.corpus import build_demo_corpus
root, ready, go = sys.argv[1:]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
build_demo_corpus(root, size="tiny", seed=0)
"""


def test_two_processes_building_one_corpus_take_turns(corpus, tmp_path):
    """Two processes (two hosts of a run on a shared disk) build the same corpus into one empty
    folder at the same moment: one builds, the other waits and finds it built; the result is a
    single build's, with no temporary folder left."""
    reference, _ = corpus
    root, go = tmp_path / "shared", tmp_path / "go"
    root.mkdir()
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", _BUILD_WHEN_TOLD, str(root), str(r), str(go)], cwd=REPO_ROOT,
                                env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for r in ready]
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        logs = [w.communicate(timeout=120)[1] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], logs
    assert sum(log.count("[demo corpus] done in") for log in logs) == 1, logs
    _same_corpus(demo_corpus.corpus_paths(str(root)), reference)


def test_a_killed_build_is_replaced(corpus, tmp_path):
    """A folder left by a build killed while moving its files into place (the marker and part of
    the corpus, no meta.json, its temporary folder) is the builder's: the next build replaces it
    and removes the temporary folder."""
    reference, meta = corpus
    root = tmp_path / "killed"
    (root / "howto").mkdir(parents=True)
    (root / demo_corpus.MARKER).write_text(json.dumps(meta["settings"]))
    (root / "howto" / "howto_train.csv").write_text("path\n")
    (root / "msrvtt_jsfusion_test.pkl").write_bytes(b"half a pickle")
    leftover = root / (demo_corpus.BUILDING_PREFIX + "killed")
    (leftover / "howto").mkdir(parents=True)
    (leftover / "word2vec.bin").write_bytes(b"x")
    paths = build_demo_corpus(str(root), size="tiny", seed=0, progress=False)
    assert not [n for n in os.listdir(root) if n.startswith(demo_corpus.BUILDING_PREFIX)]
    _same_corpus(paths, reference)
