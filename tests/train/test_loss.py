"""Training losses against transformers (the oracle): the masked token NLL equals transformers' loss with labels,
the load-balancing loss equals its load_balancing_loss_func on the same router logits, the chunked cross-entropy
equals a whole-logits numpy one (values and gradients), the z-loss a numpy formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity_models import PARITY_T, sample_tokens

import gptoss
from gptoss.train import LossConfig, cross_entropy_sum, load_balancing_loss, loss_and_metrics, router_z_loss


@pytest.fixture(scope="module")
def model(hf_dense_ckpt):
    return gptoss.from_pretrained(hf_dense_ckpt, dtype="float32", kernels="xla", progress=False)


def _batch(tokens, weights=None):
    t = np.asarray(tokens)
    w = np.ones(t[:, 1:].shape, np.float32) if weights is None else weights
    return {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:]), "weights": jnp.asarray(w)}


def test_nll_equals_transformers_with_ignored_labels(model, parity_hf):
    tokens = sample_tokens(2, PARITY_T, seed=5)
    weights = np.ones((2, PARITY_T - 1), np.float32)
    weights[0, :4] = 0  # a masked prompt
    weights[1, -3:] = 0
    labels = torch.from_numpy(tokens.astype(np.int64)).clone()
    labels[:, 1:][torch.from_numpy(weights == 0)] = -100  # transformers shifts labels itself
    with torch.no_grad():
        ref = float(parity_hf(input_ids=torch.from_numpy(tokens.astype(np.int64)), labels=labels).loss)
    _, metrics = jax.jit(lambda b: loss_and_metrics(model, b, LossConfig(chunk=7)))(_batch(tokens, weights))
    assert abs(float(metrics["nll"]) - ref) <= 1e-5 * abs(ref), (float(metrics["nll"]), ref)
    assert float(metrics["tokens"]) == weights.sum()


def test_load_balancing_loss_equals_transformers(model, parity_hf):
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    tokens = sample_tokens(2, PARITY_T, seed=6)
    _, router = model(tokens, return_router_logits=True)  # [L, B, T, E]
    router = np.array(router)  # writable, for torch
    L, B, T, E = router.shape
    k = model.config.experts_per_token
    layers = tuple(torch.from_numpy(router[i].reshape(B * T, E)) for i in range(L))
    ref = float(load_balancing_loss_func(layers, E, k))
    assert abs(float(load_balancing_loss(jnp.asarray(router), k)) - ref) <= 1e-6 * ref
    mask = np.ones((B, T), bool)
    mask[1, : T // 2] = False
    ref_masked = float(load_balancing_loss_func(layers, E, k, torch.from_numpy(mask.astype(np.int64))))
    ours_masked = float(load_balancing_loss(jnp.asarray(router), k, jnp.asarray(mask)))
    assert abs(ours_masked - ref_masked) <= 1e-6 * ref_masked and abs(ours_masked - ref) > 1e-4 * ref
    # and transformers' own output_router_logits path uses the same router logits
    with torch.no_grad():
        out = parity_hf(input_ids=torch.from_numpy(tokens.astype(np.int64)), output_router_logits=True)
    np.testing.assert_allclose(float(out.aux_loss), ref, rtol=1e-4)


def test_chunked_cross_entropy_values_and_grads():
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 11, 6, 37
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    w = rng.normal(size=(V, D)).astype(np.float32)
    t = rng.integers(0, V, (B, T))
    m = (rng.random((B, T)) > 0.3).astype(np.float32)

    def numpy_ce(x, w):
        logits = x.astype(np.float64) @ w.astype(np.float64).T
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return float(np.sum(m * (lse - np.take_along_axis(logits, t[..., None], -1)[..., 0])))

    hi = jax.lax.Precision.HIGHEST
    for chunk in (1, 4, 22, 100):
        total, count = cross_entropy_sum(jnp.asarray(x), jnp.asarray(w), jnp.asarray(t), jnp.asarray(m), chunk=chunk,
                                         precision=hi)
        assert abs(float(total) - numpy_ce(x, w)) <= 1e-5 * abs(numpy_ce(x, w)) and float(count) == m.sum()
    gx, gw = jax.grad(lambda x, w: cross_entropy_sum(x, w, t, m, chunk=4, precision=hi)[0], argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(w))
    # central differences of the numpy reference along random directions
    for g, arg in ((gx, 0), (gw, 1)):
        d = rng.normal(size=g.shape).astype(np.float64)
        h = 1e-3
        args_p, args_m = [x.astype(np.float64), w.astype(np.float64)], [x.astype(np.float64), w.astype(np.float64)]
        args_p[arg] = args_p[arg] + h * d
        args_m[arg] = args_m[arg] - h * d
        fd = (numpy_ce(*args_p) - numpy_ce(*args_m)) / (2 * h)
        assert abs(float(np.sum(np.asarray(g) * d)) - fd) <= 1e-4 * abs(fd)

    # a bf16 unembedding: the backward multiplies in bf16, close to the fp32 gradients
    gx16, gw16 = jax.grad(lambda x, w: cross_entropy_sum(x, w, t, m, chunk=4)[0], argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(w, jnp.bfloat16))
    assert gx16.dtype == jnp.float32 and gw16.dtype == jnp.bfloat16
    for got, want in ((gx16, gx), (gw16, gw)):
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want)


def test_cross_entropy_backward_makes_no_fp32_copy_of_a_bf16_unembedding():
    """XLA on CPU turns a mixed fp32 x bf16 matmul into an fp32 copy of the bf16 operand: for gpt-oss's [201088,
    2880] unembedding that is 2.2 GB per train step. The compiled gradient must hold no fp32 [V, D] buffer."""
    V, D = 4099, 96
    x = jnp.ones((1, 64, D), jnp.float32)
    w = jnp.ones((V, D), jnp.bfloat16)
    t, m = jnp.zeros((1, 64), jnp.int32), jnp.ones((1, 64), jnp.float32)
    hlo = jax.jit(jax.grad(lambda x: cross_entropy_sum(x, w, t, m, chunk=16)[0])).lower(x).compile().as_text()
    assert f"f32[{V},{D}]" not in hlo and f"bf16[{V},{D}]" in hlo


def test_router_z_loss_equals_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 2, 5, 7)).astype(np.float32) * 3
    mask = rng.random((2, 5)) > 0.4
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ref = (lse**2 * mask).sum() / (3 * mask.sum())
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits), jnp.asarray(mask))), ref, rtol=1e-5)
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits))), (lse**2).mean(), rtol=1e-5)
