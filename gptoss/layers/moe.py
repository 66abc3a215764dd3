"""The gpt-oss MoE block: fp32 router (top-k, then softmax over the k), experts packed or dense, optional
per-expert low-rank adapters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.layers.experts import ExpertAdapters, ExpertWeights, moe_ffn
from gptoss.layers.linear import project
from gptoss.layers.lora import check_dropout, check_rank
from gptoss.layers.runtime import DEFAULT, Runtime
from gptoss.quant import QuantWeight, quantize

EXPERTS = ("mxfp4", "dense")


def check_experts(experts: str) -> str:
    if experts not in EXPERTS:
        raise ValueError(f"experts must be one of {EXPERTS}, got {experts!r}")
    return experts


def route(x_TD, w_ED, b_E, top_k: int, *, kernels: bool = False):
    """Router in fp32 at full precision, on every model (near-tied choices flip under bf16 or TF32 logits; the
    matmul is tiny): returns logits [T,E], experts, weights [T,k]. `kernels`: a decode-sized router may run on the
    dense CPU kernel (fp32 x times the exact bf16 weight, fp32 sums), which spares XLA:CPU's conversion of the
    whole weight to fp32 on every step (~50 us of a ~75 us router at gpt-oss-20b's width)."""
    w = w_ED if kernels else w_ED.astype(jnp.float32)  # (a bf16 w the kernel does not take: XLA converts it alike)
    logits = project("td,ed->te", x_TD.astype(jnp.float32), w, preferred_element_type=jnp.float32,
                     precision=jax.lax.Precision.HIGHEST, kernels=kernels) + b_E.astype(jnp.float32)
    top_vals, top_idx = jax.lax.top_k(logits, top_k)
    return logits, top_idx, jax.nn.softmax(top_vals, axis=-1)


class ExpertLoRA(nnx.Module):
    """Per-expert LoRA on gate_up and down: W_e + (alpha / rank) B_e A_e. A is random, B zero, so a fresh adapter
    changes nothing. Parameters are `nnx.LoRAParam`s (an optimizer can train them alone). `experts`: the experts
    that are adapted (default all); the others' B is masked to zero, so they get no update."""

    def __init__(self, cfg: ModelConfig, rank: int, alpha: float, *, dtype, rngs: nnx.Rngs,
                 experts: tuple[int, ...] | None = None, dropout: float = 0.0):
        check_rank(rank)
        D, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        if experts is not None:
            experts = tuple(sorted({int(e) for e in experts}))
            if not experts or experts[0] < 0 or experts[-1] >= E:
                raise ValueError(f"adapted experts must be a non-empty subset of 0..{E - 1}, got {experts}")
        a_init = nnx.initializers.normal(1.0)

        def a(shape, fan_in):
            return nnx.LoRAParam((a_init(rngs.params(), shape, jnp.float32) * fan_in**-0.5).astype(dtype))

        self.gate_up_a_ERD = a((E, rank, D), D)
        self.gate_up_b_EFR = nnx.LoRAParam(jnp.zeros((E, 2 * I, rank), dtype))
        self.down_a_ERI = a((E, rank, I), I)
        self.down_b_EDR = nnx.LoRAParam(jnp.zeros((E, D, rank), dtype))
        self.scale = float(alpha) / rank
        self.experts = experts
        self.dropout = check_dropout(dropout)
        self.dropout_key = nnx.data(None)  # set by a training step (gptoss.train.step), never stored

    def weights(self) -> ExpertAdapters:
        gate_up_b, down_b = self.gate_up_b_EFR[...], self.down_b_EDR[...]
        if self.experts is not None:
            keep_E = jnp.zeros((gate_up_b.shape[0],), gate_up_b.dtype).at[jnp.asarray(self.experts)].set(1)
            gate_up_b, down_b = gate_up_b * keep_E[:, None, None], down_b * keep_E[:, None, None]
        return ExpertAdapters(self.gate_up_a_ERD[...], gate_up_b, self.down_a_ERI[...], down_b, self.scale,
                              self.dropout_key, self.dropout)

    def deltas(self):
        """scale * B_e A_e for gate_up [E, 2I, D] and down [E, D, I], fp32 (merging)."""
        ad = self.weights()
        hi = jax.lax.Precision.HIGHEST
        f32 = jnp.float32
        gate_up = jnp.einsum("efr,erd->efd", ad.gate_up_b_EFR.astype(f32), ad.gate_up_a_ERD.astype(f32), precision=hi)
        down = jnp.einsum("edr,eri->edi", ad.down_b_EDR.astype(f32), ad.down_a_ERI.astype(f32), precision=hi)
        return ad.scale * gate_up, ad.scale * down


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, experts: str, rngs: nnx.Rngs):
        D, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        normal = nnx.initializers.normal
        self.router_ED = nnx.Param(normal(D**-0.5)(rngs.params(), (E, D), jnp.float32).astype(dtype))
        self.router_bias_E = nnx.Param(jnp.zeros((E,), dtype))
        gate_up = normal(D**-0.5)(rngs.params(), (E, 2 * I, D), jnp.float32)
        down = normal(I**-0.5)(rngs.params(), (E, D, I), jnp.float32)
        if check_experts(experts) == "mxfp4":
            cfg.check_mxfp4()
            self.gate_up_EFD = QuantWeight(quantize(gate_up, dtype))
            self.down_EDI = QuantWeight(quantize(down, dtype))
        else:
            self.gate_up_EFD = nnx.Param(gate_up.astype(dtype))
            self.down_EDI = nnx.Param(down.astype(dtype))
        self.gate_up_bias_EF = nnx.Param(jnp.zeros((E, 2 * I), dtype))
        self.down_bias_ED = nnx.Param(jnp.zeros((E, D), dtype))
        self.adapters: ExpertLoRA | None = nnx.data(None)
        self.top_k = cfg.experts_per_token
        self.limit = cfg.swiglu_limit
        self.alpha = cfg.swiglu_alpha

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.gate_up_EFD[...], self.gate_up_bias_EF[...], self.down_EDI[...],
                             self.down_bias_ED[...], None if self.adapters is None else self.adapters.weights(),
                             self.limit, self.alpha)

    def __call__(self, x_BTD, rt: Runtime = DEFAULT):
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        logits_TE, idx_TK, w_TK = route(x_TD, self.router_ED[...], self.router_bias_E[...], self.top_k,
                                        kernels=rt.cpu_kernels)
        if rt.layout is not None:  # experts on a mesh: shard_map with collectives (gptoss/sharding/moe.py)
            y_TD = rt.layout.moe(x_TD, idx_TK, w_TK, self.expert_weights(), rt)
        else:
            y_TD = moe_ffn(x_TD, idx_TK, w_TK, self.expert_weights(), moe_impl=rt.moe_impl,
                           cpu_kernels=rt.cpu_kernels, pallas=rt.pallas_kernels,
                           precision=rt.precision)
        return y_TD.astype(x_BTD.dtype).reshape(B, T, D), logits_TE.reshape(B, T, -1)
