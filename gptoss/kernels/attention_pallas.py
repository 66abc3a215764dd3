"""Flash attention with per-head sinks and a sliding window as a Pallas kernel (Triton lowering on GPU; interpret
mode on CPU for the tests). Same contract as `gptoss.layers.attention.attend`.

One program per (batch row, kv head, block of `block_q` query rows); the rows are the G query heads that share
the kv head times the block's tokens, so K and V are read once per group. The program walks the keys in blocks
of `block_k` with an online softmax (running max, denominator, fp32 accumulator): no [T, S] score matrix exists.
The sink is the softmax's starting point (max = sink, denominator = 1), which both puts it in the denominator and
keeps fully masked rows finite (their output is 0, as in `attend`). Masks come from positions only: key allowed
when 0 <= k_pos <= q_pos and, with a window W, k_pos > q_pos - W. A key block no query of the block can see
(from the blocks' position bounds) is skipped, so a causal prefill does about half the work and a windowed one
O(T W).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32
NEG = -1e30  # finite "minus infinity": exp(NEG - m) is 0 and NEG - NEG is not NaN
BIG = 2**30


def _kernel(q_ref, qpos_ref, sink_ref, k_ref, v_ref, kpos_ref, o_ref, *, blocks_k: int, bk: int, window, scale,
            dot_dtype, precision):
    b, kh = pl.program_id(0), pl.program_id(1)
    q = q_ref[...].astype(dot_dtype)  # [bq, H]
    qp = qpos_ref[...]  # [bq] int32, -1 for padding rows
    q_hi = jnp.max(qp)
    q_lo = jnp.min(jnp.where(qp >= 0, qp, BIG))
    bq, H = q.shape

    def step(j, carry):
        m, l, acc = carry
        kp = kpos_ref[b, pl.ds(j * bk, bk)]
        k_lo = jnp.min(jnp.where(kp >= 0, kp, BIG))
        k_hi = jnp.max(kp)
        visible = (k_lo <= q_hi) & (k_hi >= 0)
        if window is not None:
            visible &= k_hi > q_lo - window

        def run(carry):
            m, l, acc = carry
            k = k_ref[b, pl.ds(j * bk, bk), kh, :].astype(dot_dtype)
            v = v_ref[b, pl.ds(j * bk, bk), kh, :].astype(dot_dtype)
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=F32,
                                    precision=precision) * scale
            ok = (kp[None, :] <= qp[:, None]) & (kp[None, :] >= 0)
            if window is not None:
                ok &= kp[None, :] > qp[:, None] - window
            s = jnp.where(ok, s, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jax.lax.dot_general(p.astype(dot_dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=F32,
                                     precision=precision)
            return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

        return jax.lax.cond(visible, run, lambda c: c, carry)

    sink = sink_ref[...].astype(F32)
    init = (sink, jnp.ones((bq,), F32), jnp.zeros((bq, H), F32))
    _, l, acc = jax.lax.fori_loop(0, blocks_k, step, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head size here: any in interpret mode; on a GPU a power of two >= 16 (a
    Triton block dimension; gpt-oss has 64)."""
    return jax.default_backend() == "cpu" or (head_dim >= 16 and head_dim & (head_dim - 1) == 0)


def flash_attend_pallas(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT, k_pos_BS, *, window: int | None, scale: float,
                        precision=None, block_q: int = 64, block_k: int = 64, interpret: bool | None = None):
    """attend() as one Pallas kernel; float32 [B, T, N, H]. `precision` HIGHEST: fp32 dots (float32 models)."""
    B, T, N, H = q_BTNH.shape
    S, Kh = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // Kh
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    # rows m = t*G + g of kv head kh: a block of rows covers a few consecutive tokens of all G heads
    M = T * G
    bq = block_q
    Mp = -(-M // bq) * bq
    q_BKMH = q_BTNH.reshape(B, T, Kh, G, H).transpose(0, 2, 1, 3, 4).reshape(B, Kh, M, H)
    q_BKMH = jnp.pad(q_BKMH, ((0, 0), (0, 0), (0, Mp - M), (0, 0)))
    qpos_BM = jnp.pad(jnp.repeat(q_pos_BT.astype(jnp.int32), G, axis=1), ((0, 0), (0, Mp - M)), constant_values=-1)
    sink_KM = jnp.pad(jnp.tile(sinks_N.astype(F32).reshape(Kh, 1, G), (1, T, 1)).reshape(Kh, M), ((0, 0), (0, Mp - M)))
    bk = block_k
    Sp = -(-S // bk) * bk
    if Sp != S:  # padded keys carry position -1: never allowed
        k_BSKH = jnp.pad(k_BSKH, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
        v_BSKH = jnp.pad(v_BSKH, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
        k_pos_BS = jnp.pad(k_pos_BS, ((0, 0), (0, Sp - S)), constant_values=-1)
    fp32 = precision == jax.lax.Precision.HIGHEST or jnp.dtype(q_BTNH.dtype).itemsize >= 4
    kernel = functools.partial(_kernel, blocks_k=Sp // bk, bk=bk, window=window, scale=float(scale),
                               dot_dtype=F32 if fp32 else jnp.bfloat16,
                               precision=jax.lax.Precision.HIGHEST if fp32 else None)
    o = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, Kh, Mp, H), F32),
        grid=(B, Kh, Mp // bq),
        in_specs=[
            pl.BlockSpec((None, None, bq, H), lambda b, kh, i: (b, kh, i, 0)),
            pl.BlockSpec((None, bq), lambda b, kh, i: (b, i)),
            pl.BlockSpec((None, bq), lambda b, kh, i: (kh, i)),
            pl.BlockSpec(k_BSKH.shape, lambda b, kh, i: (0, 0, 0, 0)),
            pl.BlockSpec(v_BSKH.shape, lambda b, kh, i: (0, 0, 0, 0)),
            pl.BlockSpec(k_pos_BS.shape, lambda b, kh, i: (0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bq, H), lambda b, kh, i: (b, kh, i, 0)),
        interpret=interpret,
        compiler_params=None if interpret else plt.CompilerParams(num_warps=4, num_stages=2),
        name="gptoss_flash_attention",
    )(q_BKMH, qpos_BM, sink_KM, k_BSKH, v_BSKH, k_pos_BS.astype(jnp.int32))
    return o[:, :, :M].reshape(B, Kh, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
