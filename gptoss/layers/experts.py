"""The expert op: `moe_ffn` computes sum_k w_tk * FFN_{e_tk}(x_t) for one MoE layer. The expert math lives here
once; every path (each strategy, each kernel backend, the sharded MoE) runs through it.

    FFN_e(x) = down_e(swiglu(gate_up_e(x) + b1_e)) + b2_e     (+ scale * B_e A_e on each matrix with adapters)

How the (token, expert) pairs are laid out as rows, and what multiplies them, is the strategy's business
(gptoss.layers.dispatch): `dense` runs every expert on every token (the slow, obvious reference), `gather` the
k experts of each token (decode), `grouped` sorts the pairs by expert and multiplies each expert's rows
together (prefill, training). A pair whose expert index is negative is skipped: it contributes nothing, and
the gather/grouped strategies do no work for it (expert parallelism marks the pairs routed to other devices so).

Every strategy is differentiable in reverse mode: with respect to x and the routing weights always, to dense
expert weights and biases (full training) and to the adapters (LoRA). Packed MXFP4 weights are frozen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gptoss.layers.dispatch import make_rows
from gptoss.layers.lora import lora_dropout

STRATEGIES = ("dense", "gather", "grouped")
MOE_IMPLS = ("auto", *STRATEGIES)


def check_moe_impl(moe_impl: str) -> str:
    if moe_impl not in MOE_IMPLS:
        raise ValueError(f"unknown moe_impl {moe_impl!r}; choose one of {MOE_IMPLS}")
    return moe_impl


def choose_strategy(moe_impl: str, num_tokens: int, top_k: int, num_experts: int) -> str:
    """`auto`: gather while the pairs are fewer than the experts, else grouped. Gathering materializes one
    dequantized expert per pair; once that is more than all the experts, handling each expert once wins."""
    if check_moe_impl(moe_impl) != "auto":
        return moe_impl
    return "gather" if num_tokens * top_k < num_experts else "grouped"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertAdapters:
    """Per-expert low-rank adapters (LoRA): W_e + scale * B_e A_e for gate_up [E, 2I, D] and down [E, D, I].
    With B = 0 they change nothing (the usual initialization). With a `dropout_key` (training), each adapter's
    input goes through inverted dropout at rate `dropout`."""

    gate_up_a_ERD: Any
    gate_up_b_EFR: Any
    down_a_ERI: Any
    down_b_EDR: Any
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)
    dropout_key: Any = None
    dropout: float = dataclasses.field(metadata=dict(static=True), default=0.0)

    def drop(self, x, which: int):
        return lora_dropout(x, self.dropout, self.dropout_key, which)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """One layer's experts in checkpoint orientation: gate_up [E, 2I, D] (gate/up rows interleaved), down
    [E, D, I], each dense or an MXFP4Array; biases [E, 2I], [E, D]; optional adapters."""

    gate_up_EFD: Any
    gate_up_bias_EF: Any
    down_EDI: Any
    down_bias_ED: Any
    adapters: ExpertAdapters | None = None
    limit: float = dataclasses.field(metadata=dict(static=True), default=7.0)
    alpha: float = dataclasses.field(metadata=dict(static=True), default=1.702)

    @property
    def num_experts(self) -> int:
        return self.gate_up_bias_EF.shape[0]


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """Collectives the sharded MoE inserts into the FFN when expert matrices are split over `tensor`:
    `gather_mid` turns the local activation [.., I/t] into [.., I] before `down` (gate_up split by rows);
    `reduce` sums partial products whose contraction axis is split (down split on its reduction blocks)."""

    gather_mid: Callable | None = None
    reduce: Callable | None = None


def swiglu(h_TF, limit: float, alpha: float):
    """gpt-oss's clamped SwiGLU on interleaved (gate, up) columns: gate*sigmoid(alpha*gate)*(up+1)."""
    gate, up = h_TF[..., 0::2], h_TF[..., 1::2]
    gate = jnp.minimum(gate, limit)  # gate is clamped from above only
    up = jnp.clip(up, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1.0)


def moe_ffn(x_TD, idx_TK, w_TK, ew: ExpertWeights, *, moe_impl: str = "auto", cpu_kernels: bool = False,
            pallas: bool = False, precision=None, tp: TensorParallel | None = None) -> jax.Array:
    """sum_k w_tk * FFN_{idx_tk}(x_t), float32 [T, D]. idx_TK int [T, K] (negative: skipped), w_TK [T, K].

    `moe_impl` picks the strategy (see module docstring); `cpu_kernels` lets packed experts go to the MXFP4 CPU
    kernel, `pallas` to the Pallas kernels (GPU); `precision` goes to every XLA matmul (HIGHEST for float32
    models); `tp` is the sharded MoE's hook.
    """
    T, K = idx_TK.shape
    rows = make_rows(choose_strategy(moe_impl, T, K, ew.num_experts), idx_TK, ew.num_experts,
                     cpu_kernels=cpu_kernels, pallas=pallas, precision=precision)
    ad = ew.adapters
    gather_mid = (tp and tp.gather_mid) or (lambda a: a)
    reduce = (tp and tp.reduce) or (lambda a: a)

    h = rows.matmul_in(x_TD, ew.gate_up_EFD) + rows.take(ew.gate_up_bias_EF)
    if ad is not None:
        h = h + ad.scale * rows.matmul(rows.matmul_in(ad.drop(x_TD, 0), ad.gate_up_a_ERD), ad.gate_up_b_EFR)
    a = gather_mid(swiglu(h, ew.limit, ew.alpha).astype(x_TD.dtype))
    y = reduce(rows.matmul(a, ew.down_EDI))
    if ad is not None:
        y = y + ad.scale * rows.matmul(reduce(rows.matmul(ad.drop(a, 1), ad.down_a_ERI)), ad.down_b_EDR)
    y = y + rows.take(ew.down_bias_ED)
    return rows.combine(y, w_TK)
