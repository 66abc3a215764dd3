"""`attend_flash`: attention over long prompts in pure XLA with temporaries of one query block, on every backend.

The XLA twin of the Pallas kernel (gptoss.kernels.attention_pallas), same algorithm: a loop over blocks of
`block_q` tokens (all query heads of each kv head together), and inside it a loop over blocks of `block_k` keys
with an online softmax that starts from the sink (max = sink, denominator = 1). Key blocks that no query of the
block can see, by the blocks' position bounds, are skipped by a `cond`, so a causal prefill computes about half
of the T x T scores and a 128-token window O(T W). Being a loop (not unrolled Python blocks), XLA allocates one
block's scores, [B, K, G*block_q, block_k] fp32, instead of keeping several blocks' in flight. Differentiable.
Same contract as `attend` (positions give the masks; negative positions are padding or empty slots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptoss.layers.grouped import zeros_after

F32 = jnp.float32
NEG = -1e30  # finite "minus infinity": exp(NEG - m) is 0 and NEG - NEG is not NaN
BIG = 2**30
BLOCK_Q, BLOCK_K = 256, 512  # tokens per query block, keys per key block (the sharding planner sizes these too)


def attend_flash(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT, k_pos_BS, *, window: int | None, scale: float,
                 precision=None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """attend() in query blocks of `block_q` tokens and key blocks of `block_k`; float32 [B, T, N, H]."""
    B, T, N, H = q_BTNH.shape
    S, Kh = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // Kh
    bq, bk = min(block_q, T), min(block_k, S)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    q_pos_BT = jnp.pad(q_pos_BT.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
    k_pos_BS = jnp.pad(k_pos_BS.astype(jnp.int32), ((0, 0), (0, Sp - S)), constant_values=-1)
    q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    k_BKSH = jnp.pad(k_BSKH, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v_BKSH = jnp.pad(v_BSKH, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    sink_KM = jnp.repeat(sinks_N.astype(F32).reshape(Kh, G), bq, axis=1)  # row m = g * bq + t
    k_lo_J = jnp.min(jnp.where(k_pos_BS >= 0, k_pos_BS, BIG).reshape(B, -1, bk), axis=(0, 2))
    k_hi_J = jnp.max(k_pos_BS.reshape(B, -1, bk), axis=(0, 2))

    def query_block(i, out_BTNH):
        q_BtNH = jax.lax.dynamic_slice_in_dim(q_BTNH, i * bq, bq, axis=1)
        qp_Bt = jax.lax.dynamic_slice_in_dim(q_pos_BT, i * bq, bq, axis=1)
        q_BKMH = q_BtNH.astype(F32).reshape(B, bq, Kh, G, H).transpose(0, 2, 3, 1, 4).reshape(B, Kh, G * bq, H)
        qp_BM = jnp.tile(qp_Bt, (1, G))
        q_hi = jnp.max(qp_Bt)
        q_lo = jnp.min(jnp.where(qp_Bt >= 0, qp_Bt, BIG))

        def key_block(j, carry):
            visible = (k_lo_J[j] <= q_hi) & (k_hi_J[j] >= 0)
            if window is not None:
                visible &= k_hi_J[j] > q_lo - window

            def run(carry):
                m, l, acc = carry
                k = jax.lax.dynamic_slice_in_dim(k_BKSH, j * bk, bk, axis=2).astype(F32)
                v = jax.lax.dynamic_slice_in_dim(v_BKSH, j * bk, bk, axis=2).astype(F32)
                kp = jax.lax.dynamic_slice_in_dim(k_pos_BS, j * bk, bk, axis=1)
                ok = (kp[:, None, :] <= qp_BM[:, :, None]) & (kp[:, None, :] >= 0)
                if window is not None:
                    ok &= kp[:, None, :] > qp_BM[:, :, None] - window
                s = jnp.einsum("bkmh,bksh->bkms", q_BKMH, k, precision=precision) * scale
                s = jnp.where(ok[:, None], s, NEG)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(ok[:, None], jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("bkms,bksh->bkmh", p, v, precision=precision)
                return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

            return jax.lax.cond(visible, run, lambda c: c, carry)

        init = (jnp.broadcast_to(sink_KM, (B, Kh, G * bq)), jnp.ones((B, Kh, G * bq), F32),
                jnp.zeros((B, Kh, G * bq, H), F32))
        _, l, acc = jax.lax.fori_loop(0, Sp // bk, key_block, init)
        out = (acc / l[..., None]).reshape(B, Kh, G, bq, H).transpose(0, 3, 1, 2, 4).reshape(B, bq, N, H)
        return jax.lax.dynamic_update_slice_in_dim(out_BTNH, out, i * bq, axis=1)

    # the output is a carried buffer, not the loop's stacked ys: XLA:CPU would allocate those at program start
    out = jax.lax.fori_loop(0, Tp // bq, query_block, zeros_after((B, Tp, N, H), F32, q_BTNH))
    return out[:, :T]
