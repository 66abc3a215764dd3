"""MXFP4 expert matmuls as Pallas kernels (Triton lowering on GPU; interpret mode on CPU for the tests).

Both read the packed bytes in place and dequantize in registers, one 32-value MX block at a time, accumulating in
fp32; no dequantized copy of an expert ever exists in memory.

* `mx_gather_pallas(x [M, K], w [E, N, K], idx [M, S]) -> [M, S, N]`: decode. One program per (pair, N tile)
  reads its pair's expert rows once: a GEMV in registers. A negative index skips the pair (zeros, no reads).
* `mx_grouped_pallas(x [A, K], w, counts [E]) -> [A, N]`: prefill. Rows sorted by expert are laid out in tiles of
  `bm` rows that each belong to one expert (each group padded to a multiple of `bm`); one program per (tile,
  N tile) runs its tile on the tensor cores. No loop over experts in the graph: tiles past the last group exit.

Element order (the checkpoint's): byte j of a block holds values 2j (low nibble) and 2j+1 (high nibble). Splitting
x into its even and odd columns once per call makes each nibble plane an ordinary [., 16] operand, so the kernels
never interleave. Every dimension the Triton lowering sees is a power of two: blocks of 16 bytes along K (gpt-oss
has K = 2880, 90 blocks), N tiles that divide N.

Gradients: reverse mode with respect to x through the XLA twins' transposed products (the experts are frozen).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from gptoss.quant.mxfp4 import MXFP4Array

F32 = jnp.float32


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _nibbles(code_i32):
    """E2M1 codes (int32, 0..15) -> fp32: 0, .5, 1, 1.5, 2, 3, 4, 6 with a sign bit; integer arithmetic only."""
    e, m = (code_i32 >> 1) & 3, code_i32 & 1
    twice = jnp.where(e == 0, m, (2 + m) << jnp.maximum(e - 1, 0))
    mag = twice.astype(F32) * 0.5
    return jnp.where((code_i32 & 8) != 0, -mag, mag)


def _scale(s_i32):
    """E8M0 -> 2**(s-127) exactly: the exponent bits of an fp32 (s = 0 is the subnormal 2**-127, 255 is NaN)."""
    normal = jax.lax.bitcast_convert_type(s_i32 << 23, F32)
    return jnp.where(s_i32 == 0, F32(2.0**-127), jnp.where(s_i32 == 255, F32(jnp.nan), normal))


def _plane_block(bytes_u8, s_i32):
    """16 packed bytes per row [R, 16] and the rows' scales [R] -> (even values, odd values), fp32 [R, 16] each."""
    b = bytes_u8.astype(jnp.int32)
    scale = _scale(s_i32)[:, None]
    return _nibbles(b & 15) * scale, _nibbles(b >> 4) * scale


def _load_block(blocks_ref, scales_ref, e, n0, bn: int, g):
    """Expert e's rows n0..n0+bn, MX block g, dequantized: (even values, odd values), fp32 [bn, 16] each."""
    return _plane_block(blocks_ref[e, pl.ds(n0, bn), pl.ds(g * 16, 16)],
                        scales_ref[e, pl.ds(n0, bn), g].astype(jnp.int32))


def _split(x_MK):
    """x's even and odd columns, the operands of the low and high nibble planes."""
    return x_MK[:, 0::2], x_MK[:, 1::2]


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def supports(w) -> bool:
    """Whether the kernels take this packed weight here: any shape in interpret mode; on a GPU, N a multiple of
    16 (tiles of rows are power-of-two sized; gpt-oss has N = 5760 and 2880)."""
    return isinstance(w, MXFP4Array) and w.ndim == 3 and (_interpret() or w.shape[1] % 16 == 0)


def _check(x, w, where: str):
    if not isinstance(w, MXFP4Array) or w.ndim != 3 or x.ndim != 2 or x.shape[1] != w.shape[2]:
        raise ValueError(f"{where}: x {x.shape} and W {getattr(w, 'shape', None)} do not fit x [M, K], "
                         "W [E, N, K] packed (MXFP4Array)")


# --- decode: one GEMV per (pair, N tile) --------------------------------------------------------------------------

def _gather_kernel(idx_ref, xe_ref, xo_ref, blocks_ref, scales_ref, y_ref, *, G: int, bn: int, S: int):
    m, s, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = idx_ref[m * S + s]
    n0 = j * bn

    @pl.when(e < 0)
    def _():
        y_ref[...] = jnp.zeros(y_ref.shape, F32)

    @pl.when(e >= 0)
    def _():
        def block(g, acc):
            lo, hi = _load_block(blocks_ref, scales_ref, e, n0, bn, g)
            xe = xe_ref[m, pl.ds(g * 16, 16)].astype(F32)
            xo = xo_ref[m, pl.ds(g * 16, 16)].astype(F32)
            return acc + jnp.sum(lo * xe[None, :] + hi * xo[None, :], axis=1)

        y_ref[...] = jax.lax.fori_loop(0, G, block, jnp.zeros((bn,), F32)).reshape(y_ref.shape)


def mx_gather_pallas(x_MK, w: MXFP4Array, idx_MS, *, block_n: int = 128, interpret: bool | None = None):
    """y[m, s] = W[idx[m, s]] @ x[m], fp32 [M, S, N]; a negative index gives a zero row."""
    _check(x_MK, w, "mx_gather_pallas")
    return _gather(x_MK, w, jnp.asarray(idx_MS, jnp.int32), int(block_n),
                   _interpret() if interpret is None else bool(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gather(x_MK, w, idx_MS, block_n, interpret):
    M, S = idx_MS.shape
    E, N, K = w.shape
    G = K // 32
    bn = _pow2_divisor(N, block_n)
    xe, xo = _split(x_MK)
    kernel = functools.partial(_gather_kernel, G=G, bn=bn, S=S)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, S, N), F32),
        grid=(M, S, N // bn),
        out_specs=pl.BlockSpec((None, None, bn), lambda m, s, j: (m, s, j)),
        interpret=interpret,
        compiler_params=None if interpret else plt.CompilerParams(num_warps=4, num_stages=2),
        name="gptoss_mx_gather",
    )(idx_MS.reshape(-1), xe, xo, w.blocks.reshape(E, N, K // 2), w.scales)
    return y


def _gather_fwd(x_MK, w, idx_MS, block_n, interpret):
    return _gather(x_MK, w, idx_MS, block_n, interpret), (x_MK, w, idx_MS)


def _gather_bwd(block_n, interpret, res, dy_MSN):
    x_MK, w, idx_MS = res
    live = idx_MS >= 0
    w_MSNK = w.take(jnp.maximum(idx_MS, 0)).dequantize(F32)  # the XLA twin's transpose (frozen experts)
    dy = jnp.where(live[..., None], dy_MSN.astype(F32), 0.0)
    dx = jnp.einsum("msn,msnk->mk", dy, w_MSNK, precision=jax.lax.Precision.HIGHEST).astype(x_MK.dtype)
    return dx, jax.tree.map(_no_cotangent, w), _no_cotangent(idx_MS)


_gather.defvjp(_gather_fwd, _gather_bwd)


def _no_cotangent(a):
    return np.zeros(a.shape, jax.dtypes.float0)


# --- prefill: tiles of rows that share an expert ------------------------------------------------------------------

def _grouped_kernel(tile_expert_ref, xe_ref, xo_ref, blocks_ref, scales_ref, y_ref, *, G: int, bm: int, bn: int,
                    dot_dtype, precision):
    t, j = pl.program_id(0), pl.program_id(1)
    e = tile_expert_ref[t]
    r0, n0 = t * bm, j * bn

    @pl.when(e < 0)
    def _():
        y_ref[...] = jnp.zeros(y_ref.shape, F32)

    @pl.when(e >= 0)
    def _():
        def block(g, acc):
            lo, hi = _load_block(blocks_ref, scales_ref, e, n0, bn, g)
            xe = xe_ref[pl.ds(r0, bm), pl.ds(g * 16, 16)].astype(dot_dtype)
            xo = xo_ref[pl.ds(r0, bm), pl.ds(g * 16, 16)].astype(dot_dtype)
            # the dequantized values are exact in bf16 (one mantissa bit times a power of two)
            acc += jax.lax.dot_general(xe, lo.astype(dot_dtype), (((1,), (1,)), ((), ())),
                                       preferred_element_type=F32, precision=precision)
            return acc + jax.lax.dot_general(xo, hi.astype(dot_dtype), (((1,), (1,)), ((), ())),
                                             preferred_element_type=F32, precision=precision)

        y_ref[...] = jax.lax.fori_loop(0, G, block, jnp.zeros((bm, bn), F32))


def tile_layout(counts_E, rows: int, bm: int):
    """Where each sorted row goes when every expert's group is padded to a multiple of `bm` rows.

    Returns (dest [rows]: padded row of each sorted row, or the dump row past the end for rows beyond
    sum(counts); tile_expert [tiles]: each tile's expert, -1 for unused tiles). tiles = ceil(rows / bm) + E
    bounds the padded total for any counts."""
    E = counts_E.shape[0]
    tiles = -(-rows // bm) + E
    counts = counts_E.astype(jnp.int32)
    padded = (counts + bm - 1) // bm * bm
    start = jnp.cumsum(counts) - counts
    pstart = jnp.cumsum(padded) - padded
    a = jnp.arange(rows)
    e_of_row = jnp.searchsorted(jnp.cumsum(counts), a, side="right")  # E past the grouped rows
    dest = jnp.where(e_of_row < E, pstart[jnp.minimum(e_of_row, E - 1)] + a - start[jnp.minimum(e_of_row, E - 1)],
                     tiles * bm)
    tile_start = jnp.arange(tiles) * bm
    e_of_tile = jnp.searchsorted(jnp.cumsum(padded), tile_start, side="right")
    return dest, jnp.where(e_of_tile < E, e_of_tile, -1).astype(jnp.int32)


def mx_grouped_pallas(x_AK, w: MXFP4Array, counts_E, *, block_m: int = 64, block_n: int = 128,
                      interpret: bool | None = None):
    """y[a] = W[e(a)] @ x[a] for rows sorted by expert (expert e owns counts[e] consecutive rows; rows past
    sum(counts) are zero), fp32 [A, N]: `grouped_matmul`'s semantics, forward only (grouped_matmul's custom VJP
    wraps it)."""
    _check(x_AK, w, "mx_grouped_pallas")
    if counts_E.shape != (w.shape[0],):
        raise ValueError(f"mx_grouped_pallas: counts {counts_E.shape} do not fit W {w.shape}")
    counts_E = jnp.asarray(counts_E, jnp.int32)
    interpret = _interpret() if interpret is None else bool(interpret)
    A, K = x_AK.shape
    E, N, _ = w.shape
    bm, bn = int(block_m), _pow2_divisor(N, block_n)
    dest, tile_expert = tile_layout(counts_E, A, bm)
    tiles = tile_expert.shape[0]
    x_pad = jnp.zeros((tiles * bm + 1, K), x_AK.dtype).at[dest].set(x_AK)[:-1]  # the extra row takes dumped rows
    xe, xo = _split(x_pad)
    fp32 = jnp.dtype(x_AK.dtype).itemsize >= 4
    kernel = functools.partial(_grouped_kernel, G=K // 32, bm=bm, bn=bn, dot_dtype=F32 if fp32 else jnp.bfloat16,
                               precision=jax.lax.Precision.HIGHEST if fp32 else None)
    y_pad = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tiles * bm, N), F32),
        grid=(tiles, N // bn),
        out_specs=pl.BlockSpec((bm, bn), lambda t, j: (t, j)),
        interpret=interpret,
        compiler_params=None if interpret else plt.CompilerParams(num_warps=4, num_stages=2),
        name="gptoss_mx_grouped",
    )(tile_expert, xe, xo, w.blocks.reshape(E, N, K // 2), w.scales)
    return jnp.take(y_pad, dest, axis=0, mode="fill", fill_value=0)
