// AVX2 + FMA MXFP4 tile (compiled with -mavx2 -mfma; used when AVX-512 is missing).
//
// The forward product decodes a 16-byte block with byte shuffles, not fp32 permutes: both nibble planes sit in
// one register (low nibbles in lane 0, high in lane 1), two vpshufb look up the low and high byte of each code's
// bf16 value, one byte unpack pairs them into words, and a shift (even words) or a mask (odd words) makes fp32 of
// them (bf16 << 16 is exact). 11 instructions per 32 values instead of ~24, 4 of them shuffles: on a Zen 3 core
// the decode GEMV runs ~2x faster (7.4 vs 3.6 GB/s of packed bytes from cache), two cores reach ~75 % of the read
// bandwidth. (Widening by unpacking with zeros instead of shift/mask: 5.6 GB/s.) The shuffles work within 128-bit
// lanes, so the values come out in the "xq" order the driver permutes x into (Decoder below). One token (gemv_rows):
// each row's block is summed unscaled, then times the block scale (a power of two, so exact); by default one token
// runs on integers instead (gemv_x16, on the driver's 15-bit block floating point x). Several tokens
// (run_panel): each block is decoded and scaled once per task into an L1 panel that an fp32 GEMM micro-kernel
// multiplies with every token.
#include <immintrin.h>

#include <algorithm>

#include "mxfp4_kernel.h"

namespace {

#ifndef GPTOSS_PREFETCH
#define GPTOSS_PREFETCH 8192
#endif
constexpr int kPrefetch = GPTOSS_PREFETCH;  // bytes ahead of the decode GEMV's read position (0: off)
#ifndef GPTOSS_X16_PREFETCH
#define GPTOSS_X16_PREFETCH 1024
#endif
constexpr int kX16Prefetch = GPTOSS_X16_PREFETCH;  // the same for each of the x16 GEMV's four streams
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

#include "mxfp4_x16.h"  // hsum, block_scales, x16_scales

// One block's 32 unscaled products with x (its four xq-ordered vectors), in 8 lanes.
inline __m256 block_sum(const Decoder& decode, const uint8_t* block, __m256 x0, __m256 x1, __m256 x2, __m256 x3) {
  __m256 v[4];
  decode(block, v);
  __m256 blk = _mm256_mul_ps(v[0], x0);
  blk = _mm256_fmadd_ps(v[1], x1, blk);
  blk = _mm256_fmadd_ps(v[2], x2, blk);
  return _mm256_fmadd_ps(v[3], x3, blk);
}

// One token: rows r0..r0+R-1 of the tile, each over its whole row.
template <int R>
void gemv_rows(const gptoss::Tile& t, int64_t r0) {
  const int64_t G = t.G;
  const uint8_t* w = t.w + r0 * G * 16;
  const uint8_t* s = t.s + r0 * G;
  const float* x = t.x[0];
  const Decoder decode;
  __m256 acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    if (kPrefetch > 0 && (g & 3) == 0)  // one line per row every 64 bytes, kPrefetch ahead
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + r * G * 16 + 16 * g + kPrefetch), _MM_HINT_T0);
    const float* xg = x + 32 * g;
    const __m256 x0 = _mm256_loadu_ps(xg), x1 = _mm256_loadu_ps(xg + 8), x2 = _mm256_loadu_ps(xg + 16),
                 x3 = _mm256_loadu_ps(xg + 24);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(block_sum(decode, w + r * G * 16 + 16 * g, x0, x1, x2, x3),
                               _mm256_broadcast_ss(t.scale_lut + s[r * G + g]), acc[r]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) t.y[0][t.col0 + r0 + r] = hsum(acc[r]);
}

// One token on integers (t.xi: the driver's x16 input, mxfp4_kernel.h): the 2 x 16 codes of a pair of blocks are
// looked up as unsigned bytes 2 * value + 12, multiplied with the low and the high signed byte of q (4 vpmaddubsw,
// int16 sums of at most 4 x 24 x 128), widened (2 vpmaddwd: the high part times 128). Three vphaddd fold a group's
// four pairs into one int32 sum per block (exact: < 2**24 after the offset correction), in the order of the
// group's scales, so a group of 8 blocks takes one conversion and one FMA (~17 vector operations per 64 values; a
// conversion and FMA per pair ~20; the fp32 path's decode and FMAs ~22). A task's rows run as four streams, one row
// from each quarter in turn, a group each, every stream prefetched 1 KiB ahead (four far-apart streams read ~1.4x
// one forward stream on a Zen 3 VM). 4 experts' gate_up / down on two Zen 3 cores, cold (median of 100 rounds, a
// C harness): 15.3 -> 18.3 / 15.2 -> 17.3 GB/s of packed bytes against per-pair sums one row at a time (hadd alone:
// 16.3 / 15.8); through the library in a faster spell 19.8 -> 20.7 / 19.0 -> 19.9. Blocks past the last group of 8
// take the fp32 path.

struct X16 {
  const __m256i table = _mm256_setr_epi8(GPTOSS_X16_WEIGHT_BYTES, GPTOSS_X16_WEIGHT_BYTES);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1), h128 = _mm256_set1_epi16(128);

  // sum(q * 2 * value) of each block of the group at wg (128 bytes), in the order 0, 2, 4, 6, 1, 3, 5, 7.
  inline __m256i sums(const uint8_t* wg, const uint8_t* xg) const {
    const __m256i* X = reinterpret_cast<const __m256i*>(xg);
    __m256i d[4];  // [block 2p x 4 | block 2p + 1 x 4]
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * p));
      const __m256i we = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low4));
      const __m256i wo = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
      const __m256i* xp = X + 4 * p;
      const __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(we, _mm256_load_si256(xp)),
                                          _mm256_maddubs_epi16(wo, _mm256_load_si256(xp + 1)));
      const __m256i hi = _mm256_add_epi16(_mm256_maddubs_epi16(we, _mm256_load_si256(xp + 2)),
                                          _mm256_maddubs_epi16(wo, _mm256_load_si256(xp + 3)));
      d[p] = _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, h128));
    }
    return fold(d, xg + 512);
  }

  // x8 (mxfp4_kernel.h): the same sums on the x8 input, two vpmaddubsw per pair of blocks instead of four.
  inline __m256i sums_x8(const uint8_t* wg, const uint8_t* xg) const {
    const __m256i* X = reinterpret_cast<const __m256i*>(xg);
    __m256i d[4];
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * p));
      const __m256i we = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low4));
      const __m256i wo = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
      const __m256i* xp = X + 4 * (p / 2) + p % 2;  // blocks 2p, 2p + 1: half p % 2 of their 4 blocks' planes
      const __m256i q = _mm256_add_epi16(_mm256_maddubs_epi16(we, _mm256_load_si256(xp)),
                                         _mm256_maddubs_epi16(wo, _mm256_load_si256(xp + 2)));
      d[p] = _mm256_madd_epi16(q, ones);
    }
    return fold(d, xg + 256);
  }

  // Three vphaddd: the four pairs' [block 2p x 4 | block 2p + 1 x 4] dwords -> one sum per block, in the order 0, 2,
  // 4, 6, 1, 3, 5, 7, plus the 8 int32 at corr (-12 sum(q)).
  static inline __m256i fold(const __m256i d[4], const uint8_t* corr) {
    const __m256i folded = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
    return _mm256_add_epi32(folded, _mm256_load_si256(reinterpret_cast<const __m256i*>(corr)));
  }
};

// Rows r0 + j * stride (j < R) of the tile, a group of each in turn; on the x8 input where t.x8.
template <int R, bool X8>
void gemv_x16(const gptoss::Tile& t, int64_t r0, int64_t stride) {
  const int64_t G = t.G, groups = G / gptoss::kX16Blocks;
  const uint8_t* w[R];
  const uint8_t* s[R];
  __m256 acc[R];
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j)
    w[j] = t.w + (r0 + j * stride) * G * 16, s[j] = t.s + (r0 + j * stride) * G, acc[j] = _mm256_setzero_ps();
  const X16 x16;
  for (int64_t g8 = 0; g8 < groups; ++g8) {
    const uint8_t* xg = t.xi + g8 * (X8 ? gptoss::kX8GroupBytes : gptoss::kX16GroupBytes);
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
      const uint8_t* wg = w[j] + 128 * g8;
      if (kX16Prefetch > 0)
        _mm_prefetch((const char*)(wg + kX16Prefetch), _MM_HINT_T0),
            _mm_prefetch((const char*)(wg + kX16Prefetch + 64), _MM_HINT_T0);
      const __m256i sums = X8 ? x16.sums_x8(wg, xg) : x16.sums(wg, xg);
      const __m256 scales = X8 ? block_scales(s[j] + 8 * g8, reinterpret_cast<const float*>(xg + 288))
                               : x16_scales(s[j] + 8 * g8, xg);
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scales, acc[j]);
    }
  }
  const Decoder decode;  // the blocks past the last group, exactly, on the fp32 input
  const float* x = t.x[0];
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j) {
    for (int64_t g = groups * gptoss::kX16Blocks; g < G; ++g) {
      const float* xg = x + 32 * g;
      const __m256 blk = block_sum(decode, w[j] + 16 * g, _mm256_loadu_ps(xg), _mm256_loadu_ps(xg + 8),
                                   _mm256_loadu_ps(xg + 16), _mm256_loadu_ps(xg + 24));
      acc[j] = _mm256_fmadd_ps(blk, _mm256_broadcast_ss(t.scale_lut + s[j][g]), acc[j]);
    }
    t.y[0][t.col0 + r0 + j * stride] = hsum(acc[j]);
  }
}

// Several tokens (the grouped prefill): a task's rows are decoded kPanelBlocks blocks at a time into an L1 panel,
// scaled, once for all of its tokens; an fp32 micro-kernel (panel_mk) multiplies the panel with R rows x T tokens of
// accumulators, k in the vector lanes, so that no token count is padded; each (row, token) keeps its 8 lane sums in
// `part` between chunks and adds them up after the last. Decoding once per task instead of once per 4 tokens, and a
// plain FMA loop (12 FMAs per 7 loads): 1.3-1.4x the previous register-decoding tile, 61 vs 44 GFLOP/s on one
// Zen 3 core (128 tokens x top-4 through gate_up). The next chunk's lines are prefetched while one multiplies:
// without it the decode stalls on them and two cores gain nothing over one.
constexpr int64_t kPanelBlocks = 8;  // 256 k: the panel of 16 rows (16 KiB) and 16 tokens' inputs fill L1
constexpr int64_t kPanelK = kPanelBlocks * 32;
constexpr int kPanelR = 4, kPanelT = 3;  // 12 accumulators, 3 inputs and a weight vector: the 16 registers

template <int R, int T>
void panel_mk(const float* wb, const float* const* x, int64_t k0, int64_t n, float* part, bool resume, bool finish,
              float* const* y, int64_t col) {
  __m256 acc[R][T];  // (every loop over acc fully unrolled, or GCC keeps it in memory)
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < T; ++i) acc[r][i] = resume ? _mm256_load_ps(part + (r * T + i) * 8) : _mm256_setzero_ps();
  const float* xs[T];
#pragma GCC unroll 8
  for (int i = 0; i < T; ++i) xs[i] = x[i] + k0;
  for (int64_t k = 0; k < n; k += 8) {
    __m256 xv[T];
#pragma GCC unroll 8
    for (int i = 0; i < T; ++i) xv[i] = _mm256_loadu_ps(xs[i] + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 w = _mm256_load_ps(wb + r * kPanelK + k);
#pragma GCC unroll 8
      for (int i = 0; i < T; ++i) acc[r][i] = _mm256_fmadd_ps(w, xv[i], acc[r][i]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < T; ++i) {
      if (finish) y[i][col + r] = hsum(acc[r][i]);
      else _mm256_store_ps(part + (r * T + i) * 8, acc[r][i]);
    }
}

template <int R, int T>
void panel_tokens(int64_t nt, const float* wb, const float* const* x, int64_t k0, int64_t n, float* part, bool resume,
                  bool finish, float* const* y, int64_t col) {
  if constexpr (T > 1)
    if (nt < T) return panel_tokens<R, T - 1>(nt, wb, x, k0, n, part, resume, finish, y, col);
  panel_mk<R, T>(wb, x, k0, n, part, resume, finish, y, col);
}

void run_panel(const gptoss::Tile& t) {
  constexpr int64_t kRows = gptoss::kGroupRows, kTokens = gptoss::kGroupTokens;
  if (t.rows > kRows || t.ntok > kTokens) {  // (not used by the driver) split into tasks of the driver's size
    for (int64_t r = 0; r < t.rows; r += kRows)
      for (int64_t i = 0; i < t.ntok; i += kTokens) {
        gptoss::Tile sub = t;
        sub.w += r * t.G * 16, sub.s += r * t.G, sub.col0 += r, sub.rows = std::min(kRows, t.rows - r);
        sub.x += i, sub.y += i, sub.ntok = std::min(kTokens, t.ntok - i);
        run_panel(sub);
      }
    return;
  }
  const int64_t G = t.G;
  alignas(64) float wb[kRows * kPanelK];
  alignas(64) float part[kRows * kTokens * 8];
  const Decoder decode;
  for (int64_t g0 = 0; g0 < G; g0 += kPanelBlocks) {
    const int64_t g1 = std::min(G, g0 + kPanelBlocks);
    for (int64_t r = 0; r < t.rows; ++r) {
      {  // this row's next chunk (after the last: the first chunk of the rows after the tile, likely the next task)
        const int64_t pr = g1 < G ? r : r + t.rows, pg = g1 < G ? g1 : 0;
        const char* nb = reinterpret_cast<const char*>(t.w + (pr * G + pg) * 16);
        _mm_prefetch(nb, _MM_HINT_T0);
        _mm_prefetch(nb + 64, _MM_HINT_T0);
        _mm_prefetch(nb + 16 * kPanelBlocks - 1, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(t.s + pr * G + pg), _MM_HINT_T0);
      }
      for (int64_t g = g0; g < g1; ++g) {
        __m256 v[4];
        decode(t.w + (r * G + g) * 16, v);
        const __m256 sc = _mm256_broadcast_ss(t.scale_lut + t.s[r * G + g]);
        float* o = wb + r * kPanelK + (g - g0) * 32;
        for (int q = 0; q < 4; ++q) _mm256_store_ps(o + 8 * q, _mm256_mul_ps(v[q], sc));
      }
    }
    const bool resume = g0 > 0, finish = g1 == G;
    const int64_t n = (g1 - g0) * 32;
    for (int64_t t0 = 0; t0 < t.ntok; t0 += kPanelT) {
      const int64_t nt = std::min<int64_t>(kPanelT, t.ntok - t0);
      int64_t r = 0;  // (part: row r's sums for tokens t0.. at (r * kTokens + t0 * R) * 8, R = the rows per call)
      for (; r + kPanelR <= t.rows; r += kPanelR)
        panel_tokens<kPanelR, kPanelT>(nt, wb + r * kPanelK, t.x + t0, 32 * g0, n,
                                       part + (r * kTokens + t0 * kPanelR) * 8, resume, finish, t.y + t0, t.col0 + r);
      for (; r < t.rows; ++r)
        panel_tokens<1, kPanelT>(nt, wb + r * kPanelK, t.x + t0, 32 * g0, n, part + (r * kTokens + t0) * 8, resume,
                                 finish, t.y + t0, t.col0 + r);
    }
  }
}

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

// The tile's rows on the x16 (or, where X8, x8) input: four streams, a row from each quarter of the tile in turn,
// then the rows left over.
template <bool X8>
void gemv_int_rows(const gptoss::Tile& t) {
  const int64_t q = t.rows / 4;
  for (int64_t i = 0; i < q; ++i) gemv_x16<4, X8>(t, i, q);
  for (int64_t r = 4 * q; r < t.rows; ++r) gemv_x16<1, X8>(t, r, 0);
}

#include "mxfp4_tile_t_loop.h"

}  // namespace

void gptoss::tile_avx2(const gptoss::Tile& t) {
  if (t.ntok > 1) return run_panel(t);
  if (t.xi != nullptr) return t.x8 ? gemv_int_rows<true>(t) : gemv_int_rows<false>(t);
  int64_t r = 0;
  for (; r + 4 <= t.rows; r += 4) gemv_rows<4>(t, r);
  for (; r < t.rows; ++r) gemv_rows<1>(t, r);
}
void gptoss::tile_t_avx2(const gptoss::TTile& t) { run_tile_t<MKT, 2, 1, 4, kRowsPerPass>(t); }
