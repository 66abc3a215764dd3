// AVX-512 VNNI one-token MXFP4 GEMV on the driver's x16 input (compiled with -mavx512vnni -mavx512vbmi and the
// AVX-512 flags; called only when the CPU reports AVX512_VNNI and AVX512_VBMI too): the decode GEMV of AVX-512 CPUs
// (Zen 4/5, Ice Lake and later). The same integer scheme as the AVX2 x16 kernel (mxfp4_kernel.h, mxfp4_avx2.cc),
// four blocks per 64-byte load: vpermb turns the codes into the unsigned bytes 2 * value + 12, and vpdpbusd
// multiplies them with the signed bytes of q and sums four products per dword, so the high part (times 128) and the
// low part take two vpdpbusd each per 128 weights instead of AVX2's 4 vpmaddubsw + 2 vpmaddwd + 3 adds per 64. Two
// vpermt2d and an add fold a group's 16 x 2 dwords into its 8 block sums, in the order of the x16 scales. The
// integer block sums, their conversion and the fp32 accumulation are those of the AVX2 kernel: the same results,
// bit for bit, on the whole groups. Blocks past the last group run on the fp32 "xp" input the AVX-512 tile reads.
// On a Zen 4 core, from L3: 21.6 GB/s of packed bytes (the AVX2 kernel 16.9, the exact fp32 path 13.5); vpdpbusd
// takes ~0.3 ns per zmm, 8 per group: a third of the time. (Folding two groups at a time, 16 lanes, ~20 % fewer
// instructions: the same speed.)
#include <immintrin.h>

#include <vector>

#include "mxfp4_kernel.h"

namespace {

#ifndef GPTOSS_X16_PREFETCH
#define GPTOSS_X16_PREFETCH 1024
#endif
constexpr int kX16Prefetch = GPTOSS_X16_PREFETCH;  // bytes ahead in the row stream (0: off; 0, 2048: the same)

#include "mxfp4_x16.h"  // hsum, x16_scales: the AVX2 kernel's

struct X16 {
  // the weight bytes, four times: vpermb reads 6 index bits, of which the low 4 are the code
  const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(GPTOSS_X16_WEIGHT_BYTES));
  // Block b's four dwords are lanes 4b..4b+3 of (quad 0, quad 1); output lane j < 8 is block {0, 2, 4, 6, 1, 3, 5,
  // 7}[j], its dwords 0 + 1 there and 2 + 3 in lane j + 8.
  const __m512i pa = _mm512_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28, 2, 10, 18, 26, 6, 14, 22, 30),
                pb = _mm512_setr_epi32(1, 9, 17, 25, 5, 13, 21, 29, 3, 11, 19, 27, 7, 15, 23, 31);

  // A group's eight planes as four-block vectors: X[4q + c] = plane c (l even, l odd, h even, h odd) of pairs 2q
  // and 2q + 1 (blocks 4q .. 4q + 3, one per 128-bit lane, as a 64-byte load of their packed bytes).
  static inline void planes(const uint8_t* xg, __m512i* X) {
    const __m256i* P = reinterpret_cast<const __m256i*>(xg);
    for (int q = 0; q < 2; ++q)
      for (int c = 0; c < 4; ++c)
        X[4 * q + c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256(P + 8 * q + c)),
                                          _mm256_load_si256(P + 8 * q + 4 + c), 1);
  }

  // sum(q * 2 * value) of each block of the group at wg (128 bytes), in the order 0, 2, 4, 6, 1, 3, 5, 7.
  inline __m256i sums(const uint8_t* wg, const uint8_t* xg, const __m512i X[8]) const {
    __m512i d[2];
    for (int q = 0; q < 2; ++q) {
      const __m512i v = _mm512_loadu_si512(wg + 64 * q);
      const __m512i we = _mm512_permutexvar_epi8(v, table);  // vpermb: index bits 4-5 meet the table's copies
      const __m512i wo = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), table);
      const __m512i hi = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), we, X[4 * q + 2]), wo,
                                             X[4 * q + 3]);
      d[q] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(hi, 7), we, X[4 * q]), wo, X[4 * q + 1]);
    }
    return fold(d, xg + 512);
  }

  // The 8 block sums of the dword sums d[0] (blocks 0-3, one per 128-bit lane) and d[1] (4-7), in the order 0, 2, 4,
  // 6, 1, 3, 5, 7, plus the 8 int32 at corr (-12 sum(q)).
  inline __m256i fold(const __m512i d[2], const uint8_t* corr) const {
    const __m512i s = _mm512_add_epi32(_mm512_permutex2var_epi32(d[0], pa, d[1]),
                                       _mm512_permutex2var_epi32(d[0], pb, d[1]));
    const __m256i folded = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm256_add_epi32(folded, _mm256_load_si256(reinterpret_cast<const __m256i*>(corr)));
  }

  // x8 (mxfp4_kernel.h): sum(q * (2 * value + 12)) - 12 sum(q) of each block of the group at wg, in the same order;
  // one vpdpbusd per 64 weights where x16 takes two.
  inline __m256i sums_x8(const uint8_t* wg, const uint8_t* xg) const {
    __m512i d[2];
    for (int q = 0; q < 2; ++q) {
      const __m512i v = _mm512_loadu_si512(wg + 64 * q);
      const __m512i we = _mm512_permutexvar_epi8(v, table);
      const __m512i wo = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), table);
      const __m512i* X = reinterpret_cast<const __m512i*>(xg) + 2 * q;
      d[q] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), we, _mm512_load_si512(X)), wo,
                                 _mm512_load_si512(X + 1));
    }
    return fold(d, xg + 256);
  }
};

// The blocks of row r past the last whole group, exactly, on the fp32 "xp" input.
float tail_blocks(const gptoss::Tile& t, int64_t r) {
  const int64_t G = t.G;
  const uint8_t* w = t.w + r * G * 16;
  const uint8_t* s = t.s + r * G;
  const __m512 lut = _mm512_load_ps(gptoss::kE2M1);
  const float* x = t.x[0];
  __m512 tail = _mm512_setzero_ps();
  for (int64_t g = G / gptoss::kX16Blocks * gptoss::kX16Blocks; g < G; ++g) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * g)));
    const __m512 ls = _mm512_mul_ps(lut, _mm512_set1_ps(t.scale_lut[s[g]]));
    tail = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, ls), _mm512_loadu_ps(x + 32 * g), tail);
    tail = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), ls), _mm512_loadu_ps(x + 32 * g + 16),
                           tail);
  }
  return G % gptoss::kX16Blocks != 0 ? _mm512_reduce_add_ps(tail) : 0.0f;
}


// Row r of the tile, its groups in turn, on the x16 input (XP: its planes) or, where X8, the x8 input. The task's
// rows run one after the other, one forward stream per core: cold, 4-expert gate_up / down on two Zen 4 cores, 100
// interleaved rounds twice, 24.6 / 24.1 -> 26.0 / 26.0 and 25.1 / 24.3 -> 27.2 / 26.7 GB/s median against AVX2's four
// streams (a row from each quarter of the task, a group of each in turn; one core from L3: about the same). (Four
// adjacent rows interleaved: 11 GB/s.) x8 runs without the software prefetch: cold on two Zen 4 cores, x16's loop
// with half its products streamed 40.5 -> 42.2 GB/s without it (a copy that only loads: 30 -> 42).
template <bool X8>
void gemv_int_row(const gptoss::Tile& t, int64_t r, const X16& x16, const __m512i* XP) {
  const int64_t G = t.G, groups = G / gptoss::kX16Blocks;
  const uint8_t* w = t.w + r * G * 16;
  const uint8_t* s = t.s + r * G;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g8 = 0; g8 < groups; ++g8) {
    const uint8_t* xg = t.xi + g8 * (X8 ? gptoss::kX8GroupBytes : gptoss::kX16GroupBytes);
    const uint8_t* wg = w + 128 * g8;
    if (!X8 && kX16Prefetch > 0)
      _mm_prefetch((const char*)(wg + kX16Prefetch), _MM_HINT_T0),
          _mm_prefetch((const char*)(wg + kX16Prefetch + 64), _MM_HINT_T0);
    const __m256i sums = X8 ? x16.sums_x8(wg, xg) : x16.sums(wg, xg, XP + 8 * g8);
    const __m256 scales = X8 ? block_scales(s + 8 * g8, reinterpret_cast<const float*>(xg + 288))
                             : x16_scales(s + 8 * g8, xg);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scales, acc);
  }
  t.y[0][t.col0 + r] = hsum(acc) + tail_blocks(t, r);
}

}  // namespace

void gptoss::gemv_x16_avx512vnni(const gptoss::Tile& t) {
  thread_local std::vector<__m512i> planes;  // the token's planes, built once per task
  const int64_t groups = t.G / kX16Blocks;
  planes.resize(8 * groups);
  for (int64_t g8 = 0; g8 < groups; ++g8) X16::planes(t.xi + g8 * kX16GroupBytes, planes.data() + 8 * g8);
  const __m512i* XP = planes.data();
  const X16 x16;
  for (int64_t r = 0; r < t.rows; ++r) gemv_int_row<false>(t, r, x16, XP);
}

void gptoss::gemv_x8_avx512vnni(const gptoss::Tile& t) {
  const X16 x16;
  for (int64_t r = 0; r < t.rows; ++r) gemv_int_row<true>(t, r, x16, nullptr);
}
