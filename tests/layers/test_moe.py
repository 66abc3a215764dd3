"""Router and the expert op (every strategy, skipped pairs, adapters) against a numpy top-k/softmax, a naive
per-token expert loop in float64 and transformers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.kernels import dense_cpu, mxfp4_cpu
from gptoss.layers.dispatch import GroupedRows
from gptoss.layers.experts import ExpertAdapters, ExpertWeights, choose_strategy, moe_ffn, swiglu
from gptoss.layers.moe import MoE, route
from gptoss.layers.runtime import Runtime
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
    """Facts §4.6, token by token, expert by expert, in float64. w1 [E, 2I, D] (rows interleaved gate, up).
    A negative expert index is a skipped pair (contributes nothing)."""
    x, w1, b1, w2, b2, weights = (np.asarray(a, np.float64) for a in (x, w1, b1, w2, b2, weights))
    out = np.zeros((x.shape[0], w2.shape[1]))
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e < 0:
                continue
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
        ew = ExpertWeights(q1, jnp.asarray(b1), q2, jnp.asarray(b2), None, LIMIT, ALPHA)
        # the oracle sees exactly the weights the packed bytes hold, decoded by the numpy reference
        w1, w2 = unpack_ref(q1.blocks, q1.scales), unpack_ref(q2.blocks, q2.scales)
    else:
        ew = ExpertWeights(jnp.asarray(w1), jnp.asarray(b1), jnp.asarray(w2), jnp.asarray(b2), None, LIMIT, ALPHA)
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


@pytest.mark.skipif(not dense_cpu.kernel_available() or jax.default_backend() != "cpu", reason="no dense kernel")
@pytest.mark.parametrize("T", [1, 3])
def test_route_on_the_dense_kernel(T):
    """kernels=True on a bf16 router weight with decode-sized inputs: the dense kernel computes the logits (fp32 x
    times the exact bf16 weight), the same choices and weights as numpy's float64 routing."""
    rng = np.random.default_rng(20 + T)
    x = rng.normal(size=(T, D)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(E, D)), jnp.bfloat16)
    b = rng.normal(size=(E,)).astype(np.float32)
    fn = jax.jit(lambda x, w, b: route(x, w, b, TOPK, kernels=True))
    assert dense_cpu.TARGET in fn.lower(x, w, b).as_text()
    assert dense_cpu.TARGET not in jax.jit(lambda x, w, b: route(x, w, b, TOPK)).lower(x, w, b).as_text()
    logits, idx, weights = fn(x, w, b)
    want_logits, want_idx, want_w = np_route(x, np.asarray(w, np.float32), b, TOPK)
    close(logits, want_logits)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    close(weights, want_w)


# ------------------------------------------------------------------------------------------------ experts
def test_swiglu_by_hand():
    # (gate, up) pairs: gate clamped above only, up clamped both ways, then +1 on up
    h = jnp.array([[10.0, 10.0, -3.0, -10.0, 0.5, 0.25, -10.0, 0.0]])
    got = np.asarray(swiglu(h, LIMIT, ALPHA))[0]
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    want = [7.0 * sig(ALPHA * 7.0) * 8.0, -3.0 * sig(-3 * ALPHA) * (-6.0), 0.5 * sig(0.5 * ALPHA) * 1.25,
            -10.0 * sig(-10.0 * ALPHA) * 1.0]  # not -7 * sig(-7 alpha): no lower clamp on the gate
    np.testing.assert_allclose(got, want, rtol=1e-6)


def run_op(impl, x, idx, w, ew, kernels=False, **kw):
    return moe_ffn(x, idx, w, ew, moe_impl=impl, cpu_kernels=kernels, precision=jax.lax.Precision.HIGHEST, **kw)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "mxfp4"])
def test_moe_dense_matches_naive_loop(packed):
    ew, (w1, b1, w2, b2) = make_experts(2, packed)
    x = np.random.default_rng(3).normal(size=(9, D)).astype(np.float32)
    idx, w = random_routing(4, 9)
    u = np.einsum("td,efd->etf", x.astype(np.float64), w1) + b1[:, None]
    assert (u[..., 0::2] > LIMIT).any() and (u[..., 1::2] > LIMIT).any() and (u[..., 1::2] < -LIMIT).any()
    assert (u[..., 0::2] < -LIMIT).any()  # the gate has no lower clamp: this must pass through
    got = jax.jit(lambda x, i, w: run_op("dense", x, i, w, ew))(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w))
    assert got.dtype == jnp.float32
    close(got, naive_moe(x, idx, w, w1, b1, w2, b2))


def skewed_routing(t):
    """Every token's first choice is expert 3; the rest cycle, so some experts get nothing."""
    idx = np.array([[3, (i % 2) * 4, 1] for i in range(t)], np.int32)
    w = np.tile(np.array([[0.7, 0.2, 0.1]], np.float32), (t, 1))
    return idx, w


def skipped_routing(seed, t):
    """Random routing with about a third of the pairs skipped (-1), one token entirely."""
    idx, w = random_routing(seed, t)
    rng = np.random.default_rng(seed + 100)
    idx = np.where(rng.random(idx.shape) < 0.35, -1, idx).astype(np.int32)
    idx[0] = -1
    return idx, w


KERNELS = [False, pytest.param(True, marks=pytest.mark.skipif(
    not (mxfp4_cpu.kernel_available() and jax.default_backend() == "cpu"), reason="no MXFP4 CPU kernel"))]


@pytest.mark.parametrize("kernels", KERNELS, ids=["xla", "cpu"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "mxfp4"])
@pytest.mark.parametrize("t, routing", [(1, "random"), (1, "skipped"), (7, "skewed"), (64, "random"),
                                        (64, "skewed"), (64, "skipped")])
def test_gather_and_grouped_equal_naive_loop(packed, t, routing, kernels):
    if kernels and not packed:
        pytest.skip("the CPU kernel serves packed experts only")
    ew, ref_weights = make_experts(5, packed)
    x = jnp.asarray(np.random.default_rng(t).normal(size=(t, D)), jnp.float32)
    idx, w = {"random": random_routing(6 + t, t), "skewed": skewed_routing(t),
              "skipped": skipped_routing(6 + t, t)}[routing]
    want = naive_moe(np.asarray(x), idx, w, *ref_weights)

    @jax.jit  # one compile for all strategies
    def all_impls(x, idx, w):
        return [run_op(impl, x, idx, w, ew, kernels) for impl in ("dense", "gather", "grouped")]

    for impl, got in zip(("dense", "gather", "grouped"), all_impls(x, jnp.asarray(idx), jnp.asarray(w))):
        close(got, want)
        if routing == "skipped":
            assert np.all(np.asarray(got)[0] == 0), f"{impl}: a token whose pairs are all skipped must get 0"


def test_grouped_tiles_with_a_single_expert_per_token():
    ew, ref_weights = make_experts(7, packed=True)
    idx = jnp.full((13, 1), 2, jnp.int32)  # every token goes to expert 2, with weight 1
    w = jnp.ones((13, 1), jnp.float32)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(13, D)), jnp.float32)
    want = naive_moe(np.asarray(x), np.asarray(idx), np.asarray(w), *ref_weights)
    @jax.jit
    def outputs(x):
        out = []
        for tile in (1, 4, 16):
            rows = GroupedRows(idx, E, tile=tile, precision=jax.lax.Precision.HIGHEST)
            h = rows.matmul_in(x, ew.gate_up_EFD) + rows.take(ew.gate_up_bias_EF)
            y = rows.matmul(swiglu(h, LIMIT, ALPHA), ew.down_EDI) + rows.take(ew.down_bias_ED)
            out.append(rows.combine(y, w))
        return out

    for got in outputs(x):
        close(got, want)


def test_choose_strategy():
    assert choose_strategy("auto", 1, 4, 32) == "gather"
    assert choose_strategy("auto", 512, 4, 32) == "grouped"
    assert choose_strategy("dense", 512, 4, 32) == "dense"
    with pytest.raises(ValueError, match="unknown moe_impl"):
        choose_strategy("sparse", 1, 4, 32)


# ------------------------------------------------------------------------------------------------ gradients
def nll_like(impl, kernels=False):
    """A scalar of the op's output that weights every output element differently."""
    probe = jnp.asarray(np.random.default_rng(11).normal(size=(1, D)), jnp.float32)

    def f(x, w, ew, idx):
        return jnp.sum(run_op(impl, x, idx, w, ew, kernels) * probe) + jnp.sum(jnp.tanh(run_op(impl, x, idx, w, ew,
                                                                                              kernels)))
    return f


def naive_grad_x(x, idx, w, w1, b1, w2, b2, probe_fn, eps=1e-6):
    """Central differences of the float64 naive loop (the oracle for dx)."""
    g = np.zeros_like(x, np.float64)
    for i in np.ndindex(x.shape):
        xp, xm = x.astype(np.float64).copy(), x.astype(np.float64).copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (probe_fn(naive_moe(xp, idx, w, w1, b1, w2, b2)) - probe_fn(naive_moe(xm, idx, w, w1, b1, w2,
                                                                                      b2))) / (2 * eps)
    return g


@pytest.mark.parametrize("kernels", KERNELS, ids=["xla", "cpu"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "mxfp4"])
def test_gradients_of_every_strategy_agree_and_match_the_naive_loop(packed, kernels):
    if kernels and not packed:
        pytest.skip("the CPU kernel serves packed experts only")
    ew, ref_weights = make_experts(12, packed, gate_scale=0.3)
    t = 6
    x = np.random.default_rng(13).normal(size=(t, D)).astype(np.float32)
    idx, w = skipped_routing(14, t)
    probe = np.asarray(np.random.default_rng(11).normal(size=(1, D)), np.float64)
    probe_fn = lambda y: float(np.sum(y * probe) + np.sum(np.tanh(y)))  # noqa: E731
    want_dx = naive_grad_x(x, idx, w, *ref_weights, probe_fn)
    grads = {}
    for impl in ("dense", "gather", "grouped"):
        fn = jax.jit(jax.grad(nll_like(impl, kernels), argnums=(0, 1, 2), allow_int=True))
        grads[impl] = fn(jnp.asarray(x), jnp.asarray(w), ew, jnp.asarray(idx))
        close(grads[impl][0], want_dx, rtol=1e-4)
    ref = grads["dense"]
    for impl in ("gather", "grouped"):
        for a, b in zip(grads[impl][:2], ref[:2]):
            close(a, b, rtol=1e-5)
        for leaf_a, leaf_b in zip(jax.tree.leaves(grads[impl][2]), jax.tree.leaves(ref[2])):
            if leaf_a.dtype != jax.dtypes.float0:
                close(leaf_a, leaf_b, rtol=1e-5)
    # skipped pairs get no routing-weight gradient; dense expert weights do get one, biases always
    assert np.all(np.asarray(ref[1])[idx < 0] == 0)
    assert np.abs(np.asarray(ref[2].gate_up_bias_EF)).max() > 0
    if not packed:
        assert np.abs(np.asarray(ref[2].down_EDI)).max() > 0


# ------------------------------------------------------------------------------------------------ adapters
def make_adapters(seed, rank=3, b_scale=0.2, scale=0.5):
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.normal(size=s) * s[-1] ** -0.5, jnp.float32)  # noqa: E731
    return ExpertAdapters(n(E, rank, D), n(E, 2 * I, rank) * b_scale, n(E, rank, I), n(E, D, rank) * b_scale, scale)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "mxfp4"])
def test_adapters_equal_merged_weights_and_zero_b_changes_nothing(packed):
    ew, (w1, b1, w2, b2) = make_experts(20, packed, gate_scale=0.3)
    ad = make_adapters(21)
    x = np.random.default_rng(22).normal(size=(10, D)).astype(np.float32)
    idx, w = skipped_routing(23, 10)
    m1 = w1 + ad.scale * np.einsum("efr,erd->efd", np.asarray(ad.gate_up_b_EFR, np.float64), ad.gate_up_a_ERD)
    m2 = w2 + ad.scale * np.einsum("edr,eri->edi", np.asarray(ad.down_b_EDR, np.float64), ad.down_a_ERI)
    want = naive_moe(x, idx, w, m1, b1, m2, b2)
    with_ad = dataclasses.replace(ew, adapters=ad)
    zero_b = dataclasses.replace(ew, adapters=dataclasses.replace(ad, gate_up_b_EFR=ad.gate_up_b_EFR * 0,
                                                                 down_b_EDR=ad.down_b_EDR * 0))
    @jax.jit
    def outputs(x, idx, w):
        return [[run_op(impl, x, idx, w, e) for e in (with_ad, zero_b, ew)] for impl in ("dense", "gather", "grouped")]

    for adapted, zero, plain in outputs(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w)):
        close(adapted, want)
        np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))


def _adapter_fd_check(impl, dtype, h, tol, kernels=False):
    """Directional derivatives of the op w.r.t. the adapters along random unit directions: jax.grad . v against
    fourth-order central differences (8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / 12h along v."""
    ew, _ = make_experts(30, packed=True, gate_scale=0.3)
    ad = jax.tree.map(lambda a: a.astype(dtype), make_adapters(31))
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    ew = dataclasses.replace(ew, gate_up_bias_EF=cast(ew.gate_up_bias_EF), down_bias_ED=cast(ew.down_bias_ED))
    x = jnp.asarray(np.random.default_rng(32).normal(size=(8, D)), dtype)
    idx, w = skipped_routing(33, 8)
    idx, w = jnp.asarray(idx), jnp.asarray(w, dtype)
    probe = jnp.asarray(np.random.default_rng(11).normal(size=(1, D)), dtype)

    def f(ad):
        y = run_op(impl, x, idx, w, dataclasses.replace(ew, adapters=ad), kernels)
        return jnp.sum(y * probe) + jnp.sum(jnp.tanh(y))

    g = jax.jit(jax.grad(f))(ad)
    rng = np.random.default_rng(34)
    for _ in range(3):
        raw = [rng.normal(size=a.shape) for a in jax.tree.leaves(ad)]
        norm = np.sqrt(sum(np.sum(r**2) for r in raw))
        v = jax.tree.unflatten(jax.tree.structure(ad), [jnp.asarray(r / norm, dtype) for r in raw])
        along = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
        shifted = {s: jax.tree.map(lambda a, b, s=s: a + s * h * b, ad, v) for s in (-2.0, -1.0, 1.0, 2.0)}
        fh = {s: float(jax.jit(f)(p)) for s, p in shifted.items()}
        fd = (8 * (fh[1.0] - fh[-1.0]) - (fh[2.0] - fh[-2.0])) / (12 * h)
        assert abs(along - fd) <= tol * abs(fd), f"{impl} {jnp.dtype(dtype).name}: grad.v {along} vs FD {fd}"


@pytest.mark.parametrize("kernels", KERNELS, ids=["xla", "cpu"])
@pytest.mark.parametrize("impl", ["dense", "gather", "grouped"])
def test_adapter_gradients_match_central_differences(impl, kernels):
    if kernels and impl == "dense":
        pytest.skip("the dense strategy does not use the CPU kernel")
    _adapter_fd_check(impl, jnp.float32, h=0.1, tol=1e-3, kernels=kernels)


@pytest.mark.parametrize("impl", ["dense", "gather", "grouped"])
def test_adapter_gradients_match_central_differences_float64(impl):
    with jax.enable_x64(True):
        _adapter_fd_check(impl, jnp.float64, h=1e-3, tol=1e-8)


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
    outs = nnx.jit(lambda m, x: [m(x, Runtime(moe_impl=impl)) for impl in ("auto", "gather")])(moe, jnp.asarray(x))
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
    y, _ = nnx.jit(lambda m, x: m(x, Runtime(moe_impl="dense")))(moe, jnp.asarray(x))
    close(y, want.numpy(), rtol=2e-5)
