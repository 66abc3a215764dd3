// bf12 rows decoded in registers (compiled with AVX-512 F/BW, VBMI and BF16; called only on CPUs that have them):
// per 32 weights one 48-byte load, a shift, a vpermt2b (low bytes to the even bytes, codes to the odd ones), an and,
// and a masked vpshufb through the block's 16-entry high-byte table (built in 3 operations from H_g), then the
// VDPBF16PS of the bf16 rows path. A decode with shifts and masks only (sign, exponent and mantissa assembled, ~16
// operations) was compute-bound on a Zen 4 when memory was fast (benchmarks/bf12_gemv.py).
#include <immintrin.h>

#include "bf12_kernel.h"
#include "dp_rows.h"

namespace {

struct Decoder {
  __m512i idx, offs, sign, low_nibbles;
  __mmask64 valid, odd = 0xAAAAAAAAAAAAAAAAull, body = (uint64_t{1} << 48) - 1;

  Decoder() {
    alignas(64) uint8_t i[64], o[64], s[64];
    for (int j = 0; j < 32; ++j) i[2 * j] = j, i[2 * j + 1] = j < 16 ? 32 + j : 64 + 32 + (j - 16);
    valid = 0;
    for (int c = 0; c < 64; ++c) {
      o[c] = c & 7, s[c] = (c & 8) << 4;
      valid |= static_cast<__mmask64>((c & 7) != 7) << c;
    }
    idx = _mm512_load_si512(i), offs = _mm512_load_si512(o), sign = _mm512_load_si512(s);
    low_nibbles = _mm512_set1_epi8(0x0F);
  }

  // The 32 bf16 weights of the block at `b` whose exponent byte is h.
  __m512i operator()(const uint8_t* b, uint8_t h) const {
    const __m512i table = _mm512_or_si512(_mm512_maskz_sub_epi8(valid, _mm512_set1_epi8(h), offs), sign);
    const __m512i z = _mm512_maskz_loadu_epi8(body, b);
    // even bytes: the low bytes; odd bytes j < 16: code byte j (its low nibble); j >= 16: code byte j - 16 shifted
    // right by 4 within its 16-bit lane (its high nibble)
    const __m512i p = _mm512_permutex2var_epi8(z, idx, _mm512_srli_epi16(z, 4));
    return _mm512_mask_shuffle_epi8(p, odd, table, _mm512_and_si512(p, low_nibbles));
  }
};

}  // namespace

void gptoss::bf12_rows_avx512(const Bf12Task& t) {
  static const Decoder dec;
  const int64_t G = t.K / kBf12Block, row_bytes = G * kBf12RowBytesPerBlock;
  DpRowsByFour(t.lo, t.hi, t.M, [&](int64_t n, int64_t m0, auto tokens) {
    const uint8_t* row = t.w + n * row_bytes;
    const uint8_t* b = row + G;
    const auto block = [&](int64_t g) { return (__m512bh)dec(b + g * kBf12BlockBytes, row[g]); };
    DpRowSums<decltype(tokens)::value, 4 * kBf12BlockBytes>(
        G & ~int64_t{3}, G, block, block, [&](int64_t g) { return b + g * kBf12BlockBytes; }, t.x + m0 * t.K, t.K,
        t.y + m0 * t.R + n, t.R);
  });
}

void gptoss::bf12_unpack_avx512(const Bf12UnpackTask& t) {
  static const Decoder dec;
  const int64_t G = t.K / kBf12Block, row_bytes = G * kBf12RowBytesPerBlock;
  for (int64_t n = t.lo; n < t.hi; ++n) {
    const uint8_t* row = t.w + n * row_bytes;
    uint16_t* out = t.out + n * t.K;
    for (int64_t g = 0; g < G; ++g)
      _mm512_storeu_si512(out + 32 * g, dec(row + G + g * kBf12BlockBytes, row[g]));
  }
}
