"""Import of original (PyTorch) Multi-SK / EAO weights into msk_jax variables.

The converter works on a mapping torch parameter name -> array (a `state_dict`, or the
`param/` entries of a golden .npz); :func:`load_torch_state_dict` reads a `.pth` file when
PyTorch is installed. Every msk_jax leaf must find its torch name with a matching shape, and
every torch name must be used or be one the original holds but never applies in the forward
pass; anything else raises :class:`ConversionError` listing every problem.

Layout changes: Linear weights (out, in) -> kernels (in, out); Conv2d (out, in, 1, k) ->
Conv kernels (k, in, out); DAVEnet's first conv (C, 1, bins, 1) -> a (bins, C) kernel;
BatchNorm weight/bias/running_mean/running_var -> scale/bias and batch_stats mean/var.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from msk_jax import safe_load
from msk_jax.loss import ObjectiveConfig
from msk_jax.model import MODALITIES

# The original's consistency cost divides the similarities by 0.1 in its code, not in a config.
ORIGINAL_CONSISTENCY_TEMPERATURE = 0.1

# Names the original holds but never uses in the forward pass (or duplicates).
UNUSED_TORCH_NAMES = [
    r".*num_batches_tracked",
    r"davenet\.batchnorm1\..*",                 # input BatchNorm, never applied
    r"fusion(_text|_video|_audio)?\.norm\..*",  # final LayerNorm, never applied
    r"fusion_(video|audio)\.masking_token",    # only the first transformer's token is used
    r"(trans_)?cluster_(text|video|audio)\.anc_dist",
    r"(trans_)?cluster_(text|video|audio)\.anc_linear\.bias",
    r"fusion\..*",                              # the same module as fusion_text
]


class ConversionError(ValueError):
    """A state dict that does not fit the msk_jax model."""


def _module_to_torch(path: tuple[str, ...]) -> str:
    """msk_jax module path -> torch module prefix."""
    first, rest = path[0], list(path[1:])
    for m in MODALITIES:
        if first == f"{m}_norm":
            first = f"{m}_norm_layer"
        elif first == f"{m}_transformer":
            first = f"fusion_{m}"
    parts = [first]
    for p in rest:
        if p == "gate":
            parts += ["cg", "fc"]
        elif p == "downsample_conv":
            parts.append("downsample.0")
        elif p == "downsample_bn":
            parts.append("downsample.1")
        elif re.fullmatch(r"block_\d+", p):
            parts.append("blocks." + p.split("_")[1])
        elif re.fullmatch(r"layer\d+_\d+", p):
            parts.append(p.replace("_", "."))
        else:
            parts.append(p)
    return ".".join(parts)


def torch_name(collection: str, path: tuple[str, ...]) -> str:
    """The torch state-dict name of the msk_jax leaf `collection/path`."""
    *module, leaf = path
    if collection == "params" and not module:
        if leaf == "masking_token":
            return "fusion_text.masking_token"
        space, m = re.fullmatch(r"(input|joint)_anchors_(\w+)", leaf).groups()
        return f"{'trans_' if space == 'joint' else ''}cluster_{m}.anc_linear.weight"
    prefix = _module_to_torch(tuple(module))
    if collection == "batch_stats":
        return f"{prefix}.{ {'mean': 'running_mean', 'var': 'running_var'}[leaf] }"
    return f"{prefix}.{ {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf] }"


def _to_msk(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout -> msk_jax layout for a leaf of the given msk_jax shape."""
    if name == "davenet.conv1.weight":  # (C, 1, bins, 1) -> (bins, C)
        return array.reshape(array.shape[0], -1).T if array.ndim == 4 else array
    if name.endswith(".weight") and array.ndim == 4:  # conv (out, in, 1, k) -> (k, in, out)
        return array[:, :, 0, :].transpose(2, 1, 0)
    if name.endswith(".weight") and array.ndim == 2 and "anc_linear" not in name:  # Linear
        return array.T
    return array


def to_torch_layout(name: str, array: np.ndarray) -> np.ndarray:
    """msk_jax layout -> torch layout for the leaf whose torch name is `name` (inverse of import)."""
    array = np.asarray(array)
    if name == "davenet.conv1.weight":  # (bins, C) -> (C, 1, bins, 1)
        return array.T[:, None, :, None]
    if name.endswith(".weight") and array.ndim == 3:  # conv (k, in, out) -> (out, in, 1, k)
        return array.transpose(2, 1, 0)[:, :, None, :]
    if name.endswith(".weight") and array.ndim == 2 and "anc_linear" not in name:
        return array.T
    return array


def export_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """msk_jax variables -> torch names and layouts (the used parameters and BatchNorm statistics)."""
    state = {}
    for collection, tree in variables.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = torch_name(collection, tuple(p.key for p in path))
            state[name] = to_torch_layout(name, leaf)
    return state


def convert_state_dict(state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict:
    """Converts torch weights into msk_jax variables shaped like `template`
    ({'params': ..., 'batch_stats': ...}, e.g. from `jax.eval_shape(model.init, ...)`)."""
    state = {k: np.asarray(v) for k, v in state_dict.items()}
    if "fusion.masking_token" in state and "fusion_text.masking_token" not in state:
        state["fusion_text.masking_token"] = state["fusion.masking_token"]
    used, missing, mismatched = set(), [], []
    converted = {}
    for collection, tree in template.items():
        flat = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = tuple(p.key for p in path)
            name = torch_name(collection, keys)
            if name not in state:
                missing.append(f"{name} (for {collection}/{'/'.join(keys)}, shape {tuple(leaf.shape)})")
                continue
            used.add(name)
            value = _to_msk(name, state[name], tuple(leaf.shape))
            if tuple(value.shape) != tuple(leaf.shape):
                mismatched.append(f"{name}: torch shape {tuple(state[name].shape)} gives "
                                  f"{tuple(value.shape)}, the model expects {tuple(leaf.shape)} "
                                  f"({collection}/{'/'.join(keys)})")
                continue
            flat[keys] = value.astype(leaf.dtype)
        converted[collection] = _unflatten(flat)
    unused = [re.compile(p) for p in UNUSED_TORCH_NAMES]
    leftover = sorted(n for n in state if n not in used and not any(p.fullmatch(n) for p in unused))
    if missing or mismatched or leftover:
        lines = []
        for title, items in (("missing", missing), ("shape mismatch", mismatched), ("left over", leftover)):
            lines += [f"  {title}: {item}" for item in items]
        raise ConversionError("The torch state dict does not fit the msk_jax model:\n" + "\n".join(lines))
    _check_duplicate_fusion(state)
    return converted


def _check_duplicate_fusion(state: Mapping[str, np.ndarray]) -> None:
    """`fusion.*` and `fusion_text.*` are one module in the original; they must agree."""
    for name, value in state.items():
        if name.startswith("fusion.") and not name.endswith("num_batches_tracked"):
            twin = "fusion_text." + name[len("fusion."):]
            if twin in state and not np.array_equal(value, state[twin]):
                raise ConversionError(f"{name} differs from {twin}; the original shares one module.")


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for keys, value in flat.items():
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return tree


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint (.pth) into name -> array; needs torch (an optional extra).
    Accepts a bare state dict or a dict holding one under 'state_dict' (the original's format);
    a 'module.' prefix from DataParallel is removed."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"Reading '{path}' needs PyTorch: pip install torch (CPU build is enough), "
                          "or pass a name -> array mapping to convert_state_dict.") from err

    checkpoint = safe_load.load_torch_checkpoint(path)  # tensors and plain data only, never code
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in state.items()}


def model_config_from_original(config: Mapping[str, Any]) -> dict:
    """MultiSKModel fields from the original's model arguments (TransformerPerModalityModel2)."""
    fusion = config["fusion_params"]
    davenet = config.get("davenet", {})
    anchors = tuple(fusion.get(k, 64) for k in ("anc_len_txt", "anc_len_vid", "anc_len_aud"))
    for key, expected in (("token_projection", "gated"), ("projection", "gated"),
                          ("use_positional_emb", False), ("davenet_v2", True),
                          ("strategy_audio_pooling", "none")):
        if config.get(key, expected) != expected:
            raise ConversionError(f"original config {key}={config[key]!r} is not supported (expected {expected!r}).")
    if fusion.get("use_cls_token", False):
        raise ConversionError("original config fusion_params.use_cls_token=True is not supported.")
    return dict(
        video_dim=config["video_embed_dim"], text_dim=config["text_embed_dim"],
        audio_feat_dim=davenet.get("feat_dim", 40),
        davenet_layers=tuple(davenet.get("layers", (2, 2, 1, 1, 1, 1))),
        davenet_widths=tuple(davenet.get("layer_widths", (128, 128, 256, 512, 1024, 2048, 4096))),
        davenet_kernel=davenet.get("convsize", 9),
        embed_dim=fusion["embed_dim"], num_heads=fusion["num_heads"],
        mlp_ratio=fusion.get("mlp_ratio", 4.0), depth=fusion.get("depth", 1),
        projection_dim=config.get("projection_dim", 6144),
        num_anchors=anchors[0] if len(set(anchors)) == 1 else anchors)


def objective_config_from_original(config: Mapping[str, Any]):
    """ObjectiveConfig from the original's training configuration (loss, sk_params, fusion_params)."""
    loss, sk, fusion = config["loss"], config["sk_params"], config["fusion_params"]
    return ObjectiveConfig(
        consistency=True, consistency_temperature=ORIGINAL_CONSISTENCY_TEMPERATURE,
        contrastive_scale=loss.get("alpha_closs", 1.0), consistency_scale=sk.get("beta_loss", 1.0),
        pair_weights=(("tv", loss["tv_weight"]), ("ta", loss["ta_weight"]), ("va", loss["va_weight"])),
        contrastive_temperature=loss.get("temperature", 0.05),
        consistency_weights=tuple(sorted((k, v) for k, v in fusion.items() if k.startswith("c_loss_"))),
        queue_len=config["queue_len"], sinkhorn_eps=sk["eps"], sinkhorn_iters=sk["niters"],
        required_fraction=sk["required_properties"], sinkhorn_problems_at_once=None)
