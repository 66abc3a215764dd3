"""The MXFP4 CPU kernel against the numpy reference dequantizer, through jit, for every vector path; the MoE
dispatch on it against moe_dense and its XLA twin; the switch, the fallback and its one warning; gradients."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss.kernels import mxfp4_cpu
from gptoss.layers.dispatch import ExpertWeights, moe_dense, moe_gather, moe_grouped
from gptoss.quant import MXFP4Array, quantize, unpack_ref

needs_kernel = pytest.mark.skipif(not mxfp4_cpu.kernel_available() or jax.default_backend() != "cpu",
                                  reason=f"MXFP4 CPU kernel unavailable: {mxfp4_cpu.load_error()}")
pytestmark = needs_kernel


def _supported_isas():
    if not mxfp4_cpu.kernel_available():
        return list(mxfp4_cpu.ISAS)
    lib = mxfp4_cpu.load_library()
    return list(mxfp4_cpu.ISAS[: lib.gptoss_mxfp4_best_isa() + 1])


@pytest.fixture(params=mxfp4_cpu.ISAS)
def isa(request):
    if request.param not in _supported_isas():
        pytest.skip(f"{request.param} is not supported by this CPU or build")
    before = mxfp4_cpu.isa()
    assert mxfp4_cpu.set_isa(request.param) == request.param
    yield request.param
    mxfp4_cpu.set_isa(before)


def random_packed(rng, E, N, G):
    """Random codes (every nibble value) and scale bytes 0..150 with 0 and > 127 present (255 = NaN avoided)."""
    blocks = rng.integers(0, 256, (E, N, G, 16), dtype=np.uint8)
    scales = rng.integers(100, 151, (E, N, G), dtype=np.uint8)
    scales.flat[rng.choice(scales.size, max(1, scales.size // 10), replace=False)] = 0
    scales.flat[rng.choice(scales.size, max(1, scales.size // 10), replace=False)] = rng.integers(128, 151)
    return blocks, scales


def selection(pattern, rng, M, S, E):
    if pattern == "random":  # with replacement: a token may pick the same expert twice
        return rng.integers(0, E, (M, S))
    if pattern == "one_expert":  # every pair on one expert (grouped: one long group)
        return np.full((M, S), E - 1)
    if pattern == "repeat_in_token":  # each token's S slots all the same expert
        return np.repeat(rng.integers(0, E, (M, 1)), S, axis=1)
    if pattern == "distinct":  # distinct experts per token, cycling so that every expert is used
        return (np.arange(M)[:, None] + np.arange(S)[None, :]) % E
    raise ValueError(pattern)


def check(got, x, blocks, scales, idx):
    """|got - want| within fp32 rounding of sum |w x| per output (float64 oracle from unpack_ref)."""
    W = unpack_ref(blocks, scales).astype(np.float64)[idx]  # [M, S, N, K]
    x = np.asarray(x, np.float64)
    want = np.einsum("msnk,mk->msn", W, x)
    bound = 1e-5 * np.einsum("msnk,mk->msn", np.abs(W), np.abs(x)) + 1e-30
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == np.float32
    bad = np.abs(got - want) > bound
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs off, first at {np.argwhere(bad)[0]}"


SHAPES = [  # (M, S, E, N, G): odd block counts, N not a multiple of 16 or 4, one and many tokens
    (1, 4, 5, 40, 3),
    (1, 1, 2, 17, 5),
    (7, 3, 4, 40, 5),
    (64, 4, 6, 40, 3),
    (33, 2, 3, 13, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}S{}E{}N{}G{}".format(*s))
@pytest.mark.parametrize("grouped", [False, True], ids=["gather", "grouped"])
def test_matches_numpy_reference(isa, shape, grouped):
    M, S, E, N, G = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    fn = jax.jit(lambda x, w, i: mxfp4_cpu.mx_gather_matmul(x, w, i, grouped=grouped))
    for pattern in ("random", "one_expert", "repeat_in_token", "distinct"):
        idx = selection(pattern, rng, M, S, E).astype(np.int32)
        x = rng.normal(size=(M, 32 * G)).astype(np.float32)
        check(fn(x, w, idx), x, blocks, scales, idx)
        xb = jnp.asarray(x, jnp.bfloat16)  # passed to the kernel as bf16; the oracle sees the same values
        check(fn(xb, w, idx), np.asarray(xb, np.float32), blocks, scales, idx)


def test_every_code_and_scale_byte(isa):
    """Row n has scale byte n in all of its 16 blocks, which hold all 256 byte values (so every code pair).
    (Bytes above ~200 overflow fp32 once multiplied by 6 and summed; 255 is NaN by the spec.)"""
    n_rows = 201
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (1, n_rows, 16, 16)).copy()
    scales = np.broadcast_to(np.arange(n_rows, dtype=np.uint8).reshape(1, n_rows, 1), (1, n_rows, 16)).copy()
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    x = np.random.default_rng(6).normal(size=(3, 512)).astype(np.float32)
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)  # bf16 inputs take the AMX path when grouped
    idx = np.zeros((3, 1), np.int32)
    for grouped in (False, True):
        check(mxfp4_cpu.mx_gather_matmul(x, w, idx, grouped=grouped), x, blocks, scales, idx)
        check(mxfp4_cpu.mx_gather_matmul(jnp.asarray(xb, jnp.bfloat16), w, idx, grouped=grouped), xb, blocks,
              scales, idx)


def test_nan_scale_byte_poisons_its_row_only(isa):
    """E8M0 255 is NaN: an output row with such a block is NaN, every other row stays finite."""
    rng = np.random.default_rng(8)
    blocks, scales = random_packed(rng, 2, 40, 3)
    scales[1, 5, 2] = 255
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    idx = np.array([[1], [0], [1]] * 7, np.int32)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.normal(size=(21, 96)), dtype)
        for grouped in (False, True):
            y = np.asarray(mxfp4_cpu.mx_gather_matmul(x, w, idx, grouped=grouped))
            nan = np.isnan(y)
            assert nan[idx[:, 0] == 1, 0, 5].all() and nan.sum() == (idx == 1).sum(), (dtype, grouped)


def test_bf16_grouped_many_tokens_per_expert():
    """Prefill-sized groups (several 16-token tiles, odd tile counts, row tails): every path against the oracle,
    at gpt-oss's real K."""
    rng = np.random.default_rng(9)
    E, N, G, M = 3, 72, 90, 45
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    x = jnp.asarray(rng.normal(size=(M, 32 * G)), jnp.bfloat16)
    idx = np.stack([np.zeros(M, np.int64), rng.integers(1, E, M)], axis=1).astype(np.int32)  # expert 0: 45 tokens
    before = mxfp4_cpu.isa()
    try:
        for name in _supported_isas():
            mxfp4_cpu.set_isa(name)
            check(mxfp4_cpu.mx_gather_matmul(x, w, idx, grouped=True), np.asarray(x, np.float32), blocks, scales, idx)
    finally:
        mxfp4_cpu.set_isa(before)


def test_real_width_gemv_all_paths_agree():
    """At gpt-oss's real K = 2880 (90 blocks) the three vector paths agree with each other and the oracle."""
    rng = np.random.default_rng(3)
    blocks, scales = random_packed(rng, 2, 24, 90)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    x = rng.normal(size=(3, 2880)).astype(np.float32)
    idx = np.array([[1, 0], [0, 0], [1, 1]], np.int32)
    before = mxfp4_cpu.isa()
    try:
        for name in _supported_isas():
            mxfp4_cpu.set_isa(name)
            for grouped in (False, True):
                check(mxfp4_cpu.mx_gather_matmul(x, w, idx, grouped=grouped), x, blocks, scales, idx)
    finally:
        mxfp4_cpu.set_isa(before)


def test_bad_expert_index_is_an_error():
    blocks, scales = random_packed(np.random.default_rng(0), 2, 8, 1)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(mxfp4_cpu.mx_gather_matmul(np.ones((1, 32), np.float32), w, np.array([[2]])))


def test_input_gradient_matches_dequantized_einsum():
    rng = np.random.default_rng(4)
    blocks, scales = random_packed(rng, 3, 16, 2)
    scales[:] = np.clip(scales, 120, 130)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    W = jnp.asarray(unpack_ref(blocks, scales))
    idx = jnp.asarray(rng.integers(0, 3, (5, 2)), jnp.int32)
    x = jnp.asarray(rng.normal(size=(5, 64)), jnp.float32)
    loss = lambda y: jnp.sum(jnp.sin(y))  # noqa: E731
    for grouped in (False, True):
        got = jax.jit(jax.grad(lambda x, g=grouped: loss(mxfp4_cpu.mx_gather_matmul(x, w, idx, grouped=g))))(x)
        want = jax.grad(lambda x: loss(jnp.einsum("msnk,mk->msn", W[idx], x)))(x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_vmap():
    rng = np.random.default_rng(5)
    blocks, scales = random_packed(rng, 3, 8, 1)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    x = rng.normal(size=(2, 4, 32)).astype(np.float32)
    idx = rng.integers(0, 3, (2, 4, 2)).astype(np.int32)
    got = jax.vmap(lambda x, i: mxfp4_cpu.mx_gather_matmul(x, w, i))(x, idx)
    for b in range(2):
        check(got[b], x[b], blocks, scales, idx[b])


# ------------------------------------------------------------------------------------------- MoE dispatch
E, TOPK, D, I = 5, 3, 64, 96


def packed_experts(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q1 = quantize(jnp.asarray(rng.normal(size=(E, 2 * I, D)) * 0.6, jnp.float32), dtype)
    q2 = quantize(jnp.asarray(rng.normal(size=(E, D, I)) * I**-0.5, jnp.float32), dtype)
    b1 = jnp.asarray(rng.normal(size=(E, 2 * I)), dtype)
    b2 = jnp.asarray(rng.normal(size=(E, D)), dtype)
    return ExpertWeights(q1, b1, q2, b2, 7.0, 1.702)


def routing(seed, t):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(E)[:TOPK] for _ in range(t)]).astype(np.int32)
    return jnp.asarray(idx), jnp.asarray(rng.dirichlet(np.ones(TOPK), size=t), jnp.float32)


def _uses_kernel(fn, *args) -> bool:
    return mxfp4_cpu.TARGET in jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_dispatch_with_kernel_equals_dense_and_xla_twin(t, dtype):
    ew = packed_experts(t)
    x = jnp.asarray(np.random.default_rng(t + 1).normal(size=(t, D)), dtype)
    idx, w = routing(t + 2, t)
    impls = {"gather": moe_gather, "grouped": moe_grouped}
    with mxfp4_cpu.use_kernel(True):
        assert all(_uses_kernel(lambda x, f=f: f(x, idx, w, ew), x) for f in impls.values())
        with_kernel = {name: jax.jit(lambda x, f=f: f(x, idx, w, ew))(x) for name, f in impls.items()}
    with mxfp4_cpu.use_kernel(False):
        assert not any(_uses_kernel(lambda x, f=f: f(x, idx, w, ew), x) for f in impls.values())
        twin = {name: jax.jit(lambda x, f=f: f(x, idx, w, ew))(x) for name, f in impls.items()}
        dense = jax.jit(lambda x: moe_dense(x, idx, w, ew))(x)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: the SwiGLU output is rounded to bf16 in every path
    for name in impls:
        for ref in (dense, twin[name]):
            np.testing.assert_allclose(np.asarray(with_kernel[name], np.float64), np.asarray(ref, np.float64),
                                       rtol=tol, atol=tol * float(jnp.abs(ref).max()))


def test_mode_switch_and_env(monkeypatch):
    monkeypatch.setenv("GPTOSS_MXFP4_KERNEL", "0")
    assert mxfp4_cpu.kernel_mode() == "0" and not mxfp4_cpu.kernel_enabled()
    monkeypatch.setenv("GPTOSS_MXFP4_KERNEL", "auto")
    assert mxfp4_cpu.kernel_enabled() == (mxfp4_cpu._x86())
    monkeypatch.setenv("GPTOSS_MXFP4_KERNEL", "yes")
    with pytest.raises(ValueError, match="GPTOSS_MXFP4_KERNEL"):
        mxfp4_cpu.kernel_mode()
    monkeypatch.setenv("GPTOSS_MXFP4_KERNEL", "1")
    with mxfp4_cpu.use_kernel(False):  # the in-process setting wins over the environment
        assert not mxfp4_cpu.kernel_enabled()
    assert mxfp4_cpu.kernel_enabled()


@pytest.fixture
def missing_library(monkeypatch, tmp_path):
    """The module as it is when the library was never built (the real one stays registered with XLA)."""
    saved = dict(mxfp4_cpu._state)
    monkeypatch.setenv("GPTOSS_MXFP4_LIB", str(tmp_path / "libgptoss_mxfp4.so"))
    monkeypatch.delenv("GPTOSS_MXFP4_KERNEL", raising=False)
    mxfp4_cpu._state.update(tried=False, lib=None, error=None, warned=False, mode=None)
    jax.clear_caches()
    yield
    mxfp4_cpu._state.update(saved)
    jax.clear_caches()


@pytest.mark.skipif(not mxfp4_cpu._x86(), reason="auto mode only enables the kernel on x86-64")
def test_missing_library_falls_back_with_one_warning(missing_library, monkeypatch):
    ew = packed_experts(0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, D)), jnp.float32)
    idx, w = routing(1, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [jax.jit(lambda x, f=f: f(x, idx, w, ew))(x) for f in (moe_gather, moe_grouped, moe_gather)]
        assert not mxfp4_cpu.kernel_available()
    ours = [c for c in caught if issubclass(c.category, mxfp4_cpu.KernelUnavailableWarning)]
    assert len(ours) == 1, [str(c.message) for c in caught]
    assert "pure-XLA" in str(ours[0].message) and "does not exist" in str(ours[0].message)
    dense = moe_dense(x, idx, w, ew)
    for y in outs:
        np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5 * float(jnp.abs(dense).max()))
    monkeypatch.setenv("GPTOSS_MXFP4_KERNEL", "1")  # forcing the kernel on without it is an error
    with pytest.raises(RuntimeError, match="unavailable"):
        moe_gather(x, idx, w, ew)


def test_concurrent_calls_and_pool_sizes():
    """Calls from several threads at once (one gets the pool, the others run inline) and pool resizes."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(7)
    blocks, scales = random_packed(rng, 3, 40, 3)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    fn = jax.jit(lambda x, i, g: mxfp4_cpu.mx_gather_matmul(x, w, i, grouped=g), static_argnums=2)
    cases = [(rng.normal(size=(9, 96)).astype(np.float32), rng.integers(0, 3, (9, 2)).astype(np.int32), g % 2 == 0)
             for g in range(8)]
    try:
        for n_threads in (3, 1, 0):
            mxfp4_cpu.set_num_threads(n_threads)
            with ThreadPoolExecutor(4) as ex:
                outs = list(ex.map(lambda c: np.asarray(fn(*c)), cases * 3))
            for (x, idx, _), got in zip(cases * 3, outs):
                check(got, x, blocks, scales, idx)
    finally:
        mxfp4_cpu.set_num_threads(0)
