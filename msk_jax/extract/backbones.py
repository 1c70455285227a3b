"""The HowTo100M feature extractor's two backbones in Flax, their preprocessing and weight import.

HowTo100M's video features (github.com/antoine77340/video_feature_extractor) concatenate two
2048-d vectors per second of video:

- 2D: torchvision's ImageNet ResNet-152 without its pooling and classifier, averaged over H and W
  (:class:`ResNet152`, frames preprocessed by :func:`preprocess_2d`);
- 3D: Hara et al.'s Kinetics ResNeXt-101 (cardinality 32, shortcut B) on clips of 16 frames of
  112 x 112, average-pooled (:class:`ResNeXt101`, clips preprocessed by :func:`preprocess_3d`,
  frames grouped into clips by :func:`clips_from_frames`).

Layouts: frames NHWC, clips NTHWC (channels last, RGB); both models return (N, 2048) float32.
The extractor saves the rows L2-normalised (:func:`l2_normalize`).

Weights come from the PyTorch state dicts of those models (:func:`load_backbone_weights` reads a
``.pth``, with torch, or an ``.npz`` of the same names; :func:`variables_from_state_dict` converts
a name -> array mapping). Module names follow torch's: ``layer3_5/conv2`` is ``layer3.5.conv2``,
``layer1_0/downsample_0`` is ``layer1.0.downsample.0``; Flax ``kernel``/``scale`` are torch
``weight``, ``batch_stats`` ``mean``/``var`` are ``running_mean``/``running_var``. Nothing is
downloaded: the weight files are the user's.

Precision: the convolutions run at ``jax.lax.Precision.HIGHEST`` by default. The default precision
of some GPUs and TPUs (TF32 or bfloat16 products) moves the normalised features by about 4e-5 and
3e-4, beyond the 1e-5 the reference tolerates; ``dtype=jnp.bfloat16`` is the fast option for
throughput, not for reproducing HowTo100M's features exactly.
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msk_jax import safe_load
from msk_jax.convert import ConversionError

KINDS = ("2d", "3d")
FEATURE_DIM = 2048
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

# The extractor's preprocessing constants (preprocessing.py): 2D on x / 255 with ImageNet's mean
# and std, 3D on raw pixel values with the Kinetics mean; both divide by (std + 1e-8).
MEAN_2D = (0.485, 0.456, 0.406)
STD_2D = (0.229, 0.224, 0.225)
MEAN_3D = (110.6, 103.2, 96.3)
STD_3D = (1.0, 1.0, 1.0)
STD_EPS = 1e-8
CLIP_FRAMES = 16  # frames per 3D clip
CLIP_SIZE = 112   # the 3D model's frame size

# Names of the state dicts that the backbones never apply (the classifiers, BatchNorm counters).
UNUSED_TORCH_NAMES = (r"fc\..*", r".*num_batches_tracked")
MAX_LISTED = 25  # entries listed per kind of problem in an import error

Precision = jax.lax.Precision


# ----------------------------------------------------------------------------- preprocessing


def _normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - mean) / (std + 1e-8) per channel (last axis), every step in float32 as torch does."""
    mean32 = np.asarray(mean, np.float32)
    std32 = np.asarray(std, np.float32) + np.float32(STD_EPS)
    return (x - mean32) / std32


def preprocess_2d(frames: np.ndarray) -> np.ndarray:
    """RGB frames (N, H, W, 3) uint8 -> the 2D model's input (N, H, W, 3) float32: ``x / 255``,
    then ``(x - [0.485, 0.456, 0.406]) / ([0.229, 0.224, 0.225] + 1e-8)``, in float32 in that order
    (the extractor's, which resizes the frames' shorter side to 224 beforehand)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"preprocess_2d: expected RGB frames (N, H, W, 3), got shape {frames.shape}.")
    return _normalize(frames.astype(np.float32) / np.float32(255.0), MEAN_2D, STD_2D)


def preprocess_3d(clips: np.ndarray) -> np.ndarray:
    """RGB clips (N, T, H, W, 3) uint8 (T = 16, H = W = 112 for the extractor) -> the 3D model's
    input (N, T, H, W, 3) float32: ``(x - [110.6, 103.2, 96.3]) / (1 + 1e-8)`` on pixel values
    (no ``/ 255``), in float32."""
    clips = np.asarray(clips)
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"preprocess_3d: expected RGB clips (N, T, H, W, 3), got shape {clips.shape}.")
    return _normalize(clips.astype(np.float32), MEAN_3D, STD_3D)


def clips_from_frames(frames: np.ndarray, clip_frames: int = CLIP_FRAMES) -> np.ndarray:
    """Consecutive frames (F, H, W, 3) -> clips (ceil(F / clip_frames), clip_frames, H, W, 3), the
    last one padded with black (zero) frames as the extractor pads before normalising."""
    frames = np.asarray(frames)
    pad = -frames.shape[0] % clip_frames
    if pad:
        frames = np.concatenate([frames, np.zeros((pad,) + frames.shape[1:], frames.dtype)])
    return frames.reshape((-1, clip_frames) + frames.shape[1:])


def l2_normalize(features, eps: float = 1e-12):
    """Rows divided by max(||row||, eps) (torch's ``F.normalize(x, dim=1)``): what the extractor
    saves. Works on numpy and JAX arrays."""
    xp = jnp if isinstance(features, jax.Array) else np
    norm = xp.sqrt(xp.sum(xp.square(features), axis=-1, keepdims=True))
    return features / xp.maximum(norm, eps)


# ----------------------------------------------------------------------------- models


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (grouped, strided) -> 1x1 residual block, BatchNorm after every conv, with a
    projection shortcut (conv 1x1 with the stride + BatchNorm: ``downsample.0/1``) when asked.
    ``ndim`` 2 (torchvision's ResNet) or 3 (ResNeXt-3D)."""

    inner: int
    out: int
    stride: int = 1
    groups: int = 1
    ndim: int = 2
    downsample: bool = False
    dtype: Any = jnp.float32
    precision: Any = Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        d = self.ndim
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, precision=self.precision)
        norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5, dtype=self.dtype)
        y = nn.relu(norm(name="bn1")(conv(self.inner, (1,) * d, padding=[(0, 0)] * d, name="conv1")(x)))
        y = conv(self.inner, (3,) * d, strides=(self.stride,) * d, padding=[(1, 1)] * d,
                 feature_group_count=self.groups, name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y))
        y = norm(name="bn3")(conv(self.out, (1,) * d, padding=[(0, 0)] * d, name="conv3")(y))
        if self.downsample:
            x = conv(self.out, (1,) * d, strides=(self.stride,) * d, padding=[(0, 0)] * d, name="downsample_0")(x)
            x = norm(name="downsample_1")(x)
        return nn.relu(y + x)


class _ResNet(nn.Module):
    """Stem (conv 7, BatchNorm, ReLU, max-pool 3 stride 2) and four stages of bottlenecks, then the
    mean over every position. Subclasses fix the architecture.

    Fields: ``dtype`` the compute dtype (the variables stay float32; bfloat16 for throughput),
    ``precision`` that of the convolutions (HIGHEST reproduces the reference's float32 features)."""

    dtype: Any = jnp.float32
    precision: Any = Precision.HIGHEST

    # Set by each subclass: the spatial rank, the stem's strides, blocks per stage, the stages'
    # inner and output widths, the groups of the 3x3 convolutions.
    ndim: ClassVar[int]
    stem_strides: ClassVar[tuple]
    blocks: ClassVar[tuple]
    inner: ClassVar[tuple]
    out: ClassVar[tuple]
    groups: ClassVar[int]

    @nn.compact
    def __call__(self, x, return_stages: bool = False):
        """x: (N, H, W, 3) (2D) or (N, T, H, W, 3) (3D), preprocessed. Returns the pooled features
        (N, 2048) float32; with ``return_stages`` also {stage: output} for the stem (after its
        max-pool) and ``layer1``..``layer4``, channels last in the compute dtype."""
        d = self.ndim
        if x.ndim != d + 2 or x.shape[-1] != 3:
            layout = "(N, H, W, 3)" if d == 2 else "(N, T, H, W, 3)"
            raise ValueError(f"{type(self).__name__}: expected input {layout}, got shape {x.shape}.")
        x = nn.Conv(64, (7,) * d, strides=self.stem_strides, padding=[(3, 3)] * d, use_bias=False,
                    dtype=self.dtype, precision=self.precision, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=self.dtype, name="bn1")(x)
        x = nn.max_pool(nn.relu(x), (3,) * d, strides=(2,) * d, padding=[(1, 1)] * d)
        stages = {"stem": x}
        for i, (n, inner, out) in enumerate(zip(self.blocks, self.inner, self.out)):
            for j in range(n):
                x = Bottleneck(inner, out, stride=(2 if i > 0 and j == 0 else 1), groups=self.groups, ndim=d,
                               downsample=j == 0, dtype=self.dtype, precision=self.precision,
                               name=f"layer{i + 1}_{j}")(x)
            stages[f"layer{i + 1}"] = x
        features = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, d + 1)))
        return (features, stages) if return_stages else features


class ResNet152(_ResNet):
    """torchvision's ResNet-152 up to ``layer4`` (``nn.Sequential(*list(model.children())[:-2])``),
    then the mean over H and W: frames (N, H, W, 3) from :func:`preprocess_2d` -> (N, 2048).
    The stride of each stage's first block is on its 3x3 conv (torchvision's ResNet v1.5)."""

    ndim = 2
    stem_strides = (2, 2)
    blocks = (3, 8, 36, 3)
    inner = (64, 128, 256, 512)
    out = (256, 512, 1024, 2048)
    groups = 1


class ResNeXt101(_ResNet):
    """Hara et al.'s 3D ResNeXt-101 (``resnext.resnet101(shortcut_type='B', cardinality=32,
    sample_size=112, sample_duration=16, last_fc=False)``): clips (N, 16, 112, 112, 3) from
    :func:`preprocess_3d` -> (N, 2048). Stem stride (1, 2, 2); stages 2-4 stride 2 in T, H and W;
    the final AvgPool3d (1, 4, 4) covers layer4's whole (1, 4, 4) map, here the mean over every
    position."""

    ndim = 3
    stem_strides = (1, 2, 2)
    blocks = (3, 4, 23, 3)
    inner = (128, 256, 512, 1024)
    out = (256, 512, 1024, 2048)
    groups = 32


def backbone(kind: str, dtype: Any = jnp.float32, precision: Any = Precision.HIGHEST) -> _ResNet:
    """The "2d" (:class:`ResNet152`) or "3d" (:class:`ResNeXt101`) model."""
    if kind not in KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; use '2d' or '3d'.")
    cls = ResNet152 if kind == "2d" else ResNeXt101
    return cls(dtype=jnp.dtype(dtype), precision=precision)


def preprocess(kind: str, pixels: np.ndarray) -> np.ndarray:
    """:func:`preprocess_2d` (frames) or :func:`preprocess_3d` (clips) by kind."""
    return preprocess_2d(pixels) if kind == "2d" else preprocess_3d(pixels)


# ----------------------------------------------------------------------------- weight import


def torch_name(collection: str, path: Sequence[str]) -> str:
    """The torch state-dict name of the Flax leaf ``collection/path`` of either backbone."""
    *modules, leaf = path
    prefix = ".".join(modules).replace("_", ".")
    if collection == "batch_stats":
        return f"{prefix}.{ {'mean': 'running_mean', 'var': 'running_var'}[leaf] }"
    return f"{prefix}.{ {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf] }"


def _to_flax(array: np.ndarray) -> np.ndarray:
    """Conv weights (out, in/groups, *kernel) -> Flax (*kernel, in/groups, out); others unchanged."""
    if array.ndim >= 3:
        return np.transpose(array, tuple(range(2, array.ndim)) + (1, 0))
    return array


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Flax layout -> torch layout (inverse of the import's)."""
    array = np.asarray(array)
    if array.ndim >= 3:
        return np.transpose(array, (array.ndim - 1, array.ndim - 2) + tuple(range(array.ndim - 2)))
    return array


@functools.lru_cache(maxsize=None)
def _template(kind: str):
    """{collection: {path: shape}} of the backbone's variables (shapes only, nothing computed)."""
    model = backbone(kind)
    sample = jnp.zeros((1, 32, 32, 3) if kind == "2d" else (1, 16, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample)
    return {collection: {tuple(p.key for p in path): tuple(leaf.shape)
                         for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
            for collection, tree in shapes.items()}


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def unwrap_state_dict(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict as name -> numpy array: a ``{"state_dict": ...}`` checkpoint (Hara et al.'s
    ResNeXt file) unwrapped, DataParallel's ``module.`` prefixes removed."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return {k.removeprefix("module."): _as_numpy(v) for k, v in state.items()}


def variables_from_state_dict(state: Mapping[str, Any], kind: str) -> dict:
    """Torch weights (name -> array, torch layouts) -> the ``kind`` ("2d"/"3d") backbone's
    variables ``{"params": ..., "batch_stats": ...}`` (float32 numpy arrays).

    Every variable must find its torch name with the matching shape, and every torch name must be
    used or be one the backbone never applies (``fc.*``, ``*.num_batches_tracked``); otherwise
    :class:`~msk_jax.convert.ConversionError` lists every missing, mis-shaped and left-over entry.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; use '2d' or '3d'.")
    state = unwrap_state_dict(state)
    used, missing, mismatched, converted = set(), [], [], {}
    for collection, leaves in _template(kind).items():
        tree: dict = {}
        for path, shape in leaves.items():
            name = torch_name(collection, path)
            where = f"{collection}/{'/'.join(path)}"
            if name not in state:
                missing.append(f"{name} (for {where}, shape {shape})")
                continue
            used.add(name)
            value = _to_flax(state[name])
            if tuple(value.shape) != shape:
                mismatched.append(f"{name}: torch shape {tuple(state[name].shape)} gives {tuple(value.shape)}, "
                                  f"the model expects {shape} ({where})")
                continue
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = np.ascontiguousarray(value, np.float32)
        converted[collection] = tree
    unused = [re.compile(p) for p in UNUSED_TORCH_NAMES]
    leftover = sorted(n for n in state if n not in used and not any(p.fullmatch(n) for p in unused))
    if missing or mismatched or leftover:
        lines = []
        for title, items in (("missing", missing), ("shape mismatch", mismatched), ("left over", leftover)):
            lines += [f"  {title}: {item}" for item in items[:MAX_LISTED]]
            if len(items) > MAX_LISTED:
                lines.append(f"  ... and {len(items) - MAX_LISTED} more {title}")
        model = "ResNet-152 (2d)" if kind == "2d" else "ResNeXt-101 (3d)"
        count = len(missing) + len(mismatched) + len(leftover)
        raise ConversionError(f"The torch state dict does not fit the {model} backbone ({count} problems):\n"
                              + "\n".join(lines))
    return converted


def export_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Backbone variables -> torch names and layouts (the inverse of :func:`variables_from_state_dict`,
    without the unused entries)."""
    state = {}
    for collection, tree in variables.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            state[torch_name(collection, tuple(p.key for p in path))] = to_torch_layout(leaf)
    return state


def load_backbone_weights(path: str, kind: str) -> dict:
    """The ``kind`` ("2d"/"3d") backbone's variables from a weight file: a PyTorch ``.pth``/``.pt``
    (needs torch, read with ``weights_only=True``: torchvision's ``resnet152`` ImageNet file, or
    Hara et al.'s ``resnext-101-kinetics.pth``) or an ``.npz`` of the same torch names (no torch
    needed). See :func:`variables_from_state_dict`."""
    if str(path).endswith(".npz"):
        state = safe_load.load_npz(path)  # sizes and headers checked before anything is inflated
    else:
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise ImportError(f"Reading '{path}' needs PyTorch (pip install torch, the CPU build is enough); "
                              "or save its state dict as an .npz of name -> array and load that.") from err
        state = safe_load.load_torch_checkpoint(path)  # torch >= 2.6, tensors and plain data only
        if not isinstance(state, Mapping):
            raise ConversionError(f"'{path}' holds a {type(state).__name__}, not a state dict.")
    return variables_from_state_dict(state, kind)
