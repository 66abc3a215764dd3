// A few tokens times bf16 W [N, K] with bf16 x on VDPBF16PS (compiled with -mavx512f -mavx512bw -mavx512bf16; called
// only when the CPU has AVX512_BF16): decode's unembedding, batched decode below the tiles (the router's x is fp32). Each VDPBF16PS multiplies 32
// weights with 32 elements of x and adds the products pairwise into 16 fp32 lanes (a bf16 x bf16 product is exact
// in fp32, each add rounds once, as an FMA would), so a 64-byte row chunk costs one instruction where the fp32 path
// (RowOne in dense_avx512.cc) shifts, masks and runs two FMAs. That path is compute-bound in a Zen 4 VM's fast
// phases: unembedding-sized, two cores, interleaved rounds: 35-42 GB/s fp32 vs 41-46 here (a plain read loop
// 46-48); equal-ish when the machine is slow. As VDPBF16PS is defined, bf16 subnormals (below 2**-126) in W or x
// read as zero and subnormal sums flush to zero; x must arrive as bf16 (the driver takes this path only then).
#include <immintrin.h>

#include "dense_kernel.h"

namespace {

// Several tokens make a row's sums compute-bound enough that the hardware prefetcher falls behind; 2 KiB ahead (into
// the next row) as in bf12_avx512.cc. One token streams best without it.
constexpr int64_t kPrefetchAhead = 2048;

// Row n of W [N, K] times M tokens of x (bf16, zero padded to ldx, a multiple of 32), each weight load shared by
// them: per token four accumulators over 128-element steps, as RowOne, the K tail 32 at a time with the weights past
// K masked to zero; a token's sum does not depend on M.
template <int M>
void RowsBf16(const gptoss::DenseTask& t, int64_t n, int64_t m0) {
  const int64_t K = t.K, kfull = K & ~int64_t{127};
  const uint16_t* w = static_cast<const uint16_t*>(t.w) + n * K;
  const uint16_t* x = t.xb + m0 * t.ldx;
  __m512 acc[M][4];  // every loop over m and u unrolled, or GCC keeps acc on the stack
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kfull; k += 128) {
    if constexpr (M > 1) {
      const char* ahead = reinterpret_cast<const char*>(w + k) + kPrefetchAhead;
#pragma GCC unroll 4
      for (int l = 0; l < 4; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512bh wu = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m)
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wu, (__m512bh)_mm512_loadu_si512(x + m * t.ldx + k + 32 * u));
    }
  }
  for (int64_t k = kfull; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    const __m512bh wk = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wk, (__m512bh)_mm512_loadu_si512(x + m * t.ldx + k));
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
    t.y[(m0 + m) * t.N + n] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
}

}  // namespace

void gptoss::dense_rows_bf16(const DenseTask& t) {
  for (int64_t n = t.lo; n < t.hi; ++n)
    for (int64_t m = 0; m < t.M; m += 4) {  // 4 tokens' accumulators take 16 of the 32 registers
      switch (t.M - m < 4 ? t.M - m : 4) {
        case 4: RowsBf16<4>(t, n, m); break;
        case 3: RowsBf16<3>(t, n, m); break;
        case 2: RowsBf16<2>(t, n, m); break;
        default: RowsBf16<1>(t, n, m);
      }
    }
}
