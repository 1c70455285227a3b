"""Zero-shot classification without a model: the accuracy against numpy (ties as retrieval counts
them), class names as words, windows, the files it reads (bad ones end in one line naming the
file and entry), its JSON, table and picture, the configuration's sets, the extractor's
classification pickle and the demo corpus's classification set (trained against untrained:
tests/test_evaluate.py, on the session's trained run)."""

import dataclasses
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from msk_jax import cli, configs, data_sources, retrieval
from msk_jax.data import classification_sets
from msk_jax.data.word2vec import WordVectors
from msk_jax.errors import DataError
from msk_jax.evaluators import classification

WORDS = WordVectors(["apply", "eye", "makeup", "brush", "hair", "yo", "video", "of"],
                    np.random.default_rng(0).normal(size=(8, 6)))
SETS = dict(n_video_tokens=4, num_audio_frames=128, video_dim=6, max_words=5)


def test_accuracy_against_numpy_with_ties():
    scores = np.array([[0.9, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0],   # true 0: top
                       [0.5, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0],   # true 1: tied with class 0 -> rank 0.5
                       [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.1],   # true 2: six-way tie -> rank 2.5 (< 5)
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0],   # true 6: last -> rank 6
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6]])  # true 6: tied first -> rank 0.5
    labels = np.array([0, 1, 2, 6, 6])
    want = np.array([sum(s > s[y]) + (sum(s == s[y]) - 1) / 2 for s, y in zip(scores, labels)])
    np.testing.assert_array_equal(classification.class_ranks(scores, labels), want)
    got = classification.accuracy(scores, labels)
    as_retrieval = retrieval.metrics_from_ranks(want)  # R@1 counts rank 0 only, R@5 ranks below 5
    assert got["top1"] == as_retrieval["R1"] == 20.0 and got["top5"] == as_retrieval["R5"] == 80.0
    assert got["mean_class"] == pytest.approx(100 * np.mean([1, 0, 0, 0]))  # per class 0, 1, 2, 6
    assert classification.chance(10) == {"top1": 10.0, "top5": 50.0, "mean_class": 10.0}
    with pytest.raises(ValueError, match="NaN"):
        classification.class_ranks(np.array([[np.nan, 1.0]]), np.array([0]))


def test_class_names_as_words():
    assert classification_sets.class_words("ApplyEyeMakeup") == ["apply", "eye", "makeup"]
    assert classification_sets.class_words("brush_hair") == ["brush", "hair"]
    assert classification_sets.class_words("YoYo") == ["yo", "yo"]
    assert classification_sets.class_words("PlayingDaf") == ["playing", "daf"]
    prompts, owner, unknown = classification_sets.build_prompts(["ApplyEyeMakeup", "BrushDaf", "hair"], ("{}", "video of {}"),
                                              WORDS, 5, "x.pkl")
    assert owner.tolist() == [0, 0, 1, 1, 2, 2] and unknown == {"BrushDaf": ["daf"]}
    assert prompts["text_mask"].sum(axis=1).tolist() == [3, 5, 1, 3, 1, 3]  # words without a vector dropped
    with pytest.raises(DataError) as raised:
        classification_sets.build_prompts(["Knitting"], ("{}",), WORDS, 5, "x.pkl")
    assert str(raised.value).startswith("x.pkl [class 0 'Knitting']: no word")


def _video(vid, label, splits=("1",), rows_3d=6, frames=300):
    rng = np.random.default_rng(len(vid))
    return {"id": vid, "2d": rng.normal(size=(max(rows_3d * 2 // 3, 1) if rows_3d else 0, 3)).astype(np.float32),
            "3d": rng.normal(size=(rows_3d, 3)).astype(np.float32), "audio": rng.normal(size=(40, frames)),
            "label": label, "splits": list(splits)}


def _write(path, data):
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


def test_a_pickle_becomes_windows_and_prompts(tmp_path):
    path = _write(tmp_path / "set.pkl", {"classes": ["brush_hair", "ApplyEyeMakeup"], "splits": ["2", "1"],
                                         "videos": [_video("a", 0, ["1", "2"]),
                                                    _video("b", 1, ["2"], rows_3d=9, frames=330), _video("c", 1, [])]})
    classes, videos, order = classification_sets.load_pickle(path)
    one = classification_sets.build_classification_set("S", classes, videos, WORDS, source=path, split_order=order, **SETS)
    assert len(one) == 2 and one.left_out == 1 and one.video_ids == ["a", "b"] and list(one.splits) == ["2", "1"]
    assert one.splits["1"].tolist() == [True, False] and one.batch["video"][0:2].shape == (2, 4, 6)
    three = classification_sets.build_classification_set("S", classes, videos, WORDS, source=path, windows=3, split_order=order, **SETS)
    # 6 3D rows, 300 frames: windows at rows 0 and 4 (frames 0 and 128), the third would start
    # past the rows; 9 rows, 330 frames: three (the last one row and 74 frames long).
    assert three.row_video.tolist() == [0, 0, 1, 1, 1]
    masks = three.batch["video_mask"][0:5]
    assert masks.sum(axis=1).tolist() == [4, 2, 4, 4, 1] and three.batch["audio_mask"][0:5].sum(axis=1).tolist() == \
        [128, 128, 128, 128, 74]
    np.testing.assert_array_equal(three.batch["video"][1], three.batch["video"][1:2][0])  # index as slice


@pytest.mark.parametrize("case, where, problem", [
    ("no classes", "[file]", "has no class names"),
    ("label out of range", "[entry 1, id 'b']", "label 2 is out of range: 2 classes"),
    ("unknown class", "[class 1 'Knitting']", "no word of the class name (knitting)"),
    ("no video rows", "[entry 0, id 'a']", "has 0 2D and 0 3D feature rows: shorter than one video token"),
    ("short audio", "[entry 0, id 'a']", "audio has 20 frames, shorter than one audio token"),
])
def test_bad_files_are_one_line_naming_file_and_entry(tmp_path, case, where, problem):
    data = {"classes": ["brush_hair", "ApplyEyeMakeup"], "videos": [_video("a", 0), _video("b", 1)]}
    if case == "no classes":
        del data["classes"]
    elif case == "label out of range":
        data["videos"][1]["label"] = 2
    elif case == "unknown class":
        data["classes"][1] = "Knitting"
    elif case == "no video rows":
        data["videos"][0] = _video("a", 0, rows_3d=0)
    else:
        data["videos"][0] = _video("a", 0, frames=20)
    path = _write(tmp_path / "bad.pkl", data)
    with pytest.raises(DataError) as raised:
        classification_sets.build_classification_set("S", *classification_sets.load_pickle(path)[:2], WORDS, source=path, **SETS)
    message = str(raised.value)
    assert message.startswith(path + ("" if where == "[file]" else f" {where}")) and problem in message, message
    assert "\n" not in cli.describe(raised.value)[1]


def test_a_csv_over_features_in_the_howto100m_layout(tmp_path):
    for vid, rows in (("v_a", 6), ("v_b", 3)):
        folder = tmp_path / "Cls" / vid
        folder.mkdir(parents=True)
        v = _video(vid, 0, rows_3d=rows)
        np.savez(folder / f"{vid}_2d.npz", features=v["2d"])
        np.savez(folder / f"{vid}_3d.npz", features=v["3d"])
        np.savez(folder / f"{vid}_spec.npz", v["audio"])
    (tmp_path / "set.csv").write_text("video,label,splits\nCls/v_a.avi,hair,1 3\nCls/v_b,brush_hair,2\n")
    classes, videos, _ = classification_sets.load_csv(str(tmp_path / "set.csv"))
    one = classification_sets.build_classification_set("S", classes, videos, WORDS, source="set.csv", **SETS)
    assert one.classes == ["brush_hair", "hair"] and one.labels.tolist() == [1, 0]
    assert {s: m.tolist() for s, m in one.splits.items()} == {"1": [True, False], "2": [False, True],
                                                              "3": [True, False]}
    (tmp_path / "set.csv").write_text("video,label,splits\nCls/v_c,hair,1\n")
    with pytest.raises(DataError, match=r"set.csv \[row 2\]: .*Cls/v_c/v_c_2d.npz: file does not exist"):
        classification_sets.load_csv(str(tmp_path / "set.csv"))


def test_results_table_scalars_and_files(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 4)
    splits = {"a": np.arange(12) < 6, "b": np.arange(12) >= 6}
    videos = classification.video_embeddings({"video": rng.normal(size=(24, 5)), "audio": rng.normal(size=(24, 5))},
                                np.repeat(np.arange(12), 2), 12)
    texts = classification.class_embeddings(rng.normal(size=(6, 5)), np.array([0, 0, 1, 1, 2, 2]), 3)
    results = classification.set_results(classification.scores(videos, texts), labels, splits, 3)
    assert results["mean"]["v"]["top1"] == pytest.approx((results["splits"]["a"]["v"]["top1"]
                                                          + results["splits"]["b"]["v"]["top1"]) / 2)
    evaluator = classification.ClassificationEvaluator("classification", {"S": None}, 0)
    evaluator.confusion["S"] = classification.confusion_matrix(labels, np.argmax(classification.scores(videos, texts)["v+a"], 1), 3)
    evaluator.sets["S"] = dataclasses.make_dataclass("Set", ["classes"])(["x", "y", "z"])
    assert "mean of splits" in evaluator.table({"S": results}) and "S/b/v+a/top5" in evaluator.scalars({"S": results})
    training = evaluator.write({"S": results}, str(tmp_path), 7)
    binary = evaluator.write({"S": results}, str(tmp_path), 7, weights="ema")
    pytest.importorskip("matplotlib")
    assert [os.path.basename(p) for p in training + binary] == [
        "step_7-classification.json", "step_7-classification-S.png",
        "step_7-ema-classification-S.json", "step_7-ema-classification-S.png"]
    with open(training[0]) as f:
        assert json.load(f)["S"]["chance"]["top1"] == pytest.approx(100 / 3)


def test_the_paper_config_names_ucf101_and_hmdb51_and_a_missing_file_its_field():
    config = configs.get_config("howto")
    [retrieval_entry, classification] = data_sources.evaluator_entries(config)
    assert classification.fields == ("ucf101", "hmdb51") and config.data.ucf101 == config.data.hmdb51 == ""
    assert classification.set_names == ["UCF101", "HMDB51"] and retrieval_entry.set_names == ["MSRVTT", "YouCook2"]
    paths = data_sources.DataPaths(word_vectors="", ucf101="/nowhere/ucf101.pkl")
    with pytest.raises(FileNotFoundError) as raised:
        data_sources.build_evaluation_sets(config, paths, WORDS)
    line = cli.describe(raised.value)[1]
    assert line.startswith("config.data.ucf101='/nowhere/ucf101.pkl' (the UCF101 classification set) does not "
                           "exist") and "\n" not in line
    config.evals.classification.sets = "ucf101,msrvtt"
    with pytest.raises(DataError, match=r"config.evals.classification.sets: names 'msrvtt', which is not a "
                                        r"classification set"):
        data_sources.evaluator_entries(config)
    with pytest.raises(DataError, match=r"--evals: no evaluator nope in config.evals"):
        data_sources.evaluator_entries(configs.get_config("howto"), ["nope"])


def test_the_extractor_writes_a_classification_pickle(tmp_path):
    from msk_jax.extract import extractor

    items = [extractor.VideoItem(str(tmp_path / "videos" / f"{vid}.mp4"), f"Cls/{vid}") for vid in ("v_a", "v_b")]
    for item in items[:1]:  # v_b has no features: left out, its class kept
        v = _video(item.id, 0)
        files = extractor.feature_files(str(tmp_path / "out"), item)
        os.makedirs(os.path.dirname(files["2d"]))
        np.savez(files["2d"], features=v["2d"])
        np.savez(files["3d"], features=v["3d"])
        np.savez(files["audio"], arr_0=v["audio"])
    (tmp_path / "classes.csv").write_text("video,label,splits\nv_a.mp4,YoYo,1;3\nv_b,brush_hair,2\n")
    logged = []
    opts = extractor.Options(videos="", output=str(tmp_path / "out"), eval_csv=str(tmp_path / "classes.csv"),
                             eval_format="classification", eval_output=str(tmp_path / "set.pkl"), log=logged.append)
    assert extractor.write_eval_pickle(opts, items, extractor._classification_rows(opts.eval_csv)) == 1
    classes, videos, _ = classification_sets.load_pickle(str(tmp_path / "set.pkl"))
    assert classes == ["YoYo", "brush_hair"] and [(v["id"], v["label"], v["splits"]) for v in videos] == \
        [("v_a", 0, ["1", "3"])]
    assert any("row 3 left out" in line for line in logged)


def test_a_corpus_built_before_the_classification_set_gets_it_added(tiny_corpus, tmp_path, monkeypatch):
    """The tiny size has none; given one, a cached tiny corpus gets the file, its others untouched."""
    from msk_jax.demo import corpus as demo_corpus

    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert demo_corpus.build_demo_corpus(str(root), size="tiny", feature_dim=16, progress=False).digits == ""
    monkeypatch.setitem(demo_corpus.SIZES, "tiny", dataclasses.replace(demo_corpus.SIZES["tiny"], digit_clips=1))
    paths = demo_corpus.build_demo_corpus(str(root), size="tiny", feature_dim=16, progress=False)
    assert {p: p.read_bytes() for p in before} == before
    from msk_jax.data.word2vec import load_word2vec_binary

    classes, videos, order = classification_sets.load_pickle(paths.digits)
    digits = classification_sets.build_classification_set("Digits", classes, videos, load_word2vec_binary(paths.word_vectors),
                                        source=paths.digits,
                                        n_video_tokens=12, num_audio_frames=768, video_dim=32, max_words=4,
                                        split_order=order)
    assert classes[3] == "three" and order == ["seen_voices", "held_out_voice"]
    assert digits.labels.tolist() == list(range(10)) * 2 and {v["language"] for v in videos[10:]} == {"it"}

