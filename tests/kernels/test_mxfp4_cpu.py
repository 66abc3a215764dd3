"""The MXFP4 CPU kernel against the numpy reference dequantizer, through jit, for every vector path (the product,
its transpose, skipped pairs); the expert op on it against the dense strategy and its XLA twin; the kernels option,
the fallback and its one warning; gradients."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_amx_emulation import real_amx_skip_reason

from gptoss.kernels import mxfp4_cpu, select
from gptoss.layers.experts import ExpertWeights, moe_ffn
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
        pytest.skip(real_amx_skip_reason() if request.param == "amx"
                    else f"{request.param} is not supported by this CPU or build")
    before = mxfp4_cpu.isa()
    assert mxfp4_cpu.set_isa(request.param) == request.param
    yield request.param
    mxfp4_cpu.set_isa(before)


@pytest.fixture(autouse=True)
def exact_gemv(request):
    """The exact fp32 GEMV everywhere (the oracle's contract), except in the x16 / x8 tests, which set what they
    test."""
    if "x16" in request.node.name or "int_gemv" in request.node.name:
        yield
        return
    before = mxfp4_cpu.set_exact_gemv(True)
    yield
    mxfp4_cpu.set_exact_gemv(before)


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
    if pattern == "skipped":  # about a third of the pairs skipped (expert parallelism: -1), any negative value
        idx = rng.integers(0, E, (M, S))
        idx[rng.random((M, S)) < 0.35] = -1
        idx.flat[rng.integers(0, M * S)] = np.iinfo(np.int32).min
        return idx
    if pattern == "all_skipped":
        return np.full((M, S), -1)
    raise ValueError(pattern)


PATTERNS = ("random", "one_expert", "repeat_in_token", "distinct", "skipped", "all_skipped")


def _oracle(idx, blocks, scales, v, spec):
    """float64 W[idx] contracted with v by `spec`, and the fp32 rounding bound 1e-5 * sum |w v| per output; a
    skipped pair's (idx < 0) row of both is 0."""
    keep = np.asarray(idx) >= 0
    W = unpack_ref(blocks, scales).astype(np.float64)[np.where(keep, idx, 0)]  # [M, S, N, K]
    v = np.asarray(v, np.float64)
    want = np.einsum(spec, W, v) * keep[..., None]
    bound = (1e-5 * np.einsum(spec, np.abs(W), np.abs(v)) + 1e-30) * keep[..., None]
    return want, bound, keep


def _compare(got, want, bound, keep):
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == np.float32
    assert (got[~keep] == 0).all(), "a skipped pair's row is not exactly zero"
    assert np.isfinite(got[keep]).all()
    bad = np.abs(got - want) > bound
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs off, first at {np.argwhere(bad)[0]}"


def check(got, x, blocks, scales, idx):
    """y = W[idx] x: |got - want| within fp32 rounding of sum |w x| per output (float64 oracle from unpack_ref);
    skipped pairs exactly 0."""
    _compare(got, *_oracle(idx, blocks, scales, x, "msnk,mk->msn"))


def check_t(got, dy, blocks, scales, idx):
    """dx = W[idx]^T dy, the same way."""
    _compare(got, *_oracle(idx, blocks, scales, dy, "msnk,msn->msk"))


SHAPES = [  # (M, S, E, N, G): odd block counts, N not a multiple of 16 or 4, one and many tokens
    (1, 4, 5, 40, 3),
    (1, 1, 2, 17, 5),
    (7, 3, 4, 40, 5),
    (64, 4, 6, 40, 3),
    (33, 2, 3, 13, 1),
    (20, 3, 3, 21, 17),  # K in two whole 8-block chunks of the AVX2 panel and one block more
    (2, 3, 4, 1500, 9),  # gather: 1.4 MB of rows in guided tasks (pool.h), cut where a pair's rows end
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}S{}E{}N{}G{}".format(*s))
@pytest.mark.parametrize("grouped", [False, True], ids=["gather", "grouped"])
def test_matches_numpy_reference(isa, shape, grouped):
    M, S, E, N, G = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    fn = jax.jit(lambda x, w, i: mxfp4_cpu.mx_gather_matmul(x, w, i, grouped=grouped))
    for pattern in PATTERNS:
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
    for grouped in (False, True):
        with pytest.raises(Exception, match="out of range"):
            jax.block_until_ready(mxfp4_cpu.mx_gather_matmul(np.ones((1, 32), np.float32), w, np.array([[-1, 2]]),
                                                             grouped=grouped))
        with pytest.raises(Exception, match="out of range"):
            jax.block_until_ready(mxfp4_cpu.mx_gather_matmul_t(np.ones((1, 2, 8), np.float32), w,
                                                               np.array([[0, 2]]), grouped=grouped))


@pytest.mark.parametrize("grouped", [False, True], ids=["gather", "grouped"])
def test_skipped_pairs_are_zero_and_leave_the_rest(isa, grouped):
    """Negative indices: exact zero rows, whatever was in the output buffer before; the other pairs, on the same
    experts and tokens, still match the oracle. All pairs skipped, and one token with every slot skipped."""
    rng = np.random.default_rng(10)
    M, S, E, N, G = 21, 3, 4, 40, 3
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    idx = rng.integers(0, E, (M, S)).astype(np.int32)
    idx[rng.random((M, S)) < 0.4] = -1
    idx[3] = -1
    idx[5] = [-2, -100, np.iinfo(np.int32).min]
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.normal(size=(M, 32 * G)), dtype)
        dy = jnp.asarray(rng.normal(size=(M, S, N)), dtype)
        for i in (idx, np.full((M, S), -1, np.int32)):
            check(mxfp4_cpu.mx_gather_matmul(x, w, i, grouped=grouped), np.asarray(x, np.float32), blocks, scales, i)
            check_t(mxfp4_cpu.mx_gather_matmul_t(dy, w, i, grouped=grouped), np.asarray(dy, np.float32), blocks,
                    scales, i)


# ---------------------------------------------------------------------------------------- the transposed product
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}S{}E{}N{}G{}".format(*s))
@pytest.mark.parametrize("grouped", [False, True], ids=["gather", "grouped"])
def test_transposed_matches_numpy_reference(isa, shape, grouped):
    M, S, E, N, G = shape
    rng = np.random.default_rng(hash(shape) % 2**32 + 1)
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    fn = jax.jit(lambda dy, w, i: mxfp4_cpu.mx_gather_matmul_t(dy, w, i, grouped=grouped))
    for pattern in PATTERNS:
        idx = selection(pattern, rng, M, S, E).astype(np.int32)
        dy = rng.normal(size=(M, S, N)).astype(np.float32)
        check_t(fn(dy, w, idx), dy, blocks, scales, idx)
        dyb = jnp.asarray(dy, jnp.bfloat16)
        check_t(fn(dyb, w, idx), np.asarray(dyb, np.float32), blocks, scales, idx)


@pytest.mark.parametrize("grouped", [False, True], ids=["gather", "grouped"])
def test_transposed_passes_and_tails(isa, grouped):
    """Shapes that cross every split of the transposed kernel: more than one pass over the rows (and a row tail),
    block chunks with tails, more than one 64-pair group of an expert, odd token tails."""
    rng = np.random.default_rng(11)
    M, S, E, N, G = 70, 2, 3, 150, 19
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    for pattern in ("one_expert", "skipped", "random"):
        idx = selection(pattern, rng, M, S, E).astype(np.int32)
        dy = rng.normal(size=(M, S, N)).astype(np.float32)
        check_t(mxfp4_cpu.mx_gather_matmul_t(dy, w, idx, grouped=grouped), dy, blocks, scales, idx)
    idx = selection("random", rng, 1, 4, E).astype(np.int32)  # decode: one token, its own pass per pair
    dy = rng.normal(size=(1, 4, N)).astype(np.float32)
    check_t(mxfp4_cpu.mx_gather_matmul_t(dy, w, idx, grouped=grouped), dy, blocks, scales, idx)


def test_transposed_every_code_and_scale_byte(isa):
    """As test_every_code_and_scale_byte, through the transposed product: dx = W^T dy with one-hot dy picks
    row n's 512 decoded values exactly (scale bytes 0..200, every code pair), subnormal ones included although
    XLA runs its threads with flush-to-zero."""
    n_rows = 201
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (1, n_rows, 16, 16)).copy()
    scales = np.broadcast_to(np.arange(n_rows, dtype=np.uint8).reshape(1, n_rows, 1), (1, n_rows, 16)).copy()
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    rows = np.array([0, 1, 126, 127, 128, 200, 57])
    dy = np.zeros((len(rows), 1, n_rows), np.float32)
    dy[np.arange(len(rows)), 0, rows] = 1.0
    want = unpack_ref(blocks, scales).astype(np.float32)[0, rows][:, None, :]
    for grouped in (False, True):
        got = np.asarray(mxfp4_cpu.mx_gather_matmul_t(dy, w, np.zeros((len(rows), 1), np.int32), grouped=grouped))
        np.testing.assert_array_equal(got, want)


def test_transposed_real_width_all_paths_agree():
    """At gpt-oss's real K = 2880 (90 blocks) and N = 2880 every vector path against the oracle, fp32 and bf16 dy."""
    rng = np.random.default_rng(12)
    E, N, G = 2, 2880, 90
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    idx = np.array([[1, 0], [-1, 0], [1, 1], [0, -1], [1, 0]], np.int32)
    dy = rng.normal(size=(5, 2, N)).astype(np.float32)
    dyb = jnp.asarray(dy, jnp.bfloat16)
    before = mxfp4_cpu.isa()
    try:
        for name in _supported_isas():
            mxfp4_cpu.set_isa(name)
            for grouped in (False, True):
                check_t(mxfp4_cpu.mx_gather_matmul_t(dy, w, idx, grouped=grouped), dy, blocks, scales, idx)
                check_t(mxfp4_cpu.mx_gather_matmul_t(dyb, w, idx, grouped=grouped), np.asarray(dyb, np.float32),
                        blocks, scales, idx)
    finally:
        mxfp4_cpu.set_isa(before)


def test_transposed_shape_errors():
    blocks, scales = random_packed(np.random.default_rng(0), 2, 8, 1)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    with pytest.raises(ValueError, match="do not fit"):
        mxfp4_cpu.mx_gather_matmul_t(np.ones((1, 2, 9), np.float32), w, np.zeros((1, 2), np.int32))
    with pytest.raises(ValueError, match="do not fit"):
        mxfp4_cpu.mx_gather_matmul_t(np.ones((1, 3, 8), np.float32), w, np.zeros((1, 2), np.int32))
    with pytest.raises(TypeError, match="MXFP4Array"):
        mxfp4_cpu.mx_gather_matmul_t(np.ones((1, 2, 8), np.float32), jnp.ones((2, 8, 32)), np.zeros((1, 2)))


def test_transposed_c_entry():
    """The plain C entry point (ctypes benchmarks) computes the same product, and rejects a bad index."""
    import ctypes

    lib = mxfp4_cpu.load_library()
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.gptoss_mxfp4_matmul_t
    fn.argtypes = [ptr, ctypes.c_int, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    rng = np.random.default_rng(13)
    M, S, E, N, G = 9, 2, 3, 40, 3
    blocks, scales = random_packed(rng, E, N, G)
    idx = selection("skipped", rng, M, S, E).astype(np.int32)
    dy = rng.normal(size=(M, S, N)).astype(np.float32)
    for grouped in (0, 1):
        dx = np.full((M, S, 32 * G), np.nan, np.float32)
        args = (blocks.ctypes.data, scales.ctypes.data, idx.ctypes.data, dx.ctypes.data, M, 32 * G, E, N, S, grouped)
        assert fn(dy.ctypes.data, 0, *args) == 0
        check_t(dx, dy, blocks, scales, idx)
    bad = np.full((M, S), E, np.int32)
    assert fn(dy.ctypes.data, 0, blocks.ctypes.data, scales.ctypes.data, bad.ctypes.data, dx.ctypes.data, M, 32 * G,
              E, N, S, 0) == -1


@pytest.mark.parametrize("grouped", [False, True], ids=["gather", "grouped"])
def test_vjp_is_the_transposed_product(isa, grouped):
    """jax.vjp / jax.grad of mx_gather_matmul in x: sum_s W[idx]^T dy against the float64 oracle, with skipped
    pairs (their dy contributes nothing), for fp32 and bf16 x; and the second derivative through the transposed op."""
    rng = np.random.default_rng(14)
    M, S, E, N, G = 13, 3, 4, 40, 3
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    for pattern in ("random", "skipped", "one_expert"):
        idx = selection(pattern, rng, M, S, E).astype(np.int32)
        dy = rng.normal(size=(M, S, N)).astype(np.float32)
        want, bound, _ = _oracle(idx, blocks, scales, dy, "msnk,msn->msk")
        want, bound = want.sum(axis=1), bound.sum(axis=1) + 1e-30
        for dtype in (jnp.float32, jnp.bfloat16):
            x = jnp.asarray(rng.normal(size=(M, 32 * G)), dtype)
            _, vjp = jax.vjp(lambda x, i=idx: mxfp4_cpu.mx_gather_matmul(x, w, i, grouped=grouped), x)
            (dx,) = jax.jit(vjp)(jnp.asarray(dy))
            assert dx.dtype == dtype and dx.shape == x.shape
            dx = np.asarray(dx, np.float64)
            if dtype == jnp.bfloat16:  # the fp32 result rounded once to bf16
                np.testing.assert_allclose(dx, want, rtol=2**-8, atol=1e-30)
            else:
                bad = np.abs(dx - want) > bound
                assert not bad.any(), f"{bad.sum()} of {bad.size} gradient entries off"
            loss = lambda x, i=idx, dy=dy: jnp.sum(mxfp4_cpu.mx_gather_matmul(x, w, i, grouped=grouped) * dy)  # noqa: E731
            np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(loss))(x), np.float64), dx)
        # d/d(dy) of <mx_gather_matmul_t(dy), c> = W[idx] c: the forward product again
        c = rng.normal(size=(M, S, 32 * G)).astype(np.float32)
        got = jax.grad(lambda d, i=idx, c=c: jnp.sum(mxfp4_cpu.mx_gather_matmul_t(d, w, i, grouped=grouped) * c))(dy)
        want2, bound2, keep = _oracle(idx, blocks, scales, c, "msnk,msk->msn")
        _compare(got, want2, bound2, keep)


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
    return ExpertWeights(q1, b1, q2, b2, None, 7.0, 1.702)


def routing(seed, t):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(E)[:TOPK] for _ in range(t)]).astype(np.int32)
    return jnp.asarray(idx), jnp.asarray(rng.dirichlet(np.ones(TOPK), size=t), jnp.float32)


def _uses_kernel(fn, *args) -> bool:
    return mxfp4_cpu.TARGET in jax.jit(fn).lower(*args).as_text()


def _op(impl, kernels):
    def f(x, idx, w, ew):
        return moe_ffn(x, idx, w, ew, moe_impl=impl, cpu_kernels=kernels, precision=jax.lax.Precision.HIGHEST)
    return f


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_expert_op_with_kernel_equals_dense_and_xla_twin(t, dtype):
    ew = packed_experts(t)
    x = jnp.asarray(np.random.default_rng(t + 1).normal(size=(t, D)), dtype)
    idx, w = routing(t + 2, t)
    impls = ("gather", "grouped")
    assert all(_uses_kernel(lambda x, i=i: _op(i, True)(x, idx, w, ew), x) for i in impls)
    assert not any(_uses_kernel(lambda x, i=i: _op(i, False)(x, idx, w, ew), x) for i in impls)
    with_kernel = {i: jax.jit(lambda x, i=i: _op(i, True)(x, idx, w, ew))(x) for i in impls}
    twin = {i: jax.jit(lambda x, i=i: _op(i, False)(x, idx, w, ew))(x) for i in impls}
    dense = jax.jit(lambda x: _op("dense", False)(x, idx, w, ew))(x)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: the SwiGLU output is rounded to bf16 in every path
    for name in impls:
        for ref in (dense, twin[name]):
            np.testing.assert_allclose(np.asarray(with_kernel[name], np.float64), np.asarray(ref, np.float64),
                                       rtol=tol, atol=tol * float(jnp.abs(ref).max()))


def test_kernels_option_and_environment(monkeypatch):
    """The model's `kernels` option decides; $GPTOSS_KERNELS only supplies the default when a model is built, and
    switching never clears JAX's caches (which would throw away a user's compiled steps)."""
    from gptoss import ModelConfig, random_model

    monkeypatch.setattr(jax, "clear_caches", lambda: pytest.fail("jax.clear_caches was called"))
    assert not select.cpu_kernels("xla") and select.cpu_kernels("cpu")
    assert select.cpu_kernels("auto") == select._x86()
    with pytest.raises(ValueError, match="kernels must be one of"):
        select.cpu_kernels("yes")
    monkeypatch.setenv("GPTOSS_KERNELS", "xla")
    assert select.default_kernels() == "xla"
    model = random_model(ModelConfig.tiny(), kernels=None)
    assert model.kernels == "xla" and "kernels='xla'" in repr(model).replace('"', "'")
    assert random_model(ModelConfig.tiny(), kernels="cpu").kernels == "cpu"  # an explicit choice wins
    monkeypatch.setenv("GPTOSS_KERNELS", "yes")
    with pytest.raises(ValueError, match="GPTOSS_KERNELS"):
        select.default_kernels()


@pytest.fixture
def missing_library(monkeypatch, tmp_path):
    """The modules as they are when the library was never built (the real one stays registered with XLA)."""
    saved, warned = dict(mxfp4_cpu._state), dict(select._warned)
    monkeypatch.setenv("GPTOSS_MXFP4_LIB", str(tmp_path / "libgptoss_mxfp4.so"))
    mxfp4_cpu._state.update(tried=False, lib=None, error=None)
    select._warned.update(done=False)
    yield
    mxfp4_cpu._state.update(saved)
    select._warned.update(warned)


@pytest.mark.skipif(not select._x86(), reason="auto mode only enables the kernel on x86-64")
def test_missing_library_falls_back_with_one_warning(missing_library):
    ew = packed_experts(0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, D)), jnp.float32)
    idx, w = routing(1, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flags = [select.cpu_kernels("auto") for _ in range(3)]
        assert not any(flags) and not mxfp4_cpu.kernel_available()
    ours = [c for c in caught if issubclass(c.category, select.KernelUnavailableWarning)]
    assert len(ours) == 1, [str(c.message) for c in caught]
    assert "pure-XLA" in str(ours[0].message) and "does not exist" in str(ours[0].message)
    got = jax.jit(lambda x: _op("gather", flags[0])(x, idx, w, ew))(x)
    dense = _op("dense", False)(x, idx, w, ew)
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5 * float(jnp.abs(dense).max()))
    with pytest.raises(RuntimeError, match="unavailable"):  # asking for the kernels without them is an error
        select.cpu_kernels("cpu")


@pytest.mark.parametrize("spin", [0, 1000])
def test_concurrent_calls_and_pool_sizes(spin):
    """Calls from several threads at once (one gets the pool, the others run inline) and pool resizes, with idle
    workers sleeping at once (spin 0) or polling for the next call first."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(7)
    blocks, scales = random_packed(rng, 3, 40, 3)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    fn = jax.jit(lambda x, i, g: mxfp4_cpu.mx_gather_matmul(x, w, i, grouped=g), static_argnums=2)
    cases = [(rng.normal(size=(9, 96)).astype(np.float32), rng.integers(0, 3, (9, 2)).astype(np.int32), g % 2 == 0)
             for g in range(8)]
    try:
        assert mxfp4_cpu.set_spin_micros(spin) == spin
        for n_threads in (3, 1, 0):
            mxfp4_cpu.set_num_threads(n_threads)
            with ThreadPoolExecutor(4) as ex:
                outs = list(ex.map(lambda c: np.asarray(fn(*c)), cases * 3))
            for (x, idx, _), got in zip(cases * 3, outs):
                check(got, x, blocks, scales, idx)
    finally:
        mxfp4_cpu.set_num_threads(0)
        mxfp4_cpu.set_spin_micros(-1)


def test_spin_micros_setting(monkeypatch):
    """The default is 1000 us (this suite does not set GPTOSS_POOL_SPIN_US); -1 restores it, negatives never stick."""
    monkeypatch.delenv("GPTOSS_POOL_SPIN_US", raising=False)
    try:
        assert mxfp4_cpu.set_spin_micros(-1) == 1000
        assert mxfp4_cpu.set_spin_micros(0) == 0
        assert mxfp4_cpu.set_spin_micros(250) == 250
    finally:
        assert mxfp4_cpu.set_spin_micros(-5) == 1000


# ------------------------------------------------------ x16 (AVX2 and AVX-512 VNNI one-token GEMV) and x8 (opt-in)
def x16_round(x):
    """numpy model of the documented x16 rounding: each 32-block of the first 8 * (G // 8) blocks becomes
    q * 2**(E - 13), E = floor(log2 max|x|) (one more if a q would reach 16384), q = round-half-even; the rest stay."""
    x = np.asarray(x, np.float64)
    xb = x.reshape(*x.shape[:-1], -1, 32).copy()
    whole = xb.shape[-2] // 8 * 8
    head = xb[..., :whole, :]
    amax = np.abs(head).max(-1, keepdims=True)
    e = np.floor(np.log2(np.where(amax > 0, amax, 1.0)))
    e = e + (np.rint(head * 2.0 ** (13 - e)) > 16383).any(-1, keepdims=True)
    xb[..., :whole, :] = np.rint(head * 2.0 ** (13 - e)) * 2.0 ** (e - 13)
    return xb.reshape(x.shape)


def x8_round(x):
    """numpy model of the documented x8 rounding, in the driver's fp32 arithmetic: each 32-block of the first
    8 * (G // 8) blocks becomes q * d, d = max|x| / 127, q = rint(x * (127 / max|x|)) (fp32 division and product,
    each correctly rounded; rint: half to even); the rest stay."""
    x = np.asarray(x, np.float32)
    xb = x.reshape(*x.shape[:-1], -1, 32)
    whole = xb.shape[-2] // 8 * 8
    head = xb[..., :whole, :]
    amax = np.abs(head).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    q = np.rint(head * inv.astype(np.float32))
    out = xb.astype(np.float64)
    out[..., :whole, :] = q.astype(np.float64) * (amax / np.float32(127)).astype(np.float64)
    return out.reshape(x.shape)


ROUNDINGS = {"x16": (x16_round, 2.0**-14), "x8": (x8_round, 1 / 254)}  # model, max error per block max |x|


@pytest.fixture(params=[(m, i) for m in ("x16", "x8") for i in ("avx2", "avx512")], ids=lambda p: "-".join(p))
def int_gemv(request):
    """Each integer one-token GEMV this CPU can run: x16 and x8 on AVX2, and on AVX-512 where the CPU has VNNI and
    VBMI. Yields (mode, its numpy rounding model, its error bound per block max |x|)."""
    mode, isa = request.param
    if isa not in _supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    before_isa, before_mode = mxfp4_cpu.isa(), mxfp4_cpu.set_gemv_input(mode)
    mxfp4_cpu.set_isa(isa)
    try:
        if not (mxfp4_cpu.x8_active() if mode == "x8" else mxfp4_cpu.x16_active()):
            pytest.skip(f"no {mode} kernel on {isa} here (AVX-512 needs VNNI and VBMI)")
        yield (mode, *ROUNDINGS[mode])
    finally:
        mxfp4_cpu.set_isa(before_isa)
        mxfp4_cpu.set_gemv_input(before_mode)


X16_SHAPES = [  # (M, S, E, N, G): one group, two, groups plus 1 and 2 fp32 tail blocks (G = 90 is gpt-oss's K)
    (1, 4, 5, 40, 8),
    (3, 2, 4, 13, 16),
    (1, 1, 2, 17, 17),
    (2, 4, 3, 9, 90),
    (1, 2, 2, 5, 7),  # no whole group: all fp32
    (1, 4, 4, 1100, 9),  # guided tasks (pool.h) that start inside a pair's rows and are cut where they end
]


@pytest.mark.parametrize("shape", X16_SHAPES, ids=lambda s: "M{}S{}E{}N{}G{}".format(*s))
def test_int_gemv_matches_the_rounded_oracle(int_gemv, shape):
    """Gather calls against float64 W[idx] . round(x) (x16_round or x8_round), within fp32 rounding; inputs over ~6
    binades per block (so that small elements do round) in fp32 and bf16, every selection pattern."""
    _, rounded, _ = int_gemv
    M, S, E, N, G = shape
    rng = np.random.default_rng(sum(shape))
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    fn = jax.jit(lambda x, w, i: mxfp4_cpu.mx_gather_matmul(x, w, i, grouped=False))
    for pattern in PATTERNS:
        idx = selection(pattern, rng, M, S, E).astype(np.int32)
        x = (rng.normal(size=(M, 32 * G)) * np.exp2(rng.uniform(-6, 6, (M, 32 * G)))).astype(np.float32)
        check(fn(x, w, idx), rounded(x), blocks, scales, idx)
        xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
        check(fn(jnp.asarray(xb, jnp.bfloat16), w, idx), rounded(xb), blocks, scales, idx)


def test_int_gemv_error_bound_and_edges(int_gemv):
    """Against exact x: within the bound (x16: 2**-14, x8: 1 / 254) * sum over blocks of max|x_b| * sum|w| of the
    block. Edges: a block of zeros, an fp32 element that rounds up to the next binade (x16), a negative power of
    two as the block maximum, and the scale bytes 0 and > 127 of random_packed. x8 is not x16 in disguise."""
    mode, rounded, per_max = int_gemv
    rng = np.random.default_rng(12)
    E, N, G = 2, 24, 16
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    x = rng.normal(size=(4, 32 * G)).astype(np.float32)
    x[0, 32:64] = 0.0
    x[1, 64:96] = rng.uniform(-1, 1, 32) * 2.0 ** -20
    x[1, 64] = np.nextafter(np.float32(2.0), np.float32(0.0))  # just below 2: q would be 16384 at E = 0
    x[2, 96:128] = rng.uniform(-0.5, 0.5, 32)
    x[2, 100] = -1.0
    idx = np.array([[0], [1], [0], [1]], np.int32)
    y = mxfp4_cpu.mx_gather_matmul(x, w, idx, grouped=False)
    check(y, rounded(x), blocks, scales, idx)
    got = np.asarray(y, np.float64)
    W = unpack_ref(blocks, scales).astype(np.float64)[idx[:, 0]]  # [M, N, K]
    amax = np.repeat(np.abs(x.reshape(4, G, 32)).max(-1), 32, axis=1)  # [M, K]
    mag = np.einsum("mnk,mk->mn", np.abs(W), np.abs(x))
    bound = per_max * np.einsum("mnk,mk->mn", np.abs(W), amax) + 1e-5 * mag
    exact = np.einsum("mnk,mk->mn", W, x.astype(np.float64))
    assert (np.abs(got[:, 0] - exact) <= bound).all()
    assert (np.abs(got[:, 0] - exact) > 0).any(), f"{mode} was not in use (the result is exact)"
    if mode == "x8":
        x16_y = np.einsum("mnk,mk->mn", W, x16_round(x))
        assert (np.abs(got[:, 0] - x16_y) > 1e-3 * mag).any(), "x8 gave x16's results"


def test_int_gemv_falls_back_to_fp32_for_out_of_range_tokens(int_gemv):
    """A token with a non-finite element, or a block max >= 2**60 or below 2**-100, runs on fp32 x: the same
    results as the oracle on unrounded x (inf and NaN included); the other tokens stay on x16 (x8)."""
    _, rounded, _ = int_gemv
    rng = np.random.default_rng(13)
    blocks, scales = random_packed(rng, 2, 16, 8)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    x = rng.normal(size=(6, 256)).astype(np.float32) * np.exp2(rng.uniform(-6, 6, (6, 256))).astype(np.float32)
    x[1, 40] = np.inf
    x[2, 200] = 2.0**61
    x[3, 32:64] = rng.normal(size=32) * 2.0**-110
    x[5] = (rng.normal(size=256) * 2.0**-135).astype(np.float32)  # fp32 subnormals: not zero (under DAZ either)
    idx = np.array([[0], [1], [0], [1], [0], [1]], np.int32)
    got = np.asarray(jax.jit(lambda x: mxfp4_cpu.mx_gather_matmul(x, w, idx, grouped=False))(x))
    W5 = unpack_ref(blocks, scales).astype(np.float64)[1]
    want5, mag5 = W5 @ x[5].astype(np.float64), np.abs(W5) @ np.abs(x[5].astype(np.float64))
    assert (np.abs(got[5, 0] - want5) <= 1e-5 * mag5).all() and (got[5, 0] != 0).all()
    W = unpack_ref(blocks, scales).astype(np.float64)[idx[:, 0]]
    with np.errstate(invalid="ignore", over="ignore"):
        inf_want = np.einsum("nk,k->n", W[1], x[1].astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got[1, 0]), np.isnan(inf_want))
    np.testing.assert_array_equal(got[1, 0][np.isinf(inf_want)], inf_want[np.isinf(inf_want)])
    for m in (2, 3):  # fp32 path: the oracle on x itself
        check(got[m : m + 1], x[m : m + 1], blocks, scales, idx[m : m + 1])
    for m in (0, 4):
        check(got[m : m + 1], rounded(x[m : m + 1]), blocks, scales, idx[m : m + 1])


def test_int_gemv_nan_scale_byte_poisons_its_row_only(int_gemv):
    rng = np.random.default_rng(14)
    blocks, scales = random_packed(rng, 2, 12, 16)
    scales[1, 5, 9] = 255
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    idx = np.array([[1, 0]], np.int32)
    y = np.asarray(mxfp4_cpu.mx_gather_matmul(rng.normal(size=(1, 512)).astype(np.float32), w, idx, grouped=False))
    assert np.isnan(y[0, 0, 5]) and np.isnan(y).sum() == 1


def test_x16_is_the_default_and_switchable():
    """A fresh library starts on x16 (GPTOSS_MXFP4_EXACT_GEMV and GPTOSS_MXFP4_GEMV_INPUT unset, as in this suite's
    environment)."""
    import os

    if os.environ.get("GPTOSS_MXFP4_EXACT_GEMV") == "1" or os.environ.get("GPTOSS_MXFP4_GEMV_INPUT"):
        pytest.skip("GPTOSS_MXFP4_EXACT_GEMV=1 or GPTOSS_MXFP4_GEMV_INPUT in this environment")
    assert mxfp4_cpu.exact_gemv() is False  # this test is outside the autouse fixture (its name says x16)
    assert mxfp4_cpu.set_exact_gemv(True) is False and mxfp4_cpu.exact_gemv() is True
    assert mxfp4_cpu.set_exact_gemv(False) is True and mxfp4_cpu.exact_gemv() is False
    assert mxfp4_cpu.gemv_input() == "x16"


def test_an_unknown_gemv_input_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("GPTOSS_MXFP4_GEMV_INPUT", "x4")
    with pytest.warns(UserWarning, match="GPTOSS_MXFP4_GEMV_INPUT='x4'.*x16"):
        mxfp4_cpu.check_gemv_env()
    monkeypatch.setenv("GPTOSS_MXFP4_GEMV_INPUT", "x8")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mxfp4_cpu.check_gemv_env()


def test_x16_to_x8_and_back():
    """x8 is opt-in and survives set_exact_gemv's round trip; an unknown mode is refused by name; a tile without
    integer kernels (AVX-512 without VNNI / VBMI, scalar) runs neither."""
    before_isa, before = mxfp4_cpu.isa(), mxfp4_cpu.set_gemv_input("x8")
    try:
        assert mxfp4_cpu.gemv_input() == "x8"
        assert mxfp4_cpu.set_exact_gemv(True) is False and mxfp4_cpu.gemv_input() == "exact"
        assert not mxfp4_cpu.x8_active() and not mxfp4_cpu.x16_active()
        assert mxfp4_cpu.set_exact_gemv(False) is True and mxfp4_cpu.gemv_input() == "x8"
        mxfp4_cpu.set_isa("scalar")
        assert not mxfp4_cpu.x8_active() and not mxfp4_cpu.x16_active()
        with pytest.raises(ValueError, match="'x4'"):
            mxfp4_cpu.set_gemv_input("x4")
    finally:
        mxfp4_cpu.set_isa(before_isa)
        mxfp4_cpu.set_gemv_input(before)


@pytest.mark.parametrize("mode", ["x16", "x8"])
def test_x16_kernels_agree_bit_for_bit(mode):
    """AVX-512 VNNI's x16 (x8) GEMV sums the same integers per block as AVX2's and accumulates them in the same order:
    the same fp32 results, bit for bit, where every block is in a whole group of 8 (G % 8 == 0)."""
    if not {"avx2", "avx512"} <= set(_supported_isas()):
        pytest.skip("needs both AVX2 and AVX-512")
    rng = np.random.default_rng(15)
    E, N, G = 4, 70, 24
    blocks, scales = random_packed(rng, E, N, G)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    x = (rng.normal(size=(3, 32 * G)) * np.exp2(rng.uniform(-6, 6, (3, 32 * G)))).astype(np.float32)
    idx = rng.integers(0, E, (3, 2)).astype(np.int32)
    before_isa, before_mode = mxfp4_cpu.isa(), mxfp4_cpu.set_gemv_input(mode)
    got = {}
    try:
        for name in ("avx2", "avx512"):
            mxfp4_cpu.set_isa(name)
            if not (mxfp4_cpu.x8_active() if mode == "x8" else mxfp4_cpu.x16_active()):
                pytest.skip(f"no {mode} kernel on {name} here (AVX-512 needs VNNI and VBMI)")
            got[name] = np.asarray(mxfp4_cpu.mx_gather_matmul(x, w, idx, grouped=False))
    finally:
        mxfp4_cpu.set_isa(before_isa)
        mxfp4_cpu.set_gemv_input(before_mode)
    np.testing.assert_array_equal(got["avx512"], got["avx2"])
    check(got["avx512"], ROUNDINGS[mode][0](x), blocks, scales, idx)


def test_read_probe_sums_every_word_once():
    """read_probe (the benchmarks' roofline) reads every byte of every buffer exactly once: its sum of 64-bit words
    equals numpy's, over buffers of 0 bytes, a partial word, word and 4 KiB tails, and several chunks (6 MB); jax
    arrays are read in place; a strided view is refused rather than copied."""
    rng = np.random.default_rng(0)
    bufs = [rng.integers(0, 256, n, dtype=np.uint8) for n in (0, 1, 7, 8, 9, 4095, 4097, (3 << 16) + 5, 6 << 20)]

    def words(b):
        padded = np.zeros(-(-b.nbytes // 8) * 8, np.uint8)
        padded[: b.nbytes] = b.reshape(-1).view(np.uint8)
        return int(padded.view("<u8").sum(dtype=np.uint64))

    assert mxfp4_cpu.read_probe(bufs) == sum(map(words, bufs)) % 2**64
    x = jnp.arange(-500, 500, dtype=jnp.float32)
    assert mxfp4_cpu.read_probe([x, bufs[3]]) == (words(np.asarray(x)) + words(bufs[3])) % 2**64
    assert mxfp4_cpu.read_probe([]) == 0
    with pytest.raises(ValueError, match="buffer 1 .* not C-contiguous"):
        mxfp4_cpu.read_probe([bufs[2], bufs[-1][::2]])
