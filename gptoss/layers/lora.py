"""Low-rank adapters (LoRA) on the attention projections: W + scale * A B, where A maps the projection's input
dims to the rank and B the rank to its output dims. The experts' adapters live in the expert op
(gptoss.layers.moe.ExpertLoRA)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION_TARGETS = ("q", "k", "v", "o")
# Parameter names per target (unique, so the sharding rules can name their axes): A, then B.
PARAM_NAMES = {"q": ("q_a_DR", "q_b_RNH"), "k": ("k_a_DR", "k_b_RKH"), "v": ("v_a_DR", "v_b_RKH"),
               "o": ("o_a_NHR", "o_b_RD")}


def check_dropout(rate) -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"adapter dropout must be in [0, 1), got {rate}")
    return rate


def lora_dropout(x, rate: float, key, salt: int | None = None):
    """Inverted dropout of an adapter's input (training only): the identity when `key` is None or rate is 0.
    `salt` (folded into the key) gives each adapter of one module its own mask."""
    if key is None or rate == 0.0:
        return x
    if salt is not None:
        key = jax.random.fold_in(key, salt)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def check_rank(rank) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"adapter rank must be a positive integer, got {rank!r}")
    return rank


class AttentionLoRA(nnx.Module):
    """Adapters on some of the q, k, v, o projections of one attention layer. `shapes` gives each projection's
    weight as (input dims, output dims). A is random (std 1/sqrt(fan_in)), B zero, so a fresh adapter changes
    nothing; both are `nnx.LoRAParam`s. Targets without an adapter hold None. `dropout` applies to each adapter's
    input while a training step has set `dropout_key` (gptoss.train.step)."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], targets, rank: int,
                 alpha: float, *, dtype, rngs: nnx.Rngs, dropout: float = 0.0):
        bad = set(targets) - set(ATTENTION_TARGETS)
        if bad:
            raise ValueError(f"unknown attention adapter target(s) {sorted(bad)}; choose from {ATTENTION_TARGETS}")
        check_rank(rank)
        for name in ATTENTION_TARGETS:
            a_name, b_name = PARAM_NAMES[name]
            a = b = None
            if name in targets:
                in_shape, out_shape = shapes[name]
                init = nnx.initializers.normal(math.prod(in_shape) ** -0.5)
                a = nnx.LoRAParam(init(rngs.params(), (*in_shape, rank), jnp.float32).astype(dtype))
                b = nnx.LoRAParam(jnp.zeros((rank, *out_shape), dtype))
            setattr(self, a_name, nnx.data(a))
            setattr(self, b_name, nnx.data(b))
        self.scale = float(alpha) / rank
        self.dropout = check_dropout(dropout)
        self.dropout_key = nnx.data(None)

    def targets(self) -> tuple[str, ...]:
        return tuple(n for n in ATTENTION_TARGETS if getattr(self, PARAM_NAMES[n][0]) is not None)

    def apply(self, name: str, x, y, precision=None):
        """y plus the named projection's adapter applied to its input x (y unchanged when it has none)."""
        a_name, b_name = PARAM_NAMES[name]
        a, b = getattr(self, a_name), getattr(self, b_name)
        if a is None:
            return y
        n_in = a.ndim - 1
        x = lora_dropout(x, self.dropout, self.dropout_key, ATTENTION_TARGETS.index(name))
        h = jnp.tensordot(x, a[...].astype(x.dtype), axes=n_in, precision=precision)
        return y + (self.scale * jnp.tensordot(h, b[...].astype(x.dtype), axes=1, precision=precision)).astype(y.dtype)

    def delta(self, name: str):
        """scale * A B in the weight's own shape ([out dims..., in dims...], the checkpoint's), fp32 (merging); None
        without an adapter."""
        a_name, b_name = PARAM_NAMES[name]
        a, b = getattr(self, a_name), getattr(self, b_name)
        if a is None:
            return None
        n_in, n_out = a.ndim - 1, b.ndim - 1
        d = self.scale * jnp.tensordot(a[...].astype(jnp.float32), b[...].astype(jnp.float32), axes=1,
                                       precision=jax.lax.Precision.HIGHEST)  # [in..., out...]
        return jnp.transpose(d, (*range(n_in, n_in + n_out), *range(n_in)))
