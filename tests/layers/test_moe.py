"""Router and MoE dispatch against a numpy top-k/softmax, a naive per-token expert loop and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.layers.dispatch import ExpertWeights, choose_impl, moe_dense, moe_gather, moe_grouped, swiglu
from gptoss.layers.moe import MoE, route
from gptoss.quant import MXFP4Array, quantize, unpack_ref

E, TOPK, D, I = 5, 3, 64, 96  # experts, top-k, hidden, intermediate: distinct, and whole MXFP4 blocks
LIMIT, ALPHA = 7.0, 1.702
_quantize = jax.jit(quantize, static_argnums=1)


def np_route(x, w, b, k):
    logits = x.astype(np.float64) @ w.astype(np.float64).T + b.astype(np.float64)
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, idx, axis=-1)
    p = np.exp(top - top.max(-1, keepdims=True))
    return logits, idx, p / p.sum(-1, keepdims=True)


def naive_moe(x, idx, weights, w1, b1, w2, b2, limit=LIMIT, alpha=ALPHA):
    """Facts §4.6, token by token, expert by expert, in float64. w1 [E, 2I, D] (rows interleaved gate, up)."""
    x, w1, b1, w2, b2, weights = (np.asarray(a, np.float64) for a in (x, w1, b1, w2, b2, weights))
    out = np.zeros((x.shape[0], w2.shape[1]))
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            u = w1[e] @ x[t] + b1[e]
            g, lin = u[0::2], u[1::2]
            g = np.minimum(g, limit)
            lin = np.clip(lin, -limit, limit)
            a = g * (1 / (1 + np.exp(-alpha * g))) * (lin + 1)
            out[t] += weights[t, k] * (w2[e] @ a + b2[e])
    return out


def make_experts(seed, packed: bool, gate_scale=0.6):
    """Experts scaled so that u = W1 x + b1 often passes +-7 (the clamps trigger) for unit-normal x."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(E, 2 * I, D)) * gate_scale).astype(np.float32)
    w2 = (rng.normal(size=(E, D, I)) * I**-0.5).astype(np.float32)
    b1 = rng.normal(size=(E, 2 * I)).astype(np.float32)
    b2 = rng.normal(size=(E, D)).astype(np.float32)
    if packed:
        q1, q2 = _quantize(w1, jnp.float32), _quantize(w2, jnp.float32)
        ew = ExpertWeights(q1, jnp.asarray(b1), q2, jnp.asarray(b2), LIMIT, ALPHA)
        # the oracle sees exactly the weights the packed bytes hold, decoded by the numpy reference
        w1, w2 = unpack_ref(q1.blocks, q1.scales), unpack_ref(q2.blocks, q2.scales)
    else:
        ew = ExpertWeights(jnp.asarray(w1), jnp.asarray(b1), jnp.asarray(w2), jnp.asarray(b2), LIMIT, ALPHA)
    return ew, (w1, b1, w2, b2)


def random_routing(seed, t):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(E)[:TOPK] for _ in range(t)]).astype(np.int32)
    w = rng.dirichlet(np.ones(TOPK), size=t).astype(np.float32)
    return idx, w


def close(got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# ------------------------------------------------------------------------------------------------ router
def test_route_matches_numpy_topk_softmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(33, D)).astype(np.float32)
    w = rng.normal(size=(E, D)).astype(np.float32)
    b = rng.normal(size=(E,)).astype(np.float32) * 3  # the bias takes part in selection
    logits, idx, weights = jax.jit(route, static_argnums=3)(x, w, b, TOPK)
    want_logits, want_idx, want_w = np_route(x, w, b, TOPK)
    top2 = np.sort(want_logits, -1)[:, ::-1]
    assert np.all(top2[:, TOPK - 1] - top2[:, TOPK] > 1e-3)  # no near-ties that fp32 could flip
    np.testing.assert_array_equal(np.asarray(idx), want_idx)  # sorted by logit, highest first
    close(logits, want_logits)
    close(weights, want_w)
    assert logits.dtype == weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def test_route_bias_changes_selection_and_bf16_inputs_route_in_fp32():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, D)).astype(np.float32)
    w = rng.normal(size=(E, D)).astype(np.float32)
    b = np.zeros(E, np.float32)
    b[4] = 1e3
    _, idx, _ = route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), TOPK)
    assert np.all(np.asarray(idx)[:, 0] == 4)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    logits, idx, weights = route(xb, wb, jnp.zeros(E, jnp.bfloat16), TOPK)
    assert logits.dtype == jnp.float32 and weights.dtype == jnp.float32
    want_logits, want_idx, want_w = np_route(np.asarray(xb, np.float32), np.asarray(wb, np.float32),
                                             np.zeros(E), TOPK)
    close(logits, want_logits)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)


# ------------------------------------------------------------------------------------------------ experts
def test_swiglu_by_hand():
    # (gate, up) pairs: gate clamped above only, up clamped both ways, then +1 on up
    h = jnp.array([[10.0, 10.0, -3.0, -10.0, 0.5, 0.25, -10.0, 0.0]])
    got = np.asarray(swiglu(h, LIMIT, ALPHA))[0]
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    want = [7.0 * sig(ALPHA * 7.0) * 8.0, -3.0 * sig(-3 * ALPHA) * (-6.0), 0.5 * sig(0.5 * ALPHA) * 1.25,
            -10.0 * sig(-10.0 * ALPHA) * 1.0]  # not -7 * sig(-7 alpha): no lower clamp on the gate
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "mxfp4"])
def test_moe_dense_matches_naive_loop(packed):
    ew, (w1, b1, w2, b2) = make_experts(2, packed)
    x = np.random.default_rng(3).normal(size=(9, D)).astype(np.float32)
    idx, w = random_routing(4, 9)
    u = np.einsum("td,efd->etf", x.astype(np.float64), w1) + b1[:, None]
    assert (u[..., 0::2] > LIMIT).any() and (u[..., 1::2] > LIMIT).any() and (u[..., 1::2] < -LIMIT).any()
    assert (u[..., 0::2] < -LIMIT).any()  # the gate has no lower clamp: this must pass through
    got = jax.jit(lambda x, i, w: moe_dense(x, i, w, ew))(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w))
    assert got.dtype == jnp.float32
    close(got, naive_moe(x, idx, w, w1, b1, w2, b2))


def skewed_routing(t):
    """Every token's first choice is expert 3; the rest cycle, so some experts get nothing."""
    idx = np.array([[3, (i % 2) * 4, 1] for i in range(t)], np.int32)
    w = np.tile(np.array([[0.7, 0.2, 0.1]], np.float32), (t, 1))
    return idx, w


@pytest.mark.parametrize("packed", [pytest.param(False, marks=pytest.mark.slow), True], ids=["dense", "mxfp4"])
@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("routing", ["random", "skewed"])
def test_gather_and_grouped_equal_dense(packed, t, routing):
    ew, ref_weights = make_experts(5, packed)
    x = jnp.asarray(np.random.default_rng(t).normal(size=(t, D)), jnp.float32)
    idx, w = random_routing(6 + t, t) if routing == "random" else skewed_routing(t)

    # grouped: the default tile is 8 for T <= 7 and 64 for T = 64, so tiles 8 and 1 cover the rest
    tiles = (None, 1) + ((8,) if t == 64 else ())

    @jax.jit  # one compile for all strategies
    def all_impls(x, idx, w):
        return (moe_dense(x, idx, w, ew), moe_gather(x, idx, w, ew),
                *[moe_grouped(x, idx, w, ew, tile) for tile in tiles])

    want, *others = all_impls(x, jnp.asarray(idx), jnp.asarray(w))
    if t == 7:  # anchor the comparison to the naive loop too
        close(want, naive_moe(np.asarray(x), idx, w, *ref_weights))
    for got in others:
        close(got, want)


def test_grouped_with_a_single_expert_per_token():
    ew, ref_weights = make_experts(7, packed=True)
    idx = jnp.full((13, 1), 2, jnp.int32)  # every token goes to expert 2, with weight 1
    w = jnp.ones((13, 1), jnp.float32)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(13, D)), jnp.float32)
    want = naive_moe(np.asarray(x), np.asarray(idx), np.asarray(w), *ref_weights)
    outs = jax.jit(lambda x: [moe_grouped(x, idx, w, ew, tile) for tile in (1, 4, 16)] + [moe_gather(x, idx, w, ew)])
    for got in outs(x):
        close(got, want)


def test_choose_impl():
    assert choose_impl("auto", 1, 4, 32) == "gather"
    assert choose_impl("auto", 512, 4, 32) == "grouped"
    assert choose_impl("dense", 512, 4, 32) == "dense"
    with pytest.raises(ValueError, match="unknown moe_impl"):
        choose_impl("sparse", 1, 4, 32)


# ------------------------------------------------------------------------------------------------ module
@pytest.mark.parametrize("experts", ["dense", "mxfp4"])
def test_moe_module_matches_route_plus_naive_loop(experts):
    cfg = ModelConfig.tiny()
    moe = MoE(cfg, dtype=jnp.float32, experts=experts, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(9)
    moe.router_bias_E[...] = jnp.asarray(rng.normal(size=(cfg.num_experts,)), jnp.float32)
    moe.gate_up_bias_EF[...] = jnp.asarray(rng.normal(size=moe.gate_up_bias_EF[...].shape), jnp.float32)
    moe.down_bias_ED[...] = jnp.asarray(rng.normal(size=moe.down_bias_ED[...].shape), jnp.float32)
    x = rng.normal(size=(2, 5, cfg.hidden_size)).astype(np.float32)

    gu, dn = moe.gate_up_EFD[...], moe.down_EDI[...]
    if experts == "mxfp4":
        assert isinstance(gu, MXFP4Array) and not isinstance(moe.gate_up_EFD, nnx.Param)
        gu, dn = unpack_ref(gu.blocks, gu.scales), unpack_ref(dn.blocks, dn.scales)
    logits, idx, w = np_route(x.reshape(10, -1), np.asarray(moe.router_ED[...]), np.asarray(moe.router_bias_E[...]),
                              cfg.experts_per_token)
    want = naive_moe(x.reshape(10, -1), idx, w, np.asarray(gu), np.asarray(moe.gate_up_bias_EF[...]),
                     np.asarray(dn), np.asarray(moe.down_bias_ED[...]), cfg.swiglu_limit, cfg.swiglu_alpha)
    # auto picks grouped here (10 tokens * 3 > 5 experts); dispatch itself is checked against dense above
    outs = nnx.jit(lambda m, x: [m(x, impl) for impl in ("auto", "gather")])(moe, jnp.asarray(x))
    for y, got_logits in outs:
        assert y.shape == x.shape and got_logits.shape == (2, 5, cfg.num_experts)
        close(y.reshape(10, -1), want, rtol=2e-5)
        close(got_logits.reshape(10, -1), logits)


def test_moe_module_matches_transformers_mlp():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = ModelConfig.tiny()
    moe = MoE(cfg, dtype=jnp.float32, experts="dense", rngs=nnx.Rngs(1))
    rng = np.random.default_rng(10)
    moe.gate_up_EFD[...] = moe.gate_up_EFD[...] * 8.0  # push activations past the clamps
    for p in (moe.router_bias_E, moe.gate_up_bias_EF, moe.down_bias_ED):
        p[...] = jnp.asarray(rng.normal(size=p[...].shape), jnp.float32)
    hf = GptOssMLP(transformers.GptOssConfig(**cfg.to_hf())).float().eval()
    t = lambda a: torch.from_numpy(np.array(a[...], np.float32))  # noqa: E731
    with torch.no_grad():
        hf.router.weight.copy_(t(moe.router_ED))
        hf.router.bias.copy_(t(moe.router_bias_E))
        hf.experts.gate_up_proj.copy_(t(moe.gate_up_EFD).transpose(1, 2))  # HF holds x @ W: [E, D, 2I]
        hf.experts.gate_up_proj_bias.copy_(t(moe.gate_up_bias_EF))
        hf.experts.down_proj.copy_(t(moe.down_EDI).transpose(1, 2))  # [E, I, D]
        hf.experts.down_proj_bias.copy_(t(moe.down_bias_ED))
        x = rng.normal(size=(2, 6, cfg.hidden_size)).astype(np.float32)
        want, _ = hf(torch.from_numpy(x))
    y, _ = nnx.jit(lambda m, x: m(x, "dense"))(moe, jnp.asarray(x))
    close(y, want.numpy(), rtol=2e-5)
