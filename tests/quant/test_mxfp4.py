"""MXFP4 pack/unpack against independent oracles: the numpy reference, a literal E2M1 table, hand-built blocks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss.quant import MXFP4Array, QuantWeight, dequantize, mx_einsum, mx_matmul, pack_ref, quantize, unpack_ref

# FP4 E2M1, indexed by nibble code 0..15, written out from the facts file (§3) -- not imported from the code.
E2M1 = [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
F32_TINY = np.finfo(np.float32).tiny  # smallest normal fp32 (2**-126)


def naive_dequant(blocks, scales):
    """Element by element: low nibble of byte j of block g is element 32g+2j, high nibble 32g+2j+1."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    *lead, n, g, _ = blocks.shape
    out = np.zeros((*lead, n, g * 32), np.float64)
    for idx in np.ndindex(*lead, n, g):
        for j in range(16):
            b = int(blocks[idx + (j,)])
            s = int(scales[idx])
            out[idx[:-1] + (32 * idx[-1] + 2 * j,)] = math.ldexp(E2M1[b & 0x0F], s - 127)
            out[idx[:-1] + (32 * idx[-1] + 2 * j + 1,)] = math.ldexp(E2M1[b >> 4], s - 127)
    return out.astype(np.float32)


def ref_unpack(blocks, scales):
    with np.errstate(over="ignore"):  # 6 * 2**127 overflows to inf, on purpose
        return unpack_ref(blocks, scales)


def unpacked(a: MXFP4Array):
    """The numpy reference's reading of an MXFP4Array's bytes."""
    return ref_unpack(np.asarray(a.blocks), np.asarray(a.scales))


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def assert_bits_equal(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    diff = bits(got) != bits(want)
    assert not diff.any(), f"{diff.sum()} elements differ, first at {np.argwhere(diff)[0]}: " \
                           f"{got[tuple(np.argwhere(diff)[0])]} vs {want[tuple(np.argwhere(diff)[0])]}"


def every_byte_every_scale(scales):
    """Rows n: scale byte scales[n] on every block; the 16 blocks of a row hold all 256 byte values."""
    n = len(scales)
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (n, 16, 16)).copy()
    return blocks, np.broadcast_to(np.asarray(scales, np.uint8)[:, None], (n, 16)).copy()


_jit_dequant = jax.jit(dequantize, static_argnums=2)


# ---------------------------------------------------------------------------------------------- dequantize
def test_unpack_ref_matches_literal_table():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (2, 3, 2, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (2, 3, 2), dtype=np.uint8)
    assert_bits_equal(ref_unpack(blocks, scales), naive_dequant(blocks, scales))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dequantize_all_bytes_all_normal_scales_bit_exact(dtype):
    # scale bytes 2..254: every product is a normal float (or overflows to inf at 254), so no
    # flush-to-zero question arises; the results must be bit-identical to the numpy LUT reference.
    blocks, scales = every_byte_every_scale(np.arange(2, 255))
    got = np.asarray(_jit_dequant(blocks, scales, dtype))
    assert got.dtype == np.dtype(dtype)
    ref = ref_unpack(blocks, scales)
    assert np.isinf(ref).any()  # 6 * 2**127 overflows: make sure the extreme end is really exercised
    assert_bits_equal(got.astype(np.float32), ref.astype(dtype).astype(np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dequantize_random_bytes_bit_exact(dtype):
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 7, 4, 16), dtype=np.uint8)
    scales = rng.integers(2, 255, (3, 7, 4), dtype=np.uint8)
    got = np.asarray(_jit_dequant(blocks, scales, dtype)).astype(np.float32)
    assert_bits_equal(got, ref_unpack(blocks, scales).astype(dtype).astype(np.float32))


def test_dequantize_of_compile_time_constants():
    # weights closed over by a jitted function become XLA constants and get constant-folded; a
    # uint8 -> float4_e2m1fn bitcast was folded wrongly there (scrambled nibbles), so check that path too
    blocks, scales = every_byte_every_scale([2, 127, 200])
    bj, sj = jnp.asarray(blocks), jnp.asarray(scales)
    got = jax.jit(lambda: dequantize(bj, sj, jnp.float32))()
    assert_bits_equal(got, ref_unpack(blocks, scales))
    w = MXFP4Array(bj, sj, jnp.bfloat16)
    got = jax.jit(lambda x: mx_matmul(x, w))(jnp.eye(w.shape[-1], dtype=jnp.float32))
    assert np.array_equal(np.asarray(got), ref_unpack(blocks, scales).T)  # (-0 + 0 = +0 in the sum)


def test_dequantize_smallest_scales_exact_or_flushed_to_signed_zero():
    # Scale byte 0 is the subnormal 2**-127 and scale byte 1 gives subnormal products (0.5 * 2**-126).
    # XLA on CPU treats subnormals as zero (inputs and outputs), which no checkpoint can notice; allow exactly
    # that and nothing else: every element is the reference or a zero of the reference's sign, and every
    # normal product of a normal scale (byte 1) is exact.
    blocks, scales = every_byte_every_scale([0, 1])
    got = np.asarray(_jit_dequant(blocks, scales, jnp.float32))
    ref = unpack_ref(blocks, scales)
    zero = np.copysign(np.float32(0), ref)
    assert ((bits(got) == bits(ref)) | (bits(got) == bits(zero))).all()
    normal = np.abs(ref[1]) >= F32_TINY
    assert normal.sum() > 100 and (got[1][normal] == ref[1][normal]).all()


def test_dequantize_scale_255_is_nan():
    # OCP MX v1.0: E8M0 0xFF is NaN, so the whole block is NaN (the torch reference's ldexp would give inf/0).
    blocks, scales = every_byte_every_scale([255])
    assert np.isnan(np.asarray(_jit_dequant(blocks, scales, jnp.float32))).all()


@pytest.mark.parametrize("scale, factor", [(127, 1.0), (128, 2.0), (126, 0.5)])
def test_nibble_order_hand_built(scale, factor):
    blocks = np.zeros((1, 2, 16), np.uint8)
    scales = np.full((1, 2), scale, np.uint8)
    blocks[0, 0, 0] = 0x21  # low nibble 1 -> +0.5 is element 0, high nibble 2 -> +1.0 is element 1
    blocks[0, 1, 5] = 0xF8  # block 1, byte 5: low 8 -> -0 is element 32+10, high F -> -6 is element 32+11
    blocks[0, 1, 15] = 0x7C  # low C -> -2 is element 62, high 7 -> +6 is element 63
    want = np.zeros((1, 64), np.float32)
    want[0, 0], want[0, 1] = 0.5 * factor, 1.0 * factor
    want[0, 42], want[0, 43] = -0.0, -6.0 * factor
    want[0, 62], want[0, 63] = -2.0 * factor, 6.0 * factor
    assert_bits_equal(_jit_dequant(blocks, scales, jnp.float32), want)
    assert_bits_equal(naive_dequant(blocks, scales), want)


@settings(max_examples=15, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), n=st.integers(1, 4), g=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_dequantize_random_shapes_property(lead, n, g, seed):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (*lead, n, g, 16), dtype=np.uint8)
    scales = rng.integers(2, 255, (*lead, n, g), dtype=np.uint8)
    got = _jit_dequant(blocks, scales, jnp.float32)
    assert got.shape == (*lead, n, g * 32)
    assert_bits_equal(got, ref_unpack(blocks, scales))


# ---------------------------------------------------------------------------------------------- quantize
def assert_same_bytes(q: MXFP4Array, x):
    ref_blocks, ref_scales = pack_ref(np.asarray(x, np.float32))
    np.testing.assert_array_equal(np.asarray(q.scales), ref_scales)
    np.testing.assert_array_equal(np.asarray(q.blocks), ref_blocks)


_jit_quantize = jax.jit(quantize, static_argnums=1)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 0.02, 1.0, 300.0, 2.0**60])
def test_quantize_matches_pack_ref_on_normal_data(scale):
    x = (np.random.default_rng(2).normal(size=(3, 5, 96)) * scale).astype(np.float32)
    q = _jit_quantize(jnp.asarray(x), jnp.float32)
    assert q.shape == (3, 5, 96) and q.blocks.dtype == jnp.uint8 and q.scales.dtype == jnp.uint8
    assert_same_bytes(q, x)


def tie_block(e: int):
    """One block whose amax is exactly 6 * 2**e (so the shared exponent is e), holding exact ties."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # halfway between E2M1 neighbours
    # round-half-to-even on E2M1 = toward the even code (even mantissa bit):
    expect = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    vals = [6.0] + ties + [-t for t in ties]
    want = [6.0] + expect + [-t for t in expect]
    # saturation: above 6 (the scale still puts amax in [4, 8)) everything clips to +-6
    vals += [6.5, -7.0, 7.5, -7.99, 5.9, -4.9, 5.1, 0.1, -0.1]
    want += [6.0, -6.0, 6.0, -6.0, 6.0, -4.0, 6.0, 0.0, -0.0]
    vals += [0.0] * (32 - len(vals))
    want += [0.0] * (32 - len(want))
    return np.ldexp(np.array(vals, np.float32), e), np.ldexp(np.array(want, np.float32), e)


@pytest.mark.parametrize("e", [-10, 0, 3, 40])
def test_quantize_ties_and_saturation(e):
    x, want = tie_block(e)
    x = np.stack([x, x[::-1]])  # also with the tie values in other positions (other nibble halves)
    want = np.stack([want, want[::-1]])
    q = _jit_quantize(jnp.asarray(x), jnp.float32)
    np.testing.assert_array_equal(np.asarray(q.scales), np.full((2, 1), e + 127, np.uint8))
    assert_bits_equal(_jit_dequant(q.blocks, q.scales, jnp.float32), want)
    assert_same_bytes(q, x)
    # -0.1 * 2**e rounds to zero and keeps its sign: code 8
    assert int(np.asarray(q.blocks)[0, 0, 11] & 0xF0) >> 4 == 8 and want[0, 23] == 0 and np.signbit(want[0, 23])


def test_quantize_zero_and_mixed_blocks():
    x = np.zeros((2, 96), np.float32)
    x[1, 32:64] = np.linspace(-3, 3, 32)
    x[1, 64] = -1e-3
    q = _jit_quantize(jnp.asarray(x), jnp.float32)
    assert_same_bytes(q, x)
    y = unpacked(q)
    assert (y[0] == 0).all() and (y[1, :32] == 0).all()
    assert (np.asarray(q.blocks)[0] == 0).all()


def half_step(a):
    """Half the E2M1 grid spacing around magnitude a (in units of the block scale)."""
    return np.where(a <= 2, 0.25, np.where(a <= 4, 0.5, 1.0))


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e5])
def test_quantize_error_bound(scale):
    x = (np.random.default_rng(3).normal(size=(32, 256)) * scale).astype(np.float32)
    y = np.asarray(jax.jit(lambda x: quantize(x).dequantize(jnp.float32))(x))
    xb, yb = x.reshape(32, 8, 32).astype(np.float64), y.reshape(32, 8, 32).astype(np.float64)
    amax = np.abs(xb).max(-1, keepdims=True)
    unit = np.exp2(np.floor(np.log2(amax)) - 2)  # 2**shared_exp: amax / unit lies in [4, 8)
    a = np.abs(xb) / unit
    err = np.abs(yb - xb) / unit
    # inside the grid (|a| <= 6) the error is at most half a grid step (<= 1 scale unit);
    # above it, values saturate to 6, so the error is exactly a - 6 (< 2 units).
    inside = a <= 6
    assert (err[inside] <= half_step(a[inside]) + 1e-6).all()
    np.testing.assert_allclose(err[~inside], a[~inside] - 6, rtol=1e-6)
    assert err.max() <= 2 and (err[inside] <= 1).all()
    assert (np.sign(yb) * np.sign(xb) >= 0).all()  # never flips a sign
    rel_rms = np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2))
    # 1 mantissa bit with a floor-chosen shared exponent: about 0.115 on Gaussian data
    assert rel_rms < 0.13


def test_quantize_is_lossless_on_representable_values():
    rng = np.random.default_rng(4)
    blocks = rng.integers(0, 256, (4, 6, 3, 16), dtype=np.uint8)
    scales = rng.integers(10, 241, (4, 6, 3), dtype=np.uint8)
    blocks[0, 0] = 0  # an all-zero row, and a block with a small amax code (scale must shift)
    blocks[0, 1, 0] = 0x11
    x = dequantize(blocks, scales, jnp.float32)
    x2 = jax.jit(lambda x: quantize(x).dequantize(jnp.float32))(x)
    assert np.array_equal(np.asarray(x2), np.asarray(x))  # equal as values (-0 may come back as +0)
    assert np.array_equal(np.asarray(x), unpack_ref(blocks, scales))


def test_quantize_rejects_partial_block():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(jnp.ones((2, 48)))


def test_quantize_output_dtype():
    def dtype_of(f):
        return jax.eval_shape(f).dtype  # traces only, nothing to compile

    assert dtype_of(lambda: quantize(jnp.ones((2, 32), jnp.bfloat16)).dequantize()) == jnp.bfloat16
    assert dtype_of(lambda: quantize(jnp.ones((2, 32), jnp.float32)).dequantize()) == jnp.float32
    assert dtype_of(lambda: quantize(jnp.ones((2, 32)), jnp.bfloat16).dequantize()) == jnp.bfloat16
    assert dtype_of(lambda: quantize(jnp.ones((2, 32), jnp.bfloat16)).dequantize(jnp.float32)) == jnp.float32


# ---------------------------------------------------------------------------------------------- MXFP4Array
def packed(rng, shape):
    *lead, k = shape
    blocks = rng.integers(0, 256, (*lead, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(115, 130, (*lead, k // 32), dtype=np.uint8)
    return blocks, scales


def test_array_shape_dtype_nbytes():
    blocks, scales = packed(np.random.default_rng(5), (5, 7, 64))
    a = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.bfloat16)
    assert a.shape == (5, 7, 64) and a.ndim == 3
    assert a.dtype == jnp.bfloat16 and jax.eval_shape(a.dequantize).dtype == jnp.bfloat16
    assert a.nbytes == 5 * 7 * 2 * 16 + 5 * 7 * 2
    assert a.nbytes * 8 / (5 * 7 * 64) == 4.25  # 4.25 bits per weight
    assert jax.eval_shape(a.astype(jnp.float32).dequantize).dtype == jnp.float32
    assert jax.eval_shape(a.dequantize).shape == (5, 7, 64)
    assert "packed" in repr(a)


def test_array_indexing_and_take_equal_dequantize_then_index():
    blocks, scales = packed(np.random.default_rng(6), (5, 7, 64))
    a = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    full = unpack_ref(blocks, scales)
    cases = [(2, full[2]), ((2, slice(3, 4)), full[2, 3:4]), (slice(1, 4), full[1:4]), ((slice(None), 5), full[:, 5]),
             (np.array([4, 0, 4]), full[[4, 0, 4]]), (jnp.array([1, 3]), full[[1, 3]]), (Ellipsis, full)]
    for idx, want in cases:
        got = a[idx]
        assert isinstance(got, MXFP4Array), idx
        assert got.shape == want.shape, idx
        assert got.dtype == jnp.float32
        assert_bits_equal(unpacked(got), want)
    idx = jnp.array([[4, 1], [0, 0]])
    assert_bits_equal(unpacked(a.take(idx)), full[np.asarray(idx)])
    assert_bits_equal(unpacked(a.take(jnp.array([6, 2]), axis=1)), full[:, [6, 2]])
    assert_bits_equal(unpacked(a.take(jnp.array([6, 2]), axis=-2)), full[:, [6, 2]])
    assert a.take(idx).shape == (2, 2, 7, 64)


def test_array_cannot_index_packed_axis():
    blocks, scales = packed(np.random.default_rng(7), (5, 7, 64))
    a = MXFP4Array(blocks, scales)
    with pytest.raises(IndexError):
        a[1, 2, 3]
    with pytest.raises(IndexError):
        a[..., 0]
    with pytest.raises(IndexError, match="single row"):
        a[2, 3]  # would leave a lone packed row: an MXFP4Array holds [..., N, K] matrices
    with pytest.raises(IndexError):
        a.take(np.array([0]), axis=2)
    with pytest.raises(IndexError):
        a.take(np.array([0]), axis=-1)
    with pytest.raises(TypeError, match="packed"):
        jnp.asarray(a)


def test_array_validates_shapes():
    blocks, scales = packed(np.random.default_rng(8), (5, 7, 64))
    with pytest.raises(ValueError, match="scales shape"):
        MXFP4Array(blocks, scales[:, :6])
    with pytest.raises(ValueError, match="scales shape"):
        MXFP4Array(blocks, scales[..., :1])
    with pytest.raises(ValueError, match="blocks"):
        MXFP4Array(blocks[..., :8], scales)
    with pytest.raises(ValueError, match="blocks"):
        MXFP4Array(blocks[0, 0], scales[0, 0])


def test_array_is_a_pytree():
    blocks, scales = packed(np.random.default_rng(9), (3, 4, 64))
    a = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.bfloat16)
    leaves, treedef = jax.tree.flatten(a)
    assert len(leaves) == 2 and all(leaf.dtype == jnp.uint8 for leaf in leaves)
    b = jax.tree.map(lambda t: t[::-1], a)
    assert isinstance(b, MXFP4Array) and b.dtype == jnp.bfloat16
    assert_bits_equal(unpacked(b), unpack_ref(blocks, scales)[::-1])

    @jax.jit
    def f(w, e):
        assert isinstance(w, MXFP4Array)
        return w[e].dequantize(jnp.float32), w

    out, same = f(a, 2)
    assert_bits_equal(out, unpack_ref(blocks, scales)[2])
    assert isinstance(same, MXFP4Array) and same.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(same.blocks), blocks)


class _Tiny(nnx.Module):
    def __init__(self, w: MXFP4Array):
        self.w = QuantWeight(w)
        self.gain = nnx.Param(jnp.ones((w.shape[0],), jnp.float32))

    def __call__(self, x):
        return mx_matmul(x, self.w[...]) * self.gain[...]


def test_quant_weight_is_not_a_param_and_survives_an_optimizer_step():
    blocks, scales = packed(np.random.default_rng(10), (4, 64))
    model = _Tiny(MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32))
    assert not isinstance(model.w, nnx.Param)
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    assert len(leaves) == 1 and leaves[0].shape == (4,)
    assert not any(leaf.dtype == jnp.uint8 for leaf in leaves)

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x = jnp.ones((2, 64), jnp.float32)

    def loss(m):
        return jnp.sum(m(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(model)
    optimizer.update(model, grads)
    assert not np.allclose(np.asarray(model.gain[...]), 1.0)  # the step did something
    np.testing.assert_array_equal(np.asarray(model.w[...].blocks), blocks)
    np.testing.assert_array_equal(np.asarray(model.w[...].scales), scales)


# ---------------------------------------------------------------------------------------------- matmul
def test_mx_matmul_equals_dense_reference():
    rng = np.random.default_rng(11)
    blocks, scales = packed(rng, (12, 96))
    w_ref = unpack_ref(blocks, scales).astype(np.float64)
    x = rng.normal(size=(3, 5, 96)).astype(np.float32)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), jnp.bfloat16)
    got = jax.jit(lambda x, w: mx_matmul(x, w, precision="highest"))(x, w)
    assert got.shape == (3, 5, 12) and got.dtype == jnp.float32  # computes in x's dtype, not w.dtype
    np.testing.assert_allclose(np.asarray(got), x @ w_ref.T, rtol=1e-5, atol=1e-5 * np.abs(w_ref).max())
    dense = mx_matmul(x, jnp.asarray(w_ref, jnp.float32), precision="highest")
    np.testing.assert_allclose(np.asarray(dense), x @ w_ref.T, rtol=1e-5, atol=1e-5 * np.abs(w_ref).max())


def test_mx_einsum_stacked_experts_and_packed_first_operand():
    rng = np.random.default_rng(12)
    blocks, scales = packed(rng, (3, 10, 64))
    w_ref = unpack_ref(blocks, scales).astype(np.float64)
    w = MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales))
    x = rng.normal(size=(4, 64)).astype(np.float32)
    both = jax.jit(lambda x, w: (mx_einsum("td,efd->etf", x, w, precision="highest"),
                                 mx_einsum("efd,td->etf", w, x, precision="highest")))
    for got in both(x, w):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.einsum("td,efd->etf", x, w_ref), rtol=1e-5, atol=1e-4)
