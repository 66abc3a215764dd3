"""LoRA: a fresh adapter changes nothing; gradients w.r.t. every adapter match central finite differences (fp32 and
float64); merging gives the adapter model's logits; adapters save and load on their own; bad input is named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss import ModelConfig, random_model
from gptoss.layers.lora import lora_dropout
from gptoss.train import LoraConfig, add_lora, load_adapters, lora_params, merge_lora, save_adapters

CFG = ModelConfig.tiny(num_hidden_layers=2)


def _tokens(seed=0, shape=(2, 9)):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


def _randomize_adapters(model, seed=1, std=0.3):
    """Non-zero B (and A) so that every adapter matters."""
    for i, (_, var) in enumerate(nnx.to_flat_state(lora_params(model))):
        v = var.get_value()
        var.set_value(jnp.asarray(np.random.default_rng([seed, i]).normal(0, std, v.shape), v.dtype))


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree))))


def _nll(model, tokens):
    logits = model.forward(jnp.asarray(tokens[:, :-1]))
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), axis=-1))


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_fresh_adapters_change_nothing(experts):
    model = random_model(CFG, experts=experts, kernels="xla")
    tokens = _tokens()
    before = np.asarray(model(tokens))
    add_lora(model, LoraConfig(rank=3, alpha=6))
    assert all(b.attn.adapters.targets() == ("q", "k", "v", "o") and b.mlp.adapters is not None for b in model.layers)
    np.testing.assert_allclose(np.asarray(model(tokens)), before, rtol=0, atol=1e-6 * np.abs(before).max())


def test_adapters_reach_the_output():
    """Each target's adapter changes the logits (an adapter wired to nothing would not)."""
    tokens = _tokens()
    base = np.asarray(random_model(CFG, kernels="xla")(tokens))
    for target in ("q", "k", "v", "o", "experts"):
        model = add_lora(random_model(CFG, kernels="xla"), LoraConfig(rank=2, targets=(target,), layers=(1,)))
        _randomize_adapters(model)
        assert np.abs(np.asarray(model(tokens)) - base).max() > 1e-3 * np.abs(base).max(), target


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_adapter_gradients_match_finite_differences(kernels):
    """Directional derivatives along random directions over every adapter (q, k, v, o, experts; fp32) against
    fourth-order central differences. A step that flipped a top-k routing choice would make the loss jump, so the
    router biases are spread far apart (the same 3 experts win everywhere, by a margin the steps cannot close)
    and the test checks that no choice changed; the SwiGLU clamp's kinks are moved out of reach too (its gradient
    is checked against torch autograd in tests/model/test_grad_parity.py). Then fp32 differences at h = 1e-3 agree
    to ~1e-5."""
    from gptoss.kernels import mxfp4_cpu

    if kernels == "cpu" and not mxfp4_cpu.kernel_available():
        pytest.skip("no CPU kernels")
    smooth = ModelConfig.tiny(num_hidden_layers=2, swiglu_limit=1e4)
    model = add_lora(random_model(smooth, experts="mxfp4", kernels=kernels, moe_impl="grouped"),
                     LoraConfig(rank=2, alpha=4))
    _randomize_adapters(model, std=0.05)
    for block in model.layers:
        block.mlp.router_bias_E.set_value(jnp.asarray([0.0, 40.0, -20.0, 20.0, -40.0]))
    tokens = _tokens(3)
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def loss_and_routes(p):
        m = nnx.merge(graphdef, p, rest)
        logits, router = m.forward(jnp.asarray(tokens[:, :-1]), return_router_logits=True)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), axis=-1))
        return nll, jnp.sort(jax.lax.top_k(router, CFG.experts_per_token)[1], axis=-1)

    grads = jax.jit(jax.grad(lambda p: loss_and_routes(p)[0]))(params)
    _, routes = loss_and_routes(params)
    rng = np.random.default_rng(7)
    h = 1e-3
    for _ in range(3):
        # random, plus a share of the gradient so that the derivative along it is not near zero
        noise = jax.tree.map(lambda g: jnp.asarray(rng.normal(size=g.shape), g.dtype), grads)
        ratio = 0.5 * _norm(noise) / _norm(grads)
        direction = jax.tree.map(lambda n, g, r=ratio: n + r * g, noise, grads)
        along = float(sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))))
        points = {t: loss_and_routes(jax.tree.map(lambda p, d, t=t: p + t * d, params, direction))
                  for t in (-2 * h, -h, h, 2 * h)}
        assert all(np.array_equal(r, routes) for _, r in points.values()), "a step changed the routing"
        at = {t: float(v) for t, (v, _) in points.items()}
        fd = (8 * (at[h] - at[-h]) - (at[2 * h] - at[-2 * h])) / (12 * h)
        assert abs(along - fd) <= 1e-3 * abs(fd), (along, fd)


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_merged_model_equals_adapter_model(experts):
    model = add_lora(random_model(CFG, experts=experts, kernels="xla"), LoraConfig(rank=3, experts=(0, 3)))
    _randomize_adapters(model, std=0.1)
    tokens = _tokens(4)
    with_adapters = np.asarray(model(tokens))
    merge_lora(model)
    assert model.experts == "dense" and all(b.attn.adapters is None and b.mlp.adapters is None for b in model.layers)
    assert not jax.tree.leaves(lora_params(model))
    merged = np.asarray(model(tokens))
    np.testing.assert_allclose(merged, with_adapters, rtol=0, atol=2e-5 * np.abs(with_adapters).max())


def test_expert_subset_gets_no_update():
    model = add_lora(random_model(CFG, kernels="xla"), LoraConfig(rank=2, targets=("experts",), experts=(1,)))
    _randomize_adapters(model)
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    grads = jax.grad(lambda p: _nll(nnx.merge(graphdef, p, rest), _tokens(5, (4, 16))))(params)
    g = grads["layers"][0]["mlp"]["adapters"]["gate_up_b_EFR"].get_value()
    others = np.delete(np.asarray(g), 1, axis=0)
    assert np.abs(np.asarray(g)[1]).max() > 0 and np.abs(others).max() == 0


def test_save_and_load_adapters(tmp_path):
    cfg = LoraConfig(rank=2, alpha=3, targets=("q", "o", "experts"), layers=(0,))
    model = add_lora(random_model(CFG, kernels="xla"), cfg)
    _randomize_adapters(model)
    tokens = _tokens(6)
    want = np.asarray(model(tokens))
    save_adapters(model, tmp_path / "ad", cfg)
    fresh = load_adapters(random_model(CFG, kernels="xla"), tmp_path / "ad")
    np.testing.assert_array_equal(np.asarray(fresh(tokens)), want)
    with pytest.raises(FileNotFoundError, match="gptoss_adapter.json"):
        load_adapters(random_model(CFG), tmp_path / "nothing")
    other = ModelConfig.tiny(num_hidden_layers=2, hidden_size=64)
    with pytest.raises(ValueError, match=r"tensor layers\.0\.attn\.adapters\.\w+ has shape"):
        load_adapters(random_model(other), tmp_path / "ad")


def test_lora_dropout_drops_at_its_rate_and_rescales():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(200, 100)) + 5.0, jnp.float32)  # no zeros of its own
    y = np.asarray(lora_dropout(x, 0.25, jax.random.key(1)))
    dropped = y == 0
    assert abs(dropped.mean() - 0.25) < 0.02
    np.testing.assert_allclose(y[~dropped], np.asarray(x)[~dropped] / 0.75, rtol=1e-6)
    assert (np.asarray(lora_dropout(x, 0.25, jax.random.key(2))) == 0).tolist() != dropped.tolist()
    assert lora_dropout(x, 0.25, None) is x and lora_dropout(x, 0.0, jax.random.key(1)) is x


def test_bad_lora_configs_are_named():
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("q", "mlp"))
    with pytest.raises(ValueError, match=r"layers \[7\]"):
        add_lora(random_model(CFG), LoraConfig(layers=(7,)))
    with pytest.raises(ValueError, match="experts"):
        add_lora(random_model(CFG), LoraConfig(experts=(9,)))
