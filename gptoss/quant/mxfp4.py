"""MXFP4 (OCP MX, E2M1 values with a shared E8M0 scale per 32) kept packed in the HF checkpoint layout.

`MXFP4Array` is a pytree of two uint8 arrays, exactly the checkpoint's tensors:
    blocks [..., N, K/32, 16]: two E2M1 codes per byte, low nibble = even element, high = odd
    scales [..., N, K/32]:     E8M0 exponents, value 2**(s - 127)
It represents a [..., N, K] matrix (rows = outputs, K = the reduction axis). Leading axes (experts) can be
indexed and gathered without unpacking; `dequantize` runs inside jit where the weights are used.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptoss.config import MXFP4_BLOCK as BLOCK  # values per shared scale

BLOCK_BYTES = BLOCK // 2
SCALE_BIAS = 127
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest E2M1 value (6 = 1.5 * 2**2)

# E2M1 code -> value; bit 3 is the sign.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class MXFP4Array:
    """A packed MXFP4 matrix stack; `shape` is the logical [..., N, K] shape, `dtype` the dequantized dtype."""

    blocks: Any  # uint8 [..., N, K/32, 16]
    scales: Any  # uint8 [..., N, K/32]
    dtype: Any = jnp.bfloat16

    def __post_init__(self):
        b, s = self.blocks, self.scales
        if b.ndim < 3 or b.shape[-1] != BLOCK_BYTES:
            raise ValueError(f"MXFP4 blocks must be [..., N, K/32, {BLOCK_BYTES}], got shape {tuple(b.shape)}")
        if tuple(s.shape) != tuple(b.shape[:-1]):
            raise ValueError(
                f"MXFP4 scales shape {tuple(s.shape)} does not match blocks shape {tuple(b.shape)} "
                f"(expected {tuple(b.shape[:-1])})"
            )
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    # pytree protocol: the two byte arrays are children, the logical dtype is static
    def tree_flatten(self):
        return (self.blocks, self.scales), self.dtype

    @classmethod
    def tree_unflatten(cls, dtype, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "blocks", children[0])
        object.__setattr__(obj, "scales", children[1])
        object.__setattr__(obj, "dtype", dtype)
        return obj

    # ------------------------------------------------------------------ array-like surface
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.scales.shape[:-1]) + (self.scales.shape[-1] * BLOCK,)

    @property
    def ndim(self) -> int:
        return self.scales.ndim

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.blocks.shape)) + int(np.prod(self.scales.shape))

    def __repr__(self) -> str:
        return f"MXFP4Array(shape={self.shape}, dtype={self.dtype.name}, packed_bytes={self.nbytes})"

    def __getitem__(self, idx) -> MXFP4Array:
        """Indexes the leading axes (experts, rows); the packed K axis cannot be indexed."""
        if idx is Ellipsis or (isinstance(idx, tuple) and len(idx) == 1 and idx[0] is Ellipsis):
            return self  # (`idx == (Ellipsis,)` would compare an index array elementwise)
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(i is Ellipsis or i is None for i in idx):
            raise IndexError("MXFP4Array supports only plain indices on leading axes (no ... or None)")
        if len(idx) > self.ndim - 1:
            raise IndexError(
                f"MXFP4Array of logical shape {self.shape} can be indexed on its first {self.ndim - 1} axes only; "
                "the last (K) axis is packed"
            )
        scales = self.scales[idx]
        if scales.ndim < 2:
            raise IndexError(f"index {idx} leaves a single row of {self.shape}; an MXFP4Array is [..., N, K]")
        return MXFP4Array(self.blocks[idx], scales, self.dtype)

    def take(self, indices, axis: int = 0) -> MXFP4Array:
        """Gathers along a leading axis (e.g. the routed experts of each token) without unpacking."""
        if not -self.ndim <= axis < self.ndim - 1 or axis == -1:  # -1 is the packed K axis
            raise IndexError(f"take axis {axis} must be a leading axis of {self.shape}")
        axis = axis % self.ndim
        return MXFP4Array(jnp.take(self.blocks, indices, axis=axis),
                          jnp.take(self.scales, indices, axis=axis), self.dtype)

    def astype(self, dtype) -> MXFP4Array:
        """Changes the dtype that `dequantize` produces by default (the bytes stay packed)."""
        return MXFP4Array(self.blocks, self.scales, dtype)

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize(self.blocks, self.scales, dtype or self.dtype)

    def __jax_array__(self):
        raise TypeError(
            "MXFP4Array is packed; call .dequantize() or use gptoss.quant.mx_einsum instead of treating it as an array"
        )


def dequantize(blocks, scales, dtype=jnp.float32) -> jax.Array:
    """blocks [..., N, G, 16] + scales [..., N, G] -> [..., N, G*32] in `dtype`, inside jit.

    Each byte splits into (low, high) nibbles, the checkpoint's element order; E8M0 -> float gives
    2**(s-127) exactly. Every product is exact in bf16 and fp32.
    """
    blocks = jnp.asarray(blocks)
    scales = jnp.asarray(scales)
    *lead, n, g, _ = blocks.shape
    vals = jnp.stack([_e2m1_decode(blocks & 0x0F), _e2m1_decode(blocks >> 4)], axis=-1)  # [..., N, G, 16, 2]
    scale = jax.lax.bitcast_convert_type(scales, jnp.float8_e8m0fnu).astype(jnp.float32)
    out = vals.reshape(*lead, n, g, BLOCK) * scale[..., None]
    return out.reshape(*lead, n, g * BLOCK).astype(dtype)


def _e2m1_decode(code):
    """E2M1 nibble codes (uint8, 0..15) -> fp32 by building the fp32 bits: sign, exponent, 1 mantissa bit.

    (Not a uint8 -> float4_e2m1fn bitcast: XLA constant-folds that sub-byte bitcast wrongly, so weights
    closed over by a jitted function, i.e. compile-time constants, came out scrambled.)
    """
    c = code.astype(jnp.uint32)
    e, m = (c >> 1) & 3, c & 1
    magnitude = jnp.where(e > 0, ((e + 126) << 23) | (m << 22), m * jnp.uint32(126 << 23))  # e=0: 0 or 0.5
    return jax.lax.bitcast_convert_type(((c & 8) << 28) | magnitude, jnp.float32)


@functools.partial(jax.jit, static_argnames="dtype")  # one compile, not ~20 op-by-op ones, when called eagerly
def quantize(x, dtype=None) -> MXFP4Array:
    """Quantizes [..., N, K] values to MXFP4 per the OCP MX spec (jit-able).

    Per block of 32 along K: shared exponent = floor(log2(amax)) - 2 (so amax lands in [4, 8)), clamped to
    E8M0's range; values are rounded to nearest-even on the E2M1 grid and saturate at +-6. An all-zero block
    gets scale byte 0. Negative values that round to zero keep their sign (code 8, i.e. -0).
    """
    x = jnp.asarray(x)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"the last axis ({x.shape[-1]}) must be a multiple of {BLOCK} to quantize to MXFP4")
    out_dtype = dtype or (x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
    *lead, n, k = x.shape
    xb = x.astype(jnp.float32).reshape(*lead, n, k // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    _, e = jnp.frexp(amax)  # amax = m * 2**e with m in [0.5, 1)
    shared = jnp.where(amax > 0, e - 1 - E2M1_EMAX, -SCALE_BIAS)
    shared = jnp.clip(shared, -SCALE_BIAS, SCALE_BIAS)
    q = jnp.abs(xb) / jnp.ldexp(jnp.float32(1.0), shared)[..., None]
    codes = _e2m1_code(q) | jnp.where(xb < 0, 8, 0).astype(jnp.uint8)
    pairs = codes.reshape(*lead, n, k // BLOCK, BLOCK_BYTES, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(jnp.uint8)
    return MXFP4Array(packed, (shared + SCALE_BIAS).astype(jnp.uint8), out_dtype)


def _e2m1_code(a):
    """|value| (already divided by the block scale) -> 3-bit E2M1 magnitude code, round-half-even, saturating."""
    # The grid steps by 0.5 below 2, by 1 below 4, by 2 up to 6; jnp.round is half-to-even, and in each
    # range the even multiple is also the code with an even mantissa, which is what RNE on E2M1 asks for.
    r = jnp.where(a < 2, jnp.round(a * 2) / 2, jnp.where(a < 4, jnp.round(a), jnp.round(a / 2) * 2))
    r = jnp.minimum(r, E2M1_MAX)
    grid = jnp.asarray(E2M1_VALUES[:8])
    return jnp.argmax(r[..., None] == grid, axis=-1).astype(jnp.uint8)


def mx_einsum(spec: str, x, w, *, dtype=None, precision=None) -> jax.Array:
    """einsum with one operand possibly an MXFP4Array; the packed operand is dequantized to the other's dtype."""
    compute = dtype or jnp.result_type(x)
    if isinstance(w, MXFP4Array):
        w = w.dequantize(compute)
    if isinstance(x, MXFP4Array):
        x = x.dequantize(jnp.result_type(w))
    return jnp.einsum(spec, x, w, precision=precision)


def mx_matmul(x, w, *, precision=None) -> jax.Array:
    """x [..., K] @ W[N, K]^T -> [..., N], with W packed or dense; the checkpoint's [out, in] convention."""
    return mx_einsum("...k,nk->...n", x, w, precision=precision)


def as_dense(w, dtype=None):
    """Dense view of a weight that may be packed."""
    if isinstance(w, MXFP4Array):
        return w.dequantize(dtype)
    return w if dtype is None else jnp.asarray(w).astype(dtype)
