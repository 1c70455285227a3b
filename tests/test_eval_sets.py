"""Evaluation pickles (MSR-VTT, YouCook2), their TFDS builders, and word2vec files."""

import pickle

import numpy as np
import pytest

from msk_jax.data import eval_sets
from msk_jax.data.word2vec import WordVectors, load_word2vec_binary, save_word2vec_binary
from msk_jax.errors import DataError
from tests.data_fixtures import DIM_2D, DIM_3D, WORD_DIM, read_eval_pickle, word_vectors, write_eval_pickle

WORDS = WordVectors(list(word_vectors()), np.stack(list(word_vectors().values())))


def test_msrvtt_pickle(tmp_path):
    entries = write_eval_pickle(tmp_path / "msrvtt.pkl", "msrvtt", 5, rng=np.random.default_rng(0))
    data = read_eval_pickle(str(tmp_path / "msrvtt.pkl"), eval_sets.MSRVTT, WORDS)
    assert len(data) == 5 and data.complete_dataset_size == 1000 and data.dropped == 0
    assert data.batch["video"].shape == (5, 48, DIM_2D + DIM_3D)
    assert data.batch["audio"].shape == (5, 40, 3072)
    assert data.batch["text"].shape == (5, 20, WORD_DIM)
    assert data.ids == [f"clip{i}" for i in range(5)]
    assert data.raw_text[2] == "a b x2 c"
    np.testing.assert_array_equal(data.batch["text_mask"][2, :4], [1, 1, 1, 0])  # x2 is unknown
    frames = entries[1]["audio"].shape[1]
    assert data.batch["audio_mask"][1].sum() == frames
    np.testing.assert_array_equal(data.batch["audio"][1, :, :frames], entries[1]["audio"])
    assert data.batch["video_mask"][1].sum() == int(5 * 1.5)


def test_youcook_drops_entries_without_2d(tmp_path):
    write_eval_pickle(tmp_path / "yc.pkl", "youcook", 6, rng=np.random.default_rng(1), drop_2d=2)
    data = read_eval_pickle(str(tmp_path / "yc.pkl"), eval_sets.YOUCOOK2, WORDS,
                                      complete_dataset_size=6)
    assert len(data) == 4 and data.dropped == 2 and data.complete_dataset_size == 6
    assert data.ids == ["clip2", "clip3", "clip4", "clip5"]
    assert data.batch["video"].shape[1] == 72 and data.batch["audio"].shape[2] == 4608


def test_bad_eval_input(tmp_path):
    rng = np.random.default_rng(2)
    entries = write_eval_pickle(tmp_path / "m.pkl", "msrvtt", 3, rng=rng)
    entries[1]["3d"] = entries[1]["3d"][:, :3]
    with open(tmp_path / "wrong_dim.pkl", "wb") as f:
        pickle.dump(entries, f)
    with pytest.raises(DataError, match=r"wrong_dim\.pkl \[entry 1, id 'clip1'\].*dimension 3, expected 6"):
        read_eval_pickle(str(tmp_path / "wrong_dim.pkl"), eval_sets.MSRVTT, WORDS, dim_3d=DIM_3D)
    with open(tmp_path / "empty.pkl", "wb") as f:
        pickle.dump([], f)
    with pytest.raises(DataError, match="empty evaluation set"):
        read_eval_pickle(str(tmp_path / "empty.pkl"), eval_sets.MSRVTT, WORDS)
    data = open(tmp_path / "m.pkl", "rb").read()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="cannot be read as a pickle"):
        read_eval_pickle(str(tmp_path / "cut.pkl"), eval_sets.MSRVTT, WORDS)
    with pytest.raises(FileNotFoundError, match="nowhere.pkl"):
        read_eval_pickle(str(tmp_path / "nowhere.pkl"), eval_sets.MSRVTT, WORDS)
    with pytest.raises(DataError, match="complete_dataset_size"):
        read_eval_pickle(str(tmp_path / "m.pkl"), eval_sets.MSRVTT, WORDS, complete_dataset_size=2)


def test_tfds_eval_builder_matches_the_pickle(tmp_path):
    tfds_builders = pytest.importorskip("msk_jax.data.tfds_builders")
    manual = tmp_path / "manual"
    manual.mkdir()
    write_eval_pickle(manual / "youcook_val.pkl", "youcook", 5, rng=np.random.default_rng(3), drop_2d=1)
    tfds_builders.build("youcook2_retrieval", str(manual), str(tmp_path / "out"))
    got = tfds_builders.read_tfds_eval_set("youcook2_retrieval", str(tmp_path / "out"), eval_sets.YOUCOOK2, WORDS)
    want = read_eval_pickle(str(manual / "youcook_val.pkl"), eval_sets.YOUCOOK2, WORDS)
    assert got.ids == want.ids and got.dropped == want.dropped == 1
    for key in want.batch:
        np.testing.assert_array_equal(got.batch[key], want.batch[key])
    # With source="tfds" a run evaluates on the built dataset (no pickle configured).
    from msk_jax import data_sources
    from tests.train_fixtures import load_config

    config = load_config("")
    d = config.data
    d.source, d.tfds_data_dir, d.msrvtt, d.youcook2 = "tfds", str(tmp_path / "out"), "", ""
    d.dim_2d, d.dim_3d, d.max_words, d.eval_video_tokens, d.eval_audio_frames = DIM_2D, DIM_3D, 20, 0, 0
    d.youcook2_complete_size = -1
    evals = data_sources.build_eval_sets(config, data_sources.DataPaths(word_vectors=""), WORDS)
    assert list(evals) == ["YouCook2"] and evals["YouCook2"].ids == want.ids
    assert evals["YouCook2"].complete_dataset_size == 5  # 4 entries + 1 without 2D features
    np.testing.assert_array_equal(evals["YouCook2"].batch["video"], want.batch["video"])


def test_word2vec_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "w.bin")
    save_word2vec_binary(path, word_vectors())
    loaded = load_word2vec_binary(path)
    assert len(loaded) == len(word_vectors()) and loaded.dim == WORD_DIM
    np.testing.assert_array_equal(loaded.lookup(["c", "a"]), [word_vectors()["c"], word_vectors()["a"]])
    assert len(load_word2vec_binary(path, limit=3)) == 3
    data = open(path, "rb").read()
    (tmp_path / "cut.bin").write_bytes(data[:-7])
    with pytest.raises(ValueError, match="truncated"):
        load_word2vec_binary(str(tmp_path / "cut.bin"))
    (tmp_path / "text.txt").write_text("a 0.1 0.2\n")
    with pytest.raises(ValueError, match="header"):
        load_word2vec_binary(str(tmp_path / "text.txt"))
