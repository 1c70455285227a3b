"""The benchmark runs end to end on a tiny shape and reports what BENCHMARKS.md quotes."""

import json

import pytest

from msk_jax import bench


def test_run_sk_tiny():
    results = bench.run_sk(n=48, k=8, problems=2, num_iters=3, repeats=1, batch_rows=16,
                           baseline=False, stacked=False)
    for key in ("sk_seconds_per_problem", "sk_seconds_per_step", "sk_peak_mb",
                "dense_seconds_per_problem", "copy_gbps", "sk_gbps"):
        assert results[key] > 0, key
    assert results["max_abs_diff_vs_sk"]["dense"] < 1e-4  # the same targets
    assert "Multi-SK solver" in bench.format_sk(results)
    json.dumps(results)


def test_cli_has_the_subcommands(capsys):
    for command in ("sk", "all"):
        with pytest.raises(SystemExit) as exit_info:
            bench.main([command, "--help"])
        assert exit_info.value.code == 0
    assert "--json" in capsys.readouterr().out


def test_step_and_pipeline_benchmarks_report_their_figures(tiny_corpus):
    from tests.conftest import TINY_MODEL

    step = bench.run_step(clips=8, queue_len=16, repeats=1,
                          model_fields=dict(TINY_MODEL, video_dim=4096, text_dim=300))
    assert step["step_seconds"] > 0 and step["clips_per_second"] == 8 / step["step_seconds"]
    assert 0 < step["matmul_peak_flops_per_second"] and step["step_flops"] > step["step_without_multisk_flops"]
    pipeline = bench.run_pipeline(tiny_corpus, size="tiny", videos_per_batch=2, batches=2, workers=(1,),
                                  feature_dim=16)
    assert pipeline["clips_per_second"] > 0 and pipeline["clips_per_batch"] == 20
