"""The gpt-oss transformer as a Flax NNX module."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.kernels.select import check_kernels, default_kernels
from gptoss.layers import Attention, ExpertLoRA, MoE, RMSNorm, Runtime, check_experts, check_moe_impl, rope_tables
from gptoss.layers.linear import project


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, experts: str, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, dtype=dtype, experts=experts, rngs=rngs)

    def __call__(self, x_BTD, positions_BT, cos, sin, rt: Runtime, cache=None, *, in_order: bool = False,
                 segments_BT=None):
        h_BTD, cache = self.attn(self.attn_norm(x_BTD), positions_BT, cos, sin, cache, in_order=in_order, rt=rt,
                                 segments_BT=segments_BT)
        x_BTD = x_BTD + h_BTD
        y_BTD, router_logits = self.mlp(self.mlp_norm(x_BTD), rt)
        return x_BTD + y_BTD, router_logits, cache


class GptOss(nnx.Module):
    """gpt-oss: embeddings, alternating sliding/full attention blocks with routed MoE, untied unembedding.

    What it computes: `dtype` is the parameter and activation dtype (norm gains stay fp32; float32 models ask every
    matmul for full precision); `experts` is "mxfp4" (packed, dequantized where used) or "dense".
    How it runs (static options, shown when the model is printed, changeable between calls): `moe_impl` ("auto",
    "dense", "gather", "grouped": gptoss.layers.experts), `kernels` ("auto", "xla", "cpu", "pallas":
    gptoss.kernels.select; None takes $GPTOSS_KERNELS or "auto"), `layout` (a gptoss.sharding.Layout when the model
    lives on a mesh, set by `from_pretrained(..., mesh=)` or `gptoss.sharding.shard_model`), `remat` (recompute each
    block in the backward pass: activation memory of one block instead of all; training).
    """

    def __init__(self, cfg: ModelConfig, *, dtype: Any = jnp.bfloat16, experts: str = "mxfp4",
                 moe_impl: str = "auto", kernels: str | None = None, layout: Any = None, remat: bool = False,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        dtype = jnp.dtype(dtype)
        self.config = cfg
        self.dtype = dtype
        self.experts = check_experts(experts)
        self.moe_impl = check_moe_impl(moe_impl)
        self.kernels = check_kernels(kernels or default_kernels())
        self.layout = layout
        self.remat = bool(remat)
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_VD = nnx.Param(jax.random.normal(rngs.params(), (V, D), jnp.float32).astype(dtype))
        self.layers = nnx.List(
            [Block(cfg, i, dtype=dtype, experts=experts, rngs=rngs) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.unembed_VD = nnx.Param((jax.random.normal(rngs.params(), (V, D), jnp.float32) * D**-0.5).astype(dtype))

    def runtime(self, moe_impl: str | None = None) -> Runtime:
        """This model's run options as one hashable value, handed to every layer."""
        return Runtime(moe_impl or self.moe_impl, self.kernels, self.dtype, self.layout, self.remat)

    def add_expert_adapters(self, rank: int, alpha: float | None = None, *, seed: int = 0) -> GptOss:
        """Gives every MoE layer per-expert low-rank adapters (gptoss.layers.moe.ExpertLoRA; alpha defaults to
        rank, i.e. scale 1). B starts at zero, so the model's outputs do not change. Returns the model."""
        rngs = nnx.Rngs(seed)
        for block in self.layers:
            lora = ExpertLoRA(self.config, rank, rank if alpha is None else alpha, dtype=self.dtype, rngs=rngs)
            if self.layout is not None:
                for path, var in nnx.to_flat_state(nnx.state(lora)):
                    var.set_value(self.layout.place_value(var.get_value(), path))
            block.mlp.adapters = lora
        return self

    def forward(self, tokens_BT, positions_BT=None, *, return_router_logits: bool = False,
                moe_impl: str | None = None):
        """The computation itself (traceable); `__call__` wraps it in a cached jit."""
        B, T = tokens_BT.shape
        in_order = positions_BT is None
        if in_order:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x, router_logits, _ = self.hidden_states(tokens_BT, positions_BT, None, moe_impl, in_order=in_order)
        logits_BTV = self.logits(x)
        if return_router_logits:
            return logits_BTV, router_logits
        return logits_BTV

    def hidden_states(self, tokens_BT, positions_BT, cache, moe_impl: str | None = None, *, in_order: bool = False,
                      segments_BT=None):
        """Final-normed hidden states [B, T, D], router logits [layers, B, T, E] and the updated cache
        (a list of per-layer LayerCache, or None). Positions < 0 mark padding. `in_order`: the caller promises that
        each row's non-negative positions are its indices plus a constant (attention then goes block by block).
        `segments_BT`: packed rows (training, no cache): attention stays inside each segment id."""
        rt = self.runtime(moe_impl)
        cos, sin = rope_tables(self.config, positions_BT)
        x = jnp.take(self.embed_VD[...], tokens_BT, axis=0)
        router_logits, new_cache = [], []
        run_block = _block_remat if rt.remat else _block
        for i, block in enumerate(self.layers):
            graphdef, state = nnx.split(block)
            x, logits, layer_cache = run_block(graphdef, state, x, positions_BT, cos, sin, rt,
                                               None if cache is None else cache[i], in_order, segments_BT)
            router_logits.append(logits)
            new_cache.append(layer_cache)
        return self.norm(x), jnp.stack(router_logits), (None if cache is None else new_cache)

    def logits(self, x_BTD):
        rt = self.runtime()
        return project("btd,vd->btv", x_BTD, self.unembed_VD[...], preferred_element_type=jnp.float32,
                       precision=rt.precision, kernels=rt.cpu_kernels)

    def __call__(self, tokens_BT, positions_BT=None, *, return_router_logits: bool = False,
                 moe_impl: str | None = None):
        """int32 tokens [B, T] (and optional positions) -> float32 logits [B, T, vocab]. On a mesh that spans several
        processes the outputs are replicated, so every process can read all of them."""
        tokens_BT = self._check_tokens(tokens_BT)
        if moe_impl is not None:
            check_moe_impl(moe_impl)
        if positions_BT is not None:
            positions_BT = jnp.asarray(positions_BT, jnp.int32)
            if positions_BT.shape != tokens_BT.shape:
                raise ValueError(f"positions shape {positions_BT.shape} != tokens shape {tokens_BT.shape}")
        if isinstance(tokens_BT, jax.core.Tracer):
            return self.forward(tokens_BT, positions_BT, return_router_logits=return_router_logits,
                                moe_impl=moe_impl)
        graphdef, state = nnx.split(self)
        return _jit_forward(graphdef, state, tokens_BT, positions_BT, return_router_logits, moe_impl)

    def _check_tokens(self, tokens):
        if isinstance(tokens, jax.core.Tracer):
            return tokens
        arr = np.asarray(tokens)
        if arr.ndim == 1:
            raise ValueError(f"tokens must be [batch, time]; got a 1-D array of shape {arr.shape} "
                             "(wrap it as tokens[None])")
        if arr.ndim != 2:
            raise ValueError(f"tokens must be [batch, time]; got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"tokens must be integers, got dtype {arr.dtype}")
        if arr.size:
            bad = np.argwhere((arr < 0) | (arr >= self.config.vocab_size))
            if len(bad):
                b, t = bad[0]
                raise ValueError(f"token id {int(arr[b, t])} at [{b}, {t}] is outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
        return jnp.asarray(arr, jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 6, 8))
def _block(graphdef, state, x, positions, cos, sin, rt, cache, in_order, segments):
    """One block as its own jitted function: every layer of a type shares one trace (the jaxpr calls it per layer),
    which keeps tracing time flat in depth. Inside an outer jit it is inlined like any call."""
    return nnx.merge(graphdef, state)(x, positions, cos, sin, rt, cache, in_order=in_order, segments_BT=segments)


def _block_remat(graphdef, state, x, positions, cos, sin, rt, cache, in_order, segments):
    """`_block` whose backward pass recomputes the block's activations from its inputs (training memory)."""
    return _fenced_block(graphdef, rt, in_order, state, x, positions, cos, sin, cache, segments)


# Rematerialisation by hand instead of jax.checkpoint. XLA:CPU drops optimization barriers before it schedules, so
# checkpoint's recomputation was merged back into the forward pass (CSE) and every block's activations stayed
# alive until the backward pass: remat saved nothing (gpt-oss-20b widths, LoRA: ~0.3 GiB a layer). Here the
# backward pass recomputes the block from inputs that depend on the incoming cotangent (plus a zero computed
# from it, which XLA does not fold for floats), so nothing of block l is computed before the backward pass
# reaches it, on every backend. Integer inputs (packed experts, positions) are not derived from: nothing large
# is computed from them alone.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fenced_block(graphdef, rt, in_order, state, x, positions, cos, sin, cache, segments):
    return _block(graphdef, state, x, positions, cos, sin, rt, cache, in_order, segments)


def _fenced_block_fwd(graphdef, rt, in_order, *args):
    return _fenced_block(graphdef, rt, in_order, *args), args


def _fenced_block_bwd(graphdef, rt, in_order, args, ct):
    zero = 0.0 * jnp.ravel(ct[0])[0].astype(jnp.float32)

    def after_ct(a):
        if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating):
            return a + zero.astype(a.dtype)
        return a

    def block(state, x, positions, cos, sin, cache, segments):
        return _block(graphdef, state, x, positions, cos, sin, rt, cache, in_order, segments)

    return jax.vjp(block, *jax.tree.map(after_ct, args))[1](ct)


_fenced_block.defvjp(_fenced_block_fwd, _fenced_block_bwd)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _jit_forward(graphdef, state, tokens, positions, return_router_logits, moe_impl):
    model = nnx.merge(graphdef, state)
    out = model.forward(tokens, positions, return_router_logits=return_router_logits, moe_impl=moe_impl)
    if model.layout is not None and jax.process_count() > 1:
        out = model.layout.replicate(out)
    return out
