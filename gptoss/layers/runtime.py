"""`Runtime`: how a model runs (not what it computes), handed down from the model to every layer it calls.

One frozen, hashable value built by `GptOss.runtime()` from the model's own static options, so a jitted step
depends on nothing but its arguments: no environment variable or global switch is read while tracing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from gptoss.kernels.select import check_kernels, cpu_kernels, pallas_kernels
from gptoss.layers.experts import check_moe_impl


@dataclasses.dataclass(frozen=True)
class Runtime:
    """moe_impl: MoE strategy ("auto", "dense", "gather", "grouped"); kernels: "auto" | "xla" | "cpu" | "pallas"
    (gptoss.kernels.select); dtype: the model's dtype (float32 models ask every matmul for full precision, since XLA's
    default lets GPUs and TPUs run fp32 matmuls in TF32/bf16 passes); layout: a gptoss.sharding.Layout when the model
    lives on a mesh; remat: recompute each block's activations in the backward pass (training memory)."""

    moe_impl: str = "auto"
    kernels: str = "auto"
    dtype: Any = jnp.float32
    layout: Any = None
    remat: bool = False

    def __post_init__(self):
        check_moe_impl(self.moe_impl)
        check_kernels(self.kernels)
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    @property
    def precision(self):
        """HIGHEST for float32 (and float64) models; None (the backend's fast default) for bf16 ones."""
        return jax.lax.Precision.HIGHEST if self.dtype.itemsize >= 4 else None

    @functools.cached_property
    def cpu_kernels(self) -> bool:
        """Whether the CPU kernels run (decided once per Runtime, i.e. when a step is traced)."""
        return cpu_kernels(self.kernels)

    @functools.cached_property
    def pallas_kernels(self) -> bool:
        """Whether the Pallas kernels run (GPU; interpret mode on CPU with kernels="pallas")."""
        return pallas_kernels(self.kernels)

    def replace(self, **changes) -> Runtime:
        return dataclasses.replace(self, **changes)


DEFAULT = Runtime()  # for layers called on their own: float32 precision, automatic choices
