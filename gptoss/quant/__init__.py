"""MXFP4: the packed array type, its jit (de)quantizers, the numpy reference, the frozen NNX variable."""

from flax import nnx

from gptoss.quant.mxfp4 import MXFP4Array, as_dense, dequantize, mx_einsum, mx_matmul, quantize
from gptoss.quant.reference import pack_ref, unpack_ref


class QuantWeight(nnx.Variable):
    """Holds a packed MXFP4Array; not an nnx.Param, so optimizers and LoRA filters leave it alone."""


__all__ = ["MXFP4Array", "QuantWeight", "as_dense", "dequantize", "mx_einsum", "mx_matmul", "pack_ref",
           "quantize", "unpack_ref"]
