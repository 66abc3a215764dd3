"""Grouped-query attention with q/k/v/o biases, per-head sinks and an optional sliding window."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.kernels import attention_cpu, attention_pallas
from gptoss.layers.flash import attend_flash
from gptoss.layers.kv_cache import LayerCache
from gptoss.layers.linear import project, project_many
from gptoss.layers.lora import AttentionLoRA
from gptoss.layers.rope import apply_rope
from gptoss.layers.runtime import DEFAULT, Runtime


def attend(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT, k_pos_BS, *, window: int | None, scale: float,
           precision=None, q_seg_BT=None, k_seg_BS=None):
    """Softmax attention where each head's sink is one extra logit with no value, in fp32 (`precision`: the
    matmuls' precision; HIGHEST for float32 models).

    Keys are allowed when 0 <= k_pos <= q_pos and, with a window W, k_pos > q_pos - W (W keys including
    the query's own). Negative key positions mark empty cache slots or padding. With segment ids (packed
    training rows, positions restarting per segment) a key must also be in the query's segment. Returns [B, T, N, H].
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K  # query head n uses kv head n // G
    # One plain batched GEMM per kv head, [G*T, H] x [S, H]: XLA:CPU runs the equivalent 5-D einsum (g and t both
    # free) ~2x slower for the scores and ~5x slower for p.v at T = 512.
    q_BKMH = q_BTNH.astype(jnp.float32).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    k_BKSH = k_BSKH.astype(jnp.float32).transpose(0, 2, 1, 3)
    v_BKSH = v_BSKH.astype(jnp.float32).transpose(0, 2, 1, 3)
    logits_BKGTS = (jnp.einsum("bkmh,bksh->bkms", q_BKMH, k_BKSH, precision=precision) * scale).reshape(B, K, G, T, S)
    qp, kp = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
    allowed_BTS = (kp <= qp) & (kp >= 0)
    if window is not None:
        allowed_BTS &= kp > qp - window
    if q_seg_BT is not None:
        allowed_BTS &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    logits_BKGTS = jnp.where(allowed_BTS[:, None, None], logits_BKGTS, -jnp.inf)
    sink_KG = sinks_N.astype(jnp.float32).reshape(K, G)[None, :, :, None, None]  # not scaled
    m = jnp.maximum(jnp.max(logits_BKGTS, axis=-1, keepdims=True), sink_KG)
    p = jnp.exp(logits_BKGTS - m)
    denom = jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink_KG - m)
    out_BKMH = jnp.einsum("bkms,bksh->bkmh", (p / denom).reshape(B, K, G * T, S), v_BKSH, precision=precision)
    return out_BKMH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


QUERY_BLOCK = 128
FLASH_FROM = 1024


def uses_flash(T: int, S: int) -> bool:
    """Whether attend_blocked runs attend_flash for T queries over S keys: past FLASH_FROM queries, or once the score
    matrix outgrows a FLASH_FROM-token prompt's (a chunk against a long cache). Below, unrolled blocks are faster on
    CPU (~1.8x at T = 512)."""
    return T > 1 and (T > FLASH_FROM or T * S > FLASH_FROM * FLASH_FROM)


def query_block(T: int) -> int:
    """Query rows per block of attend_blocked."""
    return QUERY_BLOCK


def attend_blocked(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT, k_pos_BS, *, window: int | None, scale: float,
                   n_prefix: int = 0, precision=None):
    """attend() one block of queries at a time, each against only the keys it can see: the first `n_prefix` keys
    (a cache: any order, always kept) and, of the rest (this chunk's own keys, key i = query i), those from the
    block's window start to its last query. Same result as attend() when each row's non-negative positions are
    its indices plus a constant (prompts in order, padding < 0), since then no allowed key lies outside the slice;
    a causal prefill then computes ~5/8 of the T x T scores at T = 512 (half with the 128-token window). XLA keeps
    several unrolled blocks in flight (0.3-0.55x of the whole fp32 score matrix), so for long prompts or long caches
    (`uses_flash`) this is attend_flash, whose temporaries are one block's and which skips empty cache blocks."""
    T = q_BTNH.shape[1]
    if uses_flash(T, k_BSKH.shape[1]):
        return attend_flash(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT, k_pos_BS, window=window, scale=scale,
                            precision=precision)
    block = query_block(T)
    if T <= block:
        return attend(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT, k_pos_BS, window=window, scale=scale,
                      precision=precision)

    def keys(a, lo, hi):
        own = a[:, n_prefix + lo: n_prefix + hi]
        return own if n_prefix == 0 else jnp.concatenate([a[:, :n_prefix], own], axis=1)

    out = []
    for lo in range(0, T, block):
        hi = min(T, lo + block)
        k_lo = 0 if window is None else max(0, lo - window + 1)
        out.append(attend(q_BTNH[:, lo:hi], keys(k_BSKH, k_lo, hi), keys(v_BSKH, k_lo, hi), sinks_N,
                          q_pos_BT[:, lo:hi], keys(k_pos_BS, k_lo, hi), window=window, scale=scale,
                          precision=precision))
    return jnp.concatenate(out, axis=1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        init = nnx.initializers.normal(D**-0.5)

        def param(shape, std_init=init):
            return nnx.Param(std_init(rngs.params(), shape, jnp.float32).astype(dtype))

        zeros = nnx.initializers.zeros
        # The checkpoint's [out, in] layout (q_proj [N * H, D], o_proj [D, N * H]): a decode step on CPU reads each
        # weight row after row, one forward stream per core (the [in, out] layout read ~15 % slower, up to ~25 % when
        # memory is fast), and the bf16 prefill tiles take [out, in] weights.
        self.wq_NHD, self.bq_NH = param((N, H, D)), param((N, H), zeros)
        self.wk_KHD, self.bk_KH = param((K, H, D)), param((K, H), zeros)
        self.wv_KHD, self.bv_KH = param((K, H, D)), param((K, H), zeros)
        self.wo_DNH = nnx.Param((init(rngs.params(), (D, N, H), jnp.float32) * (D / (N * H)) ** 0.5).astype(dtype))
        self.bo_D = param((D,), zeros)
        self.sinks_N = param((N,), zeros)
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.scale = H**-0.5
        self.adapters: AttentionLoRA | None = nnx.data(None)

    def adapter_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """(input dims, output dims) of each projection's weight, for its LoRA."""
        D, (N, H), K = self.wq_NHD.shape[-1], self.bq_NH.shape, self.bk_KH.shape[0]
        return {"q": ((D,), (N, H)), "k": ((D,), (K, H)), "v": ((D,), (K, H)), "o": ((N, H), (D,))}

    def add_adapters(self, targets, rank: int, alpha: float, *, rngs: nnx.Rngs, dropout: float = 0.0) -> None:
        self.adapters = AttentionLoRA(self.adapter_shapes(), targets, rank, alpha, dtype=self.wq_NHD.dtype,
                                      rngs=rngs, dropout=dropout)

    def qkv(self, x_BTD, rt: Runtime = DEFAULT):
        """q, k, v with their biases (and adapters), before RoPE."""
        q, k, v = project_many(("btd,nhd->btnh", "btd,khd->btkh", "btd,khd->btkh"), x_BTD,
                               (self.wq_NHD[...], self.wk_KHD[...], self.wv_KHD[...]), precision=rt.precision,
                               kernels=rt.cpu_kernels)
        q, k, v = q + self.bq_NH[...], k + self.bk_KH[...], v + self.bv_KH[...]
        if self.adapters is not None:
            q, k, v = (self.adapters.apply(n, x_BTD, y, rt.precision) for n, y in zip("qkv", (q, k, v)))
        return q, k, v

    def output(self, o_BTNH, rt: Runtime = DEFAULT):
        o_BTNH = o_BTNH.astype(self.wo_DNH.dtype)
        y = project("btnh,dnh->btd", o_BTNH, self.wo_DNH[...], precision=rt.precision, kernels=rt.cpu_kernels)
        if self.adapters is not None:
            y = self.adapters.apply("o", o_BTNH, y, rt.precision)
        return y + self.bo_D[...]

    def __call__(self, x_BTD, positions_BT, cos, sin, cache: LayerCache | None = None, *, in_order: bool = False,
                 rt: Runtime = DEFAULT, segments_BT=None):
        """Returns (output, updated cache). With a cache, new tokens attend to it and are written into it.
        `in_order`: each row's non-negative positions are its indices plus a constant, which lets a prefill
        attend block by block (attend_blocked). `rt`: precision and kernels (gptoss.layers.runtime)."""
        sinks = self.sinks_N[...]
        pallas = rt.pallas_kernels and attention_pallas.supports(self.bq_NH.shape[-1])
        q, k, v = self.qkv(x_BTD, rt)
        if cache is not None and not pallas and attention_cpu.serves(q, cache.k_BSKH, enabled=rt.cpu_kernels):
            o, k_cache, v_cache, k_pos = attention_cpu.decode_attention(  # RoPE, cache write, attention: one op
                q, k, v, cos, sin, cache.k_BSKH, cache.v_BSKH, cache.pos_BS, sinks, positions_BT,
                window=self.window, scale=self.scale, ring=cache.ring)
            return self.output(o, rt), LayerCache(k_cache, v_cache, k_pos, cache.ring)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attend_ = functools.partial(attend, precision=rt.precision)
        run = functools.partial(attend_blocked, n_prefix=0, precision=rt.precision) if in_order else attend_
        if pallas:  # one flash kernel for prefill, chunks and decode (packed training rows stay XLA)
            attend_ = run = functools.partial(attention_pallas.flash_attend_pallas, precision=rt.precision)
        if segments_BT is not None:  # packed rows (training): no cache, positions restart per segment
            if cache is not None:
                raise ValueError("segment ids are for packed training rows; they cannot be used with a KV cache")
            o = attend_(q, k, v, sinks, positions_BT, positions_BT, window=self.window, scale=self.scale,
                        q_seg_BT=segments_BT, k_seg_BS=segments_BT)
            return self.output(o, rt), None
        if cache is None:
            o = run(q, k, v, sinks, positions_BT, positions_BT, window=self.window, scale=self.scale)
            return self.output(o, rt), None
        if q.shape[1] == 1:  # decode: the new key cannot evict anything still inside the window
            cache = cache.write(k, v, positions_BT)
            o = attend_(q, cache.k_BSKH, cache.v_BSKH, sinks, positions_BT, cache.pos_BS,
                        window=self.window, scale=self.scale)
            return self.output(o, rt), cache
        # a chunk: attend to the cache and the chunk itself, then keep what later tokens need
        keys = jnp.concatenate([cache.k_BSKH, k.astype(cache.k_BSKH.dtype)], axis=1)
        values = jnp.concatenate([cache.v_BSKH, v.astype(cache.v_BSKH.dtype)], axis=1)
        key_pos = jnp.concatenate([cache.pos_BS, positions_BT], axis=1)
        if in_order and not pallas:
            run = functools.partial(attend_blocked, n_prefix=cache.k_BSKH.shape[1], precision=rt.precision)
        o = run(q, keys, values, sinks, positions_BT, key_pos, window=self.window, scale=self.scale)
        return self.output(o, rt), cache.write(k, v, positions_BT)
