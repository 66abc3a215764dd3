"""bf12: a lossless 12.25-bit form of a frozen bf16 weight, for decode on CPUs (csrc/bf12_kernel.h has the layout).

A one-token decode step reads every weight once, so it runs at the memory's speed; gptoss and llama.cpp read the same
bytes per token. Within a 32-element block of a row the bf16 exponents span few binades, so each weight keeps its low
bf16 byte and a 4-bit code (sign, exponent offset from the block's largest >> 1), plus one byte per block: 49 bytes per
32 weights instead of 64. Weights the code cannot hold (subnormals, and weights > ~13 binades below their block's
largest: ~0.03 % of Gaussian weights) are kept exactly as exceptions beside the rows. `unpack` gives back the same
bits, always.

`BF12Array` is a pytree of the packed rows and the exceptions; it stands for a bf16 [*out, *in] weight whose `n_in`
trailing dims are contracted (the rows are out, flattened; the row length K is in, flattened). `pack_bf12` is the
numpy reference (gptoss.kernels.bf12_cpu.pack does the same bytes on the kernel library's threads); `unpack` is the
XLA twin of the kernel library's unpack.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

BLOCK = 32  # weights per exponent byte
BLOCK_BYTES = 48  # per block: 32 low bytes, 16 bytes of 4-bit codes
ROW_BYTES_PER_BLOCK = BLOCK_BYTES + 1  # and its exponent byte at the row's start
ZERO_CODE = 7  # offset code of a signed zero (and of an exception)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class BF12Array:
    """A bf16 weight of logical `shape` [*out, *in] (`n_in` trailing dims contracted), packed as bf12 rows."""

    data: Any  # uint8 [R, 49 * K / 32], R = prod(out), K = prod(in)
    exc_rows: Any  # int32 [E], sorted (then by column)
    exc_cols: Any  # int32 [E]
    exc_bits: Any  # uint16 [E]: the exceptions' bf16 bits
    shape: tuple[int, ...] = ()
    n_in: int = 1

    def __post_init__(self):
        shape = tuple(int(d) for d in self.shape)
        object.__setattr__(self, "shape", shape)
        if not 1 <= self.n_in < len(shape):
            raise ValueError(f"BF12Array: n_in={self.n_in} must leave output dims in shape {shape}")
        R, K = self.rows_cols
        if K % BLOCK:
            raise ValueError(f"BF12Array: the contracted size {K} (shape {shape}) is not a multiple of {BLOCK}")
        want = (R, K // BLOCK * ROW_BYTES_PER_BLOCK)
        if tuple(self.data.shape) != want:
            raise ValueError(f"BF12Array: packed rows {tuple(self.data.shape)} do not fit shape {shape} (want {want})")
        if not (self.exc_rows.shape == self.exc_cols.shape == self.exc_bits.shape) or self.exc_rows.ndim != 1:
            raise ValueError("BF12Array: the exceptions' rows, columns and bits must be 1-d of one length, got "
                             f"{self.exc_rows.shape}, {self.exc_cols.shape}, {self.exc_bits.shape}")
        if not isinstance(self.exc_rows, jax.core.Tracer):  # the kernels index with them: in range and sorted
            rows, cols = np.asarray(self.exc_rows, np.int64), np.asarray(self.exc_cols, np.int64)
            if rows.size and not (rows.min() >= 0 and rows.max() < R and cols.min() >= 0 and cols.max() < K
                                  and np.all(np.diff(rows * K + cols) > 0)):
                raise ValueError(f"BF12Array: exceptions must lie inside the {R} x {K} rows, sorted by row then "
                                 "column, each once")

    def tree_flatten(self):
        return (self.data, self.exc_rows, self.exc_cols, self.exc_bits), (self.shape, self.n_in)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for name, value in zip(("data", "exc_rows", "exc_cols", "exc_bits"), children):
            object.__setattr__(obj, name, value)
        object.__setattr__(obj, "shape", aux[0])
        object.__setattr__(obj, "n_in", aux[1])
        return obj

    @property
    def dtype(self):
        return jnp.dtype(jnp.bfloat16)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def rows_cols(self) -> tuple[int, int]:
        """(R, K): the flattened output and contracted sizes."""
        return math.prod(self.shape[: -self.n_in]), math.prod(self.shape[-self.n_in:])

    @property
    def num_exceptions(self) -> int:
        return int(self.exc_rows.shape[0])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.data.shape)) + 10 * self.num_exceptions

    def __getitem__(self, idx):
        if idx is Ellipsis:  # nnx's `param[...]`
            return self
        raise TypeError("a BF12Array is read whole (param[...]); unpack() it to index")

    def __repr__(self) -> str:
        return (f"BF12Array(shape={self.shape}, n_in={self.n_in}, packed_bytes={self.nbytes}, "
                f"exceptions={self.num_exceptions})")

    def unpack(self) -> jax.Array:
        """The bf16 weight, bit for bit, in XLA (the kernel library's unpack is gptoss.kernels.bf12_cpu.unpack)."""
        R, K = self.rows_cols
        G = K // BLOCK
        data = jnp.asarray(self.data)
        H_RG = data[:, :G].astype(jnp.int32)
        body = data[:, G:].reshape(R, G, BLOCK_BYTES).astype(jnp.int32)
        low, cb = body[..., :BLOCK], body[..., BLOCK:]
        codes = jnp.concatenate([cb & 15, cb >> 4], axis=-1)
        off = codes & 7
        high = ((codes >> 3) << 7) | jnp.where(off == ZERO_CODE, 0, H_RG[..., None] - off)
        bits = ((high << 8) | low).astype(jnp.uint16).reshape(R, K)
        bits = bits.at[jnp.asarray(self.exc_rows), jnp.asarray(self.exc_cols)].set(jnp.asarray(self.exc_bits))
        return jax.lax.bitcast_convert_type(bits, jnp.bfloat16).reshape(self.shape)


def pack_bf12(w, n_in: int = 1, *, chunk_rows: int = 4096) -> BF12Array:
    """Packs a bf16 weight [*out, *in] (numpy or jax; `n_in` trailing dims contracted) in numpy: the reference."""
    w = np.asarray(w)
    if w.dtype != ml_dtypes.bfloat16:
        raise TypeError(f"bf12 packs bfloat16 weights, got {w.dtype} (shape {w.shape})")
    if not 1 <= n_in < w.ndim:
        raise ValueError(f"bf12: n_in={n_in} must leave output dims in shape {w.shape}")
    R, K = math.prod(w.shape[:-n_in]), math.prod(w.shape[-n_in:])
    if K % BLOCK:
        raise ValueError(f"bf12: the contracted size {K} of shape {w.shape} is not a multiple of {BLOCK}")
    bits = w.reshape(R, K).view(np.uint16)
    G = K // BLOCK
    data = np.empty((R, G * ROW_BYTES_PER_BLOCK), np.uint8)
    rows, cols, exc = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.uint16)]
    for r0 in range(0, R, chunk_rows):
        b = bits[r0:r0 + chunk_rows].reshape(-1, G, BLOCK).astype(np.int32)
        e = (b >> 7) & 0xFF
        H = e.max(axis=-1) >> 1
        off = H[..., None] - (e >> 1)
        sign = b >> 15
        bad = (e == 0) | (off >= ZERO_CODE)
        code = (sign << 3) | np.where(bad, ZERO_CODE, off)
        low = np.where(bad, 0, b & 0xFF)
        body = np.concatenate([low, code[..., :16] | (code[..., 16:] << 4)], axis=-1)
        data[r0:r0 + chunk_rows, :G] = H
        data[r0:r0 + chunk_rows, G:] = body.reshape(-1, G * BLOCK_BYTES)
        r, c = np.nonzero((bad & ((b & 0x7FFF) != 0)).reshape(-1, K))
        rows.append(r + r0), cols.append(c), exc.append(bits[r0 + r, c])
    return BF12Array(data, np.concatenate(rows).astype(np.int32), np.concatenate(cols).astype(np.int32),
                     np.concatenate(exc).astype(np.uint16), w.shape, n_in)
