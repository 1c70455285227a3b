"""Two processes on localhost (4 CPU devices each, gloo collectives) train like one with 8."""

import os
import socket
import subprocess

import numpy as np

from msk_jax import metric_writers
from tests.conftest import REPO_ROOT
from tests.test_train import _main, _losses


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_eight_devices(tiny_corpus, tmp_path):
    steps = 4
    cache = str(tmp_path / "jax_cache")

    def env(devices):
        return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                    JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_COMPILATION_CACHE_DIR=cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")

    single = str(tmp_path / "single")
    result = subprocess.run(_main(single, tiny_corpus, steps), cwd=REPO_ROOT, env=env(8), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    multi = str(tmp_path / "multi")
    port = _free_port()
    processes = [subprocess.Popen(
        _main(multi, tiny_corpus, steps) + [f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                            f"--process_id={i}", "--cpu_collectives=gloo"],
        cwd=REPO_ROOT, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]

    want, got = _losses(single), _losses(multi)
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5)
    # Only process 0 writes logs and evaluation files.
    rows = [r for r in metric_writers.read_jsonl(os.path.join(multi, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert "evaluation written" in outputs[0][0] and "evaluation written" not in outputs[1][0]
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["3", "4"]
    assert "mesh {'data': 8, 'model': 1}" in outputs[0][0]
