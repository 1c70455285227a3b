"""The checker: which golden files it knows (and which of their keys are inputs), the comparison
of the recomputed outputs with the expected ones, and the report."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, Iterable

import numpy as np

from msk_jax.parity.backbones import check_backbones
from msk_jax.parity.golden import GoldenInputs, Output, matches
from msk_jax.parity.model import check_model_forward, check_train_steps
from msk_jax.parity.multisk import check_multisk
from msk_jax.parity.retrieval import check_retrieval


@dataclasses.dataclass(frozen=True)
class GoldenFile:
    is_input: Callable[[str], bool]
    check: Callable[[GoldenInputs], Iterable[Output]] | None  # None: not yet supported
    # Expected outputs reported by the original for information only (not compared).
    informational: Callable[[str], bool] = lambda key: False


GOLDEN_FILES = {
    "multisk.npz": GoldenFile(matches("n_cases", r"case\d+_(scores|params|cost_input)"), check_multisk),
    "retrieval.npz": GoldenFile(matches("n_cases", r"case\d+_(sims|complete)"), check_retrieval),
    "model_forward.npz": GoldenFile(matches("config_json", r"param/.*", r"input/.*"), check_model_forward),
    "train_steps.npz": GoldenFile(
        matches("config_json", r"param/.*", r"queue/.*", r"step\d+/input/.*"), check_train_steps,
        # BatchNorm statistics and parameters the original never uses in its forward pass.
        informational=matches(r"final/.*(running_mean|running_var|num_batches_tracked)",
                              r"final/davenet\.batchnorm1\..*", r"final/fusion(_text|_video|_audio)?\..*norm\..*",
                              r"final/fusion_(video|audio)\.masking_token", r"final/fusion\..*",
                              r"final/(trans_)?cluster_\w+\.(anc_dist|anc_linear\.bias)")),
    "backbones.npz": GoldenFile(
        matches("seed", "recipe_version", r"\w+_version", "extractor_commit", r"state_dict_(keys|shapes)_[23]d",
                r"frames_[23]d"), check_backbones,
        # The original's own float32 deviations from its float64 replay.
        informational=matches(r"float32_max_(abs|rel)_error_.*")),
}


REL_ERR_FLOOR = 1e-6
"""Relative errors divide by max(|expected|, this), so exact zeros do not report infinities."""


def _errors(got: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max absolute error, max relative error) of got against expected."""
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        raise ValueError(f"shape {got.shape} != expected {expected.shape}")
    if got.size == 0:
        return 0.0, 0.0
    diff = np.abs(got - expected)
    if not np.all(np.isfinite(got)):
        return float("inf"), float("inf")
    rel = diff / np.maximum(np.abs(expected), REL_ERR_FLOOR)
    return float(diff.max()), float(rel.max())


def _bounds(out: Output, abs_err: float, rel_err: float, scale: float) -> list[tuple[str, float]]:
    """(tolerance, the error of `out` it bounds) for each tolerance of `out`."""
    bounds = []
    if out.atol is not None:
        bounds.append((f"abs <= {out.atol:g}", abs_err))
    if out.rtol is not None:
        bounds.append((f"rel <= {out.rtol:g}", rel_err))
    if out.max_rtol is not None:
        relative = abs_err / scale if scale else (0.0 if abs_err == 0 else float("inf"))
        bounds.append((f"abs/max|expected| <= {out.max_rtol:g}", relative))
    return bounds or [("no tolerance", 0.0)]


def check_file(path: str, features_dtype: str = "float32") -> dict:
    """Checks one golden file; returns {'max_abs_err', 'max_rel_err', 'pass', 'tolerances', ...}
    ('tolerances': {tolerance: {'outputs': how many it bounds, 'worst': their largest error
    in its terms}}: what each output passed or failed under).
    `features_dtype`: round the video and audio inputs to it first (a float16/bfloat16 feature
    store's effect on the outputs)."""
    name = os.path.basename(path)
    spec = GOLDEN_FILES[name]
    if spec.check is None:
        return {"pass": None, "status": "not yet supported"}
    with np.load(path, allow_pickle=False) as npz:
        inputs = GoldenInputs(npz, spec.is_input, name, features_dtype)
        outputs = list(spec.check(inputs))  # computed from inputs only
        result = {"max_abs_err": 0.0, "max_rel_err": 0.0, "pass": True, "outputs": len(outputs),
                  "tolerances": {}, "failures": []}
        computed = {out.key for out in outputs}
        for key in npz.files:
            if not spec.is_input(key) and not spec.informational(key) and key not in computed:
                result["pass"] = False
                result["failures"].append(f"{key}: expected output not computed")
        for out in outputs:
            abs_err, rel_err = _errors(out.value, npz[out.key])
            result["max_abs_err"] = max(result["max_abs_err"], abs_err)
            result["max_rel_err"] = max(result["max_rel_err"], rel_err)
            scale = float(np.abs(np.asarray(npz[out.key], np.float64)).max(initial=0.0))
            for tolerance, err in _bounds(out, abs_err, rel_err, scale):
                bound = result["tolerances"].setdefault(tolerance, {"outputs": 0, "worst": 0.0})
                bound["outputs"] += 1
                bound["worst"] = max(bound["worst"], err)
            ok = ((out.atol is None or abs_err <= out.atol) and (out.rtol is None or rel_err <= out.rtol)
                  and (out.max_rtol is None or abs_err <= out.max_rtol * scale))
            if not ok:
                tolerance = ("abs %g" % out.atol if out.atol is not None else "rel %g" % out.rtol
                             if out.rtol is not None else "abs %g x max|expected| %g" % (out.max_rtol, scale))
                result["pass"] = False
                result["failures"].append(f"{out.key}: abs {abs_err:.3g} rel {rel_err:.3g} (tolerance {tolerance})")
    return result


def check_dir(golden_dir: str, features_dtype: str = "float32") -> dict[str, dict]:
    """Checks every known golden file present in golden_dir."""
    if not os.path.isdir(golden_dir):
        raise FileNotFoundError(f"parity: golden folder '{golden_dir}' does not exist.")
    present = [n for n in GOLDEN_FILES if os.path.exists(os.path.join(golden_dir, n))]
    if not present:
        raise FileNotFoundError(f"parity: no golden file ({', '.join(GOLDEN_FILES)}) in '{golden_dir}'.")
    return {n: check_file(os.path.join(golden_dir, n), features_dtype) for n in present}


def format_line(name: str, result: dict) -> str:
    if result["pass"] is None:
        return f"{name:<20} {result['status']}"
    verdict = "PASS" if result["pass"] else "FAIL"
    # Each output is compared under its own tolerance: the line says which, how many outputs
    # each bounds and their worst error in its terms (a file's largest relative error alone
    # says nothing when the output it comes from is held to an absolute tolerance).
    under = "; ".join(f"{tolerance}: {bound['outputs']} output{'s' * (bound['outputs'] != 1)}, worst "
                      f"{bound['worst']:.2e}" for tolerance, bound in result.get("tolerances", {}).items())
    line = f"{name:<20} {verdict}  {result['outputs']} outputs  ({under})"
    for failure in result["failures"][:10]:
        line += f"\n    {failure}"
    return line


def run(golden_dir: str, json_out: str | None = None, features_dtype: str = "float32") -> int:
    """Checks every golden file of `golden_dir`, prints one line each (and writes `json_out`);
    returns the exit status: 0 all pass, 1 a failure, 2 no such folder."""
    try:
        results = check_dir(golden_dir, features_dtype)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, result in results.items():
        print(format_line(name, result), flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if any(r["pass"] is False for r in results.values()) else 0
