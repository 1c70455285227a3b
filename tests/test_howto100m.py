"""HowTo100M reader and clip sampling against hand-computed clips, and bad inputs."""

import os

import numpy as np
import pytest

from msk_jax import errors
from msk_jax.data import model_inputs, word2vec
from msk_jax.data.howto100m import HowTo100MReader, load_captions, plan_clip, sample_clips
from msk_jax.data.word2vec import load_word2vec_binary
from tests.data_fixtures import DIM_2D, DIM_3D, segments, write_howto
from tests.paper_config import paper_clip_settings


def sample_clip(video, word_vectors, settings, rng):
    """One random clip as the readers plan and fill it: (start, end, audio, audio_mask, text,
    text_mask, raw_text)."""
    plan = plan_clip(video, settings, rng)
    audio, audio_mask = model_inputs.audio_features(video.frames(*plan.frames), settings.num_audio_frames)
    text, text_mask, raw_text = model_inputs.text_features(plan.words, word_vectors, settings.max_words)
    return plan.start, plan.end, audio, audio_mask, text, text_mask, raw_text


class ScriptedRandom:
    """Stands in for a numpy Generator: returns the scripted values of random()."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


CAPTION_A = segments((0.0, 3.0, "a b"), (3.5, 6.0, "c"), (6.5, 12.0, "d e"))
CAPTION_B = segments((0.0, 2.0, "p"), (4.0, 6.0, "q"), (6.5, 7.5, "r"), (9.0, 10.0, "s"))


@pytest.fixture(scope="module")
def howto(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("howto"))
    write_howto(root, [
        ("demo/va", 20, CAPTION_A, {}),
        ("demo/vb", 20, CAPTION_B, {}),
        ("demo/vc", 30, segments((20.0, 25.0, "s s s")), {}),
        ("demo/missing_2d", 20, CAPTION_A, {}),
        ("demo/wrong_dim", 20, CAPTION_A, {"dim_3d": DIM_3D + 1}),
        ("demo/no_segments", 20, segments(), {}),
        ("demo/short_audio", 20, CAPTION_A, {"frames": 40}),
        ("demo/truncated", 20, CAPTION_A, {}),
    ])
    os.remove(os.path.join(root, "features_2d", "demo/missing_2d", "missing_2d_2d.npz"))
    path = os.path.join(root, "features_3d", "demo/truncated", "truncated_3d.npz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return root


def reader(root, **settings):
    return HowTo100MReader(os.path.join(root, "howto_train.csv"), os.path.join(root, "caption.pickle"),
                           os.path.join(root, "features_2d"), os.path.join(root, "audio"),
                           load_word2vec_binary(os.path.join(root, "word2vec.bin")),
                           features_3d=os.path.join(root, "features_3d"), settings=paper_clip_settings(**settings),
                           dim_2d=DIM_2D, dim_3d=DIM_3D)


def test_asr_clip_extends_forward_and_misaligns_audio(howto):
    r = reader(howto)
    video = r.video(0)
    # start = 0.25 * (20 - 8) = 3.0, inside segment 0 -> extended with 1, then 2: [0, 12].
    start, end, audio, audio_mask, text, text_mask, raw = sample_clip(video, r.word_vectors, r.settings,
                                                                      ScriptedRandom(0.25))
    assert (start, end) == (0.0, 12.0)
    assert raw == "a b c d e"
    np.testing.assert_array_equal(text_mask[:6], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(text[:5, 0], [1, 2, 3, 4, 5])  # word vectors hold the word's rank
    # Audio starts 4 s after the text: frames time_to_frames(4)=398 .. time_to_frames(12)=1198.
    assert audio.shape == (40, 768) and audio_mask.sum() == 768
    assert audio[0, 0] == 398 and audio[0, -1] == 398 + 767


def test_neighbour_choice_and_word_order(howto):
    r = reader(howto)
    video = r.video(1)
    # start = 6.8 / 12 * 12: segment 2 [6.5, 7.5]; prev (3.5 <= 3.5) -> [4, 7.5]; then next
    # (6 < 7.5) -> [4, 10]; no next left -> prev: [0, 10]. Words are appended: r q s p.
    start, end, *_, raw = sample_clip(video, r.word_vectors, r.settings, ScriptedRandom(6.8 / 12))
    assert (start, end) == (0.0, 10.0)
    assert raw == "r q s p"


def test_end_inside_a_segment_anchors_the_clip(howto):
    r = reader(howto)
    video = r.video(2)  # duration 30, one segment [20, 25]
    start, end, *_, raw = sample_clip(video, r.word_vectors, r.settings, ScriptedRandom(13.0 / 22))
    # start 13 is in no segment; end 21 is inside [20, 25]; extension impossible (one segment).
    assert (start, end) == (20.0, 25.0) and raw == "s s s"


def test_clip_without_asr_has_empty_text_and_aligned_audio(howto):
    r = reader(howto, text_audio_misaligned=True)
    video = r.video(2)
    start, end, audio, audio_mask, text, text_mask, raw = sample_clip(video, r.word_vectors, r.settings,
                                                                      ScriptedRandom(1.0 / 22))
    assert (start, end) == (1.0, 9.0) and raw == ""
    assert text_mask.sum() == 0 and np.all(text == 0)
    assert audio[0, 0] == model_inputs.time_to_frames(1.0) == 98


def test_max_words_and_out_of_vocabulary(howto):
    from msk_jax.data.word2vec import WordVectors
    vectors = WordVectors(["a", "c"], np.eye(2, dtype=np.float32))
    text, mask, raw = model_inputs.text_features(word2vec.tokenize("a b, c! a's a"), vectors, max_words=2)
    assert raw == "a b c a's a"
    np.testing.assert_array_equal(mask, [1, 1])
    np.testing.assert_array_equal(text, [[1, 0], [0, 1]])  # a, c (b and a's are unknown)
    empty, empty_mask, _ = model_inputs.text_features(word2vec.tokenize("zz yy"), vectors, max_words=3)
    assert empty_mask.sum() == 0 and empty.shape == (3, 2)


def test_video_tokens_from_2d_and_3d_rates(howto):
    r = reader(howto)
    clips = sample_clips(r.video(0), r.paths[0], r.word_vectors, r.settings, ScriptedRandom(*[0.25] * 10))
    assert clips["video"].shape == (10, 12, DIM_2D + DIM_3D)
    video = r.video(0)
    # [0, 12]: 2D rows 0..12 (13), 3D rows 0..18 (19) -> 2D upsampled to 19, first 12 kept.
    f2d, f3d = video.features_2d[0:13], video.features_3d[0:19]
    index = np.floor(np.arange(19, dtype=np.float32) * np.float32(13 / 19)).astype(int)
    expected_2d = f2d[index][:12] / np.linalg.norm(f2d[index][:12], axis=1, keepdims=True)
    expected_3d = f3d[:12] / np.linalg.norm(f3d[:12], axis=1, keepdims=True)
    np.testing.assert_allclose(clips["video"][0], np.concatenate([expected_2d, expected_3d], axis=1), rtol=1e-6)
    np.testing.assert_array_equal(clips["video_mask"][0], np.ones(12))
    assert clips["id"][0] == "demo/va0.0"


def test_short_video_slice_is_padded_and_masked():
    f2d, f3d = np.ones((3, 2), np.float32), np.ones((4, 2), np.float32)
    video, mask = model_inputs.video_features(f2d, f3d, 6)
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
    empty, empty_mask = model_inputs.video_features(f2d[:0], f3d, 6)
    assert empty_mask.sum() == 0 and not empty.any()


@pytest.mark.parametrize("index,reason,words", [
    (3, "missing features", "does not exist"),
    (4, "wrong dimension", "dimension 7, expected 6"),
    (5, "no ASR segments", "no ASR segments"),
    (6, "audio too short", "shorter than one audio token"),
    (7, "unreadable", "cannot be read"),
])
def test_bad_inputs_name_the_file_and_the_problem(howto, index, reason, words):
    r = reader(howto)
    with pytest.raises(errors.DataError) as err:
        r.video(index)
    assert err.value.reason == reason
    assert words in str(err.value)
    assert r.video_id(index) in str(err.value)


def test_csv_without_path_column(tmp_path):
    (tmp_path / "bad.csv").write_text("video\nx\n")
    with pytest.raises(errors.DataError, match="'path' column"):
        HowTo100MReader(str(tmp_path / "bad.csv"), "", "", "", None, features_3d="")


@pytest.fixture(scope="module")
def large_vocabulary(howto, tmp_path_factory):
    """A word2vec binary of 300,000 words of dimension 4 (the captions' words among them, with
    the vectors of the corpus's file) and a cache folder for caption vocabularies."""
    from msk_jax.data.word2vec import save_word2vec_binary
    from tests.data_fixtures import word_vectors

    folder = tmp_path_factory.mktemp("large_vocabulary")
    rng = np.random.default_rng(1)
    filler = rng.standard_normal((300_000, 4)).astype(np.float32)
    vectors = {f"filler{i}": filler[i] for i in range(300_000 - len(word_vectors()))}
    vectors.update({w: v[:4] for w, v in word_vectors().items()})
    path = str(folder / "word2vec.bin")
    save_word2vec_binary(path, vectors)
    return path, str(folder / "cache")


def test_a_reader_pickles_as_paths_and_its_caption_vocabulary(howto, large_vocabulary, monkeypatch):
    """Pickled (as for a worker process), a reader is its paths, settings and the folder of its
    captions' word vectors: under 1 MB with a 300,000-word vocabulary (the vectors alone pickle
    to ~9 MB), built once; unpickled, it gives the same clips."""
    import pickle

    from msk_jax.data.word2vec import load_word2vec_binary

    path, cache = large_vocabulary
    monkeypatch.setenv("MSK_JAX_CACHE_DIR", cache)
    words = load_word2vec_binary(path)
    r = HowTo100MReader(os.path.join(howto, "howto_train.csv"), os.path.join(howto, "caption.pickle"),
                        os.path.join(howto, "features_2d"), os.path.join(howto, "audio"), words,
                        features_3d=os.path.join(howto, "features_3d"), settings=paper_clip_settings(n_clips=3),
                        dim_2d=DIM_2D, dim_3d=DIM_3D)
    assert len(words) == 300_000 and len(pickle.dumps(words)) > 5 << 20
    data = pickle.dumps(r)
    assert len(data) < 1 << 20
    assert os.listdir(os.path.join(cache, "caption_words")) == [os.path.basename(r.caption_words())]
    worker = pickle.loads(data)
    # The caption words the vocabulary knows: a b c d e (vc's "s" too; p q r s of vb).
    assert sorted(worker.word_vectors.index) == ["a", "b", "c", "d", "e", "p", "q", "r", "s"]
    for i in range(len(r)):
        try:
            want = r.sample_clips(i, np.random.default_rng(i))
        except errors.DataError as err:
            with pytest.raises(errors.DataError) as again:
                worker.sample_clips(i, np.random.default_rng(i))
            assert (again.value.reason, str(again.value)) == (err.reason, str(err))
            continue
        got = worker.sample_clips(i, np.random.default_rng(i))
        for key in ("video", "video_mask", "audio", "audio_mask", "text", "text_mask", "raw_text"):
            np.testing.assert_array_equal(got[key], want[key])
    # Built once: another reader of the same files finds it; other captions make another.
    again = HowTo100MReader(r.csv_path, r.caption_path, r.root_2d, r.root_audio, words, features_3d=r.root_3d,
                            settings=r.settings)
    assert again.caption_words() == r.caption_words()
    r.caption_path = os.path.join(cache, "caption.pickle")
    with open(r.caption_path, "wb") as f:
        pickle.dump({"va": {"start": [0.0], "end": [1.0], "text": ["a zz"]}}, f)
    r.captions, r._caption_words = load_captions(r.caption_path), None
    assert r.caption_words() != again.caption_words()
    assert pickle.loads(pickle.dumps(r)).word_vectors.index == {"a": 0}
