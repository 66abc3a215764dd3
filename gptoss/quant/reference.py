"""Plain numpy MXFP4 pack/unpack: the slow, obvious twin that the jit paths are tested against."""

from __future__ import annotations

import numpy as np

from gptoss.quant.mxfp4 import BLOCK, E2M1_VALUES, SCALE_BIAS


def unpack_ref(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """LUT dequantization, as the reference `_get_mxfp4_tensor` does it: low nibble first, ldexp(scale-127)."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales).astype(np.int32) - SCALE_BIAS
    lo = E2M1_VALUES[blocks & 0x0F]
    hi = E2M1_VALUES[blocks >> 4]
    vals = np.empty(blocks.shape[:-1] + (BLOCK,), dtype=np.float32)
    vals[..., 0::2] = lo
    vals[..., 1::2] = hi
    vals = np.ldexp(vals, scales[..., None])
    return vals.reshape(*vals.shape[:-2], -1)


def pack_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-by-element OCP MX quantization: scale = 2**(floor(log2 amax) - 2), nearest E2M1, ties to even."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize NaN or Inf to MXFP4")
    *lead, n, k = x.shape
    xb = x.reshape(-1, BLOCK)
    magnitudes = E2M1_VALUES[:8]
    codes = np.zeros(xb.shape, dtype=np.uint8)
    scale_bytes = np.zeros(xb.shape[0], dtype=np.uint8)
    for b, block in enumerate(xb):
        amax = float(np.max(np.abs(block)))
        exp = int(np.floor(np.log2(amax))) - 2 if amax > 0 else -SCALE_BIAS
        exp = min(max(exp, -SCALE_BIAS), SCALE_BIAS)
        scale_bytes[b] = exp + SCALE_BIAS
        for i, v in enumerate(block):
            a = min(abs(float(v)) / 2.0**exp, 6.0)
            dist = np.abs(magnitudes - a)
            best = np.flatnonzero(dist == dist.min())
            # a tie between two grid points goes to the code with an even mantissa bit (even code)
            code = int(best[0]) if len(best) == 1 else int(next(c for c in best if c % 2 == 0))
            codes[b, i] = code | (8 if v < 0 else 0)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return (packed.reshape(*lead, n, k // BLOCK, BLOCK // 2).astype(np.uint8),
            scale_bytes.reshape(*lead, n, k // BLOCK))
