// AVX-512 BF16 tile path (compiled with -mavx512bf16 and the AVX-512 flags; called only when the CPU reports
// AVX512_BF16): prefill on CPUs with bf16 dot products but no AMX (AMD Zen 4/5, Intel Cooper Lake).
//
// Prefill is compute bound; the fp32 FMA path (mxfp4_avx512.cc) decodes every weight once per token block and does
// one multiply-add per weight and token. Here each group of kRows output rows of the tile is dequantized once,
// exactly, to bf16 in k order (as in the AMX path: an E2M1 value times 2**(s-127) has one mantissa bit) into an
// L1-sized scratch, and VDPBF16PS multiplies 32 k of a row with 32 k of a token's bf16 input (two multiply-adds per
// lane), accumulating in fp32 across k; each (row, token) sum is reduced across the 16 lanes at the end. Inputs are
// read in place, in k order, and so are dense bf16 rows (s == null: the unembedding at prefill sizes).
//
// Rounding: products of two bf16 are exact in fp32; VDPBF16PS adds them to the accumulator with round-to-nearest-
// even and treats subnormal inputs and results as zero (a weight |w| < 2**-126, scale byte 0, counts as zero).
#include <immintrin.h>
#include <stdint.h>

#include <vector>

#include "mxfp4_bf16_block.h"
#include "mxfp4_kernel.h"

namespace {

constexpr int kRows = 4;    // rows per register block ...
constexpr int kTokens = 6;  // ... times tokens: 24 accumulators, 4 row and 1 input registers of 32

// The four lane sums of a, b, c, d.
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const auto half = [](__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(half(a), half(b)), _mm256_hadd_ps(half(c), half(d)));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));  // [a, b, c, d]
}

// y[i][col + r] = w[r] . x[i] for R rows and T tokens of G blocks of 32 bf16. Few (row, token) pairs get a second set
// of accumulators (even / odd blocks): VDPBF16PS's latency, not its throughput, would bound a short chain otherwise.
template <int R, int T>
void dot_block(const uint16_t* const* w, const uint16_t* const* x, int64_t G, float* const* y, int64_t col) {
  constexpr int U = R * T <= 12 ? 2 : 1;
  __m512 acc[U][R][T];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < T; ++i) acc[u][r][i] = _mm512_setzero_ps();
  const auto step = [&](int u, int64_t g) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w[r] + 32 * g);
#pragma GCC unroll 6
    for (int i = 0; i < T; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[i] + 32 * g);
      for (int r = 0; r < R; ++r) acc[u][r][i] = _mm512_dpbf16_ps(acc[u][r][i], wv[r], xv);
    }
  };
  int64_t g = 0;
  for (; g + U <= G; g += U)
    for (int u = 0; u < U; ++u) step(u, g + u);
  if (g < G) step(0, g);
  if (U == 2)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < T; ++i) acc[0][r][i] = _mm512_add_ps(acc[0][r][i], acc[U - 1][r][i]);
  for (int i = 0; i < T; ++i) {
    if (R == 4)
      _mm_storeu_ps(y[i] + col, sum4(acc[0][0][i], acc[0][1][i], acc[0][2][i], acc[0][3][i]));
    else
      for (int r = 0; r < R; ++r) y[i][col + r] = _mm512_reduce_add_ps(acc[0][r][i]);
  }
}

// All of the tile's tokens times R rows.
template <int R>
void rows_times_tokens(const uint16_t* const* w, const gptoss::DpTile& t, int64_t col) {
  int64_t i = 0;
  for (; i + kTokens <= t.ntok; i += kTokens) dot_block<R, kTokens>(w, t.x + i, t.G, t.y + i, col);
  switch (t.ntok - i) {
    case 5: dot_block<R, 5>(w, t.x + i, t.G, t.y + i, col); break;
    case 4: dot_block<R, 4>(w, t.x + i, t.G, t.y + i, col); break;
    case 3: dot_block<R, 3>(w, t.x + i, t.G, t.y + i, col); break;
    case 2: dot_block<R, 2>(w, t.x + i, t.G, t.y + i, col); break;
    case 1: dot_block<R, 1>(w, t.x + i, t.G, t.y + i, col); break;
    default: break;
  }
}

// Row `row` of an MXFP4 tile -> G * 32 bf16 in k order.
void dequantize_row(const gptoss::DpTile& t, int64_t row, uint16_t* dst) {
  const uint8_t* w = t.w + row * t.G * 16;
  const uint8_t* s = t.s + row * t.G;
  for (int64_t g = 0; g < t.G; ++g)
    _mm512_storeu_si512(dst + 32 * g, gptoss_bf16_block(w + 16 * g, t.bf16_lut + 16 * s[g]));
}

}  // namespace

void gptoss::tile_dp_bf16(const gptoss::DpTile& t) {
  const int64_t K = 32 * t.G;
  thread_local std::vector<uint16_t> scratch;  // kRows dequantized rows (23 KB at K = 2880): stays in L1
  if (t.s != nullptr) scratch.resize(kRows * K);
  for (int64_t r0 = 0; r0 < t.rows; r0 += kRows) {
    const int R = static_cast<int>(t.rows - r0 < kRows ? t.rows - r0 : kRows);
    const uint16_t* w[kRows];
    for (int r = 0; r < R; ++r) {
      if (t.s == nullptr) {
        w[r] = reinterpret_cast<const uint16_t*>(t.w) + (r0 + r) * K;
      } else {
        dequantize_row(t, r0 + r, scratch.data() + r * K);
        w[r] = scratch.data() + r * K;
      }
    }
    switch (R) {
      case 4: rows_times_tokens<4>(w, t, t.col0 + r0); break;
      case 3: rows_times_tokens<3>(w, t, t.col0 + r0); break;
      case 2: rows_times_tokens<2>(w, t, t.col0 + r0); break;
      default: rows_times_tokens<1>(w, t, t.col0 + r0); break;
    }
  }
}
