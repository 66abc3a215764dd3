"""The frozen dense weights decode reads once per token (attention's q/k/v/o, the unembedding) packed as bf12.

A one-token decode step on a CPU runs at the memory's speed; bf12 (gptoss.quant.bf12) holds the same bf16 bits in
77 % of the bytes, so those GEMVs run ~1.25-1.3x faster where the CPU decodes it in registers (AVX-512 VBMI and
BF16: gptoss.kernels.bf12_cpu.fast(); `auto` packs there unless the CPU has AMX: bf12_cpu.packs_by_default()).
Nothing changes numerically: each packed weight unpacks to its exact bits, and the kernels' products and sums are
those of the bf16 paths (for 1-4 tokens a row's exceptions are added after its sum).

Packed weights are `QuantWeight`s, not parameters: they are frozen (LoRA trains beside them; full fine-tuning and
sharding need `unpack_dense`). Saving writes them back as bf16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.kernels import bf12_cpu
from gptoss.kernels.select import cpu_kernels
from gptoss.quant import QuantWeight
from gptoss.quant.bf12 import BLOCK, BF12Array

DENSE_FORMATS = ("bf16", "bf12", "auto")


def _targets(model):
    """(module, attribute, contracted trailing dims) of each weight that bf12 packs."""
    yield model, "unembed_VD", 1
    for block in model.layers:
        for name, n_in in (("wq_NHD", 1), ("wk_KHD", 1), ("wv_KHD", 1), ("wo_DNH", 2)):
            yield block.attn, name, n_in


def dense_format(model) -> str:
    """'bf12' if any of the model's dense decode weights are packed, else 'bf16'."""
    return "bf12" if any(isinstance(getattr(m, a).get_value(), BF12Array) for m, a, _ in _targets(model)) else "bf16"


def resolve_dense_format(fmt: str, model) -> str:
    """'auto' -> 'bf12' where it pays (a bf16 model on one CPU device with the CPU kernels, on a CPU that decodes bf12
    in registers and has no AMX: bf12_cpu.packs_by_default), else 'bf16'; 'bf16' and 'bf12' as they are."""
    if fmt not in DENSE_FORMATS:
        raise ValueError(f"dense weights: must be one of {list(DENSE_FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    ok = (model.dtype == jnp.bfloat16 and model.layout is None and jax.device_count() == 1
          and jax.default_backend() == "cpu" and cpu_kernels(model.kernels) and bf12_cpu.packs_by_default())
    return "bf12" if ok else "bf16"


# A weight keeps bf16 where bf12 would not pay: its contracted size is not a multiple of 32 (no whole blocks), or
# more than this share of its weights are exceptions (each costs 10 bytes and a scalar add; ~0.03 % in Gaussian
# weights, unmeasured on the real checkpoints offline).
MAX_EXCEPTION_SHARE = 0.01


def pack_dense(model, fmt: str = "bf12"):
    """Packs (fmt 'bf12'), unpacks ('bf16') or chooses ('auto': resolve_dense_format) the model's dense decode
    weights, in place; returns the model. A weight bf12 cannot hold in whole blocks, or with many exceptions, stays
    bf16 (MAX_EXCEPTION_SHARE)."""
    fmt = resolve_dense_format(fmt, model)
    if fmt == "bf16":
        return unpack_dense(model)
    if model.dtype != jnp.bfloat16:
        raise ValueError(f"bf12 packs bfloat16 weights; this model computes in {jnp.dtype(model.dtype).name}")
    if model.layout is not None:
        raise ValueError("bf12 weights are for one device; this model is sharded (its layout places every weight)")
    for module, name, n_in in _targets(model):
        value = getattr(module, name).get_value()
        if isinstance(value, BF12Array) or math.prod(value.shape[-n_in:]) % BLOCK:
            continue
        packed = bf12_cpu.pack(np.asarray(jax.device_get(value)), n_in)
        if packed.num_exceptions <= MAX_EXCEPTION_SHARE * value.size:
            setattr(module, name, QuantWeight(jax.tree.map(jnp.asarray, packed)))
    return model


def unpack_dense(model):
    """The dense decode weights back to bf16 parameters (exact), in place; returns the model."""
    for module, name, _ in _targets(model):
        value = getattr(module, name).get_value()
        if isinstance(value, BF12Array):
            setattr(module, name, nnx.Param(value.unpack()))
    return model
