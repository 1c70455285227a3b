"""Parity with the original implementation through the checker, and the checker's own honesty."""

import json
import os

import numpy as np
import pytest

from msk_jax import parity


@pytest.mark.slow
def test_golden_parity(golden_dir, tmp_path, capsys):
    out = tmp_path / "parity.json"
    code = parity.run(golden_dir, str(out))
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert code == 0, printed
    for name in ("multisk.npz", "retrieval.npz", "model_forward.npz", "train_steps.npz", "backbones.npz"):
        assert results[name]["pass"] is True, printed
        assert results[name]["max_abs_err"] <= 1e-4
        assert f"{name}" in printed and "PASS" in printed


def _copy_with(golden_dir, tmp_path, name, change):
    data = dict(np.load(os.path.join(golden_dir, name)))
    change(data)
    target = tmp_path / "golden"
    target.mkdir(exist_ok=True)
    np.savez(target / name, **data)
    return str(target)


def test_checker_fails_on_a_wrong_expected_output(golden_dir, tmp_path, capsys):
    def perturb(data):
        data["case1_calculate_sk"] = data["case1_calculate_sk"] + np.float32(1e-3)

    folder = _copy_with(golden_dir, tmp_path, "multisk.npz", perturb)
    assert parity.run(folder) == 1
    assert "FAIL" in capsys.readouterr().out


def test_checker_uses_inputs_not_expected_outputs(golden_dir, tmp_path):
    """Changing an input changes the recomputed result; outputs are never served to checkers."""
    def perturb(data):
        data["case0_R1"] = np.float64(-1.0)  # an expected output

    folder = _copy_with(golden_dir, tmp_path, "retrieval.npz", perturb)
    result = parity.check_dir(folder)["retrieval.npz"]
    assert result["pass"] is False and result["max_abs_err"] == pytest.approx(3.0)

    with np.load(os.path.join(golden_dir, "retrieval.npz")) as npz:
        view = parity.GoldenInputs(npz, parity.GOLDEN_FILES["retrieval.npz"].is_input, "retrieval.npz")
        assert view["case0_sims"].shape[0] > 0
        with pytest.raises(KeyError, match="expected output"):
            view["case0_R1"]


def test_an_expected_output_left_uncomputed_fails(golden_dir, tmp_path):
    def add(data):
        data["case0_R100"] = np.float64(100.0)

    folder = _copy_with(golden_dir, tmp_path, "retrieval.npz", add)
    result = parity.check_dir(folder)["retrieval.npz"]
    assert result["pass"] is False
    assert any("case0_R100" in f and "not computed" in f for f in result["failures"])


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert parity.run(str(tmp_path / "nowhere")) == 2
    assert "does not exist" in capsys.readouterr().err
