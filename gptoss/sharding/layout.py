"""A model's layout on a device mesh: mesh + resolved rules, and everything that places or constrains arrays.

`Layout.create(mesh, cfg)` validates before any weight is read; `layout.place(array, path)` is the loader's
hook (each device receives only its slice, via `jax.make_array_from_callback`). A model on a mesh holds its
layout (`GptOss.layout`, a static part of the model): its MoE layers then run under `shard_map`
(`layout.moe`) and `generate`'s KV cache is laid out to match.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptoss.config import ModelConfig
from gptoss.quant import MXFP4Array
from gptoss.sharding.rules import (
    ACTIVATION_AXES,
    CACHE_AXES,
    MESH_AXES,
    PARAM_AXES,
    Rules,
    ShardingError,
    param_spec_for,
    resolve,
    spec_for,
)

DEFAULT_AXES = ("data", "expert", "tensor")


def mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    if isinstance(mesh, Mesh):
        return dict(mesh.shape)
    if not isinstance(mesh, Mapping):
        raise ShardingError(f"mesh must be a jax.sharding.Mesh or a mapping like {{'expert': 8}}, got {mesh!r}")
    return {str(k): v for k, v in mesh.items()}


def make_mesh(mesh: Mesh | Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with axes ("data", "expert", "tensor") (+ "fsdp" when asked) and Auto axis types.

    `mesh` is a dict of axis sizes (missing axes are 1; at most one may be -1 = "the remaining devices"), or a
    Mesh, which is re-typed to Auto axes (the model relies on GSPMD propagation). Uses all (global) devices.
    """
    if isinstance(mesh, Mesh):
        if any(t != AxisType.Auto for t in mesh.axis_types):
            mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        bad = [a for a in mesh.axis_names if a not in MESH_AXES]
        if bad:
            raise ShardingError(f"mesh axis {bad[0]!r} is not one of {MESH_AXES}")
        return mesh
    sizes = mesh_sizes(mesh or {})
    bad = [a for a in sizes if a not in MESH_AXES]
    if bad:
        raise ShardingError(f"unknown mesh axis {bad[0]!r}; mesh axes are named {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    names = [a for a in MESH_AXES if a in DEFAULT_AXES or a in sizes]
    shape = [sizes.get(a, 1) for a in names]
    if shape.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got {sizes}")
    if -1 in shape:
        rest = math.prod(n for n in shape if n != -1)
        if rest < 1 or len(devices) % rest:
            raise ShardingError(f"mesh {sizes}: {len(devices)} devices cannot fill the -1 axis")
        shape[shape.index(-1)] = len(devices) // rest
    if any(not isinstance(n, int) or n < 1 for n in shape):
        raise ShardingError(f"mesh axis sizes must be positive integers, got {sizes}")
    need = math.prod(shape)
    if need > len(devices):
        raise ShardingError(f"mesh {dict(zip(names, shape))} needs {need} devices but {len(devices)} are available "
                            f"({jax.process_count()} process(es))")
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                         devices=devices[:need])


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the model-resolved rules (hashable: it lives in the model's static graph)."""

    mesh: Mesh
    rules: Rules
    notes: tuple[str, ...] = ()

    @classmethod
    def create(cls, mesh: Mesh | Mapping[str, int] | Layout, cfg: ModelConfig, rules: Rules | Mapping | None = None,
               experts: str = "mxfp4") -> Layout:
        """Validates `mesh` (and rules) against `cfg` first, then builds the Mesh (dict meshes; with a -1 size
        the devices decide that axis, so the mesh is built first)."""
        if isinstance(mesh, Layout):
            return mesh
        sizes = mesh_sizes(mesh)
        if -1 in sizes.values():
            mesh = make_mesh(mesh)
            sizes = mesh_sizes(mesh)
        resolved, notes = resolve(cfg, sizes, rules, experts)
        return cls(make_mesh(mesh), resolved, notes)

    # ------------------------------------------------------------------ specs
    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    def axes(self, logical: str) -> tuple[str, ...]:
        """The mesh axes (size > 1) a logical axis is sharded over."""
        return tuple(a for a in self.rules.axes(logical) if self.sizes.get(a, 1) > 1)

    def spec(self, logical: tuple[str | None, ...], shape: tuple[int, ...], name: str = "tensor") -> P:
        return spec_for(tuple(logical), tuple(shape), self.sizes, self.rules, name)

    def sharding(self, logical, shape, name: str = "tensor") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape, name))

    def value_spec(self, logical, value, name: str = "tensor"):
        """PartitionSpec of an array, or an MXFP4Array of specs (blocks: same as scales plus the 16-byte axis)."""
        if isinstance(value, MXFP4Array):
            s = self.spec(logical, value.scales.shape, name)
            return MXFP4Array.tree_unflatten(value.dtype, (P(*s, *([None] * (len(value.blocks.shape) - len(s)))), s))
        return self.spec(logical, value.shape, name)

    def param_axes(self, path: tuple) -> tuple[str, ...]:
        name = path[-1]
        if name not in PARAM_AXES:
            raise ShardingError(f"parameter {'.'.join(map(str, path))}: no logical axes for {name!r} in "
                                "gptoss.sharding.rules.PARAM_AXES (every parameter needs an entry)")
        return PARAM_AXES[name]

    # ------------------------------------------------------------------ placement
    def place(self, value: Any, path: tuple) -> jax.Array:
        """Loader hook: a host array (numpy, possibly an mmap) -> a global jax.Array; every addressable device
        receives a copy of only its own slice, so no process ever holds a full copy per device."""
        logical, name = self.param_axes(path), ".".join(map(str, path))
        sharding = NamedSharding(self.mesh, param_spec_for(logical, tuple(value.shape), self.sizes, self.rules, name))
        if isinstance(value, jax.Array):
            return jax.device_put(value, sharding)
        return jax.make_array_from_callback(tuple(value.shape), sharding, lambda idx: np.array(value[idx]),
                                            dtype=value.dtype)

    def place_value(self, value: Any, path: tuple):
        if isinstance(value, MXFP4Array):
            return MXFP4Array(self.place(value.blocks, path), self.place(value.scales, path), value.dtype)
        return self.place(value, path)

    def attach(self, model):
        """Sets `model.layout` to this layout (its arrays must already be placed); returns the model."""
        model.layout = self
        return model

    # ------------------------------------------------------------------ inside jit
    def constrain(self, x, logical: tuple[str | None, ...] | str):
        if isinstance(logical, str):
            logical = ACTIVATION_AXES.get(logical) or CACHE_AXES[logical]
        return jax.lax.with_sharding_constraint(x, self.sharding(logical, x.shape))

    def constrain_cache(self, cache):
        """Per-layer LayerCaches: batch on data, kv heads on tensor (when they divide)."""
        return [dataclasses.replace(c, k_BSKH=self.constrain(c.k_BSKH, "k_BSKH"),
                                    v_BSKH=self.constrain(c.v_BSKH, "v_BSKH"),
                                    pos_BS=self.constrain(c.pos_BS, "pos_BS")) for c in cache]

    def replicate(self, tree):
        """Fully replicated (addressable by every process): for small outputs read back on the host."""
        rep = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), tree)

    def moe(self, x_TD, idx_TK, w_TK, ew, rt):
        """The MoE layer's expert op on this mesh (gptoss.sharding.moe.sharded_moe)."""
        from gptoss.sharding.moe import sharded_moe

        return sharded_moe(self, x_TD, idx_TK, w_TK, ew, rt)


def shard_model(model, mesh: Mesh | Mapping[str, int] | Layout, rules: Rules | Mapping | None = None):
    """Places an in-memory GptOss on a mesh (same layout as `from_pretrained(..., mesh=)`); returns the model."""
    layout = Layout.create(mesh, model.config, rules, experts=model.experts)
    graphdef, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        var.set_value(layout.place_value(var.get_value(), path))
    return layout.attach(nnx.merge(graphdef, state))


def layout_of(model) -> Layout | None:
    return model.layout


def device_bytes(model) -> dict[Any, int]:
    """Bytes of model state held by each addressable device (from the arrays' addressable shards)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(nnx.state(model)):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
