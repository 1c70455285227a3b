"""Device mesh and sharding rules.

The mesh comes from the config as named axes, e.g. `[("data", -1), ("model", 1)]` (-1: all
remaining devices, across every host). The batch is split over the `data` axis (and `fsdp`, if
present). Parameters follow rules kept as data: a list of (regex over the leaf path, partition
spec), the first match wins; leaves that match no rule, or whose dimensions do not divide the
mesh axes, are replicated. The same rules apply to the parameters' optimiser moments and EMA,
whose paths end with the parameter's path.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# Tensor-parallel rules for the `model` axis: split the output features of the large kernels.
MODEL_PARALLEL_RULES = (
    (r".*_proj/(fc|gate)/kernel$", (None, "model")),
    (r".*_transformer/block_\d+/(attn/qkv|mlp/fc1)/kernel$", (None, "model")),
    (r".*_transformer/block_\d+/(attn/proj|mlp/fc2)/kernel$", ("model", None)),
)
# Fully sharded data parallel: split the first dimension of every large matrix over `fsdp`, and
# the input channels of the DAVEnet convolutions' (width, in, out) kernels (at the paper's widths
# they are a third of the parameters: replicated, they and their moments took 5 GiB per device).
FSDP_RULES = ((r".*(kernel|anchors_\w+)$", ("fsdp", None)), (r".*kernel$", (None, "fsdp", None)))


def create_mesh(axes: Sequence[Sequence[Any]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with named axes [(name, size)], one size may be -1 (the rest of the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names = [str(a[0]) for a in axes]
    sizes = [int(a[1]) for a in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {list(axes)}: at most one axis may have size -1.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {list(axes)}: {len(devices)} devices are not divisible by {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {list(axes)} needs {int(np.prod(sizes))} devices, {len(devices)} are available.")
    return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes if axes else None))


def _path(keys) -> str:
    parts = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            spec = tuple(spec)
            if len(spec) != len(shape):
                continue
            fits = all(axis is None or (axis in mesh.axis_names and dim % mesh.shape[axis] == 0)
                       for axis, dim in zip(spec, shape))
            return P(*spec) if fits else P()
    return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Sequence]] = ()) -> Any:
    """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs) from the rules."""
    def leaf_sharding(keys, leaf):
        return NamedSharding(mesh, _spec_for(_path(keys), tuple(np.shape(leaf)), mesh, rules))

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def rules_for(mesh: Mesh, extra: Sequence[tuple[str, Sequence]] = ()) -> list:
    """Config rules first, then the built-in model-parallel and FSDP rules for axes in the mesh."""
    rules = list(extra)
    if "model" in mesh.axis_names and mesh.shape["model"] > 1:
        rules += MODEL_PARALLEL_RULES
    if "fsdp" in mesh.axis_names and mesh.shape["fsdp"] > 1:
        rules += FSDP_RULES
    return rules


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_host(tree: Any) -> Any:
    """Fetches replicated arrays to numpy, also on multi-process runs (where a global array is
    not fully addressable: this process's first copy is read)."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree_util.tree_map(fetch, tree)
