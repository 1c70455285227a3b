"""Zero-shot evaluation: directions, duplicates, the binary, and trained vs untrained on the demo."""

import json
import os

import jax
import numpy as np
import pytest

from msk_jax import evaluate, evaluation, input_pipeline, train
from msk_jax.model import MultiSKModel
from tests.train_fixtures import load_config


def test_average_by_id_groups_duplicates():
    ids = ["b", "a", "b", "c"]
    emb = {"text": np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 1.0]])}
    unique, averaged = evaluation.average_by_id(ids, emb)
    assert unique == ["a", "b", "c"]
    np.testing.assert_allclose(averaged["text"], [[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    same_ids, same = evaluation.average_by_id(["x", "y"], {"text": emb["text"][:2]})
    assert same_ids == ["x", "y"] and same["text"] is not None


def test_every_direction_and_fused_embeddings():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 8))
    emb = {"text": base, "video": base + 0.01 * rng.normal(size=base.shape), "audio": rng.normal(size=base.shape)}
    results = evaluation.retrieval_results(emb, complete_dataset_size=40)
    assert list(results) == list(evaluation.DIRECTIONS)
    assert results["t2v"]["R1"] == pytest.approx(100 * 30 / 40)   # missing items count as misses
    assert results["t2a"]["R1"] < 50
    fused = evaluation.direction_embeddings(emb)["v+a"]
    v = emb["video"] / np.linalg.norm(emb["video"], axis=1, keepdims=True)
    a = emb["audio"] / np.linalg.norm(emb["audio"], axis=1, keepdims=True)
    np.testing.assert_allclose(fused, (v + a) / 2)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """A 40-video demo corpus, trained briefly: (config, workdir)."""
    from msk_jax.data.demo_corpus import build_demo_corpus

    corpus = str(tmp_path_factory.mktemp("small_demo"))
    build_demo_corpus(corpus, size="small", feature_dim=32, progress=False)
    config = load_config("demo")
    config.data.demo_dir, config.data.demo_size = corpus, "small"
    config.data.dim_2d = config.data.dim_3d = 32
    config.model.video_dim = 64
    config.num_train_steps = 150
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    workdir = str(tmp_path_factory.mktemp("small_run"))
    # 150 real steps: here full XLA optimisation pays for its longer compile.
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        results = train.train_and_evaluate(config, workdir)
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
    return config, workdir, results


def test_trained_scores_far_above_untrained(small_demo):
    config, workdir, trained = small_demo
    paths = input_pipeline.data_paths(config, training=False)
    words = input_pipeline.load_words(config, paths)
    evals = input_pipeline.build_eval_sets(config, paths, words)
    model = MultiSKModel.from_config(config)
    batch = {k: v[:2] for k, v in input_pipeline.sample_batch(config, words.dim).items()}
    untrained = evaluation.evaluate(model, model.init(jax.random.PRNGKey(1), batch), evals, config.eval_batch_size)
    for direction in ("t2v", "v2t"):
        before, after = untrained["MSRVTT"][direction], trained["MSRVTT"][direction]
        assert after["R10"] >= 3 * max(before["R10"], 10.0 / 3), (direction, before, after)
        assert after["MedR"] < 0.6 * before["MedR"], (direction, before, after)


def test_binary_reproduces_the_training_evaluation(small_demo, tmp_path):
    config, workdir, trained = small_demo
    results = evaluate.run(config, workdir, None, weights="ema", output_dir=str(tmp_path))
    assert results[150]["MSRVTT"]["t2v"] == trained["MSRVTT"]["t2v"]
    with open(tmp_path / "eval" / "step_150.json") as f:
        saved = json.load(f)
    assert set(saved) == {"MSRVTT", "YouCook2"} and set(saved["YouCook2"]["t+v2a"]) >= {"R1", "MedR", "MeanR"}
    online = evaluate.run(config, os.path.join(workdir, "checkpoints", "150"), None, weights="online",
                          output_dir=str(tmp_path / "online"))
    assert online[150]["MSRVTT"]["t2v"] != trained["MSRVTT"]["t2v"]  # EMA and online weights differ


def test_pytorch_weights_through_the_converter(small_demo, tmp_path):
    """The checkpoint's online weights, exported under the original's torch names, evaluate the same."""
    from msk_jax import convert

    config, workdir, _ = small_demo
    paths = input_pipeline.data_paths(config, training=False)
    words = input_pipeline.load_words(config, paths)
    model = MultiSKModel.from_config(config)
    template = evaluate.model_template(model, config, words.dim)
    variables, step = evaluate.load_msk_checkpoint(os.path.join(workdir, "checkpoints"), None, template, "online")
    torch_state = convert.export_state_dict(variables)
    assert "fusion_text.blocks.0.attn.qkv.weight" in torch_state
    np.savez(tmp_path / "weights.npz", **{f"param/{k}": v for k, v in torch_state.items()})
    from_torch = evaluate.run(config, None, str(tmp_path / "weights.npz"), output_dir=str(tmp_path / "torch"))
    online = evaluate.run(config, workdir, None, weights="online", output_dir=str(tmp_path / "online"))
    assert from_torch[0]["MSRVTT"] == online[step]["MSRVTT"]


def test_watch_evaluates_each_checkpoint_once(small_demo, tmp_path):
    config, workdir, _ = small_demo
    results = evaluate.run(config, workdir, None, output_dir=str(tmp_path), watch=True, poll_seconds=0.01,
                           idle_timeout=0.5)
    assert list(results) == [150]  # the run's last step: the watcher stops there
    again = evaluate.run(config, workdir, None, output_dir=str(tmp_path), watch=True, poll_seconds=0.01,
                         idle_timeout=0.2)
    assert again == {}  # already evaluated


def test_bad_checkpoints_give_clear_errors(small_demo, tmp_path):
    config, workdir, _ = small_demo
    with pytest.raises(evaluate.CheckpointError, match="does not exist"):
        evaluate.run(config, str(tmp_path / "nowhere"), None)
    with pytest.raises(evaluate.CheckpointError, match="no checkpoint"):
        os.makedirs(tmp_path / "empty" / "checkpoints")
        evaluate.run(config, str(tmp_path / "empty"), None)
    narrow = config.copy_and_resolve_references()
    narrow.model.embed_dim = 64
    with pytest.raises(evaluate.CheckpointError, match=r"does not fit the configured model"):
        evaluate.run(narrow, workdir, None, output_dir=str(tmp_path))
    with pytest.raises(evaluate.CheckpointError, match="exactly one"):
        evaluate.run(config, workdir, "weights.pth")
    no_eval = config.copy_and_resolve_references()
    with pytest.raises(Exception, match="empty evaluation set|no entry"):
        empty = tmp_path / "empty.pkl"
        import pickle
        pickle.dump([], open(empty, "wb"))
        no_eval.data.source = "files"
        no_eval.data.word_vectors = input_pipeline.data_paths(config, training=False).word_vectors
        no_eval.data.msrvtt = str(empty)
        evaluate.run(no_eval, workdir, None, output_dir=str(tmp_path))
