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
// The transposed product's rows per pass; each pass prefetches (to L2) the same blocks of the next pass's rows,
// which a hardware prefetcher does not see coming (a few bytes every G * 16).
constexpr int kRowsPerPass = 64;

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

// The transposed product: per row n, block b decodes once into its even and odd elements (as above), then
// acc[b][i] += dy[i][n] * w for each token. Partial sums wait in dx in that even/odd order; the last pass
// interleaves them into k order.
template <int B, int TB>
struct MKT {
  static void run(const gptoss::TTile& t, int64_t n0, int64_t n1, int64_t t0, int64_t g) {
    const int64_t G = t.G;
    const __m512 lut = _mm512_load_ps(gptoss::kE2M1);
    __m512 acc[B][TB][2];  // [block][token][even, odd]
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < TB; ++i) {
        const float* d = t.dx[t0 + i] + 32 * (g + b);
        acc[b][i][0] = n0 > 0 ? _mm512_loadu_ps(d) : _mm512_setzero_ps();
        acc[b][i][1] = n0 > 0 ? _mm512_loadu_ps(d + 16) : _mm512_setzero_ps();
      }
    const uint8_t* w = t.w + (n0 * G + g) * 16;
    const uint8_t* s = t.s + n0 * G + g;
    const float* dy = t.dy + n0 * t.ntok + t0;
    for (int64_t n = n0; n < n1; ++n, w += G * 16, s += G, dy += t.ntok) {
      if (t0 == 0) {
        _mm_prefetch((const char*)(w + kRowsPerPass * G * 16), _MM_HINT_T1);
        _mm_prefetch((const char*)(w + kRowsPerPass * G * 16 + 16 * B - 1), _MM_HINT_T1);
        _mm_prefetch((const char*)(s + kRowsPerPass * G), _MM_HINT_T1);
      }
      __m512 wl[B], wh[B];
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + 16 * b)));
        const __m512 ls = _mm512_mul_ps(lut, _mm512_set1_ps(t.scale_lut[s[b]]));
        wl[b] = _mm512_permutexvar_ps(v, ls);
        wh[b] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), ls);
      }
#pragma GCC unroll 8
      for (int i = 0; i < TB; ++i) {
        const __m512 d = _mm512_set1_ps(dy[i]);
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) {
          acc[b][i][0] = _mm512_fmadd_ps(wl[b], d, acc[b][i][0]);
          acc[b][i][1] = _mm512_fmadd_ps(wh[b], d, acc[b][i][1]);
        }
      }
    }
    const bool last = n1 == t.rows;
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < TB; ++i) {
        float* d = t.dx[t0 + i] + 32 * (g + b);
        const __m512 e = acc[b][i][0], o = acc[b][i][1];
        _mm512_storeu_ps(d, last ? _mm512_permutex2var_ps(e, lo, o) : e);
        _mm512_storeu_ps(d + 16, last ? _mm512_permutex2var_ps(e, hi, o) : o);
      }
  }
};

#include "mxfp4_tile_loop.h"
#include "mxfp4_tile_t_loop.h"

}  // namespace

void gptoss::tile_avx512(const gptoss::Tile& t) { run_tile<MK, 4, 2, 8, 16>(t); }
void gptoss::tile_t_avx512(const gptoss::TTile& t) { run_tile_t<MKT, 4, 2, 6, kRowsPerPass>(t); }
