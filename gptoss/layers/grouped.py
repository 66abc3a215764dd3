"""`grouped_matmul`: rows sorted by expert times their expert, in XLA, with a backward pass that is itself grouped.

Semantics of `jax.lax.ragged_dot` (the reference twin in the tests) with W in the checkpoint's [E, N, K]
orientation, dense or packed: expert e owns counts[e] consecutive rows, y[a] = W[e(a)] @ x[a], rows past
sum(counts) are zero. Unlike ragged_dot on XLA:CPU/GPU (which expands to every row times every expert), each
expert that has rows is dequantized once and multiplies its rows in tiles of `tile`; experts without rows cost
nothing. The loops have data-dependent trip counts, which reverse-mode autodiff cannot go through, so the op has
a custom VJP whose backward runs the same loops transposed: dx = W[e]^T dy per expert (packed weights are never
dequantized for experts without rows), and for dense W also dW[e] = dy_e^T x_e.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptoss.kernels import mxfp4_pallas
from gptoss.manual_axes import cotangent_like, varying_like
from gptoss.quant import MXFP4Array

F32 = jnp.float32


def default_tile(rows: int, num_experts: int) -> int:
    """About the mean group size, a power of two in [8, 256]."""
    return int(min(256, max(8, 1 << max(0, (rows // max(num_experts, 1) - 1)).bit_length())))


def grouped_matmul(x_AK, w_ENK, counts_E, *, tile: int | None = None, precision=None, pallas: bool = False
                   ) -> jax.Array:
    """x [A, K] sorted by expert, W [E, N, K] (dense or MXFP4Array), counts int [E] -> float32 [A, N] (float64
    for float64 x). `pallas`: packed W's forward runs the Pallas kernel (gptoss.kernels.mxfp4_pallas); the
    backward stays these loops."""
    if w_ENK.ndim != 3 or x_AK.ndim != 2 or x_AK.shape[1] != w_ENK.shape[2] or counts_E.shape != w_ENK.shape[:1]:
        raise ValueError(f"grouped_matmul: x {x_AK.shape}, W {w_ENK.shape} and counts {counts_E.shape} do not fit "
                         "x [A, K], W [E, N, K], counts [E]")
    tile = tile or default_tile(x_AK.shape[0], w_ENK.shape[0])
    pallas = pallas and mxfp4_pallas.supports(w_ENK) and x_AK.dtype in (jnp.float32, jnp.bfloat16)
    return _gmm(x_AK, w_ENK, jnp.asarray(counts_E, jnp.int32), int(tile), precision, pallas)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(x, w, counts, tile, precision, pallas):
    if pallas:
        return mxfp4_pallas.mx_grouped_pallas(x, w, counts)
    return _rows_loop(x, w, counts, tile, precision, transpose=False)


def _gmm_fwd(x, w, counts, tile, precision, pallas):
    return _gmm(x, w, counts, tile, precision, pallas), (x, w, counts)


def _gmm_bwd(tile, precision, pallas, res, dy_AN):
    x, w, counts = res
    dx = cotangent_like(_rows_loop(dy_AN, w, counts, tile, precision, transpose=True).astype(x.dtype), x)
    if isinstance(w, MXFP4Array):  # packed weights are integers: no cotangent
        dw = jax.tree.map(_no_cotangent, w)
    else:
        dw = cotangent_like(_dw_loop(x, dy_AN, counts, tile, precision, w.shape).astype(w.dtype), w)
    return dx, dw, _no_cotangent(counts)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _no_cotangent(a):
    return np.zeros(a.shape, jax.dtypes.float0)


def zeros_after(shape, dtype, x):
    """Zeros that XLA cannot compute before `x` exists. A loop's zero-initialised carry is a copy of a constant,
    which XLA:CPU schedules at the start of the program: in a training step every layer's backward buffers would
    be alive from the forward pass on (~0.1 GiB a layer at gpt-oss-20b widths). 0 * x is not folded for floats."""
    return jnp.zeros(shape, dtype) + (jnp.sum(x[:1]) * 0).astype(dtype)


def _expert(w, e, dtype):
    """W[e] as a dense [N, K] matrix in `dtype` (only this expert is dequantized)."""
    if isinstance(w, MXFP4Array):
        return MXFP4Array(jax.lax.dynamic_index_in_dim(w.blocks, e, keepdims=False),
                          jax.lax.dynamic_index_in_dim(w.scales, e, keepdims=False), w.dtype).dequantize(dtype)
    return jax.lax.dynamic_index_in_dim(w, e, keepdims=False).astype(dtype)


def _rows_loop(x_AI, w, counts, tile, precision, *, transpose: bool):
    """y[a] = W[e(a)] @ x[a] (transpose: W[e(a)]^T @ x[a]) for every row of every expert that has rows."""
    A = x_AI.shape[0]
    E, N, K = w.shape
    out_dim = K if transpose else N
    spec = "tn,nk->tk" if transpose else "tk,nk->tn"
    out_dtype = jnp.promote_types(F32, x_AI.dtype)
    starts = jnp.cumsum(counts) - counts
    x_pad = jnp.concatenate([x_AI, jnp.zeros((tile, x_AI.shape[1]), x_AI.dtype)])
    out = varying_like(zeros_after((A + tile, out_dim), out_dtype, x_AI), x_AI, w, counts)

    def one_expert(e, out):
        def run(out):
            w_e = _expert(w, e, x_AI.dtype)

            def one_tile(j, out):
                # A tile may run past this expert's rows into the next expert's; those rows are recomputed (and
                # overwritten) when the next expert's turn comes, since experts go in order.
                s = starts[e] + j * tile
                yt = jnp.einsum(spec, jax.lax.dynamic_slice_in_dim(x_pad, s, tile), w_e,
                                preferred_element_type=out_dtype, precision=precision)
                return jax.lax.dynamic_update_slice_in_dim(out, yt, s, axis=0)

            return jax.lax.fori_loop(0, (counts[e] + tile - 1) // tile, one_tile, out)

        return jax.lax.cond(counts[e] > 0, run, lambda o: o, out)

    out = jax.lax.fori_loop(0, E, one_expert, out)
    # the last expert's final tile may have written past the grouped rows (skipped pairs, padding)
    return jnp.where((jnp.arange(A) < jnp.sum(counts))[:, None], out[:A], 0.0)


def _dw_loop(x_AK, dy_AN, counts, tile, precision, shape):
    """dW[e] = sum over expert e's rows of dy[a] x[a]^T, float32 [E, N, K]."""
    E, N, K = shape
    out_dtype = jnp.promote_types(F32, dy_AN.dtype)
    starts = jnp.cumsum(counts) - counts
    x_pad = jnp.concatenate([x_AK, jnp.zeros((tile, K), x_AK.dtype)])
    dy_pad = jnp.concatenate([dy_AN, jnp.zeros((tile, N), dy_AN.dtype)])

    def one_expert(e, dw):
        def run(dw):
            def one_tile(j, acc):
                s = starts[e] + j * tile
                mine = (s + jnp.arange(tile)) < starts[e] + counts[e]  # the tile's rows that are this expert's
                dyt = jnp.where(mine[:, None], jax.lax.dynamic_slice_in_dim(dy_pad, s, tile), 0)
                xt = jax.lax.dynamic_slice_in_dim(x_pad, s, tile).astype(dyt.dtype)
                return acc + jnp.einsum("tn,tk->nk", dyt, xt, preferred_element_type=out_dtype, precision=precision)

            acc0 = varying_like(zeros_after((N, K), out_dtype, dy_AN), x_AK, dy_AN, counts)
            acc = jax.lax.fori_loop(0, (counts[e] + tile - 1) // tile, one_tile, acc0)
            return jax.lax.dynamic_update_index_in_dim(dw, acc, e, axis=0)

        return jax.lax.cond(counts[e] > 0, run, lambda d: d, dw)

    dw0 = varying_like(zeros_after((E, N, K), out_dtype, dy_AN), x_AK, dy_AN, counts)
    return jax.lax.fori_loop(0, E, one_expert, dw0)
