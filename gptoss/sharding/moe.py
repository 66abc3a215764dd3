"""The MoE layer on a mesh: `jax.shard_map` with collectives every XLA backend runs (psum, all_gather).

Tokens (already routed, outside) arrive split over the batch axes (data, and `expert` where the token count
allows) and replicated over `tensor`. Each device holds E/|expert| experts (rows split over `tensor`):
  * the tokens are all-gathered over `expert`, so every expert shard sees its data shard's tokens;
  * it computes the token-expert pairs routed to its own experts; pairs routed elsewhere are weighted 0
    (no ragged_all_to_all: XLA:CPU cannot run it, so the same code runs on every backend);
  * `psum_scatter` over `expert` adds the experts' contributions (each pair is computed by exactly one shard)
    and hands each shard its own tokens back (`psum` where the tokens were replicated over `expert`);
  * with tensor parallelism (default rules): gate_up's rows are split, so each device holds whole gate/up
    pairs for I/|tensor| units; the activation [.., I] is all-gathered over `tensor` and down's output rows
    (D/|tensor|) are computed locally, then all-gathered. With MEGATRON_RULES (down split on its reduction
    blocks) the partial outputs are psum'ed instead.
Without tensor parallelism the per-shard work is `gptoss.layers.dispatch.run_moe` on the local experts, so
the MXFP4 CPU kernel, `gather` and `grouped` all apply unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptoss.kernels import mxfp4_cpu
from gptoss.layers.dispatch import ExpertWeights, choose_impl, kernel_serves, run_moe, swiglu
from gptoss.quant import MXFP4Array, as_dense

GATE_UP = ("experts", "expert_ffn", "expert_embed_in")
GATE_UP_BIAS = ("experts", "expert_ffn")
DOWN = ("experts", "expert_embed_out", "expert_ffn_in")
DOWN_BIAS = ("experts", "expert_embed_out")


def sharded_moe(layout, impl: str, x_TD, idx_TK, w_TK, ew: ExpertWeights):
    """sum_k w_tk * FFN_{e_tk}(x_t) [T, D] in fp32, computed under shard_map on `layout.mesh`."""
    K = idx_TK.shape[1]
    tok = layout.spec(("tokens", "embed"), x_TD.shape)
    tok_part = tok[0] if len(tok) else None
    tok_axes = () if tok_part is None else (tok_part,) if isinstance(tok_part, str) else tuple(tok_part)
    tok_spec = P(tok_part, None)
    e_axes, f_axes = layout.axes("experts"), layout.axes("expert_ffn")
    o_axes, fi_axes = layout.axes("expert_embed_out"), layout.axes("expert_ffn_in")
    specs = (layout.value_spec(GATE_UP, ew.gate_up_EFD), layout.spec(GATE_UP_BIAS, ew.gate_up_bias_EF.shape),
             layout.value_spec(DOWN, ew.down_EDI), layout.spec(DOWN_BIAS, ew.down_bias_ED.shape))
    tensor_parallel = bool(f_axes or o_axes or fi_axes)
    limit, alpha = ew.limit, ew.alpha

    gather_axes = tuple(a for a in tok_axes if a in e_axes)
    sum_axes = tuple(a for a in e_axes if a not in gather_axes)

    def body(x, idx, w, gu, gub, dn, dnb):
        E_l = gub.shape[0]
        if gather_axes:  # every expert shard sees all of its data shard's tokens
            x, idx, w = (jax.lax.all_gather(v, gather_axes, axis=0, tiled=True) for v in (x, idx, w))
        if e_axes:  # pairs routed to another shard's experts: weight 0 (computed on local expert 0, discarded)
            local = idx - jax.lax.axis_index(e_axes) * E_l
            mine = (local >= 0) & (local < E_l)
            w = jnp.where(mine, w, 0.0).astype(w.dtype)
            idx = jnp.where(mine, local, 0)
        local_ew = ExpertWeights(gu, gub, dn, dnb, limit, alpha)
        mode = choose_impl(impl, x.shape[0], K, E_l)
        if tensor_parallel:
            y = _tp_ffn(mode, x, idx, w, local_ew, f_axes, fi_axes)
        else:
            y = run_moe(mode, x, idx, w, local_ew).astype(jnp.float32)
        if gather_axes:  # sum over expert shards, and give each its own tokens back
            y = jax.lax.psum_scatter(y, gather_axes, scatter_dimension=0, tiled=True)
        if sum_axes:
            y = jax.lax.psum(y, sum_axes)
        if o_axes:
            y = jax.lax.all_gather(y, o_axes, axis=1, tiled=True, to="invarying")
        return y

    fn = jax.shard_map(body, mesh=layout.mesh, in_specs=(tok_spec, tok_spec, tok_spec, *specs),
                       out_specs=tok_spec)
    return fn(x_TD, idx_TK, w_TK, ew.gate_up_EFD, ew.gate_up_bias_EF, ew.down_EDI, ew.down_bias_ED)


def _tp_ffn(mode: str, x_TD, idx_TK, w_TK, ew: ExpertWeights, f_axes, fi_axes):
    """The local experts' FFN with gate_up rows split over f_axes: [T, D/|o_axes|] fp32 (biases included)."""
    T, K = idx_TK.shape
    dt = x_TD.dtype
    gather_mid = bool(f_axes) and not fi_axes  # activation [.., I/t] -> [.., I] before the down projection

    def mid(a, axis):
        return jax.lax.all_gather(a, f_axes, axis=axis, tiled=True) if gather_mid else a

    if kernel_serves(ew) or mode == "gather":
        kernel = kernel_serves(ew)
        if kernel:
            h = mxfp4_cpu.mx_gather_matmul(x_TD, ew.gate_up_EFD, idx_TK, grouped=mode != "gather")  # [T, K, F]
        else:
            w1 = _take(ew.gate_up_EFD, idx_TK, dt)  # [T, K, F, D]
            h = jnp.einsum("td,tkfd->tkf", x_TD, w1, preferred_element_type=jnp.float32)
        h = h + ew.gate_up_bias_EF[idx_TK].astype(jnp.float32)
        a = mid(swiglu(h, ew.limit, ew.alpha).astype(dt), axis=2)  # [T, K, I(/t)]
        if kernel:
            y = mxfp4_cpu.mx_gather_matmul(a.reshape(T * K, -1), ew.down_EDI, idx_TK.reshape(T * K, 1),
                                           grouped=mode != "gather").reshape(T, K, -1)
        else:
            y = jnp.einsum("tki,tkdi->tkd", a, _take(ew.down_EDI, idx_TK, dt), preferred_element_type=jnp.float32)
        y = jnp.einsum("tk,tkd->td", w_TK.astype(jnp.float32), y)
        bias = jnp.einsum("tk,tkd->td", w_TK.astype(jnp.float32), ew.down_bias_ED[idx_TK].astype(jnp.float32))
    else:  # dense over the local experts (also what "grouped" means here without the kernel)
        E_l = ew.gate_up_bias_EF.shape[0]
        h = jnp.einsum("td,efd->etf", x_TD, as_dense(ew.gate_up_EFD, dt), preferred_element_type=jnp.float32)
        h = h + ew.gate_up_bias_EF[:, None, :].astype(jnp.float32)
        a = mid(swiglu(h, ew.limit, ew.alpha).astype(dt), axis=2)  # [E, T, I(/t)]
        y = jnp.einsum("eti,edi->etd", a, as_dense(ew.down_EDI, dt), preferred_element_type=jnp.float32)
        combine_TE = jnp.sum(jax.nn.one_hot(idx_TK, E_l, dtype=jnp.float32) * w_TK[..., None], axis=1)
        y = jnp.einsum("te,etd->td", combine_TE, y)
        bias = combine_TE @ ew.down_bias_ED.astype(jnp.float32)
    if fi_axes:  # down split on its reduction blocks: partial sums (bias added once, after)
        y = jax.lax.psum(y, fi_axes)
    return y + bias


def _take(w, idx_TK, dtype):
    T, K = idx_TK.shape
    flat = idx_TK.reshape(-1)
    if isinstance(w, MXFP4Array):
        d = w.take(flat).dequantize(dtype)
    else:
        d = jnp.take(w, flat, axis=0).astype(dtype)
    return d.reshape(T, K, *d.shape[1:])
