"""project(): which einsums map onto the dense kernel, that it equals jnp.einsum (values and dtype) with the
kernel on and off, when the kernel is chosen, and the attention layer with the kernel on vs off."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.kernels import dense_cpu
from gptoss.layers.attention import Attention
from gptoss.layers.linear import Plan, plan, project, project_many
from gptoss.layers.rope import rope_tables
from gptoss.layers.runtime import Runtime

needs_kernel = pytest.mark.skipif(not dense_cpu.kernel_available() or jax.default_backend() != "cpu",
                                  reason=f"dense CPU kernel unavailable: {dense_cpu.load_error()}")


@pytest.mark.parametrize("spec, want", [
    ("btd,dnh->btnh", Plan(2, False)),
    ("btnh,nhd->btd", Plan(2, False)),
    ("btd,vd->btv", Plan(2, True)),
    ("td,fd->tf", Plan(1, True)),
    ("d,dn->n", Plan(0, False)),
    ("bij,bjk->bik", None),   # batched matmul: b is on both sides
    ("btd,dn->bn", None),     # t is summed out of x alone
    ("btd,nd->btv", None),    # output letter from nowhere
    ("bdt,dn->btn", None),    # contracted dim not trailing in x
    ("btnh,hnd->btd", None),  # contracted dims in another order in w
    ("btd,dn->btn,x", None),
    ("...d,dn->...n", None),
    ("btd,dn", None),
])
def test_plan(spec, want):
    assert plan(spec) == want


def _operands(spec, x_shape, w_shape, x_dtype, w_dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=x_shape), x_dtype), jnp.asarray(rng.normal(size=w_shape) * 0.1, w_dtype))


def _uses_kernel(fn, *args) -> bool:
    return dense_cpu.TARGET in jax.jit(fn).lower(*args).as_text()


CASES = [  # spec, x shape, w shape, preferred_element_type (the three projections of the model)
    ("btd,dnh->btnh", (1, 3, 40), (40, 6, 20), None),
    ("btnh,nhd->btd", (3, 1, 6, 20), (6, 20, 40), None),
    ("btd,vd->btv", (4, 1, 40), (331, 40), jnp.float32),
]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32], ids=["x_bf16", "x_f32"])
def test_project_equals_einsum(case, x_dtype):
    spec, xs, ws, pref = case
    x, w = _operands(spec, xs, ws, x_dtype, jnp.bfloat16)
    want = jnp.einsum(spec, x, w, preferred_element_type=pref)
    on = lambda x, w: project(spec, x, w, preferred_element_type=pref, kernels=True)  # noqa: E731
    off = lambda x, w: project(spec, x, w, preferred_element_type=pref, kernels=False)  # noqa: E731
    assert _uses_kernel(on, x, w) and not _uses_kernel(off, x, w)
    got, twin = jax.jit(on)(x, w), jax.jit(off)(x, w)
    assert got.dtype == want.dtype == twin.dtype and got.shape == want.shape == twin.shape
    tol = 1e-5 if got.dtype == jnp.float32 else 1e-2  # bf16 results: one rounding of an fp32 sum, either path
    scale = float(jnp.abs(want.astype(jnp.float32)).max())
    for ref in (want, twin):
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(ref, np.float64), rtol=tol,
                                   atol=tol * scale)


@needs_kernel
def test_project_many_is_one_call_equal_to_project():
    """project_many (attention's q, k, v) gives project's results, in one kernel call when it serves all three,
    else one project per weight (here: too many tokens for the kernel, or fp32 weights)."""
    rng = np.random.default_rng(5)
    specs = ("btd,dnh->btnh", "btd,dkh->btkh", "btd,dkh->btkh")

    def weights(dtype):
        return tuple(jnp.asarray(rng.normal(size=s) * 0.1, dtype) for s in ((40, 6, 20), (40, 2, 20), (40, 2, 20)))

    panel = dense_cpu.isa() in dense_cpu.PANEL_COLS_ISAS  # AVX2: the kernel serves [K, N] weights at any size
    for T, w_dtype, one_call in ((1, jnp.bfloat16, True), (3, jnp.bfloat16, True),
                                 (dense_cpu.MAX_TOKENS_VS_BF16_GEMM_KN + 1, jnp.bfloat16, panel),
                                 (1, jnp.float32, False)):
        x, ws = jnp.asarray(rng.normal(size=(1, T, 40)), jnp.bfloat16), weights(w_dtype)
        many = jax.jit(lambda x, ws: project_many(specs, x, ws, kernels=True))
        hlo = many.lower(x, ws).as_text()
        assert (dense_cpu.TARGET_MANY in hlo) == one_call, (T, w_dtype)
        got = many(x, ws)
        for spec, w, y in zip(specs, ws, got):
            want = jax.jit(lambda x, w, spec=spec: project(spec, x, w, kernels=True))(x, w)
            assert y.dtype == want.dtype and y.shape == want.shape
            # the same fp32 sums, rounded once to the result dtype: equal up to summation order
            np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(want, np.float64), rtol=1e-2,
                                       atol=1e-2 * float(jnp.abs(want.astype(jnp.float32)).max()))


@needs_kernel
def test_kernel_only_for_bf16_weights_and_few_tokens():
    spec = "btd,vd->btv"

    def uses(tokens, x_dtype=jnp.bfloat16, w_dtype=jnp.bfloat16, pref=None):
        x, w = _operands(spec, (1, tokens, 40), (50, 40), x_dtype, w_dtype)
        return _uses_kernel(lambda x, w: project(spec, x, w, preferred_element_type=pref, kernels=True), x, w)

    # bf16 x and W: XLA's native bf16 GEMM (fp32-accumulated, whatever the result dtype) takes over soon
    limit = dense_cpu.MAX_TOKENS_VS_BF16_GEMM
    for pref in (None, jnp.float32):
        assert uses(limit, pref=pref) and not uses(limit + 1, pref=pref)
    assert not uses(1, jnp.float32, jnp.float32)
    # fp32 x, bf16 W: XLA would convert the whole weight, so the kernel serves far longer
    assert uses(dense_cpu.MAX_TOKENS, jnp.float32) and not uses(dense_cpu.MAX_TOKENS + 1, jnp.float32)


@needs_kernel
def test_tiles_serve_prefill_sized_unembedding():
    """bf16 x times bf16 [V, D] with D % 32 == 0 goes to the kernel at any size on a CPU with AMX or AVX512_BF16
    tiles (else to XLA)."""
    x, w = _operands("btd,vd->btv", (1, 300, 64), (50, 64), jnp.bfloat16, jnp.bfloat16)
    fn = lambda x, w: project("btd,vd->btv", x, w, preferred_element_type=jnp.float32, kernels=True)  # noqa: E731
    assert _uses_kernel(fn, x, w) == (dense_cpu.isa() in dense_cpu.TILE_ISAS)
    got = jax.jit(fn)(x, w)
    x2, w2 = _operands("btd,dn->btn", (1, 300, 64), (64, 50), jnp.bfloat16, jnp.bfloat16)
    # [K, N]: XLA's GEMM, except on AVX2 CPUs (the kernel's panel GEMM)
    panel = dense_cpu.isa() in dense_cpu.PANEL_COLS_ISAS
    assert _uses_kernel(lambda x, w: project("btd,dn->btn", x, w, kernels=True), x2, w2) == panel
    want = jnp.einsum("btd,vd->btv", x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_attention_with_kernel_on_and_off():
    cfg = ModelConfig.tiny()
    attn = Attention(cfg, 0, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    B, T = 2, 2  # 4 tokens: decode-sized (the kernel's range for bf16 activations)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, cfg.hidden_size)), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = rope_tables(cfg, pos)

    def run(kernels):
        graphdef, state = nnx.split(attn)
        rt = Runtime(kernels=kernels, dtype=jnp.bfloat16)
        fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, pos, cos, sin, rt=rt)[0])
        return fn.lower(state, x).as_text(), fn(state, x)

    hlo_on, on = run("cpu")
    hlo_off, off = run("xla")
    # q, k and v in one call, o in another (TARGET is a prefix of TARGET_MANY)
    assert hlo_on.count(dense_cpu.TARGET_MANY) == 1 and hlo_on.count(dense_cpu.TARGET) == 2
    assert dense_cpu.TARGET not in hlo_off
    assert on.dtype == off.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(on, np.float32), np.asarray(off, np.float32), rtol=2e-2,
                               atol=2e-2 * float(jnp.abs(off.astype(jnp.float32)).max()))


def test_several_contracted_dims_never_copy_the_weight():
    """"btnh,nhd->btd" (the attention output) contracts (n, h) as one dim: as a two-dim contraction XLA:CPU laid the
    dot out by transposing the whole weight on every call (wo: 23.6 MB per layer and prefill)."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 128, 8, 16)), jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(8, 16, 48)), jnp.bfloat16)
    fn = jax.jit(lambda x, w: project("btnh,nhd->btd", x, w, preferred_element_type=jnp.float32))
    hlo = fn.lower(x, w).compile().as_text()
    weight_sized = [line.strip() for line in hlo.splitlines()
                    if (m := re.search(r"= bf16\[([\d,]+)\]", line)) and math.prod(map(int, m[1].split(","))) == w.size
                    and "parameter(" not in line and " bitcast(" not in line]
    assert not weight_sized, weight_sized
    want = np.einsum("btnh,nhd->btd", np.asarray(x, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(np.asarray(fn(x, w)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("spec, x_shape, w_shape", [("btd,dnh->btnh", (2, 5, 24), (24, 3, 8)),
                                                    ("btnh,nhd->btd", (2, 5, 3, 8), (3, 8, 24)),
                                                    ("td,fd->tf", (7, 24), (10, 24))])
def test_bf16_projection_backward_is_bf16_gemms(spec, x_shape, w_shape):
    """The backward of a bf16 projection multiplies bf16 operands (the cotangent rounded to bf16), never an fp32
    copy of the weight; its gradients equal float64 numpy's on the same rounded cotangent."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.bfloat16)
    out_shape = jax.eval_shape(lambda x, w: jnp.einsum(spec, x, w), x, w).shape
    ct = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    def f(x, w):
        return jnp.sum(project(spec, x, w, preferred_element_type=jnp.float32) * ct)

    grad = jax.grad(f, argnums=(0, 1))
    dx, dw = grad(x, w)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    ins, out = spec.split("->")
    a, b = ins.split(",")
    c64 = np.asarray(ct.astype(jnp.bfloat16), np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(dx, np.float64), np.einsum(f"{out},{b}->{a}", c64, w64), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), np.einsum(f"{a},{out}->{b}", x64, c64), rtol=2e-2, atol=2e-2)
    dots = [line for line in jax.jit(grad).lower(x, w).as_text().splitlines() if "dot_general" in line]
    operands = [line.rsplit(": (", 1)[1].split(") ->")[0] for line in dots]
    assert len(dots) == 2 and not any("f32" in o for o in operands), operands  # dx and dw
