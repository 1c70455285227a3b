"""The experiment runner: grid x seeds, one folder per run, finished runs skipped, the summary."""

import json

import numpy as np
import pytest

from msk_jax import experiments
from msk_jax.experiments import compare
from tests.train_fixtures import load_config, tiny_config


def test_grid_parsing_and_overrides():
    grid = experiments.parse_grid(["objective.consistency_scale=0,0.1", "model.num_anchors=8,16"])
    assert grid == {"objective.consistency_scale": [0, 0.1], "model.num_anchors": [8, 16]}
    assert len(experiments.settings(grid)) == 4
    config = experiments.apply_overrides(load_config("demo"), {"objective.consistency_scale": 0}, seed=2)
    assert config.objective.consistency_scale == 0.0 and isinstance(config.objective.consistency_scale, float)
    assert config.seed == 2
    with pytest.raises(ValueError, match="no 'consistency_scal'"):
        experiments.apply_overrides(load_config("demo"), {"objective.consistency_scal": 1}, seed=0)
    with pytest.raises(ValueError, match="model.num_anchors"):
        experiments.apply_overrides(load_config("demo"), {"model.num_anchors": 0.5}, seed=0)
    with pytest.raises(ValueError, match="FIELD=V1"):
        experiments.parse_grid(["objective.consistency_scale"])


def test_interval_is_the_t_interval():
    mean, sd, half = experiments.interval([50.0, 55.0, 60.0])
    assert (mean, sd) == (55.0, 5.0)
    assert half == pytest.approx(4.303 * 5.0 / np.sqrt(3), rel=1e-3)  # t(0.975, 2 dof) = 4.303


def test_runs_are_resumable_and_summarised(tmp_path):
    calls = []

    def fake_train(config, workdir):  # R@10 depends on the setting and the seed
        calls.append(workdir)
        r10 = 50 + 10 * config.objective.consistency_scale + config.seed
        return {"MSRVTT": {"t2v": {"R1": 1.0, "R5": 2.0, "R10": r10}}}

    grid = {"objective.consistency_scale": [0, 1]}
    runs = experiments.run_grid(load_config("demo"), str(tmp_path), grid, [0, 1, 2], train_fn=fake_train)
    assert len(runs) == len(calls) == 6 and len(set(calls)) == 6
    again = experiments.run_grid(load_config("demo"), str(tmp_path), grid, [0, 1, 2], train_fn=fake_train)
    assert len(calls) == 6 and again == runs  # every run finished: nothing retrained
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["runs"][3] == {"overrides": {"objective.consistency_scale": 1}, "seed": 0,
                                          "metrics": {"MSRVTT": {"t2v": {"R1": 1.0, "R5": 2.0, "R10": 60}}}}
    table = (tmp_path / "summary.md").read_text()
    assert "| objective.consistency_scale=1 | 3 | MSRVTT | t2v |" in table and "61.0 (1.0)" in table
    # The wide table: R@10 mean (sd) and the 95 % half-width (t(0.975, 2) x 1 / sqrt(3) = 2.5).
    assert "| objective.consistency_scale=1 | 3 | 61.0 (1.0) ±2.5 |" in table


def _run(overrides, seed, in_domain, out_of_domain):
    return {"overrides": overrides, "seed": seed,
            "metrics": {"MSRVTT": {"t2v": {"R1": 0.0, "R5": 0.0, "R10": in_domain}},
                        "YouCook2": {"t2v": {"R1": 0.0, "R5": 0.0, "R10": out_of_domain}}}}


def test_paired_differences_and_the_comparison(tmp_path):
    """Settings against a baseline seed by seed: the differences, their t interval, whether it
    excludes zero; and the command that merges two grids' summaries and plots a series."""
    base = {"objective.consistency_scale": 0}
    runs = [_run(base, s, 70 + 5 * s, 60 + 5 * s) for s in range(3)]  # large seed-to-seed spread
    good = {"objective.consistency_cost": "sigmoid", "objective.consistency_scale": 0.1}
    runs += [_run(good, s, 70 + 5 * s + d, 60 + 5 * s - 1) for s, d in zip(range(3), (2.0, 3.0, 4.0))]
    paired = experiments.paired_differences(runs, base, "MSRVTT", "t2v")
    (d,) = paired.values()
    assert d["seeds"] == [0, 1, 2] and d["differences"] == [2.0, 3.0, 4.0] and d["mean"] == 3.0
    assert d["low"] == pytest.approx(3 - 4.303 / np.sqrt(3), rel=1e-3) and d["low"] > 0  # above zero
    # The means' intervals overlap (seed spread 5), the paired one does not: that is the point.
    assert experiments.interval([r["metrics"]["MSRVTT"]["t2v"]["R10"] for r in runs[:3]])[2] > 2
    table = experiments.summarise_paired(runs, base, ["t2v"])
    assert "| +2.0, +3.0, +4.0 | +3.0 [+0.5, +5.5] | above 0 |" in table
    assert "| -1.0, -1.0, -1.0 | -1.0 [-1.0, -1.0] | below 0 |" in table  # no spread: a zero-width interval
    with pytest.raises(ValueError, match="baseline"):
        experiments.paired_differences(runs[3:], base, "MSRVTT", "t2v")

    (tmp_path / "a.json").write_text(json.dumps({"runs": runs[3:]}))
    (tmp_path / "b.json").write_text(json.dumps({"runs": runs[:3]}))
    paths = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    text = compare.compare_files(paths, "objective.consistency_scale=0", ["t2v"], field="objective.consistency_scale",
                                 series="objective.consistency_cost", plot=str(tmp_path / "plot.png"),
                                 out=str(tmp_path / "merged"))
    assert "above 0" in text
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "merged.json").read_text())["runs"]) == 6
    with pytest.raises(ValueError, match="no run has the baseline's overrides"):
        compare.compare_files(paths, "objective.consistency_scale=3")


@pytest.mark.slow
def test_a_real_run_on_the_tiny_corpus_with_its_analysis(tiny_corpus, tmp_path):
    config = tiny_config(tiny_corpus, num_train_steps=3, checkpoint_every_steps=2)
    runs = experiments.run_grid(config, str(tmp_path), {"objective.consistency_scale": [0.5]}, [0],
                                analyse_fn=experiments.analyse)
    run = runs[0]
    folder = tmp_path / "consistency_scale=0.5_seed=0"
    with open(folder / "results.json") as f:
        assert json.load(f) == run
    # The run's metrics are the evaluation its training wrote, of every set and direction.
    with open(folder / "eval" / "step_3.json") as f:
        assert run["metrics"] == json.load(f)
    assert set(run["metrics"]) == {"MSRVTT", "YouCook2"} and len(run["metrics"]["YouCook2"]) == 12
    # Anchor semantics: both evaluation sets, three modalities x two spaces, NMI in [0, 1].
    assert set(run["anchors"]) == {"MSRVTT", "YouCook2"}
    rows = run["anchors"]["MSRVTT"]
    assert set(rows) == {f"{m}/{s}" for m in ("text", "video", "audio") for s in ("input", "joint")}
    assert all(0 <= r[k] <= 1 for r in rows.values() for k in ("nmi_first", "nmi_present", "random_nmi_first"))
    assert all(1 <= r["anchors_used"] <= 4 for r in rows.values())  # tiny_config: 4 anchors
    # Diagnostics at the last step, 3 (the queues of 16 rows are full after two steps of 8 clips).
    d = run["diagnostics"]
    assert d["step"] == 3 and d["steps_in_queue"] == 2.0
    assert d["contrastive_grad_encoders"] > 0 and d["consistency_grad_encoders"] > 0
    assert d["consistency_to_contrastive_encoders"] == pytest.approx(
        0.5 * d["consistency_grad_encoders"] / d["contrastive_grad_encoders"])
    assert -1 <= d["encoder_grad_cosine"] <= 1 and 0 < d["target_entropy"] <= 1
    assert 1 <= d["anchors_per_clip"] <= 4  # Multi-SK: about R = K/2 anchors per clip
    assert d["consistency_value"] > d["consistency_floor"] > 0  # (the original cost: log 2 per entry below 0.5)
    # The end-of-training losses, from metrics.jsonl (steps 1-3 are logged; the consistency loss
    # is on at step 3 only, after the warm-up).
    t = run["training"]
    assert t["steps"] == [1, 3] and t["contrastive"] > 0 and t["consistency_unscaled"] > 0
    # The joint embeddings' geometry per evaluation set and modality.
    g = run["geometry"]["YouCook2"]
    assert 1 <= g["video_effective_rank"] <= 24 and -1 <= g["text_mean_cosine"] <= 1  # tiny_config: 24-d
    summary = (tmp_path / "summary.md").read_text()
    assert "learned anchors / random anchors" in summary and "video eff. rank (mean cos)" in summary


def test_effective_rank_counts_the_directions_used():
    from msk_jax.experiments.consistency_diagnostics import effective_rank, embedding_geometry

    rng = np.random.default_rng(0)
    assert effective_rank(rng.normal(size=(400, 3)) @ np.eye(3, 8)) == pytest.approx(3, abs=0.2)
    assert effective_rank(rng.normal(size=(400, 8))) == pytest.approx(8, abs=0.5)
    same = embedding_geometry({"video": np.tile(rng.normal(size=(1, 5)), (10, 1))})
    assert same["video_mean_cosine"] == pytest.approx(1.0)


def test_plot_draws_the_sweep_and_the_baseline_band(tmp_path):
    runs = [{"overrides": {"objective.consistency_scale": v}, "seed": s,
             "metrics": {d: {t: {"R10": 50 + v + s} for t in ("t2v", "t2v+a")} for d in ("MSRVTT", "YouCook2")}}
            for v in (0, 0.1, 1) for s in (0, 1, 2)]
    assert experiments.plot_field({"seed_like": ["a", "b"], "objective.consistency_scale": [0, 0.1, 1]}) == \
        "objective.consistency_scale"
    experiments.plot(runs, "objective.consistency_scale", str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
