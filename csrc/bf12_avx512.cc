// bf12 rows decoded in registers (compiled with AVX-512 F/BW, VBMI and BF16; called only on CPUs that have them):
// per 32 weights one 48-byte load, a shift, a vpermt2b (low bytes to the even bytes, codes to the odd ones), an and,
// and a masked vpshufb through the block's 16-entry high-byte table (built in 3 operations from H_g), then the
// VDPBF16PS of the bf16 rows path. A decode with shifts and masks only (sign, exponent and mantissa assembled, ~16
// operations) was compute-bound on a Zen 4 when memory was fast (benchmarks/bf12_gemv.py).
#include <immintrin.h>

#include <algorithm>

#include "bf12_kernel.h"

namespace {

// Several tokens make a row's sums compute-bound enough that the hardware prefetcher falls behind and memory waits
// add to the compute instead of hiding under it; prefetching 2 KiB ahead (the stream runs on into the next row)
// took 4 cold tokens from 68 to 45 ms on the unembedding (Zen 4; 1 KiB and 4 KiB alike). One token is memory-bound
// and streams best without it.
constexpr int64_t kPrefetchAhead = 2048;

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

// Row n times M tokens (x rows ldx apart), each block decoded once for all of them: per token the accumulators and
// order of dense_avx512bf16.cc's RowOneBf16 (K % 32 == 0 here), so a token's sum does not depend on M.
template <int M>
void Rows(const Decoder& dec, const uint8_t* row, int64_t G, const uint16_t* x, int64_t ldx, float* y,
          int64_t ldy) {
  const uint8_t* b = row + G;
  const int64_t gfull = G & ~int64_t{3};
  __m512 acc[M][4];  // every loop over m and u unrolled, or GCC keeps acc on the stack (a load and store per product)
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
  for (int64_t g = 0; g < gfull; g += 4) {
    if constexpr (M > 1) {
      const char* ahead = reinterpret_cast<const char*>(b + g * gptoss::kBf12BlockBytes) + kPrefetchAhead;
      _mm_prefetch(ahead, _MM_HINT_T0), _mm_prefetch(ahead + 64, _MM_HINT_T0), _mm_prefetch(ahead + 128, _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512bh w = (__m512bh)dec(b + (g + u) * gptoss::kBf12BlockBytes, row[g + u]);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m)
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], w, (__m512bh)_mm512_loadu_si512(x + m * ldx + 32 * (g + u)));
    }
  }
  for (int64_t g = gfull; g < G; ++g) {
    const __m512bh w = (__m512bh)dec(b + g * gptoss::kBf12BlockBytes, row[g]);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w, (__m512bh)_mm512_loadu_si512(x + m * ldx + 32 * g));
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
    y[m * ldy] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
}

}  // namespace

void gptoss::bf12_rows_avx512(const Bf12Task& t) {
  static const Decoder dec;
  const int64_t G = t.K / kBf12Block, row_bytes = G * kBf12RowBytesPerBlock;
  for (int64_t n = t.lo; n < t.hi; ++n) {
    const uint8_t* row = t.w + n * row_bytes;
    for (int64_t m = 0; m < t.M; m += 4) {  // 4 tokens' accumulators take 16 of the 32 registers
      const uint16_t* x = t.x + m * t.K;
      float* y = t.y + m * t.R + n;
      switch (std::min<int64_t>(4, t.M - m)) {
        case 4: Rows<4>(dec, row, G, x, t.K, y, t.R); break;
        case 3: Rows<3>(dec, row, G, x, t.K, y, t.R); break;
        case 2: Rows<2>(dec, row, G, x, t.K, y, t.R); break;
        default: Rows<1>(dec, row, G, x, t.K, y, t.R);
      }
    }
  }
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
