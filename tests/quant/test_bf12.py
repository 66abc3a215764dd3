"""bf12 (gptoss.quant.bf12): the numpy packer and the XLA unpacker give back every bf16 bit pattern; the layout's
fields against a decoder written from the format's description; exceptions; errors."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

from gptoss.quant.bf12 import BF12Array, pack_bf12


def bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint16)


def as_bf16(b: np.ndarray) -> np.ndarray:
    return np.asarray(b, np.uint16).view(ml_dtypes.bfloat16)


def decode_by_spec(data: np.ndarray, K: int) -> np.ndarray:
    """Weight bits from the packed rows, element by element as csrc/bf12_kernel.h describes them (exceptions as
    signed zeros)."""
    G = K // 32
    out = np.zeros((data.shape[0], K), np.uint16)
    for r in range(data.shape[0]):
        for k in range(K):
            g, j = divmod(k, 32)
            block = data[r, G + 48 * g: G + 48 * (g + 1)]
            code = int(block[32 + j] & 15 if j < 16 else block[32 + j - 16] >> 4)
            sign, off = code >> 3, code & 7
            high = (sign << 7) | (0 if off == 7 else int(data[r, g]) - off)
            out[r, k] = (high << 8) | int(block[j])
    return out


def test_every_bit_pattern_comes_back():
    """All 65536 bf16 patterns (NaN payloads, Infs, subnormals, both zeros), shuffled into blocks, round-trip."""
    rng = np.random.default_rng(0)
    w = as_bf16(rng.permutation(np.arange(1 << 16, dtype=np.uint16)).reshape(512, 128))
    packed = pack_bf12(w)
    assert np.array_equal(bits(packed.unpack()), bits(w))
    assert np.array_equal(bits(jax.jit(BF12Array.unpack)(packed)), bits(w))


@pytest.mark.parametrize("scale", [1e-3, 0.02, 1.0, 3e4])
def test_gaussian_weights_pack_to_49_bytes_per_32(scale):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((37, 2, 96)) * scale).astype(ml_dtypes.bfloat16)
    packed = pack_bf12(w)
    assert packed.shape == w.shape and packed.rows_cols == (74, 96) and packed.dtype == np.dtype(ml_dtypes.bfloat16)
    assert packed.data.shape == (74, 3 * 49) and packed.data.dtype == np.uint8
    assert packed.num_exceptions < 0.002 * w.size  # ~0.03 % for Gaussian weights
    assert np.array_equal(bits(packed.unpack()), bits(w))


def test_layout_matches_the_description():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((5, 64)) * 0.05).astype(ml_dtypes.bfloat16)
    w[1, 3], w[2, 40] = 0.0, -0.0
    packed = pack_bf12(w)
    e = (bits(w).reshape(5, 2, 32) >> 7) & 0xFF
    assert np.array_equal(packed.data[:, :2], e.max(-1) >> 1)  # one byte per block first
    got = decode_by_spec(packed.data, 64)
    got[packed.exc_rows, packed.exc_cols] = packed.exc_bits
    assert np.array_equal(got, bits(w))


def test_exceptions_are_the_weights_the_code_cannot_hold():
    w = np.full((3, 64), 1.0, ml_dtypes.bfloat16)
    w[0, 5] = 2.0**-11  # 11 binades below the block's largest: offset 5 or 6, held
    w[0, 6] = -(2.0**-16)  # 16 below: an exception
    w[1, 33] = as_bf16(np.uint16(0x0003))  # a subnormal: an exception
    w[2, 0], w[2, 1] = 0.0, -0.0  # signed zeros: exact, not exceptions
    packed = pack_bf12(w)
    assert packed.exc_rows.tolist() == [0, 1] and packed.exc_cols.tolist() == [6, 33]
    assert packed.exc_bits.tolist() == [bits(w)[0, 6], 0x0003]
    assert np.array_equal(bits(packed.unpack()), bits(w))
    dropped = decode_by_spec(packed.data, 64)  # without its exceptions the rows read zeros there
    assert dropped[0, 6] == 0x8000 and dropped[1, 33] == 0 and dropped[0, 5] == bits(w)[0, 5]


def test_two_contracted_dims():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((7, 4, 16)).astype(ml_dtypes.bfloat16)  # [out, in1, in2]: K = 64
    packed = pack_bf12(w, n_in=2)
    assert packed.rows_cols == (7, 64)
    assert np.array_equal(bits(packed.unpack()), bits(w))


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="bfloat16"):
        pack_bf12(np.zeros((4, 32), np.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_bf12(np.zeros((4, 40), ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="n_in"):
        pack_bf12(np.zeros((4, 32), ml_dtypes.bfloat16), n_in=2)
    p = pack_bf12(np.zeros((4, 32), ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="do not fit"):
        BF12Array(p.data[:3], p.exc_rows, p.exc_cols, p.exc_bits, (4, 32))
    w = np.zeros((4, 32), ml_dtypes.bfloat16)
    w[1, :2] = w[2, :2] = [1.0, 2.0**-30]  # exceptions at (1, 1) and (2, 1)
    q = pack_bf12(w)
    assert q.num_exceptions == 2
    for rows, cols in (([1, 4], [1, 1]), ([2, 1], [1, 1]), ([1, 2], [1, 32]), ([1, 1], [1, 1])):
        with pytest.raises(ValueError, match="exceptions must lie inside"):
            BF12Array(q.data, np.array(rows, np.int32), np.array(cols, np.int32), q.exc_bits, (4, 32))
    with pytest.raises(TypeError, match="read whole"):
        p[0]
    assert p[...] is p
