"""MXFP4: the packed array type, its jit (de)quantizers, the numpy reference, the frozen NNX variable; bf12: the
lossless 12.25-bit form of frozen bf16 weights for CPU decode."""

from flax import nnx

from gptoss.quant.bf12 import BF12Array, pack_bf12
from gptoss.quant.mxfp4 import MXFP4Array, as_dense, dequantize, mx_einsum, mx_matmul, quantize
from gptoss.quant.reference import pack_ref, unpack_ref


class QuantWeight(nnx.Variable):
    """Holds a packed MXFP4Array or BF12Array; not an nnx.Param, so optimizers and LoRA filters leave it alone."""


__all__ = ["BF12Array", "MXFP4Array", "QuantWeight", "as_dense", "dequantize", "mx_einsum", "mx_matmul",
           "pack_bf12", "pack_ref", "quantize", "unpack_ref"]
