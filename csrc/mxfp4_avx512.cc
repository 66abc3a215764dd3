// AVX-512 MXFP4 tile (compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma; called only when the
// CPU reports those features). Per row and 32-value block: the 16 packed bytes widen to 16 dwords; vpermps
// looks the low nibbles (index = low 4 bits, no mask needed) and the high nibbles (after a shift) up in the
// 16-entry E2M1 table, pre-multiplied by the block's scale 2**(s-127); two FMAs against the permuted input.
// (Scaling the table by an integer add to its exponent field instead of the multiply measured slower.)
#include <immintrin.h>

#include "mxfp4_kernel.h"

namespace {

#ifndef GPTOSS_PREFETCH
#define GPTOSS_PREFETCH 8192
#endif
constexpr int kPrefetch = GPTOSS_PREFETCH;  // bytes ahead of the decode GEMV's read position (0: off)

template <int R, int TB>
struct MK {
  static void run(const gptoss::Tile& t, int64_t r0, int64_t t0, int64_t g0, int64_t g1, float* part) {
    const int64_t G = t.G;
    const uint8_t* w = t.w + r0 * G * 16;
    const uint8_t* s = t.s + r0 * G;
    const float* x[TB];
    for (int i = 0; i < TB; ++i) x[i] = t.x[t0 + i];
    const __m512 lut = _mm512_load_ps(gptoss::kE2M1);
    constexpr int A2 = TB == 1 ? 1 : 0;  // one token: a second accumulator per row halves the FMA chain
    __m512 acc[R][TB], acc2[R];
    const bool resume = part != nullptr && g0 > 0, suspend = part != nullptr && g1 < G;
    for (int r = 0; r < R; ++r) {
      acc2[r] = _mm512_setzero_ps();
      for (int i = 0; i < TB; ++i) acc[r][i] = resume ? _mm512_load_ps(part + (r * TB + i) * 16) : _mm512_setzero_ps();
    }
    for (int64_t g = g0; g < g1; ++g) {
      if (TB == 1 && kPrefetch > 0 && (g & 3) == 0)  // one line per row every 64 bytes, kPrefetch ahead
        for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + r * G * 16 + 16 * g + kPrefetch), _MM_HINT_T0);
      __m512 wl[R], wh[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + r * G * 16 + 16 * g)));
        const __m512 ls = _mm512_mul_ps(lut, _mm512_set1_ps(t.scale_lut[s[r * G + g]]));
        wl[r] = _mm512_permutexvar_ps(v, ls);
        wh[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), ls);
      }
#pragma GCC unroll 8
      for (int i = 0; i < TB; ++i) {
        const __m512 xe = _mm512_loadu_ps(x[i] + 32 * g);
        const __m512 xo = _mm512_loadu_ps(x[i] + 32 * g + 16);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          acc[r][i] = _mm512_fmadd_ps(wl[r], xe, acc[r][i]);
          if (A2)
            acc2[r] = _mm512_fmadd_ps(wh[r], xo, acc2[r]);
          else
            acc[r][i] = _mm512_fmadd_ps(wh[r], xo, acc[r][i]);
        }
      }
    }
    for (int i = 0; i < TB; ++i)
      for (int r = 0; r < R; ++r) {
        const __m512 a = A2 ? _mm512_add_ps(acc[r][i], acc2[r]) : acc[r][i];
        if (suspend)
          _mm512_store_ps(part + (r * TB + i) * 16, a);
        else
          t.y[t0 + i][t.col0 + r0 + r] = _mm512_reduce_add_ps(a);
      }
  }
};

#include "mxfp4_tile_loop.h"

}  // namespace

void gptoss::tile_avx512(const gptoss::Tile& t) { run_tile<MK, 4, 2, 8, 16>(t); }
