// One weight row times M tokens on VDPBF16PS, shared by the dense bf16 rows path (dense_avx512bf16.cc) and bf12's
// (bf12_avx512.cc), which differ only in how a 32-weight block reaches a register. The order of the sums lives here
// once: per token four accumulators, block g of the whole 128-element steps into accumulator g % 4, the blocks after
// them into the first, then (a0 + a1) + (a2 + a3). So a bf12 row without exceptions gives the dense kernel's bits,
// and a token's sum does not depend on how many tokens share the call. Include only from units compiled with
// AVX-512 F/BW and BF16.
#ifndef GPTOSS_DP_ROWS_H_
#define GPTOSS_DP_ROWS_H_

#include <immintrin.h>
#include <stdint.h>

#include <type_traits>

namespace gptoss {

// Several tokens make a row's sums compute-bound enough that the hardware prefetcher falls behind and memory waits
// add to the compute instead of hiding under it: prefetching 2 KiB ahead (the stream runs on into the next row) took
// 4 cold tokens of bf12 from 68 to 45 ms on the unembedding (Zen 4; 1 and 4 KiB alike). One token is memory-bound
// and streams best without it.
constexpr int64_t kDpRowsPrefetch = 2048;

// y[m * ldy] = the row times token m (x + m * ldx, bf16, zero padded past the row), m < M <= 4 (4 tokens' 16
// accumulators take half the registers). The row: `blocks` 32-weight blocks, the first `gfull` (a multiple of 4)
// from block(g) -> __m512bh, the rest from tail(g); bytes(g) points at block g's stored bytes, kStepBytes of them
// per 4 blocks (the prefetch).
template <int M, int kStepBytes, class Block, class Tail, class Bytes>
inline void DpRowSums(int64_t gfull, int64_t blocks, const Block& block, const Tail& tail, const Bytes& bytes,
                      const uint16_t* x, int64_t ldx, float* y, int64_t ldy) {
  __m512 acc[M][4];  // every loop over m and u unrolled, or GCC keeps acc on the stack (a load and store per product)
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
  for (int64_t g = 0; g < gfull; g += 4) {
    if constexpr (M > 1) {
      const char* ahead = reinterpret_cast<const char*>(bytes(g)) + kDpRowsPrefetch;
#pragma GCC unroll 4
      for (int l = 0; l < kStepBytes; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512bh w = block(g + u);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m)
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], w, (__m512bh)_mm512_loadu_si512(x + m * ldx + 32 * (g + u)));
    }
  }
  for (int64_t g = gfull; g < blocks; ++g) {
    const __m512bh w = tail(g);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w, (__m512bh)_mm512_loadu_si512(x + m * ldx + 32 * g));
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
    y[m * ldy] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
}

// Rows lo..hi-1 times M tokens, 4 at a time: rows(n, m0, Mc) with Mc a compile-time token count.
template <class Rows>
inline void DpRowsByFour(int64_t lo, int64_t hi, int64_t M, const Rows& rows) {
  for (int64_t n = lo; n < hi; ++n)
    for (int64_t m0 = 0; m0 < M; m0 += 4) switch (M - m0 < 4 ? M - m0 : 4) {
        case 4: rows(n, m0, std::integral_constant<int, 4>{}); break;
        case 3: rows(n, m0, std::integral_constant<int, 3>{}); break;
        case 2: rows(n, m0, std::integral_constant<int, 2>{}); break;
        default: rows(n, m0, std::integral_constant<int, 1>{});
      }
}

}  // namespace gptoss

#endif  // GPTOSS_DP_ROWS_H_
