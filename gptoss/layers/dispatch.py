"""MoE dispatch strategies: three ways to compute sum_k w_tk * FFN_{e_tk}(x_t), all exact.

* `dense`:   every expert on every token, unselected ones weighted 0. The slow, obvious reference.
* `gather`:  per token, gather (still packed) and dequantize only its k experts. Cheap for a few tokens
             (decode); memory grows with tokens * k * expert size.
* `grouped`: sort the token-expert pairs by expert; for each expert that got tokens, dequantize it once and
             run its tokens in fixed-size tiles. The prefill path; no token is ever dropped.

With packed (MXFP4Array) experts on the CPU, `gather` and `grouped` run both expert matmuls in the fused
MXFP4 kernel (gptoss.kernels.mxfp4_cpu: an XLA FFI call that reads the packed bytes in place; decode GEMVs
for `gather`, per-expert GEMMs for `grouped`); bias, SwiGLU and the combine stay in XLA. The pure-XLA code
below is the reference twin, used on other backends, without the library, or with GPTOSS_MXFP4_KERNEL=0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gptoss.kernels import mxfp4_cpu
from gptoss.quant import MXFP4Array, as_dense

IMPLS = ("auto", "dense", "gather", "grouped")


@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """One layer's experts in checkpoint orientation: gate_up [E, 2I, D] (gate/up rows interleaved),
    down [E, D, I]; each either dense or an MXFP4Array."""

    gate_up_EFD: Any
    gate_up_bias_EF: Any
    down_EDI: Any
    down_bias_ED: Any
    limit: float
    alpha: float


def swiglu(h_TF, limit: float, alpha: float):
    """gpt-oss's clamped SwiGLU on interleaved (gate, up) columns: gate*sigmoid(alpha*gate)*(up+1)."""
    gate, up = h_TF[..., 0::2], h_TF[..., 1::2]
    gate = jnp.minimum(gate, limit)  # gate is clamped from above only
    up = jnp.clip(up, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1.0)


def _ffn(x_TD, w1_FD, b1_F, w2_DI, b2_D, limit, alpha):
    h = jnp.einsum("td,fd->tf", x_TD, w1_FD, preferred_element_type=jnp.float32) + b1_F.astype(jnp.float32)
    a = swiglu(h, limit, alpha).astype(x_TD.dtype)
    return jnp.einsum("ti,di->td", a, w2_DI, preferred_element_type=jnp.float32) + b2_D.astype(jnp.float32)


def moe_dense(x_TD, idx_TK, w_TK, ew: ExpertWeights):
    E = ew.gate_up_bias_EF.shape[0]
    w1 = as_dense(ew.gate_up_EFD, x_TD.dtype)
    w2 = as_dense(ew.down_EDI, x_TD.dtype)
    h = jnp.einsum("td,efd->etf", x_TD, w1, preferred_element_type=jnp.float32)
    h = h + ew.gate_up_bias_EF[:, None, :].astype(jnp.float32)
    a = swiglu(h, ew.limit, ew.alpha).astype(x_TD.dtype)
    y = jnp.einsum("eti,edi->etd", a, w2, preferred_element_type=jnp.float32)
    y = y + ew.down_bias_ED[:, None, :].astype(jnp.float32)
    combine_TE = jnp.sum(jax.nn.one_hot(idx_TK, E, dtype=jnp.float32) * w_TK[..., None], axis=1)
    return jnp.einsum("te,etd->td", combine_TE, y)


def kernel_serves(ew: ExpertWeights) -> bool:
    """Whether this layer's expert matmuls go to the MXFP4 CPU kernel (decided at trace time)."""
    return (isinstance(ew.gate_up_EFD, MXFP4Array) and isinstance(ew.down_EDI, MXFP4Array)
            and mxfp4_cpu.kernel_enabled())


def moe_kernel(x_TD, idx_TK, w_TK, ew: ExpertWeights, grouped: bool):
    """gather/grouped through the MXFP4 kernel: gate_up on each token's k experts, SwiGLU, down per pair."""
    T, K = idx_TK.shape
    h = mxfp4_cpu.mx_gather_matmul(x_TD, ew.gate_up_EFD, idx_TK, grouped=grouped)  # [T, K, F] fp32
    h = h + ew.gate_up_bias_EF[idx_TK].astype(jnp.float32)
    a = swiglu(h, ew.limit, ew.alpha).astype(x_TD.dtype)
    y = mxfp4_cpu.mx_gather_matmul(a.reshape(T * K, -1), ew.down_EDI, idx_TK.reshape(T * K, 1), grouped=grouped)
    y = y.reshape(T, K, -1) + ew.down_bias_ED[idx_TK].astype(jnp.float32)
    return jnp.einsum("tk,tkd->td", w_TK, y)


def moe_gather(x_TD, idx_TK, w_TK, ew: ExpertWeights):
    if kernel_serves(ew):
        return moe_kernel(x_TD, idx_TK, w_TK, ew, grouped=False)
    T, K = idx_TK.shape
    flat = idx_TK.reshape(-1)
    w1 = _take(ew.gate_up_EFD, flat, x_TD.dtype)  # [T*K, F, D]
    w2 = _take(ew.down_EDI, flat, x_TD.dtype)
    x = jnp.repeat(x_TD, K, axis=0)
    h = jnp.einsum("ad,afd->af", x, w1, preferred_element_type=jnp.float32)
    h = h + ew.gate_up_bias_EF[flat].astype(jnp.float32)
    a = swiglu(h, ew.limit, ew.alpha).astype(x_TD.dtype)
    y = jnp.einsum("ai,adi->ad", a, w2, preferred_element_type=jnp.float32)
    y = y + ew.down_bias_ED[flat].astype(jnp.float32)
    return jnp.einsum("tk,tkd->td", w_TK, y.reshape(T, K, -1))


def moe_grouped(x_TD, idx_TK, w_TK, ew: ExpertWeights, tile: int | None = None):
    if kernel_serves(ew):  # (the kernel tiles by itself; `tile` applies to the XLA path)
        return moe_kernel(x_TD, idx_TK, w_TK, ew, grouped=True)
    T, K = idx_TK.shape
    D = x_TD.shape[-1]
    E = ew.gate_up_bias_EF.shape[0]
    A = T * K
    if tile is None:  # about the mean group size, a power of two in [8, 256]
        tile = int(min(256, max(8, 1 << max(0, (A // E - 1)).bit_length())))
    flat = idx_TK.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=E)
    starts = jnp.cumsum(counts) - counts
    x_sorted = jnp.concatenate([x_TD[order // K], jnp.zeros((tile, D), x_TD.dtype)])
    out = jnp.zeros((A + tile, D), jnp.float32)

    def one_expert(e, out):
        def run(out):
            w1 = _index(ew.gate_up_EFD, e, x_TD.dtype)
            w2 = _index(ew.down_EDI, e, x_TD.dtype)
            b1, b2 = ew.gate_up_bias_EF[e], ew.down_bias_ED[e]

            def one_tile(j, out):
                # A tile may run past this expert's rows into the next expert's; those rows are
                # recomputed (and overwritten) when the next expert's turn comes, since experts go in order.
                s = starts[e] + j * tile
                xt = jax.lax.dynamic_slice_in_dim(x_sorted, s, tile)
                yt = _ffn(xt, w1, b1, w2, b2, ew.limit, ew.alpha)
                return jax.lax.dynamic_update_slice_in_dim(out, yt, s, axis=0)

            return jax.lax.fori_loop(0, (counts[e] + tile - 1) // tile, one_tile, out)

        return jax.lax.cond(counts[e] > 0, run, lambda o: o, out)

    out = jax.lax.fori_loop(0, E, one_expert, out)
    y = jnp.zeros((A, D), jnp.float32).at[order].set(out[:A])
    return jnp.einsum("tk,tkd->td", w_TK, y.reshape(T, K, D))


def choose_impl(impl: str, num_tokens: int, top_k: int, num_experts: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown moe_impl {impl!r}; choose one of {IMPLS}")
    if impl != "auto":
        return impl
    # Gathering materializes one dequantized expert per (token, k); once that is more than all the
    # experts, dequantizing each expert once (grouped) is cheaper.
    return "gather" if num_tokens * top_k < num_experts else "grouped"


def run_moe(impl: str, x_TD, idx_TK, w_TK, ew: ExpertWeights):
    fn = {"dense": moe_dense, "gather": moe_gather, "grouped": moe_grouped}[impl]
    return fn(x_TD, idx_TK, w_TK, ew)


def _take(w, idx, dtype):
    if isinstance(w, MXFP4Array):
        return w.take(idx).dequantize(dtype)
    return jnp.take(w, idx, axis=0).astype(dtype)


def _index(w, e, dtype):
    if isinstance(w, MXFP4Array):
        return MXFP4Array(jax.lax.dynamic_index_in_dim(w.blocks, e, keepdims=False),
                          jax.lax.dynamic_index_in_dim(w.scales, e, keepdims=False), w.dtype).dequantize(dtype)
    return jax.lax.dynamic_index_in_dim(w, e, keepdims=False).astype(dtype)
