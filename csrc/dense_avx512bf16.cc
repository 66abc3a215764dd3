// 1-3 tokens times bf16 W [N, K] with bf16 x on VDPBF16PS (compiled with -mavx512f -mavx512bw -mavx512bf16; called
// only when the CPU has AVX512_BF16): decode's projections and unembedding, and batched decode below the tiles (the
// router's x is fp32). Each VDPBF16PS multiplies 32 weights with 32 elements of x and adds the products pairwise into
// 16 fp32 lanes (a bf16 x bf16 product is exact in fp32, each add rounds once, as an FMA would), so a 64-byte row
// chunk costs one instruction per token where the fp32 path (dense_avx512.cc) shifts, masks and runs two FMAs. That
// path is compute-bound in a Zen 4 VM's fast phases: unembedding-sized, one token, two cores, interleaved rounds:
// 35-42 GB/s fp32 vs 41-46 here (a plain read loop 46-48); equal-ish when the machine is slow. The sums' order is
// dp_rows.h's. As VDPBF16PS is defined, bf16 subnormals (below 2**-126) in W or x read as zero and subnormal sums
// flush to zero; x must arrive as bf16 (the driver takes this path only then).
#include <immintrin.h>

#include "dense_kernel.h"
#include "dp_rows.h"

void gptoss::dense_rows_bf16(const DenseTask& t) {
  const int64_t K = t.K, gfull = (K / 32) & ~int64_t{3}, blocks = (K + 31) / 32;
  DpRowsByFour(t.lo, t.hi, t.M, [&](int64_t n, int64_t m0, auto tokens) {
    const uint16_t* w = static_cast<const uint16_t*>(t.w) + n * K;
    const auto block = [&](int64_t g) { return (__m512bh)_mm512_loadu_si512(w + 32 * g); };
    const auto tail = [&](int64_t g) {  // weights past K read as 0 and meet the zero padding of x
      const int64_t left = K - 32 * g;
      const __mmask32 m = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << left) - 1);
      return (__m512bh)_mm512_maskz_loadu_epi16(m, w + 32 * g);
    };
    DpRowSums<decltype(tokens)::value, 256>(gfull, blocks, block, tail, [&](int64_t g) { return w + 32 * g; },
                                            t.xb + m0 * t.ldx, t.ldx, t.y + m0 * t.N + n, t.N);
  });
}
