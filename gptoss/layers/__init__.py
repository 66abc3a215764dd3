"""Building blocks of the gpt-oss transformer."""

from gptoss.layers.attention import Attention, attend
from gptoss.layers.experts import (
    MOE_IMPLS,
    STRATEGIES,
    ExpertAdapters,
    ExpertWeights,
    TensorParallel,
    check_moe_impl,
    choose_strategy,
    moe_ffn,
    swiglu,
)
from gptoss.layers.grouped import grouped_matmul
from gptoss.layers.moe import EXPERTS, ExpertLoRA, MoE, check_experts, route
from gptoss.layers.norm import RMSNorm
from gptoss.layers.rope import apply_rope, inv_freq_and_concentration, rope_tables
from gptoss.layers.runtime import Runtime

__all__ = ["EXPERTS", "MOE_IMPLS", "STRATEGIES", "Attention", "ExpertAdapters", "ExpertLoRA", "ExpertWeights", "MoE",
           "RMSNorm", "Runtime", "TensorParallel", "apply_rope", "attend", "check_experts", "check_moe_impl",
           "choose_strategy", "grouped_matmul", "inv_freq_and_concentration", "moe_ffn", "rope_tables", "route",
           "swiglu"]
