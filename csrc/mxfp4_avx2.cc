// AVX2 + FMA MXFP4 tile (compiled with -mavx2 -mfma; used when AVX-512 is missing).
//
// The forward product decodes a 16-byte block with byte shuffles, not fp32 permutes: both nibble planes sit in
// one register (low nibbles in lane 0, high in lane 1), two vpshufb look up the low and high byte of each code's
// bf16 value, one byte unpack pairs them into words, and a shift (even words) or a mask (odd words) makes fp32 of
// them (bf16 << 16 is exact). 11 instructions per 32 values instead of ~24, 4 of them shuffles: on a Zen 3 core
// the decode GEMV runs ~2x faster (7.4 vs 3.6 GB/s of packed bytes from cache), two cores reach ~75 % of the read
// bandwidth. (Widening by unpacking with zeros instead of shift/mask: 5.6 GB/s.) The shuffles work within 128-bit
// lanes, so the values come out in the "xq" order the driver permutes x into (Decoder below). One token: each
// row's block is summed unscaled, then times the block scale (a power of two, so exact). Several tokens: the
// decoded block is scaled once and used by each.
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

// The E2M1 codes' bf16 bits (0, 0.5, 1, 1.5, 2, 3, 4, 6, then negated), split into low and high bytes; twice,
// because vpshufb looks up within each 128-bit lane.
#define GPTOSS_LO 0, 0, 0x80, 0xC0, 0, 0x40, 0x80, 0xC0, 0, 0, 0x80, 0xC0, 0, 0x40, 0x80, 0xC0
#define GPTOSS_HI 0, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, 0x80, 0xBF, 0xBF, 0xBF, 0xC0, 0xC0, 0xC0, 0xC0

struct Decoder {
  const __m256i lo = _mm256_setr_epi8(GPTOSS_LO, GPTOSS_LO);
  const __m256i hi = _mm256_setr_epi8(GPTOSS_HI, GPTOSS_HI);
  const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);  // lane 1 takes the high nibbles
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i high16 = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));

  // The 32 unscaled values of one block, in xq order (gptoss::xq_position): v[0] holds elements {0, 4, 8, 12 | 1,
  // 5, 9, 13} (lane 0 | lane 1), v[1] {2, 6, 10, 14 | 3, 7, 11, 15}, v[2] and v[3] the same plus 16.
  inline void operator()(const uint8_t* block, __m256 v[4]) const {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
    const __m256i code = _mm256_and_si256(_mm256_srlv_epi32(b, shift), low4);
    const __m256i l = _mm256_shuffle_epi8(lo, code), h = _mm256_shuffle_epi8(hi, code);
    const __m256i w0 = _mm256_unpacklo_epi8(l, h), w1 = _mm256_unpackhi_epi8(l, h);  // bf16 words
    v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));  // even words
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(w0, high16));  // odd words
    v[2] = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    v[3] = _mm256_castsi256_ps(_mm256_and_si256(w1, high16));
  }
};

template <int R, int TB>
struct MK {
  static void run(const gptoss::Tile& t, int64_t r0, int64_t t0, int64_t g0, int64_t g1, float* part) {
    const int64_t G = t.G;
    const uint8_t* w = t.w + r0 * G * 16;
    const uint8_t* s = t.s + r0 * G;
    const float* x[TB];
    for (int i = 0; i < TB; ++i) x[i] = t.x[t0 + i];
    const Decoder decode;
    const bool resume = part != nullptr && g0 > 0, suspend = part != nullptr && g1 < G;
    __m256 acc[R][TB];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < TB; ++i) acc[r][i] = resume ? _mm256_load_ps(part + (r * TB + i) * 16) : _mm256_setzero_ps();
    for (int64_t g = g0; g < g1; ++g) {
      if (TB == 1 && kPrefetch > 0 && (g & 3) == 0)  // one line per row every 64 bytes, kPrefetch ahead
        for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + r * G * 16 + 16 * g + kPrefetch), _MM_HINT_T0);
      if constexpr (TB == 1) {
        const float* xg = x[0] + 32 * g;
        const __m256 x0 = _mm256_loadu_ps(xg), x1 = _mm256_loadu_ps(xg + 8), x2 = _mm256_loadu_ps(xg + 16),
                     x3 = _mm256_loadu_ps(xg + 24);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          __m256 v[4];
          decode(w + r * G * 16 + 16 * g, v);
          __m256 blk = _mm256_mul_ps(v[0], x0);
          blk = _mm256_fmadd_ps(v[1], x1, blk);
          blk = _mm256_fmadd_ps(v[2], x2, blk);
          blk = _mm256_fmadd_ps(v[3], x3, blk);
          acc[r][0] = _mm256_fmadd_ps(blk, _mm256_broadcast_ss(t.scale_lut + s[r * G + g]), acc[r][0]);
        }
      } else {
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) {
          __m256 v[4];
          decode(w + r * G * 16 + 16 * g, v);
          const __m256 sc = _mm256_broadcast_ss(t.scale_lut + s[r * G + g]);
#pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) {
            const __m256 wq = _mm256_mul_ps(v[q], sc);
#pragma GCC unroll 8
            for (int i = 0; i < TB; ++i) acc[r][i] = _mm256_fmadd_ps(wq, _mm256_loadu_ps(x[i] + 32 * g + 8 * q), acc[r][i]);
          }
        }
      }
    }
    for (int i = 0; i < TB; ++i)
      for (int r = 0; r < R; ++r) {
        const __m256 a = acc[r][i];
        if (suspend) {
          _mm256_store_ps(part + (r * TB + i) * 16, a);
          continue;
        }
        __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        q = _mm_add_ss(q, _mm_movehdup_ps(q));
        t.y[t0 + i][t.col0 + r0 + r] = _mm_cvtss_f32(q);
      }
  }
};

// The transposed product: per row n, each half block decodes once into its 8 even and 8 odd elements (as above),
// then acc[i] += dy[i][n] * w for each token. With several tokens, one half block per pass over the rows keeps
// 2 x TB accumulators in the 16 registers. Partial sums wait in dx in that even/odd order; the last pass
// interleaves them into k order.
template <int B, int TB>
struct MKT {
  static constexpr int HP = TB == 1 ? 2 : 1;  // halves per pass

  static void run(const gptoss::TTile& t, int64_t n0, int64_t n1, int64_t t0, int64_t g) {
    const int64_t G = t.G;
    const __m256 mag = _mm256_load_ps(gptoss::kE2M1);
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    for (int h0 = 0; h0 < 2; h0 += HP) {
      __m256 acc[B][HP][TB][2];  // [block][half][token][even, odd]
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < HP; ++h)
          for (int i = 0; i < TB; ++i) {
            const float* d = t.dx[t0 + i] + 32 * (g + b) + 16 * (h0 + h);
            acc[b][h][i][0] = n0 > 0 ? _mm256_loadu_ps(d) : _mm256_setzero_ps();
            acc[b][h][i][1] = n0 > 0 ? _mm256_loadu_ps(d + 8) : _mm256_setzero_ps();
          }
      const uint8_t* w = t.w + (n0 * G + g) * 16 + 8 * h0;
      const uint8_t* s = t.s + n0 * G + g;
      const float* dy = t.dy + n0 * t.ntok + t0;
      for (int64_t n = n0; n < n1; ++n, w += G * 16, s += G, dy += t.ntok) {
        if (h0 == 0 && t0 == 0) {
          _mm_prefetch((const char*)(w + kRowsPerPass * G * 16), _MM_HINT_T1);
          _mm_prefetch((const char*)(w + kRowsPerPass * G * 16 + 16 * B - 1), _MM_HINT_T1);
          _mm_prefetch((const char*)(s + kRowsPerPass * G), _MM_HINT_T1);
        }
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) {
          const __m256 ms = _mm256_mul_ps(mag, _mm256_set1_ps(t.scale_lut[s[b]]));
#pragma GCC unroll 2
          for (int h = 0; h < HP; ++h) {
            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w + 16 * b + 8 * h)));
            const __m256i sl = _mm256_and_si256(_mm256_slli_epi32(v, 28), sign);
            const __m256i sh = _mm256_and_si256(_mm256_slli_epi32(v, 24), sign);
            const __m256 wl = _mm256_xor_ps(_mm256_permutevar8x32_ps(ms, v), _mm256_castsi256_ps(sl));
            const __m256 wh =
                _mm256_xor_ps(_mm256_permutevar8x32_ps(ms, _mm256_srli_epi32(v, 4)), _mm256_castsi256_ps(sh));
#pragma GCC unroll 8
            for (int i = 0; i < TB; ++i) {
              const __m256 d = _mm256_broadcast_ss(dy + i);
              acc[b][h][i][0] = _mm256_fmadd_ps(wl, d, acc[b][h][i][0]);
              acc[b][h][i][1] = _mm256_fmadd_ps(wh, d, acc[b][h][i][1]);
            }
          }
        }
      }
      const bool last = n1 == t.rows;
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < HP; ++h)
          for (int i = 0; i < TB; ++i) {
            float* d = t.dx[t0 + i] + 32 * (g + b) + 16 * (h0 + h);
            const __m256 e = acc[b][h][i][0], o = acc[b][h][i][1];
            if (last) {  // lanes of e are k = 2j, of o k = 2j + 1 (j = 0..7)
              const __m256 lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o);
              _mm256_storeu_ps(d, _mm256_permute2f128_ps(lo, hi, 0x20));
              _mm256_storeu_ps(d + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
            } else {
              _mm256_storeu_ps(d, e);
              _mm256_storeu_ps(d + 8, o);
            }
          }
    }
  }
};

#include "mxfp4_tile_loop.h"
#include "mxfp4_tile_t_loop.h"

}  // namespace

void gptoss::tile_avx2(const gptoss::Tile& t) { run_tile<MK, 4, 2, 4, 16>(t); }
void gptoss::tile_t_avx2(const gptoss::TTile& t) { run_tile_t<MKT, 2, 1, 4, kRowsPerPass>(t); }
