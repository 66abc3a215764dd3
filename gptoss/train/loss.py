"""Training losses: masked token cross-entropy without whole [B, T, vocab] logits, the MoE load-balancing loss
(Switch Transformer, as transformers computes it for gpt-oss) and the router z-loss (ST-MoE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptoss.layers.linear import project


def cross_entropy_sum(x_BTD, unembed_VD, targets_BT, weights_BT, *, chunk: int = 512, precision=None):
    """(sum of weights * -log softmax(x W^T)[target], sum of weights) over all positions.

    The logits are computed `chunk` rows at a time inside a rematerialised scan: the forward keeps one chunk's
    [chunk, V] fp32 logits alive, the backward recomputes them (gpt-oss's vocabulary makes full fp32 logits
    3.2 GB for 4k tokens)."""
    B, T, D = x_BTD.shape
    N = B * T
    C = max(1, min(chunk, N))
    pad = -N % C
    x_ND = jnp.pad(x_BTD.reshape(N, D), ((0, pad), (0, 0)))
    t_N = jnp.pad(targets_BT.reshape(N).astype(jnp.int32), (0, pad))
    w_N = jnp.pad(weights_BT.reshape(N).astype(jnp.float32), (0, pad))

    @jax.checkpoint
    def one(total, xs):
        x_CD, t_C, w_C = xs
        logits_CV = _logits(x_CD, unembed_VD, precision)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        target_C = jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0]
        return total + jnp.sum(w_C * (lse_C - target_C)), None

    xs = (x_ND.reshape(-1, C, D), t_N.reshape(-1, C), w_N.reshape(-1, C))
    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(w_N)


def _logits(x_CD, unembed_VD, precision):
    """fp32 logits x W^T, multiplied in the weight's dtype both ways (`project`'s bf16 path has a bf16 backward):
    XLA on CPU turns a mixed fp32 x bf16 matmul into an fp32 copy of the bf16 operand (2.2 GB for gpt-oss's
    unembedding, per use). fp32 models: a plain fp32 einsum."""
    return project("cd,vd->cv", x_CD.astype(unembed_VD.dtype), unembed_VD, preferred_element_type=jnp.float32,
                   precision=precision)


def load_balancing_loss(router_logits_LBTE, top_k: int, mask_BT=None):
    """E * sum_e f_e P_e, pooled over layers and (unmasked) tokens: f_e = top-k assignments of expert e per token,
    P_e = its mean full-softmax probability. Gradients flow through P only (the top-k choice is discrete)."""
    L, B, T, E = router_logits_LBTE.shape
    probs = jax.nn.softmax(router_logits_LBTE.astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(probs, top_k)
    counts_LBTE = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32), axis=-2)
    m = jnp.ones((B, T), jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
    rows = L * jnp.sum(m)
    f_E = jnp.einsum("lbte,bt->e", counts_LBTE, m) / rows
    p_E = jnp.einsum("lbte,bt->e", probs, m) / rows
    return E * jnp.sum(f_E * p_E)


def router_z_loss(router_logits_LBTE, mask_BT=None):
    """Mean over layers and (unmasked) tokens of logsumexp(router logits)^2: keeps router logits small."""
    z_LBT = jax.nn.logsumexp(router_logits_LBTE.astype(jnp.float32), axis=-1) ** 2
    if mask_BT is None:
        return jnp.mean(z_LBT)
    m = mask_BT.astype(jnp.float32)
    return jnp.sum(z_LBT * m) / (z_LBT.shape[0] * jnp.maximum(jnp.sum(m), 1.0))


def expert_load(router_logits_LBTE, top_k: int, mask_BT=None):
    """Fraction of each layer's top-k assignments that go to each expert, [L, E] (rows sum to 1)."""
    L, B, T, E = router_logits_LBTE.shape
    _, idx = jax.lax.top_k(router_logits_LBTE, top_k)
    counts = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32), axis=-2)
    m = jnp.ones((B, T), jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
    load = jnp.einsum("lbte,bt->le", counts, m)
    return load / jnp.maximum(jnp.sum(load, axis=-1, keepdims=True), 1.0)
