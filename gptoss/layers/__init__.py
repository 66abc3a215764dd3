"""Building blocks of the gpt-oss transformer."""

from gptoss.layers.attention import Attention, attend
from gptoss.layers.dispatch import IMPLS as MOE_IMPLS
from gptoss.layers.dispatch import ExpertWeights, moe_dense, moe_gather, moe_grouped, swiglu
from gptoss.layers.moe import MoE, route
from gptoss.layers.norm import RMSNorm
from gptoss.layers.rope import apply_rope, inv_freq_and_concentration, rope_tables

__all__ = ["MOE_IMPLS", "Attention", "ExpertWeights", "MoE", "RMSNorm", "apply_rope", "attend",
           "inv_freq_and_concentration", "moe_dense", "moe_gather", "moe_grouped", "rope_tables", "route",
           "swiglu"]
