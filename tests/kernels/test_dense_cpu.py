"""The dense bf16-weight CPU kernel against a float64 numpy oracle of the same (bf16-rounded) inputs, through jit,
for both weight layouts, every vector path and several pool sizes; NaN/Inf; shape errors; gradients; selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_amx_emulation import real_amx_skip_reason

from gptoss.kernels import dense_cpu, mxfp4_cpu

pytestmark = pytest.mark.skipif(not dense_cpu.kernel_available() or jax.default_backend() != "cpu",
                                reason=f"dense CPU kernel unavailable: {dense_cpu.load_error()}")


@pytest.fixture(params=dense_cpu.ISAS)
def isa(request):
    supported = dense_cpu.ISAS[: dense_cpu.ISAS.index(dense_cpu.best_isa()) + 1] if dense_cpu.kernel_available() else ()
    if request.param not in supported:
        pytest.skip(real_amx_skip_reason() if request.param == "amx"
                    else f"{request.param} is not supported by this CPU or build")
    before = dense_cpu.isa()
    assert dense_cpu.set_isa(request.param) == request.param
    yield request.param
    dense_cpu.set_isa(before)


def operands(rng, M, K, N, w_nk, x_dtype=np.float32, w_dtype=ml_dtypes.bfloat16):
    x = rng.normal(size=(M, K)).astype(x_dtype)
    w = (rng.normal(size=(N, K) if w_nk else (K, N)) * K**-0.5).astype(w_dtype)
    return x, w


def oracle(x, w, w_nk):
    """float64 x @ W (W as [K, N]) and sum |x| |W| (the scale of fp32 rounding) from the exact input values."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    w_KN = w64.T if w_nk else w64
    with np.errstate(invalid="ignore", over="ignore"):
        return x64 @ w_KN, np.abs(x64) @ np.abs(w_KN)


def check(got, x, w, w_nk):
    want, scale = oracle(x, w, w_nk)
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == np.float32
    bad = ~(np.abs(got - want) <= 1e-5 * scale + 1e-30)
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs off, first at {np.argwhere(bad)[0]}"


jit_matmul = jax.jit(dense_cpu.dense_matmul, static_argnames="w_nk")

# (K, N): K and N not multiples of 16 or 32, K below one vector, a K tail after whole 32-blocks and after whole
# 16-row sweeps, and sizes above the one-task threshold (128 KiB of weights: strips, K slabs, row chunks)
SHAPES = [(5, 3), (37, 19), (100, 70), (33, 290), (700, 301), (1000, 97), (300, 1031)]
TOKENS = [1, 2, 3, 7, 8, 9, 13, 16, 35]  # from 8 on AVX2, W [K, N]: the panel path, 6-token tiles and every tail


@pytest.mark.parametrize("w_nk", [True, False], ids=["w_nk", "w_kn"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K{}N{}".format(*s))
def test_matches_float64_oracle(isa, shape, w_nk):
    K, N = shape
    rng = np.random.default_rng([K, N, w_nk])
    for M in TOKENS:
        x, w = operands(rng, M, K, N, w_nk)
        check(jit_matmul(x, w, w_nk=w_nk), x, w, w_nk)
        xb = jnp.asarray(x, jnp.bfloat16)  # passed as bf16; the oracle sees the same values
        check(jit_matmul(xb, w, w_nk=w_nk), np.asarray(xb, np.float32), w, w_nk)


@pytest.mark.parametrize("x_dtype", [np.float32, ml_dtypes.bfloat16], ids=["x_f32", "x_bf16"])
@pytest.mark.parametrize("w_nk", [True, False], ids=["w_nk", "w_kn"])
def test_one_token_streams(isa, w_nk, x_dtype):
    """Decode reads a task as four streams (its quarters: AVX2 rows of W [N, K], or rows of K for W [K, N]) and the rows
    past the last whole group after them: fewer rows than streams, 0-3 rows left over, one row per stream; rows of 40
    and 61 (tails after one and after one and a half 32-element vectors; VDPBF16PS rows with bf16 x on AVX512_BF16)."""
    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 42):
        for width in (40, 61):
            K, N = (width, n) if w_nk else (n, width)
            x, w = operands(rng, 1, K, N, w_nk, x_dtype=x_dtype)
            check(jit_matmul(jnp.asarray(x), w, w_nk=w_nk), x, w, w_nk)


def test_batched_decode_sums_each_token_as_alone():
    """1-3 tokens of bf16 x times W [N, K] on VDPBF16PS share each weight load; every token's sum keeps its
    one-token bits (K with a tail after the 128-element steps)."""
    if dense_cpu.set_isa("avx512bf16") != "avx512bf16":
        dense_cpu.set_isa(dense_cpu.best_isa())
        pytest.skip("no AVX512_BF16 rows path on this CPU or build")
    try:
        rng = np.random.default_rng(8)
        x, w = operands(rng, 3, 2880 + 40, 77, True, x_dtype=ml_dtypes.bfloat16)
        alone = np.concatenate([np.asarray(jit_matmul(x[m:m + 1], w, w_nk=True)) for m in range(3)])
        for M in (2, 3):
            assert np.array_equal(np.asarray(jit_matmul(x[:M], w, w_nk=True)), alone[:M]), M
        check(alone, np.asarray(x, np.float32), w, True)
    finally:
        dense_cpu.set_isa(dense_cpu.best_isa())


@pytest.mark.parametrize("w_nk", [True, False], ids=["w_nk", "w_kn"])
def test_fp32_weights(isa, w_nk):
    rng = np.random.default_rng(11)
    for M, K, N in [(1, 37, 19), (8, 700, 301), (33, 300, 1031)]:
        x, w = operands(rng, M, K, N, w_nk, w_dtype=np.float32)
        check(jit_matmul(x, w, w_nk=w_nk), x, w, w_nk)


@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("w_nk", [True, False], ids=["w_nk", "w_kn"])
def test_pool_sizes_and_gpt_oss_width(threads, w_nk):
    """The task split depends on the pool size (guided row tasks cut at multiples of 4 rows, column strips, K slabs);
    K = 2880 like gpt-oss, 5.8 MB of W: several tasks of each size; one token with bf16 x is its own path."""
    rng = np.random.default_rng(threads)
    try:
        mxfp4_cpu.set_num_threads(threads)
        for M, x_dtype in ((1, np.float32), (1, ml_dtypes.bfloat16), (8, np.float32), (9, np.float32)):
            x, w = operands(rng, M, 2880, 1000 + threads, w_nk, x_dtype=x_dtype)
            check(jit_matmul(jnp.asarray(x), w, w_nk=w_nk), x, w, w_nk)
    finally:
        mxfp4_cpu.set_num_threads(0)


# Prefill-sized bf16 x. Times bf16 [N, K] with K % 32 == 0: the AMX tile path where the CPU has it, the AVX-512 /
# scalar paths otherwise (M >= 4 on the tiles); row tails (N % 32), token tails (M % 16), several 256-token blocks.
AMX_CASES = [(4, 64, 40), (5, 32, 17), (16, 32, 32), (17, 96, 45), (40, 2880, 70), (300, 64, 33), (530, 128, 64)]
# Times W [K, N] and W [N, K]: on AVX2 the panel GEMM (8+ tokens; column strips of 32-multiples, a 16-column strip and
# a scalar tail; K chunks of 128 and K tails past whole 8 x 8 transposes; 6-token tiles and tails; blocks of 384
# tokens), elsewhere the sweep (W [K, N]) or the rows and tiles (W [N, K]).
COLS_CASES = [(8, 128, 32), (13, 300, 48), (35, 129, 70), (390, 200, 83)]
PREFILL_CASES = [(*c, True) for c in AMX_CASES] + [(*c, w_nk) for c in COLS_CASES for w_nk in (False, True)]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "M{}K{}N{}{}".format(*c[:3], "" if c[3] else "_kn"))
def test_prefill_sized_bf16(isa, case):
    M, K, N, w_nk = case
    rng = np.random.default_rng(list(case[:3]))
    x, w = operands(rng, M, K, N, w_nk, x_dtype=ml_dtypes.bfloat16)
    check(jit_matmul(jnp.asarray(x), w, w_nk=w_nk), x, w, w_nk)


def test_prefill_sized_nan_and_inf_on_every_path():
    rng = np.random.default_rng(12)
    x, w = operands(rng, 40, 96, 50, True, x_dtype=ml_dtypes.bfloat16)
    w[33, 70] = np.nan  # output column 33 (the row tail): NaN for every token
    x[20, 5] = np.inf
    want, _ = oracle(x, w, True)
    before = dense_cpu.isa()
    for name in dense_cpu.ISAS[: dense_cpu.ISAS.index(dense_cpu.best_isa()) + 1]:
        assert dense_cpu.set_isa(name) == name
        try:
            got = np.asarray(jit_matmul(jnp.asarray(x), w, w_nk=True))
        finally:
            dense_cpu.set_isa(before)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=name)


@pytest.mark.parametrize("x_dtype", [np.float32, ml_dtypes.bfloat16], ids=["x_f32", "x_bf16"])
@pytest.mark.parametrize("w_nk", [True, False], ids=["w_nk", "w_kn"])
def test_nan_and_inf_propagate(isa, w_nk, x_dtype):
    rng = np.random.default_rng(5)
    M, K, N = 3, 300, 200  # K = 300: K tails after 32-blocks and after 16-row sweeps (the last row alone)
    x, w = operands(rng, M, K, N, w_nk, x_dtype=x_dtype)
    w_KN = w.T if w_nk else w  # a view: writes land in w
    w_KN[7, 11] = np.nan  # column 11: NaN for every token
    w_KN[:, 150] = 0.0
    x[1, 7] = np.inf  # token 1: +-inf where W[7, n] != 0, NaN at n = 11 and n = 150 (inf * 0)
    x[2, 299] = -np.inf
    got = np.asarray(jit_matmul(x, w, w_nk=w_nk))
    want, _ = oracle(x, w, w_nk)
    assert np.isnan(got[:, 11]).all() and np.isnan(got[1:, 150]).all() and np.isfinite(got[0, :11]).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_array_equal(np.sign(got[np.isinf(got)]), np.sign(want[np.isinf(want)]))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_empty_and_zero_k():
    bf16 = ml_dtypes.bfloat16
    y = np.full((1, 5), np.nan, np.float32)  # K = 0: zeros
    assert jit_matmul(np.ones((1, 0), np.float32), np.ones((5, 0), bf16), w_nk=True).tolist() == [[0.0] * 5]
    assert jit_matmul(np.ones((2, 0), np.float32), np.ones((0, 4), bf16), w_nk=False).tolist() == [[0.0] * 4] * 2
    assert jit_matmul(np.ones((2, 3), np.float32), np.ones((0, 3), bf16), w_nk=True).shape == (2, 0)
    lib = dense_cpu.load_library()  # the plain entry writes the zeros itself (XLA's output buffer is not zeroed)
    assert lib.gptoss_dense_matmul(y.ctypes.data, 0, y.ctypes.data, 0, 1, y.ctypes.data, 1, 0, 5) == 0
    assert (y == 0).all()


def test_bad_shapes_are_errors():
    x, w = np.ones((2, 8), np.float32), np.ones((5, 8), ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match=r"do not fit x \[M, K\], w \[K, N\]"):
        dense_cpu.dense_matmul(x, w, w_nk=False)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        dense_cpu.dense_matmul(x, w.astype(np.float16), w_nk=True)
    # the handler validates what reaches it (the Python wrapper is bypassed here)
    raw = jax.ffi.ffi_call(dense_cpu.TARGET, jax.ShapeDtypeStruct((2, 4), jnp.float32))
    with pytest.raises(Exception, match=r"dense matmul: y \[2, 4\] must be \[M, N\] = \[2, 5\]"):
        jax.block_until_ready(raw(x, w, w_nk=np.int64(1)))
    with pytest.raises(Exception, match=r"dense matmul: x \[2, 8\] and W \[5, 8\] \(\[K, N\]\) disagree on K"):
        jax.block_until_ready(raw(x, w, w_nk=np.int64(0)))
    with pytest.raises(Exception, match="w_nk must be 0"):
        jax.block_until_ready(raw(x, w, w_nk=np.int64(2)))
    with pytest.raises(Exception, match="must be rank 2"):
        jax.block_until_ready(raw(x[None], w, w_nk=np.int64(1)))
    with pytest.raises(Exception, match="W must be bfloat16 or float32"):
        jax.block_until_ready(raw(x, w.astype(np.float16), w_nk=np.int64(1)))
    lib = dense_cpu.load_library()
    y = np.zeros((2, 5), np.float32)
    args = (x.ctypes.data, 0, w.ctypes.data, 0)
    assert lib.gptoss_dense_matmul(*args, 1, y.ctypes.data, 2, 8, 5) == 0
    assert lib.gptoss_dense_matmul(*args, 2, y.ctypes.data, 2, 8, 5) == -1
    assert lib.gptoss_dense_matmul(*args, 1, y.ctypes.data, -1, 8, 5) == -1
    np.testing.assert_allclose(y, x @ w.astype(np.float32).T, rtol=1e-6)


@pytest.mark.parametrize("w_nk", [True, False], ids=["w_nk", "w_kn"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gradients_match_einsum(w_nk, dtype):
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(5, 40)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(30, 40) if w_nk else (40, 30)), dtype)
    spec = "mk,nk->mn" if w_nk else "mk,kn->mn"

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)) * jnp.arange(30.0))

    got = jax.jit(jax.grad(loss(lambda x, w: dense_cpu.dense_matmul(x, w, w_nk=w_nk)), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)),
                    argnums=(0, 1))(x, w)
    for g, r, name in zip(got, want, ("dx", "dW")):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        tol = 1e-5 if r.dtype == jnp.float32 else 1e-2  # bf16 dW: both rounded to bf16 from fp32
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(r, np.float64), rtol=tol,
                                   atol=tol * float(jnp.abs(r.astype(jnp.float32)).max()), err_msg=name)


@pytest.mark.parametrize("w_nk", [True, False], ids=["w_nk", "w_kn"])
def test_many_weights_in_one_call(isa, w_nk):
    """dense_matmul_many: each output against the oracle, for weights of different widths (one below the
    one-task size, two split into tasks and K slabs), fp32 and bf16 x, one and several tokens."""
    rng = np.random.default_rng([7, w_nk])
    K = 700
    many = jax.jit(dense_cpu.dense_matmul_many, static_argnames="w_nk")
    for M in (1, 2, 9):
        x = rng.normal(size=(M, K)).astype(np.float32)
        ws = [operands(rng, M, K, N, w_nk)[1] for N in (301, 64, 1031)]
        for xin, xref in ((x, x), (jnp.asarray(x, jnp.bfloat16), np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32))):
            got = many(xin, ws, w_nk=w_nk)
            assert len(got) == 3
            for y, w in zip(got, ws):
                check(y, xref, w, w_nk)


def test_many_weights_errors_name_the_weight():
    x = np.ones((2, 8), np.float32)
    good, bad_k = np.ones((8, 5), ml_dtypes.bfloat16), np.ones((7, 5), ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match=r"weight 1 \(7, 5\) do not fit x \[M, K\], w \[K, N\]"):
        dense_cpu.dense_matmul_many(x, [good, bad_k], w_nk=False)
    with pytest.raises(TypeError, match="weight 0 must be bfloat16 or float32"):
        dense_cpu.dense_matmul_many(x, [good.astype(np.float16)], w_nk=False)
    with pytest.raises(ValueError, match="no weights"):
        dense_cpu.dense_matmul_many(x, [], w_nk=False)
    # the handler validates what reaches it (the Python wrapper is bypassed here)
    out = (jax.ShapeDtypeStruct((2, 5), jnp.float32), jax.ShapeDtypeStruct((2, 5), jnp.float32))
    raw = jax.ffi.ffi_call(dense_cpu.TARGET_MANY, out)
    with pytest.raises(Exception, match=r"weight 1: x \[2, 8\] and W \[7, 5\] \(\[K, N\]\) disagree on K"):
        jax.block_until_ready(raw(x, good, bad_k, w_nk=np.int64(0)))
    with pytest.raises(Exception, match="2 weights but 1 results"):
        jax.block_until_ready(jax.ffi.ffi_call(dense_cpu.TARGET_MANY, out[:1])(x, good, good, w_nk=np.int64(0)))


@pytest.mark.parametrize("w_nk", [True, False], ids=["w_nk", "w_kn"])
def test_many_weights_gradients_match_einsum(w_nk):
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.normal(size=(3, 40)), jnp.bfloat16)
    ws = [jnp.asarray(rng.normal(size=(n, 40) if w_nk else (40, n)), jnp.bfloat16) for n in (30, 12)]
    spec = "mk,nk->mn" if w_nk else "mk,kn->mn"

    def loss(f):
        return lambda x, ws: sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(f(x, ws)))

    got = jax.jit(jax.grad(loss(lambda x, ws: dense_cpu.dense_matmul_many(x, ws, w_nk=w_nk)), argnums=(0, 1)))(x, ws)
    want = jax.grad(loss(lambda x, ws: [jnp.einsum(spec, x, w, preferred_element_type=jnp.float32) for w in ws]),
                    argnums=(0, 1))(x, ws)
    for g, r, name in zip(jax.tree.leaves(got), jax.tree.leaves(want), ("dx", "dW0", "dW1")):
        assert g.dtype == r.dtype == jnp.bfloat16 and g.shape == r.shape, name
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(r, np.float64), rtol=1e-2,
                                   atol=1e-2 * float(jnp.abs(r.astype(jnp.float32)).max()), err_msg=name)


def test_vmap():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 2, 50)).astype(np.float32)
    w = rng.normal(size=(50, 20)).astype(ml_dtypes.bfloat16)
    got = jax.vmap(lambda x: dense_cpu.dense_matmul(x, w, w_nk=False))(x)
    for b in range(3):
        check(got[b], x[b], w, False)


def test_serves(monkeypatch):
    w16, w32 = jnp.ones((8, 4), jnp.bfloat16), jnp.ones((8, 4), jnp.float32)
    assert dense_cpu.serves(1, w16) and dense_cpu.serves(dense_cpu.MAX_TOKENS, w16)
    assert not dense_cpu.serves(dense_cpu.MAX_TOKENS + 1, w16)
    assert dense_cpu.serves(dense_cpu.MAX_TOKENS_VS_BF16_GEMM, w16, xla_bf16_gemm=True)
    assert not dense_cpu.serves(dense_cpu.MAX_TOKENS_VS_BF16_GEMM + 1, w16, xla_bf16_gemm=True)
    limit_kn = dense_cpu.MAX_TOKENS_VS_BF16_GEMM_KN  # W [K, N]: XLA's bf16 GEMM catches up later
    assert dense_cpu.serves(limit_kn, w16, xla_bf16_gemm=True, w_nk=False)
    panel = dense_cpu.isa() in dense_cpu.PANEL_COLS_ISAS  # AVX2: the kernel's panel GEMM beats XLA's at any size
    assert dense_cpu.serves(limit_kn + 1, w16, xla_bf16_gemm=True, w_nk=False) == panel
    assert dense_cpu.serves(10**6, w16, xla_bf16_gemm=True, w_nk=False) == panel
    assert not dense_cpu.serves(10**6, w16, w_nk=False)  # fp32 x: XLA's GEMM after MAX_TOKENS
    # W [N, K] on AVX2: the panel GEMM from panel_min_tokens() (between MAX_TOKENS_VS_BF16_GEMM and it: XLA's)
    assert dense_cpu.serves(dense_cpu.panel_min_tokens(), w16, xla_bf16_gemm=True) == panel
    assert dense_cpu.serves(10**6, w16, xla_bf16_gemm=True) == panel
    assert not dense_cpu.serves(dense_cpu.panel_min_tokens() - 1, w16, xla_bf16_gemm=True)
    tiles = dense_cpu.isa() in ("avx512bf16", "amx")  # bf16 x times W [N, K]: the tiles serve any size
    assert dense_cpu.serves(10**6, w16, xla_bf16_gemm=True, tile_rows=True) == (tiles or panel)
    assert not dense_cpu.serves(0, w16)
    assert not dense_cpu.serves(1, w32)  # XLA's fp32 GEMV needs no conversion
    assert not dense_cpu.serves(1, w16, enabled=False)  # the model's kernels option says xla
    monkeypatch.setattr(jax, "device_count", lambda *a: 2)
    assert not dense_cpu.serves(1, w16)  # several devices: the SPMD partitioner would replicate the weight
