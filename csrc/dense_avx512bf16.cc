// One token times bf16 W [N, K] with bf16 x on VDPBF16PS (compiled with -mavx512f -mavx512bw -mavx512bf16; called
// only when the CPU has AVX512_BF16): decode's unembedding (the router's x is fp32). Each VDPBF16PS multiplies 32
// weights with 32 elements of x and adds the products pairwise into 16 fp32 lanes (a bf16 x bf16 product is exact
// in fp32, each add rounds once, as an FMA would), so a 64-byte row chunk costs one instruction where the fp32 path
// (RowOne in dense_avx512.cc) shifts, masks and runs two FMAs. That path is compute-bound in a Zen 4 VM's fast
// phases: unembedding-sized, two cores, interleaved rounds: 35-42 GB/s fp32 vs 41-46 here (a plain read loop
// 46-48); equal-ish when the machine is slow. As VDPBF16PS is defined, bf16 subnormals (below 2**-126) in W or x
// read as zero and subnormal sums flush to zero; x must arrive as bf16 (the driver takes this path only then).
#include <immintrin.h>

#include "dense_kernel.h"

namespace {

// Row n of W [N, K] times x (bf16, zero padded to a multiple of 32): four accumulators over 128-element steps,
// as RowOne, the K tail 32 at a time with the weights past K masked to zero.
void RowOneBf16(const gptoss::DenseTask& t, int64_t n) {
  const int64_t K = t.K, kfull = K & ~int64_t{127};
  const uint16_t* w = static_cast<const uint16_t*>(t.w) + n * K;
  const uint16_t* x = t.xb;
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = 0; k < kfull; k += 128) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_loadu_si512(w + k + 32 * u),
                                (__m512bh)_mm512_loadu_si512(x + k + 32 * u));
  }
  for (int64_t k = kfull; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_maskz_loadu_epi16(m, w + k),
                              (__m512bh)_mm512_loadu_si512(x + k));
  }
  t.y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

}  // namespace

void gptoss::dense_rows_one_bf16(const DenseTask& t) {
  for (int64_t n = t.lo; n < t.hi; ++n) RowOneBf16(t, n);
}
