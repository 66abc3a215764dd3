"""The bf12 CPU kernels (csrc/bf12_matmul.cc): the library's packer gives the numpy reference's bytes, its unpack the
original bits, and its GEMV / tile products match a float64 oracle on every path (exceptions included), and the
dense bf16 kernel bit for bit on rows without exceptions where both run the same instructions in the same order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gptoss.kernels import bf12_cpu, dense_cpu
from gptoss.quant.bf12 import pack_bf12

pytestmark = pytest.mark.skipif(not bf12_cpu.kernel_available() or jax.default_backend() != "cpu",
                                reason="the CPU kernel library is unavailable")
ISAS = ("scalar", "avx512", "amx_emulated")


@pytest.fixture(params=ISAS)
def isa(request):
    before = bf12_cpu.isa()
    if bf12_cpu.set_isa(request.param) != request.param:
        bf12_cpu.set_isa(before)
        pytest.skip(f"{request.param} is not supported by this CPU or build")
    yield request.param
    bf12_cpu.set_isa(before)


def weights(rng, R, K, *, scale=0.05, exceptions=0):
    """Gaussian bf16 weights with at least `exceptions` weights 2**-20 below their neighbours (exceptions)."""
    w = (rng.standard_normal((R, K)) * scale).astype(ml_dtypes.bfloat16)
    for i in range(exceptions):
        w[(7 * i) % R, (13 * i) % K] = scale * 2.0**-20 * (1 if i % 2 else -1)
    return w


def check(got, x, w, exc_cols=()):
    """got vs float64 x W^T; the exceptions' columns of x are large, so a dropped exception is far outside."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    want, scale = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == np.float32
    bad = ~(np.abs(got - want) <= 1e-5 * scale + 1e-30)
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs off, first at {np.argwhere(bad)[0]}"


def inputs(rng, M, K, packed, boost=2.0**18):
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, np.asarray(packed.exc_cols)] *= boost  # the exceptions' products as large as a whole row's
    return x.astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("R,K", [(1, 32), (7, 64), (203, 96), (1500, 2880)])
def test_library_packs_the_reference_bytes_and_unpacks_exactly(isa, R, K):
    rng = np.random.default_rng(R)
    w = weights(rng, R, K, exceptions=5)
    w.view(np.uint16)[0, :4] = [0x7F80, 0xFFC1, 0x8000, 0x0001]  # Inf, NaN, -0, a subnormal
    ref, ours = pack_bf12(w), bf12_cpu.pack(w)
    for name in ("data", "exc_rows", "exc_cols", "exc_bits"):
        assert np.array_equal(getattr(ours, name), getattr(ref, name)), name
    assert ours.num_exceptions >= 5
    assert np.array_equal(np.asarray(jax.jit(bf12_cpu.unpack)(ours)).view(np.uint16), w.view(np.uint16))


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 35])
@pytest.mark.parametrize("R,K", [(1, 32), (37, 160), (300, 2880)])
def test_products_match_float64_oracle(isa, M, R, K):
    rng = np.random.default_rng(M * 1000 + R)
    w = weights(rng, R, K, exceptions=3)
    packed = bf12_cpu.pack(w)
    x = inputs(rng, M, K, packed)
    (y,) = jax.jit(bf12_cpu.matmul_many)(jnp.asarray(x), [packed])
    check(y, x, w)


def test_each_token_sums_alone_in_a_batched_decode_call(isa):
    """2-4 tokens (batched decode) share each decoded block; every token's sum keeps its one-token bits."""
    rng = np.random.default_rng(11)
    w = weights(rng, 301, 2880 + 96, exceptions=6)  # 93 blocks: a tail after the groups of 4
    packed = bf12_cpu.pack(w)
    x = inputs(rng, 4, w.shape[1], packed)
    alone = np.concatenate([np.asarray(bf12_cpu.matmul_many(jnp.asarray(x[m:m + 1]), [packed])[0]) for m in range(4)])
    for M in (2, 3, 4):
        (y,) = bf12_cpu.matmul_many(jnp.asarray(x[:M]), [packed])
        assert np.array_equal(np.asarray(y), alone[:M]), M


def test_large_enough_to_split_and_many_weights_in_one_call(isa):
    rng = np.random.default_rng(5)
    ws = [weights(rng, R, 2880, exceptions=4) for R in (4096, 512, 520)]  # 23.6 MB: several tasks each
    packed = [bf12_cpu.pack(w) for w in ws]
    x = inputs(rng, 1, 2880, packed[0])
    ys = bf12_cpu.matmul_many(jnp.asarray(x), packed)
    for y, w in zip(ys, ws):
        check(y, x, w)


@pytest.mark.parametrize("M,bf12_isa,dense_isa", [(1, "avx512", "avx512bf16"), (3, "avx512", "avx512bf16"),
                                                  (7, "avx512", "avx512bf16"), (35, "avx512", "avx512bf16"),
                                                  (7, "amx_emulated", "amx_emulated")])
def test_equals_the_dense_kernel_bit_for_bit(M, bf12_isa, dense_isa):
    """1-3 tokens: VDPBF16PS in the dense rows path's order, rows without exceptions (theirs are added after the
    sum); from 5 tokens, every row: the exceptions are written into the decoded rows before the same VDPBF16PS tiles,
    or AMX tiles (emulated; dense from 4)."""
    if bf12_cpu.set_isa(bf12_isa) != bf12_isa or dense_cpu.set_isa(dense_isa) != dense_isa:
        pytest.skip(f"{bf12_isa} / {dense_isa} are not supported by this CPU or build")
    try:
        rng = np.random.default_rng(M)
        w = weights(rng, 300, 2880, exceptions=40)
        packed = bf12_cpu.pack(w)
        x = jnp.asarray(rng.standard_normal((M, 2880)).astype(ml_dtypes.bfloat16))
        (y,) = bf12_cpu.matmul_many(x, [packed])
        yd = dense_cpu.dense_matmul(x, jnp.asarray(w), w_nk=True)
        clean = np.setdiff1d(np.arange(300), packed.exc_rows)
        assert 0 < clean.size < 300
        rows = clean if M <= bf12_cpu.MAX_TOKENS else np.arange(300)
        assert np.array_equal(np.asarray(y)[:, rows], np.asarray(yd)[:, rows])
    finally:
        bf12_cpu.set_isa(bf12_cpu.best_isa())
        dense_cpu.set_isa(dense_cpu.best_isa())


def test_nan_and_inf_weights_propagate(isa):
    w = np.full((4, 64), 0.5, ml_dtypes.bfloat16)
    w[1, 3], w[2, 60] = np.inf, np.nan
    x = jnp.ones((1, 64), jnp.bfloat16)
    (y,) = bf12_cpu.matmul_many(x, [bf12_cpu.pack(w)])
    y = np.asarray(y)[0]
    assert y[0] == y[3] == 32.0 and np.isposinf(y[1]) and np.isnan(y[2])


def test_gradient_of_x_matches_the_unpacked_einsum():
    rng = np.random.default_rng(6)
    ws = [weights(rng, 40, 96, exceptions=2), weights(rng, 24, 96, exceptions=1)]
    packed = [bf12_cpu.pack(w) for w in ws]
    x = jnp.asarray(rng.standard_normal((3, 96)).astype(ml_dtypes.bfloat16))
    cts = [jnp.asarray(rng.standard_normal((3, w.shape[0])), jnp.float32) for w in ws]

    def loss(x):
        return sum((y * ct).sum() for y, ct in zip(bf12_cpu.matmul_many(x, packed), cts))

    dx = np.asarray(jax.grad(loss)(x), np.float64)
    want = sum(np.asarray(ct, np.float64) @ np.asarray(w, np.float64) for w, ct in zip(ws, cts))
    np.testing.assert_allclose(dx, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())  # dx is rounded to bf16


def test_errors_name_the_weight():
    w = bf12_cpu.pack(np.zeros((8, 64), ml_dtypes.bfloat16))
    with pytest.raises(TypeError, match="bfloat16"):
        bf12_cpu.matmul_many(jnp.ones((1, 64), jnp.float32), [w])
    with pytest.raises(ValueError, match="weight 1"):
        bf12_cpu.matmul_many(jnp.ones((1, 64), jnp.bfloat16), [w, bf12_cpu.pack(np.zeros((8, 32), ml_dtypes.bfloat16))])
    with pytest.raises(TypeError, match="weight 0 is a ndarray"):
        bf12_cpu.matmul_many(jnp.ones((1, 64), jnp.bfloat16), [np.zeros((8, 64))])
    with pytest.raises(ValueError, match="no weights"):
        bf12_cpu.matmul_many(jnp.ones((1, 64), jnp.bfloat16), [])


def test_serves():
    x16, x32 = jnp.ones((1, 64), jnp.bfloat16), jnp.ones((1, 64), jnp.float32)
    assert bf12_cpu.serves(1, x16) and bf12_cpu.serves(bf12_cpu.MAX_TOKENS, x16)
    assert not bf12_cpu.serves(1, x32) and not bf12_cpu.serves(1, x16, enabled=False) and not bf12_cpu.serves(0, x16)
    before = bf12_cpu.isa()
    try:
        bf12_cpu.set_isa("scalar")  # no tiles: many tokens are unpacked for the dense path instead
        assert not bf12_cpu.serves(bf12_cpu.MAX_TOKENS + 1, x16)
    finally:
        bf12_cpu.set_isa(before)
    assert bf12_cpu.serves(512, x16) == (before != "scalar")
    assert bf12_cpu.fast() == (bf12_cpu.load_library().gptoss_bf12_best_isa() in (1, 2))
