"""backbones.npz: the feature extractor's 2D ResNet-152 and 3D ResNeXt-101 (msk_jax.extract.backbones)
on the golden's frames, with weights rebuilt from the golden's recipe.

The golden file stores no weights: each state-dict entry is a function of the seed and the entry's
name and shape only (recipe version 1, :func:`recipe_state_dict`). The check rebuilds them from the
stored names and shapes, imports them with ``variables_from_state_dict``, preprocesses the stored
uint8 frames and clips, and runs each model once at full float32 precision, returning the
preprocessed inputs, the pooled and L2-normalised features and the per-stage channel means and
shapes.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Iterable

import numpy as np

from msk_jax.extract import backbones
from msk_jax.extract.backbones import l2_normalize
from msk_jax.parity.golden import GoldenInputs, Output

RECIPE_VERSION = 1

# Tolerances of the golden README: preprocessing absolute; normalised features absolute; raw
# features and debug channel means absolute at this fraction of the expected array's largest |value|.
PREPROCESS_ATOL = {"2d": 1e-6, "3d": 2e-5}
NORMALIZED_ATOL = 1e-5
RELATIVE_TO_MAX = 1e-4


def recipe_array(seed: int, key: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """The golden weight of state-dict entry `key` (recipe version 1): drawn from
    ``default_rng([seed, crc32(key)])`` by the entry's role, float arrays rounded to float32."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if key.endswith("num_batches_tracked"):
        return np.zeros(shape, np.int64)
    if key in ("fc.weight", "fc.bias"):
        value = rng.normal(0.0, 0.01, shape)
    elif key.endswith(".running_mean"):
        value = rng.normal(0.0, 0.1, shape)
    elif key.endswith(".running_var"):
        value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith(".weight") and len(shape) in (4, 5):
        std = math.sqrt(2.0 / math.prod(shape[1:]))
        if kind == "3d" and key == "conv1.weight":
            std /= 64
        value = rng.normal(0.0, std, shape)
    elif key.endswith(".weight") and len(shape) == 1:
        value = np.full(shape, 0.2 if re.fullmatch(r"layer\d+\.\d+\.bn3\.weight", key) else 1.0)
    elif key.endswith(".bias"):
        value = rng.normal(0.0, 0.05, shape)
    else:
        raise ValueError(f"backbones recipe: no rule for state-dict entry '{key}' of shape {shape}.")
    return np.asarray(value).astype(np.float32)


def recipe_state_dict(keys: Iterable[str], shapes: np.ndarray, seed: int, kind: str) -> dict[str, np.ndarray]:
    """The golden state dict: `keys` in order, `shapes` (K, 5) padded with -1 (a row of -1 is a scalar)."""
    return {str(k): recipe_array(int(seed), str(k), tuple(int(d) for d in row if d >= 0), kind)
            for k, row in zip(keys, np.asarray(shapes))}


def forward(kind: str, variables: dict, x: np.ndarray):
    """(features (N, 2048), {stage: output}) of the `kind` backbone at float32 and HIGHEST precision,
    jitted once."""
    import jax


    model = backbones.backbone(kind)
    apply = jax.jit(lambda v, x: model.apply(v, x, return_stages=True))
    features, stages = apply(variables, x)
    return np.asarray(features), {name: np.asarray(value) for name, value in stages.items()}


def check_backbones(inputs: GoldenInputs) -> Iterable[Output]:
    if int(inputs["recipe_version"]) != RECIPE_VERSION:
        raise ValueError(f"backbones.npz: recipe version {int(inputs['recipe_version'])} is not "
                         f"{RECIPE_VERSION}, the one implemented here.")
    seed = int(inputs["seed"])
    for kind in backbones.KINDS:
        pixels = inputs[f"frames_{kind}"]
        x = backbones.preprocess(kind, pixels)
        # Golden inputs are channels-first (NCHW / NCTHW).
        yield Output(f"input_{kind}", np.moveaxis(x, -1, 1), atol=PREPROCESS_ATOL[kind])
        state = recipe_state_dict(inputs[f"state_dict_keys_{kind}"], inputs[f"state_dict_shapes_{kind}"], seed, kind)
        variables = backbones.variables_from_state_dict(state, kind)
        features, stages = forward(kind, variables, x)
        yield from _outputs(kind, features, stages)


def _outputs(kind: str, features: np.ndarray, stages: dict) -> Iterable[Output]:
    features = features.astype(np.float64)
    yield Output(f"features_{kind}", features, max_rtol=RELATIVE_TO_MAX)
    yield Output(f"features_{kind}_normalized", l2_normalize(features), atol=NORMALIZED_ATOL)
    for name, value in stages.items():
        value = value.astype(np.float64)
        means = value.mean(axis=tuple(range(1, value.ndim - 1)))  # over every position (channels last)
        yield Output(f"debug_{kind}_{name}_channel_mean", means, max_rtol=RELATIVE_TO_MAX)
        shape = (value.shape[0], value.shape[-1]) + value.shape[1:-1]  # channels first, as torch's
        yield Output(f"debug_{kind}_{name}_shape", np.asarray(shape, np.int64), atol=0.0)
