"""The readers of third-party files under mutation fuzzing (tests/fuzz_readers.py): caption pickles,
feature npz files (stored and compressed), evaluation pickles, a feature store's index, word2vec
headers and video containers each give a result or a one-line error naming the file, within a
memory bound, for every mutated input tried in a few seconds each."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, run_env

pytest.importorskip("av")


@pytest.mark.slow
def test_mutated_inputs_give_a_result_or_one_line_naming_the_file(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tests.fuzz_readers", str(tmp_path / "fuzz"), "--seconds", "1"],
                          cwd=REPO_ROOT, env=run_env(MSK_JAX_CACHE_DIR=str(tmp_path / "cache")),
                          capture_output=True, text=True, timeout=240)
    report = re.findall(r"^(\w+): (\d+) inputs, (\d+) read, (\d+) one-line errors, (\d+) violations$", done.stdout,
                        re.MULTILINE)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    kinds = {kind: (int(inputs), int(errors)) for kind, inputs, _, errors, _ in report}
    assert set(kinds) == {"caption", "npz", "npz_compressed", "eval", "word2vec", "store", "video"}, done.stdout
    for kind, (inputs, errors) in kinds.items():
        assert inputs >= 10 and errors >= 1, (kind, done.stdout)
