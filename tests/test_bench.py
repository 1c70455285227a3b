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
