"""The MoE layer on a mesh: `jax.shard_map` around the one expert op (gptoss.layers.experts.moe_ffn), with
collectives every XLA backend runs (psum, all_gather, psum_scatter).

Tokens (already routed, outside) arrive split over the batch axes (data, and `expert` where the token count
allows) and replicated over `tensor`. Each device holds E/|expert| experts (rows split over `tensor`):
  * the tokens are all-gathered over `expert`, so every expert shard sees its data shard's tokens;
  * pairs routed to another shard's experts are marked skipped (expert -1) and cost nothing: the grouped strategy
    and the CPU kernel never touch them; the gather strategy packs the local pairs first and runs them in chunks
    of about (pairs / expert shards), as many chunks as the local pairs need (one when routing is balanced);
    dense runs only the local experts (no ragged_all_to_all: XLA:CPU cannot run it, and this runs everywhere);
  * `psum_scatter` over `expert` adds the experts' contributions (each pair is computed by exactly one shard)
    and hands each shard its own tokens back (`psum` where the tokens were replicated over `expert`);
  * with tensor parallelism (default rules): gate_up's rows are split, so each device holds whole gate/up
    pairs for I/|tensor| units; the activation [.., I] is all-gathered over `tensor` and down's output rows
    (D/|tensor|) are computed locally, then all-gathered. With MEGATRON_RULES (down split on its reduction
    blocks) the partial outputs are psum'ed instead. These collectives are the op's TensorParallel hook.
Everything is differentiable (shard_map transposes the collectives), so training runs through it too.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptoss.layers.experts import ExpertAdapters, ExpertWeights, TensorParallel, choose_strategy, moe_ffn
from gptoss.manual_axes import varying_like
from gptoss.sharding.rules import PARAM_AXES

CHUNK_ALIGN = 8


def _specs(layout, ew: ExpertWeights) -> ExpertWeights:
    """The PartitionSpecs of a layer's expert weights (a pytree shaped like `ew`)."""

    def spec(name, value):
        return layout.value_spec(PARAM_AXES[name], value, name)

    ad = ew.adapters
    adapters = None if ad is None else ExpertAdapters(
        spec("gate_up_a_ERD", ad.gate_up_a_ERD), spec("gate_up_b_EFR", ad.gate_up_b_EFR),
        spec("down_a_ERI", ad.down_a_ERI), spec("down_b_EDR", ad.down_b_EDR), ad.scale,
        None if ad.dropout_key is None else P(), ad.dropout)
    return ExpertWeights(spec("gate_up_EFD", ew.gate_up_EFD), spec("gate_up_bias_EF", ew.gate_up_bias_EF),
                         spec("down_EDI", ew.down_EDI), spec("down_bias_ED", ew.down_bias_ED), adapters,
                         ew.limit, ew.alpha)


def sharded_moe(layout, x_TD, idx_TK, w_TK, ew: ExpertWeights, rt):
    """sum_k w_tk * FFN_{e_tk}(x_t) [T, D] in fp32, computed under shard_map on `layout.mesh`."""
    K = idx_TK.shape[1]
    tok = layout.spec(("tokens", "embed"), x_TD.shape)
    tok_part = tok[0] if len(tok) else None
    tok_axes = () if tok_part is None else (tok_part,) if isinstance(tok_part, str) else tuple(tok_part)
    tok_spec = P(tok_part, None)
    e_axes, f_axes = layout.axes("experts"), layout.axes("expert_ffn")
    o_axes, fi_axes = layout.axes("expert_embed_out"), layout.axes("expert_ffn_in")
    n_shards = math.prod(layout.sizes[a] for a in e_axes)
    gather_axes = tuple(a for a in tok_axes if a in e_axes)
    sum_axes = tuple(a for a in e_axes if a not in gather_axes)
    tp = None
    if f_axes or fi_axes:
        gather_mid = None
        if f_axes and not fi_axes:  # activation [.., I/t] -> [.., I] before the down projection
            def gather_mid(a):
                return jax.lax.all_gather(a, f_axes, axis=a.ndim - 1, tiled=True)
        reduce = (lambda y: jax.lax.psum(y, fi_axes)) if fi_axes else None
        tp = TensorParallel(gather_mid, reduce)

    # the axes over which shards hold different (token, expert) pairs: adapter dropout masks differ only over these
    pair_axes = tuple(dict.fromkeys(tok_axes + tuple(e_axes)))

    def body(x, idx, w, local_ew):
        E_l = local_ew.num_experts
        local_ew = _shard_dropout_key(local_ew, pair_axes)
        if gather_axes:  # every expert shard sees all of its data shard's tokens
            x, idx, w = (jax.lax.all_gather(v, gather_axes, axis=0, tiled=True) for v in (x, idx, w))
        if e_axes:  # pairs routed to another shard's experts are skipped
            local = idx - jax.lax.axis_index(e_axes) * E_l
            idx = jnp.where((local >= 0) & (local < E_l), local, -1)
        strategy = choose_strategy(rt.moe_impl, x.shape[0], K, E_l)
        run = dict(cpu_kernels=rt.cpu_kernels, pallas=rt.pallas_kernels, precision=rt.precision, tp=tp)
        if e_axes and strategy == "gather":
            y = local_pairs_in_chunks(x, idx, w, local_ew, n_shards, **run)
        else:
            y = moe_ffn(x, idx, w, local_ew, moe_impl=strategy, **run)
        if gather_axes:  # sum over expert shards, and give each its own tokens back
            y = jax.lax.psum_scatter(y, gather_axes, scatter_dimension=0, tiled=True)
        if sum_axes:
            y = jax.lax.psum(y, sum_axes)
        if o_axes:
            y = jax.lax.all_gather(y, o_axes, axis=1, tiled=True, to="invarying")
        return y

    fn = jax.shard_map(body, mesh=layout.mesh, in_specs=(tok_spec, tok_spec, tok_spec, _specs(layout, ew)),
                       out_specs=tok_spec)
    return fn(x_TD, idx_TK, w_TK, ew)


def _shard_dropout_key(ew: ExpertWeights, axes, salt=None) -> ExpertWeights:
    """Adapter dropout draws its own mask on each shard (and chunk): the replicated key folded with the index."""
    ad = ew.adapters
    if ad is None or ad.dropout_key is None or (salt is None and not axes):
        return ew
    key = jax.random.fold_in(ad.dropout_key, jax.lax.axis_index(axes) if salt is None else salt)
    return dataclasses.replace(ew, adapters=dataclasses.replace(ad, dropout_key=key))


def local_pairs_in_chunks(x_TD, idx_TK, w_TK, ew: ExpertWeights, n_shards: int, **run):
    """The gather strategy over only the pairs with a local expert (idx >= 0): they are packed first and run in
    chunks of C = pairs / n_shards (rounded up to CHUNK_ALIGN); chunks past the local pairs are skipped at run
    time, so a device does ceil(local pairs / C) chunks of work, one when routing is balanced. Exact: no pair
    is ever dropped, however unbalanced the routing."""
    T, K = idx_TK.shape
    A = T * K
    C = min(A, -(-A // (n_shards * CHUNK_ALIGN)) * CHUNK_ALIGN)
    if C == A:
        return moe_ffn(x_TD, idx_TK, w_TK, ew, moe_impl="gather", **run)
    n_chunks = -(-A // C)
    flat = idx_TK.reshape(-1)
    order = varying_like(jnp.argsort(flat < 0, stable=True), flat)  # local pairs first (see GroupedRows.order)
    n_local = jnp.sum(flat >= 0)
    pad = n_chunks * C - A
    token = jnp.concatenate([order // K, jnp.zeros((pad,), order.dtype)])
    rows = x_TD[token].reshape(n_chunks, C, -1)
    expert = jnp.concatenate([flat[order], jnp.full((pad,), -1, flat.dtype)]).reshape(n_chunks, C, 1)
    weight = jnp.concatenate([w_TK.reshape(-1)[order], jnp.zeros((pad,), w_TK.dtype)]).reshape(n_chunks, C, 1)
    # Whether a chunk runs differs between devices, so no collective may sit in (or, for the backward pass, be
    # implied by) a skipped branch: every operand is made to vary over every mesh axis any of them varies over
    # before the loop, so the sums over replicas that autodiff adds come after it. (The tensor-parallel
    # collectives inside run within one tensor group, whose devices share their pairs and so their branches.)
    everything = (rows, expert, weight, ew)
    rows, expert, weight, ew = jax.tree.map(lambda a: varying_like(a, *everything), everything)

    def chunk(_, c):
        i, rows_c, e_c, w_c = c

        def compute():  # each pair is its own one-expert "token"
            return moe_ffn(rows_c, e_c, w_c, _shard_dropout_key(ew, (), salt=i), moe_impl="gather", **run)

        return None, jax.lax.cond(i * C < n_local, compute, lambda: _zeros_like_result(compute))

    _, y = jax.lax.scan(chunk, None, (jnp.arange(n_chunks), rows, expert, weight))
    return jax.ops.segment_sum(y.reshape(n_chunks * C, -1), token, num_segments=T)


def _zeros_like_result(fn):
    """Zeros of fn()'s type, including the mesh axes it varies over (cond's two branches must agree on them)."""
    out = jax.eval_shape(fn)
    return varying_like(jnp.zeros(out.shape, out.dtype), out)
