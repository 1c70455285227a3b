"""The benchmark runs end to end on a tiny shape and reports what BENCHMARKS.md quotes."""

import json

import pytest

from msk_jax import bench
from msk_jax.bench import loop, pipeline, sk, step
from tests.conftest import REPO_ROOT
from tests.paper_config import paper_clip_settings, paper_objective


def test_run_sk_tiny():
    results = sk.run_sk(48, 8, 3, eps=0.07, num_iters=3, required_fraction=0.5, problems_at_once=2,
                           at_once_sweep=(1,), repeats=1, batch_rows=16, baseline=False)
    for key in ("sk_seconds_per_problem", "sk_seconds_per_step", "sk_peak_mb", "at_once_1_seconds_per_step",
                "dense_seconds_per_problem", "copy_gbps", "sk_gbps"):
        assert results[key] > 0, key
    assert results["max_abs_diff_vs_sk"]["dense"] < 1e-4  # the same targets
    table = sk.format_sk(results)
    assert "Multi-SK solver" in table and "1 problems at once" in table and "2 at once" in table
    json.dumps(results)


def test_commands_take_their_shapes_from_configs_bench():
    import importlib.util
    import os
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("bench_config", bench.CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("cpu_bench")
    assert set(bench.BENCHMARKS) <= set(config) and config.model.num_anchors == config.sk.k == 64
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        bench.run("nope", config)
    env = dict(os.environ, MSK_JAX_TCMALLOC="0")
    done = subprocess.run([sys.executable, "-m", "msk_jax.bench", "nope"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "unknown benchmark 'nope'" in done.stderr
    done = subprocess.run([sys.executable, "-m", "msk_jax.bench", "sk", "--config.sk.n=not_a_number"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "config.sk.n" in done.stderr


@pytest.mark.slow
def test_step_and_pipeline_benchmarks_report_their_figures(tiny_corpus):
    from tests.conftest import TINY_MODEL

    from msk_jax.model import MultiSKModel

    model = MultiSKModel(**dict(TINY_MODEL, video_dim=4096, text_dim=300))
    s = step.run_step(model, paper_objective(), clips=8, queue_len=16, repeats=1)
    assert s["step_seconds"] > 0 and s["clips_per_second"] == 8 / s["step_seconds"]
    assert 0 < s["matmul_peak_flops_per_second"] and s["step_flops"] > s["step_without_multisk_flops"]
    p = pipeline.run_pipeline(paper_clip_settings(), tiny_corpus, size="tiny", videos_per_batch=2, batches=2,
                                  workers=(1,), feature_dim=16)
    assert p["clips_per_second"] > 0 and p["clips_per_batch"] == 20


def test_pipeline_at_howto100m_layout_reports_old_and_new_paths(tmp_path):
    r = pipeline.run_pipeline_howto100m(paper_clip_settings(), str(tmp_path), videos=12, videos_per_batch=4, batches=1, seconds=200, dim=16)
    for name in ("old", "store_threads", "store_slots", "new"):
        assert set(r[name]["workers"]) == {"1", "2"} and r[name]["videos_per_second"] > 0
        assert r[name]["scaling_1_to_2"] > 0
        for row in r[name]["workers"].values():
            assert row["main_ms_per_video"] > 0 and row["videos_per_second_ceiling"] == 1e3 / row["main_ms_per_video"]
            assert row["cpu_ms_per_video"] == pytest.approx(row["main_ms_per_video"] + row["worker_ms_per_video"])
    assert r["old"]["read_per_used"] > r["new"]["read_per_used"] > 0  # whole files against windows
    assert r["store_threads"]["workers"]["1"]["worker_ms_per_video"] == 0  # threads: this process's time
    assert r["new"]["workers"]["1"]["worker_ms_per_video"] > 0
    assert r["videos_per_second"] == r["new"]["videos_per_second"] and r["cpu_ms_per_video"] > 0
    assert r["main_ms_per_video"] == r["new"]["main_ms_per_video"] and r["videos_per_second_ceiling"] > 0
    table = pipeline.format_pipeline_howto100m(r)
    assert "store, processes, slots" in table and "store, processes, batches" in table and "main ms/video" in table
    json.dumps(r)


@pytest.mark.slow
def test_loop_benchmark_times_the_loop_and_the_bare_step():
    from tests.conftest import TINY_MODEL

    from msk_jax.model import MultiSKModel

    r = loop.run_loop(MultiSKModel(**dict(TINY_MODEL, video_dim=4096, text_dim=300)), paper_objective(), clips=20,
                       queue_len=40, steps=2,
                       repeats=1, log_every=2)
    assert r["bare_step_seconds"] > 0 and r["loop_step_seconds"] > 0 and r["synchronous_loop_step_seconds"] > 0
    assert "asynchronous" in loop.format_loop(r)
