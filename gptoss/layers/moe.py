"""The gpt-oss MoE block: fp32 router (top-k, then softmax over the k), experts packed or dense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.layers.dispatch import ExpertWeights, choose_impl, run_moe
from gptoss.quant import QuantWeight, quantize


def route(x_TD, w_ED, b_E, top_k: int):
    """Router in fp32 (bf16 logits can flip near-tied choices): returns logits [T,E], experts, weights [T,k]."""
    logits = jnp.einsum("td,ed->te", x_TD.astype(jnp.float32), w_ED.astype(jnp.float32)) + b_E.astype(jnp.float32)
    top_vals, top_idx = jax.lax.top_k(logits, top_k)
    return logits, top_idx, jax.nn.softmax(top_vals, axis=-1)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, experts: str, rngs: nnx.Rngs):
        D, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        normal = nnx.initializers.normal
        self.router_ED = nnx.Param(normal(D**-0.5)(rngs.params(), (E, D), jnp.float32).astype(dtype))
        self.router_bias_E = nnx.Param(jnp.zeros((E,), dtype))
        gate_up = normal(D**-0.5)(rngs.params(), (E, 2 * I, D), jnp.float32)
        down = normal(I**-0.5)(rngs.params(), (E, D, I), jnp.float32)
        if experts == "mxfp4":
            cfg.check_mxfp4()
            self.gate_up_EFD = QuantWeight(quantize(gate_up, dtype))
            self.down_EDI = QuantWeight(quantize(down, dtype))
        elif experts == "dense":
            self.gate_up_EFD = nnx.Param(gate_up.astype(dtype))
            self.down_EDI = nnx.Param(down.astype(dtype))
        else:
            raise ValueError(f"experts must be 'mxfp4' or 'dense', got {experts!r}")
        self.gate_up_bias_EF = nnx.Param(jnp.zeros((E, 2 * I), dtype))
        self.down_bias_ED = nnx.Param(jnp.zeros((E, D), dtype))
        self.top_k = cfg.experts_per_token
        self.limit = cfg.swiglu_limit
        self.alpha = cfg.swiglu_alpha

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.gate_up_EFD[...], self.gate_up_bias_EF[...], self.down_EDI[...],
                             self.down_bias_ED[...], self.limit, self.alpha)

    def __call__(self, x_BTD, impl: str = "auto"):
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        logits_TE, idx_TK, w_TK = route(x_TD, self.router_ED[...], self.router_bias_E[...], self.top_k)
        layout = getattr(self, "shard_layout", None)  # set by gptoss.sharding on a model placed on a mesh
        if layout is not None:  # experts sharded: shard_map with psum/all_gather (gptoss/sharding/moe.py)
            y_TD = layout.run_moe(impl, x_TD, idx_TK, w_TK, self.expert_weights())
        else:
            y_TD = run_moe(choose_impl(impl, B * T, self.top_k, logits_TE.shape[-1]), x_TD, idx_TK, w_TK,
                           self.expert_weights())
        return y_TD.astype(x_BTD.dtype).reshape(B, T, D), logits_TE.reshape(B, T, -1)
