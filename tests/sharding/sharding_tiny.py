"""The tiny model of the sharding tests: dims that 2-, 4- and 8-way meshes divide, otherwise all distinct
(vocab 344, hidden 96, intermediate 64, 16 heads, 4 kv heads of 12, 8 experts, top-3, 3 layers, window 5)."""

from __future__ import annotations

from gptoss import ModelConfig, random_model

CFG = ModelConfig.tiny(vocab_size=344, hidden_size=96, intermediate_size=64, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=12, num_experts=8, experts_per_token=3)

__all__ = ["CFG", "random_model"]
