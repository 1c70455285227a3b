"""The benchmark runs end to end on a tiny shape and reports what BENCHMARKS.md quotes."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from msk_jax import bench
from msk_jax.bench import accelerator, bucket, loop, pipeline, plan, sk, step
from msk_jax.data import synthetic
from msk_jax.model import MultiSKModel
from tests.conftest import REPO_ROOT, TINY_MODEL
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
    config = _bench_config()
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
    done = subprocess.run([sys.executable, "-m", "msk_jax.bench", "accelerator"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--out=DIR" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_step_and_pipeline_benchmarks_report_their_figures(tiny_corpus):
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


def test_bucket_benchmark_reports_requests_bytes_and_cpu_per_video(tmp_path):
    """The store read from the test server, per layout, gap and client: requests and read/used
    per video as the server counts them, the clients' CPU per request, the pipeline's figures."""
    paths = synthetic.write_synthetic_howto100m(str(tmp_path / "npz"), 6, seconds=120, dim_2d=16, dim_3d=16,
                                                progress=False)
    b = bucket.run_bucket(paper_clip_settings(), paths, str(tmp_path), (0,), videos=6, videos_per_batch=3, batches=1,
                          workers=(1,), seconds=120, dim=16, variants=("time_blocks_tensorstore",), client_requests=20)
    reads = b["reads"]
    for row in reads.values():
        assert row["requests_per_video"] == row["server_requests_per_video"] > 0 and row["read_per_used"] > 0
    # Time blocks: a clip is one range; wider gaps, fewer requests and more bytes; kinds: three windows a clip.
    requests = {name: row["requests_per_video"] for name, row in reads.items()}
    assert requests["time blocks, 0 gap"] < requests["kinds, 64 KiB gap"] + 3
    assert requests["time blocks, 2 MiB gap"] <= requests["time blocks, 256 KiB gap"] < requests["time blocks, 0 gap"] <= 10
    assert reads["time blocks, 0 gap"]["read_per_used"] < reads["time blocks, 2 MiB gap"]["read_per_used"]
    assert reads["kinds, one window at a time"]["requests_per_video"] == 30  # 10 clips x 3 windows
    assert set(b["clients"]) == {"fsspec", "tensorstore"}
    assert all(row["cpu_ms_per_request"]["100"] > 0 for row in b["clients"].values())
    assert set(b["page_cache"]) == {"time_blocks"} and set(b["0"]) == {"time_blocks_tensorstore"}
    row = b["0"]["time_blocks_tensorstore"]["1"]
    assert row["videos_per_second"] > 0 and row["worker_cpu_ms_per_video"] > 0 and row["of_page_cache"] > 0
    assert b["summary"]["requests_per_video"] == reads["time blocks, 1152 KiB gap"]["requests_per_video"]
    table = bucket.format_bucket(b)
    assert "time blocks, 1152 KiB gap, TensorStore" in table and "requests per video" in table
    json.dumps(b)


def test_plan_prints_the_request_rates_the_input_asks_of_a_bucket(tmp_path):
    """From the compiled rows of an earlier plan (no compilation): requests/s and bytes/s per host
    and per pod against a bucket's starting rate, and the paper run's requests."""
    rows = {"v4-8/fsdp": {"target": "v4-8", "mesh": {"fsdp": 4}, "remat": "none", "clips_per_device": 540,
                          "peak_bytes": 27 * 2**30, "memory_gib": 32, "fits": True, "headroom": 0.15,
                          "argument_bytes": 4 * 2**30, "temp_bytes": 23 * 2**30, "flops_per_step": 144e12,
                          "step_seconds_at_40pct_mfu": 0.33, "videos_per_second_needed_per_host": 650, "hosts": 1}}
    budget = plan.request_budget(rows, {"time_blocks": (4.0, 5e6), "kinds": (22.0, 3e6)}, pod_hosts=(1, 4),
                                 paper_videos=1e6, epochs=10)
    blocks = budget["rows"]["v4-8/fsdp"]["layouts"]["time_blocks"]
    assert blocks["requests_per_second_per_host"] == 2600 and blocks["bytes_per_second_per_host"] == 650 * 5e6
    assert blocks["pods"]["1"]["ramp_minutes"] == 0  # under the bucket's 5,000 reads/s
    assert blocks["pods"]["4"]["requests_per_second"] == 10400
    assert blocks["pods"]["4"]["ramp_minutes"] == pytest.approx(20 * math.log2(10400 / 5000))
    paper = budget["paper_run"]["kinds"]
    assert paper["requests"] == 22 * 1e7 and paper["dollars"] == pytest.approx(88)
    table = plan.format_budget(budget)
    assert "v4-8/fsdp" in table and "10,400" in table and "paper run (10.0 M video reads), kinds: 220 M" in table
    # The command reads the rows of an earlier `--json` and prints the budget.
    (tmp_path / "plan.json").write_text(json.dumps(rows))
    config = _bench_config()
    config.plan.from_json = str(tmp_path / "plan.json")
    results = plan.cli(config)
    assert results["request_budget"]["rows"]["v4-8/fsdp"]["videos_per_second_per_host"] == 650
    config.plan.from_json = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="config.plan.from_json="):
        plan.cli(config)


def _bench_config():
    spec = importlib.util.spec_from_file_location("bench_config", bench.CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("cpu_bench")


@pytest.mark.slow
def test_accelerator_command_in_small_mode(tmp_path):
    """The accelerator command's parts at tiny widths on the CPU: the fed and unfed step, bf16
    against float32 from one state, the evaluation's embedding rate, written as JSON and a table
    after each part; parts past the time budget are skipped and say so."""
    out = tmp_path / "out"
    r = accelerator.run_accelerator(str(out), small=True, corpus_dir=str(tmp_path / "corpus"),
                                    parts=("step", "dtypes", "evaluation"))
    step = r["parts"]["step"]
    assert step["fed_step_seconds"] > 0 and step["bare_step_seconds"] > 0 and step["input_wait_seconds"] >= 0
    assert step["flops_per_step"] > 0 and step["clips_per_step"] == 20 and step["dtype"] == "bfloat16"
    dtypes = r["parts"]["dtypes"]
    assert len(dtypes["losses"]["bfloat16"]) == len(dtypes["losses"]["float32"]) == 3
    assert 0 < dtypes["max_relative_difference_float32"] < 0.05  # the same state: close, not equal
    assert r["parts"]["evaluation"]["clips_per_second"] > 0 and r["parts"]["evaluation"]["clips"] == 8
    saved = json.loads((out / "accelerator.json").read_text())
    assert set(saved["parts"]) == {"step", "dtypes", "evaluation"} and saved["small"]
    table = (out / "accelerator.md").read_text()
    assert "| step | fed by 1 workers (batch tasks, local store) |" in table
    assert "| dtypes | largest difference |" in table
    assert "| demo | wall time | not run |" in table
    late = accelerator.run_accelerator(str(tmp_path / "late"), small=True, budget_seconds=0,
                                       parts=("extractor", "demo"))
    assert late["parts"]["demo"]["skipped"].startswith("out of time")
    assert "| extractor | bf16 backbones | out of time (0 s budget spent) |" in accelerator.format_accelerator(late)


@pytest.mark.slow
def test_loop_benchmark_times_the_loop_and_the_bare_step():
    r = loop.run_loop(MultiSKModel(**dict(TINY_MODEL, video_dim=4096, text_dim=300)), paper_objective(), clips=20,
                       queue_len=40, steps=2,
                       repeats=1, log_every=2)
    assert r["bare_step_seconds"] > 0 and r["loop_step_seconds"] > 0 and r["synchronous_loop_step_seconds"] > 0
    assert "asynchronous" in loop.format_loop(r)
