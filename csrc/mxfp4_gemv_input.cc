// The one-token GEMVs' integer inputs (mxfp4_kernel.h: the x16 and x8 layouts), written once per token by the
// driver before the tasks run. Compiled without ISA flags: the same bytes on every CPU, so every kernel that reads
// them (AVX2, AVX-512 VNNI) gives the same sums.
#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "mxfp4_kernel.h"

namespace gptoss {
namespace {

// Block b (of 8) of a group goes to slot kOrder[b] of the group's sums and scales: the order 0, 2, 4, 6, 1, 3, 5, 7.
constexpr int kOrder[8] = {0, 4, 1, 5, 2, 6, 3, 7};

// The 32 values of block `k0 / 32` of x (fp32 or bf16) into v, and their largest magnitude. False where the block
// would leave the range the kernels' scale products assume: a non-finite element (NaN fails the first test), or a
// largest magnitude >= 2**60 or nonzero below 2**-100.
bool LoadBlock(const void* x, bool x_bf16, int64_t k0, float v[32], float& amax) {
  amax = 0.0f;
  for (int i = 0; i < 32; ++i) {
    if (x_bf16) {
      const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(x)[k0 + i]) << 16;
      std::memcpy(&v[i], &bits, 4);
    } else {
      v[i] = static_cast<const float*>(x)[k0 + i];
    }
    amax = std::max(amax, std::fabs(v[i]));
  }
  return amax < 0x1p60f && !(amax > 0.0f && amax < 0x1p-100f);
}

// y rounded to the nearest integer, ties to even: cvtss2si under the default MXCSR (lrintf is a libm call here).
inline int32_t RoundToEven(float y) {
#if defined(__SSE__)
  return _mm_cvtss_si32(_mm_set_ss(y));
#else
  return static_cast<int32_t>(std::lrint(y));
#endif
}

}  // namespace

bool PrepareX16(const void* x, bool x_bf16, int64_t K, uint8_t* out) {
  const int64_t groups = K / 32 / kX16Blocks;
  for (int64_t g8 = 0; g8 < groups; ++g8) {
    uint8_t* dst = out + g8 * kX16GroupBytes;
    int8_t* planes = reinterpret_cast<int8_t*>(dst);  // [pair][l even, l odd, h even, h odd][32]
    int32_t corr[8];
    float xscale[8];
    for (int b = 0; b < kX16Blocks; ++b) {
      float v[32], amax;
      if (!LoadBlock(x, x_bf16, 32 * (g8 * kX16Blocks + b), v, amax)) return false;
      int e = 0;
      if (amax > 0.0f) e = std::ilogb(amax);  // amax in [2**e, 2**(e+1))
      int32_t q[32];
      for (int pass = 0; pass < 2; ++pass) {  // an fp32 element just below 2**(e+1) may round up to 16384: e + 1
        const float up = std::ldexp(1.0f, 13 - e), magic = 0x1.8p23f;  // (y + magic) - magic: y rounded to even
        bool over = false;
        for (int i = 0; i < 32; ++i) {
          const float t = v[i] * up + magic;  // v[i] * up is exact (a power of two); the add rounds it
          q[i] = static_cast<int32_t>(t - magic);
          over |= q[i] > 16383;
        }
        if (!over) break;
        ++e;
      }
      const int p = b / 2, lane = b % 2;
      int32_t sum = 0;
      for (int i = 0; i < 32; ++i) {
        sum += q[i];
        const int at = 16 * lane + i / 2, odd = i % 2;
        planes[(4 * p + odd) * 32 + at] = static_cast<int8_t>(q[i] & 127);
        planes[(4 * p + 2 + odd) * 32 + at] = static_cast<int8_t>(q[i] >> 7);  // arithmetic: floor(q / 128)
      }
      corr[kOrder[b]] = -12 * sum;
      xscale[kOrder[b]] = std::ldexp(1.0f, e - 14);
    }
    std::memcpy(dst + 512, corr, sizeof(corr));
    std::memcpy(dst + 544, xscale, sizeof(xscale));
  }
  return true;
}

bool PrepareX8(const void* x, bool x_bf16, int64_t K, uint8_t* out) {
  const int64_t groups = K / 32 / kX16Blocks;
  for (int64_t g8 = 0; g8 < groups; ++g8) {
    uint8_t* dst = out + g8 * kX8GroupBytes;
    int8_t* planes = reinterpret_cast<int8_t*>(dst);  // [4 blocks][even, odd][64]
    int32_t corr[8];
    float xscale[8];
    for (int b = 0; b < kX16Blocks; ++b) {
      float v[32], amax;
      if (!LoadBlock(x, x_bf16, 32 * (g8 * kX16Blocks + b), v, amax)) return false;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int i = 0; i < 32; ++i) {
        const int32_t q = RoundToEven(v[i] * inv);  // |v * inv| <= 127, rounded once, then to an integer
        sum += q;
        planes[(2 * (b / 4) + i % 2) * 64 + 16 * (b % 4) + i / 2] = static_cast<int8_t>(q);
      }
      corr[kOrder[b]] = -12 * sum;
      xscale[kOrder[b]] = amax / 127.0f * 0.5f;  // the weight bytes are 2 * value (+ 12)
    }
    std::memcpy(dst + 256, corr, sizeof(corr));
    std::memcpy(dst + 288, xscale, sizeof(xscale));
  }
  return true;
}

}  // namespace gptoss
