"""Feature extraction from video files (`msk_jax.extract`): FFmpeg's decoding graphs, the written
HowTo100M layout, resume, undecodable files, evaluation pickles, the demo backbone against the
demo corpus's features, and the real backbones on a short video."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

av = pytest.importorskip("av")

from msk_jax.data import eval_sets  # noqa: E402
from msk_jax.extract import extractor as E  # noqa: E402
from msk_jax.extract import video as V  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_video(path, frames, fps, audio_rate=44100, seconds=None, tone=440.0):
    """An H.264 mp4 of `frames` (N, H, W, 3) uint8 at `fps`, with a stereo AAC tone."""
    container = av.open(str(path), "w")
    video = container.add_stream("libx264", rate=fps, options={"crf": "0"})
    video.height, video.width = frames.shape[1:3]
    video.pix_fmt = "yuv420p"
    audio = container.add_stream("aac", rate=audio_rate)
    audio.layout = "stereo"
    for i, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        container.mux(video.encode(frame))
    container.mux(video.encode())
    seconds = len(frames) / fps if seconds is None else seconds
    t = np.arange(int(seconds * audio_rate)) / audio_rate
    wave = (0.3 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
    stereo = np.stack([wave, wave])
    for start in range(0, stereo.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, start:start + 1024]), format="fltp",
                                           layout="stereo")
        frame.sample_rate, frame.pts = audio_rate, start
        container.mux(audio.encode(frame))
    container.mux(audio.encode())
    container.close()


def grey_frames(count, height, width):
    """Frame i is uniformly grey at level 4 * i."""
    return np.repeat((4 * np.arange(count, dtype=np.uint8))[:, None, None, None], 3, axis=3) * \
        np.ones((1, height, width, 1), np.uint8)


def test_decoding_rates_sizes_and_clips(tmp_path):
    path = tmp_path / "grey.mp4"
    write_video(path, grey_frames(60, 240, 320), fps=24)  # 2.5 s
    decoded = V.decode_video(str(path))
    # 2D: fps=1 -> output tick k takes the last input frame whose time rounds to k (24k + 11);
    # the end (2.5 s) rounds to 3 ticks. Shorter side 224, the other int(320 * 224 / 240) = 298.
    assert decoded.frames_2d.shape == (3, 224, 298, 3)
    np.testing.assert_allclose(decoded.frames_2d.mean(axis=(1, 2, 3)), [44, 140, 236], atol=2.5)
    # 3D: 24 fps (every frame), shorter side 112, other int(320 * 112 / 240) = 149, 112x112 crop.
    assert decoded.frames_3d.shape == (60, 112, 112, 3)
    np.testing.assert_allclose(decoded.frames_3d.mean(axis=(1, 2, 3)), 4 * np.arange(60), atol=2.5)
    clips = V.clips_3d(decoded.frames_3d)
    assert clips.shape == (4, 16, 112, 112, 3)  # 60 frames: 3 clips and a partial one
    np.testing.assert_array_equal(clips.reshape(64, 112, 112, 3)[:60], decoded.frames_3d)
    assert not clips[3, 12:].any()  # padded with raw zeros
    # Audio: 16 kHz mono, the 440 Hz tone.
    wave = decoded.waveform
    assert wave.dtype == np.float32 and abs(len(wave) - 2.5 * 16000) < 2048
    spectrum = np.abs(np.fft.rfft(wave[2000:34000]))
    assert abs(np.argmax(spectrum) * 16000 / 32000 - 440) < 2
    assert decoded.duration == pytest.approx(2.5, abs=0.05)


def test_portrait_sizes_and_centre_crop(tmp_path):
    height, width = 250, 180
    rows = np.round(np.arange(height) * 255 / (height - 1)).astype(np.uint8)  # vertical gradient
    frames = np.repeat(np.broadcast_to(rows[None, :, None, None], (24, height, width, 3)), 1, axis=0).copy()
    path = tmp_path / "portrait.mp4"
    write_video(path, frames, fps=24)
    decoded = V.decode_video(str(path))
    assert V.output_size(height, width, 224) == (311, 224)  # int(250 * 224 / 180) = 311.1 -> 311
    assert decoded.frames_2d.shape[1:] == (311, 224, 3)
    assert decoded.frames_3d.shape[1:] == (112, 112, 3)
    # 3D: scaled to 155 x 112, crop rows 21..132 (int((155 - 112) / 2) = 21).
    assert V.centre_crop_offsets(155, 112, 112) == (0, 21)
    level = lambda scaled_row: ((scaled_row + 0.5) * height / 155 - 0.5) * 255 / (height - 1)  # noqa: E731
    column = decoded.frames_3d[5, :, 56, 0].astype(float)
    assert column[0] == pytest.approx(level(21), abs=4)
    assert column[-1] == pytest.approx(level(132), abs=4)


def test_undecodable_file_is_a_data_error(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(E.DataError) as err:
        V.decode_video(str(bad))
    assert "broken.mp4" in str(err.value)


@pytest.fixture(scope="module")
def demo_videos(tmp_path_factory):
    pytest.importorskip("sklearn")
    from msk_jax.demo import corpus as demo_corpus
    from msk_jax.demo import videos as demo_videos

    try:
        demo_corpus.ensure_voices(demo_corpus.TRAIN_LANGUAGES)
    except RuntimeError as err:
        pytest.skip(str(err))
    out = tmp_path_factory.mktemp("demo_videos")
    demo_videos.write_demo_videos(str(out), count=2, progress=False)
    return out


def _options(videos, output, **kwargs):
    return E.Options(videos=str(videos), output=str(output), backbone="demo", batch=8, log=lambda m: None, **kwargs)


def test_demo_extraction_writes_the_howto100m_layout(demo_videos, tmp_path):
    from msk_jax.demo import corpus as demo_corpus
    from msk_jax.data.feature_store import FeatureStoreSource  # noqa: F401 (the store's reader exists)
    from msk_jax.data.howto100m import HowTo100MReader
    from msk_jax.data.word2vec import save_word2vec_binary

    words = tmp_path / "words.bin"
    rng = np.random.default_rng(0)
    save_word2vec_binary(str(words), {w: rng.normal(size=8).astype(np.float32) for w in demo_corpus.DIGIT_WORDS})
    out, store = tmp_path / "features", tmp_path / "store"
    captions = demo_videos / "captions.csv"
    summary = E.run(_options(demo_videos, out, captions=str(captions), store=str(store), word_vectors=str(words),
                             eval_csv=str(captions), eval_output=str(tmp_path / "test.pkl")))
    assert summary["complete"] and summary["usable"] == 2 and not summary["failed"]

    reader = HowTo100MReader(str(out / "videos.csv"), str(out / "caption.pickle"), str(out), str(out), None,
                             features_3d=str(out))
    assert len(reader) == 2
    # The demo backbone gives the corpus's own features of these clips (up to the codec).
    sources = demo_corpus.load_sources(0, 128, False)
    strings = demo_corpus.unique_strings(np.random.default_rng([0, 9]), demo_corpus.SIZES["default"].msrvtt_clips, set())
    for i in range(2):
        video = reader.video(i)
        for rows in (video.features_2d, video.features_3d):
            assert rows.dtype == np.float16
            np.testing.assert_allclose(np.linalg.norm(rows.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert video.log_mel.shape[0] == 40
        assert video.caption["text"] == [" ".join(demo_corpus.DIGIT_WORDS[int(d)] for d in strings[i])]
        rng = np.random.default_rng([0, 2, i])
        events, duration = demo_corpus.plan_test_clip(rng, strings[i], demo_corpus.TRAIN_LANGUAGES)
        clip = demo_corpus.render(events, duration, sources.images, sources.pools["msrvtt"], sources.voices, rng, None)
        f2d, f3d = sources.encoder.features(clip.frames, duration)
        for ours, corpus in ((video.features_2d, f2d), (video.features_3d, f3d)):
            assert len(ours) in (len(corpus), len(corpus) + 1)  # the extractor's last partial second / clip
            cosine = (E.l2_normalize(corpus) * ours[:len(corpus)].astype(np.float32)).sum(axis=1)
            assert cosine.min() > 0.99
    with open(out / "index.json") as f:
        index = json.load(f)
    assert [v["rows_2d"] > 0 and v["caption_segments"] == 1 for v in index["videos"]] == [True, True]
    meta = json.loads((store / "meta.json").read_text())
    assert meta["usable"] == 2

    entries, dropped = eval_sets.load_eval_entries(str(tmp_path / "test.pkl"), eval_sets.MSRVTT)
    assert len(entries) == 2 and dropped == 0
    assert entries[0]["caption"] == reader.video(0).caption["text"][0]
    assert entries[0]["features_2d"].shape[1] == 128 and entries[0]["audio"].shape[0] == 40


def test_resume_shards_and_undecodable_videos(demo_videos, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in sorted(os.listdir(demo_videos)):
        if name.endswith(".mp4"):
            os.symlink(demo_videos / name, videos / name)
    (videos / "broken.mp4").write_bytes(b"\x00" * 5000)
    out = tmp_path / "features"
    # Two processes: the first alone writes its part, the index waits for the second.
    first = E.run(_options(videos, out, process_index=0, process_count=2))
    assert not first["complete"] and not (out / "videos.csv").exists()
    second = E.run(_options(videos, out, process_index=1, process_count=2))
    assert second["complete"] and second["usable"] == 2
    assert list(second["failed_all"]) == ["broken"] and "broken" in second["failed_all"]
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}
    assert len(written) == 6
    # Resume: nothing is extracted again, the broken file is tried and named again.
    logs = []
    again = E.run(E.Options(videos=str(videos), output=str(out), backbone="demo", batch=8, log=logs.append))
    assert again["skipped_done"] == 2 and again["extracted_now"] == 0 and list(again["failed"]) == ["broken"]
    assert any("broken.mp4" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")} == written
    # The index names the broken video with its reason; the csv lists the two others.
    index = json.loads((out / "index.json").read_text())
    assert [v["path"] for v in index["videos"] if "error" in v] == ["broken"]
    assert (out / "videos.csv").read_text().split() == ["path", "demo_msrvtt_0000", "demo_msrvtt_0001"]


def test_one_of_two_processes_finalises(demo_videos, tmp_path):
    """Two processes of one extraction run together over a finished one (a rerun, with a store
    now): both find every part present, exactly one writes the csv, captions, index and store,
    the other names it and writes nothing."""
    from msk_jax.demo import corpus as demo_corpus
    from msk_jax.data.word2vec import save_word2vec_binary

    out, store, words = tmp_path / "features", tmp_path / "store", tmp_path / "words.bin"
    rng = np.random.default_rng(0)
    save_word2vec_binary(str(words), {w: rng.normal(size=8).astype(np.float32) for w in demo_corpus.DIGIT_WORDS})
    captions = str(demo_videos / "captions.csv")
    E.run(_options(demo_videos, out, captions=captions))
    for index in range(2):  # every part written, as a resumed run writes them
        E.run(_options(demo_videos, out, captions=captions, process_index=index, process_count=2))
    runs = [subprocess.Popen([sys.executable, "-m", "msk_jax.extract", f"--videos={demo_videos}", f"--output={out}",
                              "--backbone=demo", f"--captions={captions}", f"--store={store}",
                              f"--word_vectors={words}", f"--process_index={index}", "--process_count=2"],
                             cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True) for index in range(2)]
    logs = [run.communicate(timeout=120)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    finalised = [i for i, log in enumerate(logs) if "failed here (0 in all)" in log]
    assert len(finalised) == 1, logs
    other = logs[1 - finalised[0]]
    assert f"process {finalised[0]} of 2 (host " in other and " finalise" in other, other
    assert json.loads((store / "meta.json").read_text())["usable"] == 2
    assert not (out / "parts" / "finalising.json").exists()


def test_youcook2_pickle_and_clip_rows(demo_videos, tmp_path):
    clips = tmp_path / "clips.csv"
    clips.write_text("video,start,end,caption\n"
                     f"{demo_videos}/demo_msrvtt_0000.mp4,1.0,3.0,first clip\n"
                     "demo_msrvtt_0001,,,whole video\n")
    out = tmp_path / "features"
    E.run(_options(demo_videos, out, eval_csv=str(clips), eval_format="youcook2",
                   eval_output=str(tmp_path / "youcook.pkl")))
    entries, _ = eval_sets.load_eval_entries(str(tmp_path / "youcook.pkl"), eval_sets.YOUCOOK2)
    assert [e["caption"] for e in entries] == ["first clip", "whole video"]
    assert len(entries[0]["features_2d"]) == 2 and len(entries[0]["features_3d"]) == 4  # [1, 3] s: rows 1..2 and 1..4
    assert entries[0]["audio"].shape[1] == 1 + 2 * 16000 // 160


def test_cli_bad_input_is_one_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "msk_jax.extract", "--process_index=0", "--process_count=1",
                               *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)

    missing = cli(f"--videos={tmp_path}/nowhere", f"--output={tmp_path}/out", "--backbone=demo")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/nowhere: no such folder or csv"
    bad_csv = tmp_path / "list.csv"
    bad_csv.write_text("file\nx.mp4\n")
    wrong = cli(f"--videos={bad_csv}", f"--output={tmp_path}/out", "--backbone=demo")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr and "'video'" in wrong.stderr
    (tmp_path / "only_broken").mkdir()
    (tmp_path / "only_broken" / "a.mp4").write_bytes(b"junk")
    nothing = cli(f"--videos={tmp_path}/only_broken", f"--output={tmp_path}/out2", "--backbone=demo")
    assert nothing.returncode == 1 and "a.mp4" in nothing.stderr and "Traceback" not in nothing.stderr


@pytest.mark.slow
def test_real_backbones_on_a_short_video(tmp_path):
    import jax
    import jax.numpy as jnp

    B = pytest.importorskip("msk_jax.extract.backbones")
    path = tmp_path / "short.mp4"
    rng = np.random.default_rng(0)
    write_video(path, rng.integers(0, 256, size=(30, 120, 160, 3), dtype=np.uint8), fps=24)  # 1.25 s
    backbones = []
    for kind, sample in (("2d", (1, 32, 32, 3)), ("3d", (1, 16, 32, 32, 3))):
        shapes = jax.eval_shape(B.backbone(kind).init, jax.random.PRNGKey(0), jnp.zeros(sample))
        keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree_util.tree_leaves(shapes))))

        def init(path, leaf):
            name = path[-1].key
            if name == "kernel":
                fan_in = int(np.prod(leaf.shape[:-1]))
                return jax.random.normal(next(keys), leaf.shape) * np.sqrt(2.0 / fan_in)
            return jnp.ones(leaf.shape) if name in ("scale", "var") else jnp.zeros(leaf.shape)

        backbones += list(E.real_backbone(kind, jax.tree_util.tree_map_with_path(init, shapes)))
    decoded = V.decode_video(str(path))
    feats = E.compute_features(decoded, *backbones, batch=1)  # one frame, one clip per call
    assert feats["2d"].shape == (len(decoded.frames_2d), 2048) and feats["3d"].shape == (2, 2048)
    for rows in (feats["2d"], feats["3d"]):
        assert rows.dtype == np.float16 and np.isfinite(rows.astype(np.float32)).all()
        np.testing.assert_allclose(np.linalg.norm(rows.astype(np.float32), axis=1), 1.0, atol=2e-3)
