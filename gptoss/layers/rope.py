"""Rotary embeddings with YaRN, half-split ("rotate-half") pairing: dim i pairs with dim i + head_dim/2."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gptoss.config import ModelConfig, yarn_low_high


def inv_freq_and_concentration(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies [head_dim/2] and the YaRN attention factor that scales cos and sin."""
    d = cfg.head_dim
    freq = cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d)
    extrapolated = 1.0 / freq
    if cfg.rope_type == "default" or cfg.rope_scaling_factor == 1.0:
        return extrapolated.astype(np.float32), 1.0
    interpolated = 1.0 / (cfg.rope_scaling_factor * freq)
    low, high = yarn_low_high(cfg)  # not rounded: gpt-oss sets truncate=false (vLLM once rounded them)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 = keep the original frequency (fast-rotating dims)
    inv_freq = interpolated * (1.0 - keep) + extrapolated * keep
    concentration = 0.1 * math.log(cfg.rope_scaling_factor) + 1.0
    return inv_freq.astype(np.float32), concentration


def rope_tables(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim/2] in fp32, already multiplied by the YaRN concentration."""
    inv_freq, conc = inv_freq_and_concentration(cfg)
    angle = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angle) * conc, jnp.sin(angle) * conc


def apply_rope(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)
