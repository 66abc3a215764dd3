"""The bf16 tile paths. The library's ISA "amx_emulated" runs the real AMX unit's algorithm (the input packing, the
bf16 table, the scratch layout, the tile loop and the C-tile transpose into y: csrc/mxfp4_amx_loop.h) on a portable
emulation of the tile instructions, on every CPU. Grouped MXFP4 with bf16 inputs and dense bf16 [N, K] rows go
through it against an independent numpy reference, dequantized from the bit layout, within fp32 rounding and bit
for bit in TDPBF16PS's order; where the CPU has AMX the same cases run on the real unit, and where it has
AVX512_BF16 on the VDPBF16PS tiles (csrc/mxfp4_avx512bf16.cc), both within fp32 rounding and with the same
denormals-are-zero behaviour."""

from __future__ import annotations

import ctypes
import platform

import jax
import ml_dtypes
import numpy as np
import pytest

from gptoss.kernels import dense_cpu, mxfp4_cpu
from gptoss.quant import MXFP4Array

pytestmark = pytest.mark.skipif(
    not dense_cpu.kernel_available() or jax.default_backend() != "cpu",
    reason=f"CPU kernel library unavailable: {dense_cpu.load_error()}")

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
FLT_MIN = 2.0**-126  # TDPBF16PS reads denormal inputs as zero and flushes denormal results


def real_amx_skip_reason() -> str:
    """The skip message of tests that need the real AMX unit where this process cannot use it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    have = [f for f in ("amx_tile", "amx_bf16", "avx512_bf16") if f in flags]
    cpu = ("cpu flags " + " ".join(have) + ", but this build or the OS does not enable AMX" if len(have) == 3
           else "no amx_tile/amx_bf16 in its cpu flags")
    best = mxfp4_cpu.ISAS[mxfp4_cpu.load_library().gptoss_mxfp4_best_isa()] if mxfp4_cpu.kernel_available() else "-"
    return (f"real AMX not run on this CPU ({platform.machine()}, {cpu}; best kernel path {best}); "
            "the emulated tile path ran (tests/kernels/test_amx_emulation.py)")


def _flush(a):
    return np.where(np.abs(a) < FLT_MIN, np.zeros_like(a), a)


def dequantize(blocks, scales):
    """uint8 [..., N, G, 16] and [..., N, G] -> float64 [..., N, 32 G]: element 2j of a block is byte j's low nibble,
    2j+1 its high one, times 2**(s - 127) (255: NaN); denormal weights (|w| < 2**-126) are zero on the AMX path."""
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    scale = np.where(scales == 255, np.nan, np.exp2(scales.astype(np.float64) - 127))
    return _flush(E2M1[codes] * scale[..., None]).reshape(*blocks.shape[:-2], -1)


def tdpbf16ps_order(w, x):
    """float32 [M, N] = x [M, K] . w [N, K]^T summed as TDPBF16PS does per the Intel SDM, k ascending (pairs, even
    then odd): each product exact (float64), flushed below FLT_MIN, each fp32 sum rounded to nearest and flushed."""
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for k in range(w.shape[1]):
            acc = _flush(acc + _flush(np.outer(x[:, k], w[:, k])).astype(np.float32))
    return acc


def check(got, w, x, tiles):
    """got [M, N] vs x . w^T (float64, denormals zero): within fp32 rounding of sum |w x|, NaN where it is NaN; on
    the emulated tiles also bit for bit in TDPBF16PS's order."""
    with np.errstate(invalid="ignore", over="ignore"):
        want, scale = x @ w.T, np.abs(x) @ np.abs(w).T
    got = np.asarray(got)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    bad = np.abs(got - want) > 1e-5 * scale + 1e-30
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs off, first at {np.argwhere(bad)[0]}"
    if tiles == mxfp4_cpu.AMX_EMULATED:
        np.testing.assert_array_equal(got, tdpbf16ps_order(w, x))


def emulated_tiles() -> int:
    """Tile calls the emulation has served in this process."""
    fn = mxfp4_cpu.load_library().gptoss_amx_emulated_tiles
    fn.restype = ctypes.c_int64
    return fn()


def dp_skip_reason() -> str | None:
    """Why the VDPBF16PS tiles cannot run here, or None."""
    best = (mxfp4_cpu.ISAS[mxfp4_cpu.load_library().gptoss_mxfp4_best_isa()], dense_cpu.best_isa())
    if all(mxfp4_cpu.ISAS.index(b) >= mxfp4_cpu.ISAS.index("avx512bf16") for b in best):
        return None
    return f"no AVX512_BF16 on this CPU or in this build (best kernel paths {best[0]}, {best[1]})"


@pytest.fixture(params=[mxfp4_cpu.AMX_EMULATED, "amx", "avx512bf16"], ids=["emulated", "real", "vdpbf16ps"])
def tiles(request):
    """Both kernels' AMX paths on the emulated tile instructions or on the real unit, or their VDPBF16PS tiles, where
    this CPU has them; checks that the emulation ran exactly when chosen."""
    if request.param == "amx" and not (dense_cpu.best_isa() == "amx" and
                                       mxfp4_cpu.ISAS[mxfp4_cpu.load_library().gptoss_mxfp4_best_isa()] == "amx"):
        pytest.skip(real_amx_skip_reason())
    if request.param == "avx512bf16" and dp_skip_reason():
        pytest.skip(dp_skip_reason())
    before = mxfp4_cpu.isa(), dense_cpu.isa()
    assert mxfp4_cpu.set_isa(request.param) == request.param and dense_cpu.set_isa(request.param) == request.param
    served = emulated_tiles()
    try:
        yield request.param
    finally:
        mxfp4_cpu.set_isa(before[0])
        dense_cpu.set_isa(before[1])
    assert (emulated_tiles() > served) == (request.param == mxfp4_cpu.AMX_EMULATED)


def bf16_inputs(rng, M, K):
    """bf16 normal values with a few denormal ones (zero on the AMX path); as bf16 and as float64 (flushed)."""
    x = rng.normal(size=(M, K))
    x.flat[rng.choice(x.size, max(1, x.size // 50), replace=False)] = 3e-39
    xb = x.astype(ml_dtypes.bfloat16)
    return xb, _flush(xb.astype(np.float64))


def packed(rng, E, N, G):
    """Random codes; scale bytes 100..150 with some 0 and 1 (denormal weights, zero on the AMX path)."""
    blocks = rng.integers(0, 256, (E, N, G, 16), dtype=np.uint8)
    scales = rng.integers(100, 151, (E, N, G), dtype=np.uint8)
    n = max(2, scales.size // 10)
    scales.flat[rng.choice(scales.size, n, replace=False)] = rng.integers(0, 2, n)
    return blocks, scales


def check_grouped(tiles, blocks, scales, idx, xb, x):
    """The grouped product against the reference, expert by expert; a skipped pair's row exactly zero."""
    w = MXFP4Array(blocks, scales, np.float32)
    got = np.asarray(mxfp4_cpu.mx_gather_matmul(xb, w, idx, grouped=True))
    assert (got[idx < 0] == 0).all()
    W = dequantize(blocks, scales)
    for e in range(blocks.shape[0]):
        m, s = np.nonzero(idx == e)
        if len(m):
            check(got[m, s], W[e], x[m], tiles)


# (M, S, E, N, G, routing): token tails (a pair of 16-token tiles, then one), row tails (N % 32; fewer than 16
# rows), an expert without tokens, skipped pairs, gpt-oss's K = 2880
GROUPED = [(45, 2, 4, 72, 3, "tails"), (5, 3, 3, 17, 1, "random"), (20, 1, 2, 40, 90, "random")]


@pytest.mark.parametrize("case", GROUPED, ids=lambda c: "M{}S{}E{}N{}G{}-{}".format(*c))
def test_grouped_mxfp4_bf16(tiles, case):
    M, S, E, N, G, routing = case
    rng = np.random.default_rng(list(case[:5]))
    blocks, scales = packed(rng, E, N, G)
    if routing == "tails":  # expert 0: all 45 tokens; 1, 2: the second slot, some skipped; 3: none
        idx = np.stack([np.zeros(M, np.int64), rng.integers(1, 3, M)], axis=1)
    else:
        idx = rng.integers(0, E, (M, S))
    idx[rng.random(idx.shape) < 0.2] = -1
    idx.flat[0] = np.iinfo(np.int32).min
    xb, x = bf16_inputs(rng, M, 32 * G)
    check_grouped(tiles, blocks, scales, idx.astype(np.int32), xb, x)


# (M, K, N): the fewest tokens the AMX tiles take (4; the VDPBF16PS ones take 16 and more: 4 runs the GEMV there),
# row tails (scratch copy) and whole 32-row tiles (read in place), token tails, two 256-token blocks
DENSE = [(4, 32, 17), (17, 96, 45), (40, 64, 64), (300, 64, 33)]


@pytest.mark.parametrize("case", DENSE, ids=lambda c: "M{}K{}N{}".format(*c))
def test_dense_bf16_rows(tiles, case):
    M, K, N = case
    rng = np.random.default_rng(list(case))
    xb, x = bf16_inputs(rng, M, K)
    wb = (rng.normal(size=(N, K)) * K**-0.5).astype(ml_dtypes.bfloat16)
    wb.flat[rng.choice(wb.size, 5, replace=False)] = 5e-39  # denormal weights
    got = dense_cpu.dense_matmul(xb, wb, w_nk=True)
    check(got, _flush(wb.astype(np.float64)), x, tiles)


def _on_this_thread(fn):
    """fn() with a one-thread pool from this (Python) thread, which runs without the flush-to-zero and
    denormals-are-zero modes XLA's threads set: the emulation must apply them itself."""
    try:
        mxfp4_cpu.set_num_threads(1)
        return fn()
    finally:
        mxfp4_cpu.set_num_threads(0)


def test_denormals_are_zero_and_nan_propagates(tiles):
    """What sets the tile paths apart: denormal weights (row 3) and a token of denormal inputs (token 7, times weights
    up to ~5e7) give exact zeros where the vector paths keep them, and a NaN scale byte (or weight) poisons its row
    for every token. Emulated: also products that would be denormal (row 4: 2**-126 times |x| < 1) are zero, and
    so on a thread without XLA's FTZ/DAZ modes (the C entry points from this thread)."""
    rng = np.random.default_rng(0)
    M, N, K = 20, 40, 64
    x = rng.uniform(-0.99, 0.99, (M, K))
    x[7] = 5e-39
    xb = x.astype(ml_dtypes.bfloat16)
    x = _flush(xb.astype(np.float64))
    zero_rows = [3, 4] if tiles == mxfp4_cpu.AMX_EMULATED else [3]

    def expect(got, w):
        assert (got[:, zero_rows] == 0).all() and (np.delete(got[7], 35) == 0).all() and np.isnan(got[:, 35]).all()
        check(got, w, x, tiles)

    blocks, scales = packed(rng, 1, N, K // 32)
    scales[0, 3], scales[0, 4] = 0, 1
    blocks[0, 3] = rng.choice(np.array([0x12, 0x39, 0xA3, 0x9B], np.uint8), (2, 16))  # |w| <= 1.5 * 2**-127
    blocks[0, 4] = rng.choice(np.array([0x22, 0xAA, 0x2A, 0xA2], np.uint8), (2, 16))  # |w| = 2**-126
    scales[0, 35, 1] = 255
    idx = np.zeros((M, 1), np.int32)
    w = MXFP4Array(blocks, scales, np.float32)
    expect(np.asarray(mxfp4_cpu.mx_gather_matmul(xb, w, idx, grouped=True))[:, 0], dequantize(blocks, scales)[0])
    y = np.full((M, N), np.inf, np.float32)
    lib = mxfp4_cpu.load_library()
    assert _on_this_thread(lambda: lib.gptoss_mxfp4_matmul(xb.ctypes.data, 1, blocks.ctypes.data, scales.ctypes.data,
                                                           idx.ctypes.data, y.ctypes.data, M, K, 1, N, 1, 1)) == 0
    expect(y, dequantize(blocks, scales)[0])

    wb = (rng.normal(size=(N, K)) * 1e3).astype(ml_dtypes.bfloat16)
    wb[3], wb[4], wb[35, 9] = ml_dtypes.bfloat16(-5e-39), ml_dtypes.bfloat16(FLT_MIN), np.nan
    w = _flush(wb.astype(np.float64))
    expect(np.asarray(dense_cpu.dense_matmul(xb, wb, w_nk=True)), w)
    y = np.full((M, N), np.inf, np.float32)
    assert _on_this_thread(lambda: lib.gptoss_dense_matmul(xb.ctypes.data, 1, wb.ctypes.data, 0, 1, y.ctypes.data,
                                                           M, K, N)) == 0
    expect(y, w)
