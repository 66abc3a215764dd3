"""The tiny model of the sharding tests: dims that 2-, 4- and 8-way meshes divide, otherwise all distinct
(vocab 344, hidden 96, intermediate 64, 16 heads, 4 kv heads of 12, 8 experts, top-3, 3 layers, window 5)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss import GptOss, ModelConfig

CFG = ModelConfig.tiny(vocab_size=344, hidden_size=96, intermediate_size=64, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=12, num_experts=8, experts_per_token=3)


def random_model(cfg: ModelConfig, seed: int = 0) -> GptOss:
    """Default init for the matrices; random biases, sinks and norm gains (zeros/ones would hide layout bugs)."""
    model = GptOss(cfg, dtype=jnp.float32, experts="mxfp4", rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        name = path[-1]
        shape = var.get_value().shape
        if name == "scale_D":
            var.set_value(jnp.asarray(1 + 0.2 * rng.standard_normal(shape), jnp.float32))
        elif name.startswith(("b", "sinks")) or "bias" in name:
            var.set_value(jnp.asarray(0.3 * rng.standard_normal(shape), jnp.float32))
    return nnx.merge(graphdef, state)
