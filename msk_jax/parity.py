"""Parity checker: recomputes the original implementation's golden outputs with msk_jax.

    python -m msk_jax.parity GOLDEN_DIR [--json OUT]

For every known golden file present in GOLDEN_DIR, the outputs are recomputed from the file's
*inputs only* (each checker sees the file through a view that refuses output keys), compared
with the expected outputs under the tolerances of the golden README, and reported as one line
per file. Exits non-zero if any file fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Callable, Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Output:
    """One recomputed output, compared with the golden key of the same name."""

    key: str
    value: np.ndarray
    atol: float | None = None  # pass if max |got - expected| <= atol
    rtol: float | None = None  # pass if max |got - expected| / |expected| <= rtol


class GoldenInputs:
    """Read-only view of a golden .npz that only serves input keys."""

    def __init__(self, npz, is_input: Callable[[str], bool], name: str, features_dtype: str = "float32"):
        self._npz, self._is_input, self._name = npz, is_input, name
        self._features_dtype = features_dtype

    def __getitem__(self, key: str) -> np.ndarray:
        if not self._is_input(key):
            raise KeyError(f"{self._name}: '{key}' is an expected output, not an input.")
        if key not in self._npz.files:
            raise KeyError(f"{self._name}: missing input '{key}'.")
        value = self._npz[key]
        if self._features_dtype != "float32" and re.fullmatch(r"(step\d+/)?input/(video|audio)", key):
            from msk_jax.data.feature_store import numpy_dtype  # features as a store of that dtype holds them
            value = value.astype(numpy_dtype(self._features_dtype)).astype(value.dtype)
        return value

    def keys(self) -> list[str]:
        return [k for k in self._npz.files if self._is_input(k)]


def _matches(*patterns: str) -> Callable[[str], bool]:
    compiled = [re.compile(p) for p in patterns]
    return lambda key: any(p.fullmatch(key) for p in compiled)


# --- multisk.npz -------------------------------------------------------------------------------

def _check_multisk(inputs: GoldenInputs) -> Iterable[Output]:
    import jax.numpy as jnp

    from msk_jax import convert, loss, sinkhorn

    for i in range(int(inputs["n_cases"])):
        scores = inputs[f"case{i}_scores"]
        eps, niters, fraction, required = inputs[f"case{i}_params"]
        settings = dict(eps=float(eps), num_iters=int(niters), required_fraction=float(fraction))
        if sinkhorn.num_required_slots(scores.shape[1], settings["required_fraction"]) != int(required):
            raise ValueError(f"multisk.npz case {i}: R={int(required)} disagrees with "
                             f"int(K * fraction) for K={scores.shape[1]}, fraction={fraction}.")
        target = sinkhorn.multi_sinkhorn(scores, **settings).target
        tensor = sinkhorn.multi_sinkhorn_assignment(scores, **settings)
        cost = loss.consistency_cost(jnp.asarray(inputs[f"case{i}_cost_input"]), target,
                                     convert.ORIGINAL_CONSISTENCY_TEMPERATURE)
        yield Output(f"case{i}_multi_sinkhorn", np.asarray(tensor), atol=1e-4)
        yield Output(f"case{i}_calculate_sk", np.asarray(target), atol=1e-4)
        yield Output(f"case{i}_cost", np.asarray(cost), rtol=1e-5)


# --- retrieval.npz -----------------------------------------------------------------------------

def _check_retrieval(inputs: GoldenInputs) -> Iterable[Output]:
    from msk_jax import retrieval

    for i in range(int(inputs["n_cases"])):
        complete = int(inputs[f"case{i}_complete"])
        metrics = retrieval.retrieval_metrics(inputs[f"case{i}_sims"], complete if complete >= 0 else None)
        for name in retrieval.METRIC_NAMES:
            yield Output(f"case{i}_{name}", np.asarray(metrics[name]), atol=1e-6)


# --- model_forward.npz and train_steps.npz ----------------------------------------------------

def _prefixed(inputs: GoldenInputs, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: inputs[k] for k in inputs.keys() if k.startswith(prefix)}


def _golden_model(inputs: GoldenInputs, sample_batch: dict):
    """The original config, the msk_jax model it describes and the converted golden weights."""
    import functools

    import jax

    from msk_jax import convert
    from msk_jax.model import MultiSKModel

    config = json.loads(str(inputs["config_json"]))
    model = MultiSKModel(**convert.model_config_from_original(config))
    template = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), sample_batch)
    variables = convert.convert_state_dict(_prefixed(inputs, "param/"), template)
    return config, model, variables


def _check_model_forward(inputs: GoldenInputs) -> Iterable[Output]:
    import jax

    batch = _prefixed(inputs, "input/")
    _, model, variables = _golden_model(inputs, batch)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    outputs = {"eval": apply(variables, batch, train=False),
               "train": apply(variables, batch, train=True, mutable=("batch_stats",))[0]}
    for mode, out in outputs.items():
        for name, value in out.original_names().items():
            yield Output(f"{mode}/{name}", np.asarray(value), atol=1e-4)


# Golden info names -> msk_jax metric names.
_TRAIN_INFO = {"tv": "tv", "ta": "ta", "va": "va", "Retrieval": "contrastive", "anc_loss": "consistency",
               **{f"loss_pair_{i}_{j}": f"loss_pair_{i}_{j}" for i in range(1, 7) for j in range(1, 4)}}


def _check_train_steps(inputs: GoldenInputs) -> Iterable[Output]:
    import jax
    import jax.numpy as jnp

    from msk_jax import convert, train_step
    from msk_jax.queues import QUEUE_NAMES, FeatureQueues

    steps = sorted({int(m.group(1)) for k in inputs.keys() if (m := re.match(r"step(\d+)/input/", k))})
    config, model, variables = _golden_model(inputs, _prefixed(inputs, "step0/input/"))
    objective = convert.objective_config_from_original(config)
    # The golden runs start with full queues (consistency on) unless the config says otherwise.
    fill = int(config.get("queue_size", objective.queue_len))
    queues = FeatureQueues(features={n: jnp.asarray(inputs[f"queue/{n}_queue"]) for n in QUEUE_NAMES},
                           fill=jnp.asarray(fill, jnp.int32))
    opt = config["optimizer"]
    if opt.get("type", "adam") != "adam":
        raise ValueError(f"train_steps.npz: optimizer {opt['type']!r} is not supported.")
    tx = train_step.adam(opt["lr"], opt.get("b1", 0.9), opt.get("b2", 0.999), opt.get("eps", 1e-8),
                         opt.get("weight_decay", 0.0))
    state = train_step.create_train_state(jax.random.PRNGKey(0), model, objective, tx,
                                          _prefixed(inputs, "step0/input/"), variables=variables, queues=queues)
    step_fn = jax.jit(train_step.train_step)
    for s in steps:
        state, metrics = step_fn(state, _prefixed(inputs, f"step{s}/input/"))
        yield Output(f"step{s}/loss", np.asarray(metrics["loss"]), rtol=1e-4)
        for golden_name, name in _TRAIN_INFO.items():
            yield Output(f"step{s}/info/{golden_name}", np.asarray(metrics[name]), rtol=1e-4)
    for name, value in convert.export_state_dict({"params": state.params}).items():
        yield Output(f"final/{name}", value, atol=1e-4)
    for name in QUEUE_NAMES:
        yield Output(f"final_queue/{name}_queue", np.asarray(state.queues.features[name]), atol=1e-4)


@dataclasses.dataclass(frozen=True)
class GoldenFile:
    is_input: Callable[[str], bool]
    check: Callable[[GoldenInputs], Iterable[Output]] | None  # None: not yet supported
    # Expected outputs reported by the original for information only (not compared).
    informational: Callable[[str], bool] = lambda key: False


GOLDEN_FILES = {
    "multisk.npz": GoldenFile(_matches("n_cases", r"case\d+_(scores|params|cost_input)"), _check_multisk),
    "retrieval.npz": GoldenFile(_matches("n_cases", r"case\d+_(sims|complete)"), _check_retrieval),
    "model_forward.npz": GoldenFile(_matches("config_json", r"param/.*", r"input/.*"), _check_model_forward),
    "train_steps.npz": GoldenFile(
        _matches("config_json", r"param/.*", r"queue/.*", r"step\d+/input/.*"), _check_train_steps,
        # BatchNorm statistics and parameters the original never uses in its forward pass.
        informational=_matches(r"final/.*(running_mean|running_var|num_batches_tracked)",
                               r"final/davenet\.batchnorm1\..*", r"final/fusion(_text|_video|_audio)?\..*norm\..*",
                               r"final/fusion_(video|audio)\.masking_token", r"final/fusion\..*",
                               r"final/(trans_)?cluster_\w+\.(anc_dist|anc_linear\.bias)")),
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


def check_file(path: str, features_dtype: str = "float32") -> dict:
    """Checks one golden file; returns {'max_abs_err', 'max_rel_err', 'pass', ...}.
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
                  "failures": []}
        computed = {out.key for out in outputs}
        for key in npz.files:
            if not spec.is_input(key) and not spec.informational(key) and key not in computed:
                result["pass"] = False
                result["failures"].append(f"{key}: expected output not computed")
        for out in outputs:
            abs_err, rel_err = _errors(out.value, npz[out.key])
            result["max_abs_err"] = max(result["max_abs_err"], abs_err)
            result["max_rel_err"] = max(result["max_rel_err"], rel_err)
            ok = ((out.atol is None or abs_err <= out.atol) and (out.rtol is None or rel_err <= out.rtol))
            if not ok:
                result["pass"] = False
                result["failures"].append(
                    f"{out.key}: abs {abs_err:.3g} rel {rel_err:.3g} "
                    f"(tolerance {'abs %g' % out.atol if out.atol is not None else 'rel %g' % out.rtol})")
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
    line = (f"{name:<20} max_abs_err {result['max_abs_err']:.3e}  max_rel_err {result['max_rel_err']:.3e}"
            f"  {verdict}  ({result['outputs']} outputs)")
    for failure in result["failures"][:10]:
        line += f"\n    {failure}"
    return line


def run(golden_dir: str, json_out: str | None = None, features_dtype: str = "float32") -> int:
    """Checks every golden file of `golden_dir`, prints one line each (and writes `json_out`);
    returns the exit status: 0 all pass, 1 a failure, 2 no such folder."""
    try:
        results = check_dir(golden_dir, features_dtype)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    for name, result in results.items():
        print(format_line(name, result), flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if any(r["pass"] is False for r in results.values()) else 0


def main(argv):
    from absl import app

    if len(argv) != 2:
        raise app.UsageError("usage: python -m msk_jax.parity GOLDEN_DIR [--json=OUT] [--features_dtype=float16]")
    sys.exit(run(argv[1], FLAGS.json, FLAGS.features_dtype))


if __name__ == "__main__":
    from absl import app, flags

    FLAGS = flags.FLAGS
    flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")
    flags.DEFINE_enum("features_dtype", "float32", ["float32", "float16", "bfloat16"],
                      "Round the video and audio inputs to this dtype first (a feature store's dtype): measures "
                      "its effect against the tolerances.")
    app.run(main)
