"""Sharded (multi-device, multi-host) inference: mesh, the logical-axis rules table, the sharded MoE, the planner.

    mesh = gptoss.sharding.make_mesh({"data": 2, "expert": 4})          # or jax.make_mesh(...)
    model = gptoss.from_pretrained(path, mesh=mesh)                       # each device gets only its slices
    model(tokens); gptoss.engine.generate(model, prompts, ...)            # unchanged

See gptoss/sharding/rules.py for the layout of every tensor, and `plan` for per-device memory.
"""

from gptoss.sharding.distributed import init_distributed
from gptoss.sharding.layout import Layout, device_bytes, layout_of, make_mesh, shard_model
from gptoss.sharding.planner import DEVICES, Plan, plan
from gptoss.sharding.rules import (
    ACTIVATION_AXES,
    CACHE_AXES,
    DEFAULT_RULES,
    MEGATRON_RULES,
    PARAM_AXES,
    Rules,
    ShardingError,
    resolve,
)

__all__ = ["ACTIVATION_AXES", "CACHE_AXES", "DEFAULT_RULES", "DEVICES", "MEGATRON_RULES", "PARAM_AXES", "Layout",
           "Plan", "Rules", "ShardingError", "device_bytes", "init_distributed", "layout_of", "make_mesh", "plan",
           "resolve", "shard_model"]
