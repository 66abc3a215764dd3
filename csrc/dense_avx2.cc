// AVX2 dense matmul (compiled with -mavx2 -mfma; called only when the CPU has them): CPUs without AVX-512.
//
// Same tiling as dense_avx512.cc at half the vector width, with inputs in their natural order: 8 bf16 weights
// are one 16-byte load, zero-extended to dwords and shifted left by 16 (the fp32 values, exactly).
// rows (W [N, K]): R <= 4 output rows (one from each quarter of the task: four memory streams) x TB <= 2 tokens of
//   8-lane accumulators over the whole of K; the rows stay in L1 for further token blocks. cols (W [K, N]): sweeps
//   of kKG input rows across a strip, 16 columns by TB <= 4 tokens, accumulating in y; one token reads kOneRows
//   rows at a time from four streams instead (ColsOne), and 8 tokens or more run a packed fp32 GEMM (ColsPanel; for
//   W [N, K] too, its panels transposed from 8 x 8 blocks of rows).
#include <immintrin.h>

#include <algorithm>

#include "dense_kernel.h"

namespace {

constexpr int64_t kRowPrefetch = 1024;  // bytes ahead in each W row (rows layout)

template <bool F32>
inline __m256 Load8(const void* p) {
  if (F32) return _mm256_loadu_ps(static_cast<const float*>(p));
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

template <bool F32>
inline float Scalar(const void* p, int64_t i) {
  if (F32) return static_cast<const float*>(p)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
  float v;
  __builtin_memcpy(&v, &bits, 4);
  return v;
}

inline float Sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// ------------------------------------------------------------------------------------------ rows layout
template <int R, int TB, bool F32>
void RowsMK(const gptoss::DenseTask& t, int64_t n0, int64_t rs, int64_t m0, bool prefetch) {
  constexpr int64_t E = F32 ? 4 : 2;
  const int64_t K = t.K, kfull = K & ~int64_t{15};
  const char* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const char*>(t.w) + (n0 + r * rs) * K * E;
  const float* x[TB];
  for (int i = 0; i < TB; ++i) x[i] = t.x + (m0 + i) * t.ldx;
  __m256 acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < TB; ++i) acc[r][i] = _mm256_setzero_ps();
  // Past a row's end the prefetch runs on into the row each stream reads next: the next row of its stream
  // (rs > 1: Rows' streams), or the same row of the next R-row group (rs = 1, R - 1 rows further on). The hardware
  // prefetcher does not see interleaved streams coming, and every group's first kRowPrefetch bytes per row used to
  // arrive unprefetched (the 201088 x 2880 bf16 unembedding on two Zen 3 cores: 14-16 -> 17-20 GB/s).
  const int64_t wrap_at = K * E - kRowPrefetch, wrap = (rs == 1 ? R - 1 : 0) * K * E;
  for (int64_t k = 0; k < kfull; k += 16) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if (prefetch) _mm_prefetch(w[r] + k * E + kRowPrefetch + (k * E >= wrap_at ? wrap : 0), _MM_HINT_T0);
      const __m256 wa = Load8<F32>(w[r] + k * E), wb = Load8<F32>(w[r] + (k + 8) * E);
#pragma GCC unroll 2
      for (int i = 0; i < TB; ++i)
        acc[r][i] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x[i] + k + 8),
                                    _mm256_fmadd_ps(wa, _mm256_loadu_ps(x[i] + k), acc[r][i]));
    }
  }
  for (int i = 0; i < TB; ++i)
    for (int r = 0; r < R; ++r) {
      float s = Sum8(acc[r][i]);
      for (int64_t k = kfull; k < K; ++k) s += Scalar<F32>(w[r], k) * x[i][k];  // the tail, in order
      t.y[(m0 + i) * t.N + n0 + r * rs] = s;
    }
}

template <int R, bool F32>
void RowsTokens(const gptoss::DenseTask& t, int64_t n0, int64_t rs, int64_t m0, int64_t nt, bool prefetch) {
  if (nt == 1)
    RowsMK<R, 1, F32>(t, n0, rs, m0, prefetch);
  else
    RowsMK<R, 2, F32>(t, n0, rs, m0, prefetch);
}

// R rows, rs apart from row n on, for every token (the rows stay in L1 after the first token block).
template <int R, bool F32>
void RowsGroup(const gptoss::DenseTask& t, int64_t n, int64_t rs) {
  constexpr int kTB = 2;
  for (int64_t m0 = 0; m0 < t.M; m0 += kTB) RowsTokens<R, F32>(t, n, rs, m0, t.M - m0 < kTB ? t.M - m0 : kTB, m0 == 0);
}

// The task's rows as kR streams (quarters of [lo, hi), each read front to back), one row of each at a time: four
// far-apart forward streams per core keep more of the memory system busy than four adjacent rows, which it sees
// as one stream (a plain read loop on two Zen 3 cores: 14 GB/s one stream, 16 four streams 8 KiB apart, 20-21 four
// streams >= 64 KiB apart). The unembedding (201088 x 2880 bf16, one token): 16.1 -> 20.4 GB/s. Each output is
// the same dot product as before, in the same order; the < kR rows past the last whole group come last.
template <bool F32>
void Rows(const gptoss::DenseTask& t) {
  constexpr int kR = 4;
  const int64_t q = (t.hi - t.lo) / kR;
  for (int64_t j = 0; j < q; ++j) RowsGroup<kR, F32>(t, t.lo + j, q);
  const int64_t n = t.lo + kR * q;
  switch (t.hi - n) {
    case 1: RowsGroup<1, F32>(t, n, 1); break;
    case 2: RowsGroup<2, F32>(t, n, 1); break;
    case 3: RowsGroup<3, F32>(t, n, 1); break;
    default: break;
  }
}

// ------------------------------------------------------------------------------------------ cols layout
constexpr int kKG = 16;  // input rows per sweep across the strip

// y[m0 + i, n0 : n0 + 16] += sum_{g < G} x[m0 + i, k0 + g] W[k0 + g, n0 : n0 + 16] (a full 16-column block).
template <int TB, int G, bool F32>
void ColsMK(const gptoss::DenseTask& t, int64_t n0, int64_t m0, int64_t k0, bool first) {
  constexpr int64_t E = F32 ? 4 : 2;
  const int64_t ws = t.N * E;
  __m256 acc[TB][2];
  for (int i = 0; i < TB; ++i) {
    float* y = t.y + (m0 + i) * t.N + n0;
    acc[i][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y);
    acc[i][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + 8);
  }
  const char* w = static_cast<const char*>(t.w) + (k0 * t.N + n0) * E;
  const float* x = t.x + m0 * t.ldx + k0;
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g) {
    const __m256 wa = Load8<F32>(w + g * ws), wb = Load8<F32>(w + g * ws + 8 * E);
#pragma GCC unroll 4
    for (int i = 0; i < TB; ++i) {
      const __m256 xk = _mm256_broadcast_ss(x + i * t.ldx + g);
      acc[i][0] = _mm256_fmadd_ps(wa, xk, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(wb, xk, acc[i][1]);
    }
  }
  for (int i = 0; i < TB; ++i) {
    float* y = t.y + (m0 + i) * t.N + n0;
    _mm256_storeu_ps(y, acc[i][0]);
    _mm256_storeu_ps(y + 8, acc[i][1]);
  }
}

template <int G, bool F32>
void ColsTokens(int64_t nt, const gptoss::DenseTask& t, int64_t n0, int64_t m0, int64_t k0, bool first) {
  switch (nt) {
    case 1: ColsMK<1, G, F32>(t, n0, m0, k0, first); break;
    case 2: ColsMK<2, G, F32>(t, n0, m0, k0, first); break;
    case 3: ColsMK<3, G, F32>(t, n0, m0, k0, first); break;
    default: ColsMK<4, G, F32>(t, n0, m0, k0, first); break;
  }
}

// Columns [n0, n1) (fewer than 16) for rows [k0, k0 + rows), scalar.
template <bool F32>
void ColsTail(const gptoss::DenseTask& t, int64_t n0, int64_t n1, int64_t k0, int64_t rows) {
  constexpr int64_t E = F32 ? 4 : 2;
  for (int64_t m = 0; m < t.M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = k0 == 0 ? 0.0f : t.y[m * t.N + n];
      for (int64_t k = k0; k < k0 + rows; ++k)
        s += t.x[m * t.ldx + k] * Scalar<F32>(static_cast<const char*>(t.w) + k * t.N * E, n);
      t.y[m * t.N + n] = s;
    }
}

// One token (decode): kOneRows input rows at a time, each read once along the strip, y accumulating in place in L1.
// The rows come from kOneRows streams, the quarters of the task's K range, each read front to back (a contiguous
// stream when the driver gives one task all columns): as in Rows, four far-apart streams per core read faster
// than four adjacent rows (q, k, v and o of 16 layers on two Zen 3 cores: 12.6 -> 14.1 GB/s median; k and v alone,
// 1 KiB rows, 7.1 -> 10.7). No software prefetch: with far-apart streams it was no faster (13.9), and slower on the
// short rows (8.6). The rows past the last whole group come last, one at a time. (Earlier: one stream of adjacent
// rows, prefetched 512 B ahead; before that the kKG sweep, 11-13 GB/s, which kept 16 rows' streams open at once.)
constexpr int kOneRows = 4;

template <bool F32>
void ColsOne(const gptoss::DenseTask& t) {
  constexpr int64_t E = F32 ? 4 : 2;
  const int64_t ws = t.N * E, n_end = t.lo + ((t.hi - t.lo) & ~int64_t{7});
  const int64_t rs = t.K / kOneRows;  // rows per stream; input row j + r * rs is stream r's j-th
  const float* x = t.x;
  float* y = t.y;
  for (int64_t j = 0; j < rs; ++j) {
    const char* w = static_cast<const char*>(t.w) + j * ws;
    __m256 xk[kOneRows];
    for (int r = 0; r < kOneRows; ++r) xk[r] = _mm256_set1_ps(x[j + r * rs]);
    for (int64_t n = t.lo; n < n_end; n += 8) {
      __m256 acc = j == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y + n);
#pragma GCC unroll 8
      for (int r = 0; r < kOneRows; ++r) acc = _mm256_fmadd_ps(Load8<F32>(w + r * rs * ws + n * E), xk[r], acc);
      _mm256_storeu_ps(y + n, acc);
    }
    for (int64_t n = n_end; n < t.hi; ++n) {
      float a = j == 0 ? 0.0f : y[n];
      for (int r = 0; r < kOneRows; ++r) a += x[j + r * rs] * Scalar<F32>(w + r * rs * ws, n);
      y[n] = a;
    }
  }
  for (int64_t k0 = kOneRows * rs; k0 < t.K; ++k0) {  // the K tail, one row at a time
    const char* w = static_cast<const char*>(t.w) + k0 * ws;
    for (int64_t n = t.lo; n < t.hi; ++n) y[n] = (k0 == 0 ? 0.0f : y[n]) + x[k0] * Scalar<F32>(w, n);
  }
}

// Prefill-sized M (kColsPanelMinTokens or more), a GEMM: x arrives packed by the driver (per kPanelK rows of K, per
// 6-token tile, [k][6]); per kPanelK rows and 32 columns, W's chunk is converted once to fp32 panels [k][16] (two
// strips, 16 KiB, L1; the next 32 columns' lines prefetched meanwhile), then every 6-token tile runs a 6 x 16
// micro-kernel (12 accumulators,
// two panel loads and six broadcasts per k), y accumulating in place between chunks. The kKG sweep below converts
// each weight again for every 4 tokens; XLA's bf16 GEMM repacks W on every call: at 128 tokens this is 1.3-1.4x
// XLA on attention's wq and wo on a 2-core Zen 3 (unpacked x broadcast from 6 rows: ~25 % slower).
// Tokens are taken kPanelTokens at a time (their packed chunk, 192 KiB, stays in L2 while the columns go by).
constexpr int64_t kPanelK = gptoss::kColsPanelK, kPanelTokens = 384;
constexpr int kPanelTB = gptoss::kColsPanelTB;

template <int TB>
void PanelMK(const gptoss::DenseTask& t, const float* pw, const float* px, int64_t kc, int64_t n0, int64_t m0,
             int64_t k0) {
  __m256 acc[TB][2];  // (every loop over acc fully unrolled, or GCC keeps it in memory)
#pragma GCC unroll 8
  for (int i = 0; i < TB; ++i) {
    const float* y = t.y + (m0 + i) * t.N + n0;
    acc[i][0] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y);
    acc[i][1] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 wa = _mm256_load_ps(pw + 16 * k), wb = _mm256_load_ps(pw + 16 * k + 8);
#pragma GCC unroll 8
    for (int i = 0; i < TB; ++i) {
      const __m256 xk = _mm256_broadcast_ss(px + kPanelTB * k + i);
      acc[i][0] = _mm256_fmadd_ps(wa, xk, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(wb, xk, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < TB; ++i) {
    float* y = t.y + (m0 + i) * t.N + n0;
    _mm256_storeu_ps(y, acc[i][0]);
    _mm256_storeu_ps(y + 8, acc[i][1]);
  }
}

template <int TB>
void PanelTokens(int64_t nt, const gptoss::DenseTask& t, const float* pw, const float* px, int64_t kc, int64_t n0,
                 int64_t m0, int64_t k0) {
  if constexpr (TB > 1)
    if (nt < TB) return PanelTokens<TB - 1>(nt, t, pw, px, kc, n0, m0, k0);
  PanelMK<TB>(t, pw, px, kc, n0, m0, k0);
}

// The 8 x 8 transpose of r: r[i] lane j -> r[j] lane i.
inline void Transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i)
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]), t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h) {
      u[4 * i + 2 * h] = _mm256_shuffle_ps(t[4 * i + h], t[4 * i + 2 + h], 0x44);
      u[4 * i + 2 * h + 1] = _mm256_shuffle_ps(t[4 * i + h], t[4 * i + 2 + h], 0xEE);
    }
  for (int i = 0; i < 4; ++i)
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20), r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
}

// W [N, K]: rows n0 .. n0 + 15 at w (row n0, column k0; rows ws bytes apart), columns k0 .. k0 + kc, as the panel
// [k][16] the [K, N] layout reads straight off its rows: 8 x 8 blocks transposed, the last kc % 8 columns one by one.
template <bool F32>
void PanelFromRows(const char* w, int64_t ws, int64_t kc, float* pw) {
  constexpr int64_t E = F32 ? 4 : 2;
  const int64_t k8 = kc & ~int64_t{7};
  for (int h = 0; h < 2; ++h)
    for (int64_t k = 0; k < k8; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = Load8<F32>(w + (8 * h + i) * ws + k * E);
      Transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(pw + 16 * (k + i) + 8 * h, r[i]);
    }
  for (int64_t k = k8; k < kc; ++k)
    for (int j = 0; j < 16; ++j) pw[16 * k + j] = Scalar<F32>(w + j * ws, k);
}

template <bool F32, bool NK>
void ColsPanel(const gptoss::DenseTask& t) {
  constexpr int64_t E = F32 ? 4 : 2;
  alignas(64) float pw[2 * kPanelK * 16];  // two 16-column strips, each [k][16]
  const int64_t tiles = (t.M + kPanelTB - 1) / kPanelTB, full_end = t.lo + ((t.hi - t.lo) & ~int64_t{15});
  for (int64_t mb = 0; mb < t.M; mb += kPanelTokens) {
    const int64_t mn = std::min(kPanelTokens, t.M - mb);
    for (int64_t k0 = 0; k0 < t.K; k0 += kPanelK) {
      const int64_t kc = std::min(kPanelK, t.K - k0);
      const float* px = t.x + ((k0 / kPanelK) * tiles + mb / kPanelTB) * kPanelK * kPanelTB;  // (the driver's packing)
      for (int64_t n0 = t.lo; n0 < full_end; n0 += 32) {
        const int strips = full_end - n0 >= 32 ? 2 : 1;
        if (NK) {
          const char* w = static_cast<const char*>(t.w) + (n0 * t.K + k0) * E;
          for (int s = 0; s < strips; ++s) PanelFromRows<F32>(w + 16 * s * t.K * E, t.K * E, kc, pw + s * kPanelK * 16);
        }
        const char* w = static_cast<const char*>(t.w) + (k0 * t.N + n0) * E;
        for (int64_t k = 0; k < kc && !NK; ++k) {
          const char* wk = w + k * t.N * E;
          _mm_prefetch(wk + 32 * E, _MM_HINT_T0);  // the next panel's line of this row
          for (int s = 0; s < strips; ++s) {
            _mm256_store_ps(pw + s * kPanelK * 16 + 16 * k, Load8<F32>(wk + 16 * s * E));
            _mm256_store_ps(pw + s * kPanelK * 16 + 16 * k + 8, Load8<F32>(wk + (16 * s + 8) * E));
          }
        }
        for (int s = 0; s < strips; ++s)
          for (int64_t m0 = 0; m0 < mn; m0 += kPanelTB)
            PanelTokens<kPanelTB>(std::min<int64_t>(kPanelTB, mn - m0), t, pw + s * kPanelK * 16,
                                  px + (m0 / kPanelTB) * kPanelK * kPanelTB, kc, n0 + 16 * s, mb + m0, k0);
      }
    }
  }
  for (int64_t m = 0; m < t.M; ++m)  // the last columns (fewer than 16), scalar, from the same packed x
    for (int64_t n = full_end; n < t.hi; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < t.K; ++k)
        acc += t.x[((k / kPanelK) * tiles + m / kPanelTB) * kPanelK * kPanelTB + (k % kPanelK) * kPanelTB +
                   m % kPanelTB] *
               (NK ? Scalar<F32>(static_cast<const char*>(t.w) + n * t.K * E, k)
                   : Scalar<F32>(static_cast<const char*>(t.w) + k * t.N * E, n));
      t.y[m * t.N + n] = acc;
    }
}

template <bool F32>
void Cols(const gptoss::DenseTask& t) {
  if (t.M == 1) return ColsOne<F32>(t);
  if (t.M >= gptoss::kColsPanelMinTokens) return ColsPanel<F32, false>(t);
  constexpr int64_t kTB = 4;
  const int64_t full_end = t.lo + ((t.hi - t.lo) & ~int64_t{15});
  for (int64_t k0 = 0; k0 < t.K;) {
    const int64_t rows = t.K - k0 >= kKG ? kKG : 1;
    for (int64_t m0 = 0; m0 < t.M; m0 += kTB) {
      const int64_t nt = t.M - m0 < kTB ? t.M - m0 : kTB;
      for (int64_t n0 = t.lo; n0 < full_end; n0 += 16) {
        if (rows == kKG)
          ColsTokens<kKG, F32>(nt, t, n0, m0, k0, k0 == 0);
        else
          ColsTokens<1, F32>(nt, t, n0, m0, k0, k0 == 0);
      }
    }
    if (full_end < t.hi) ColsTail<F32>(t, full_end, t.hi, k0, rows);
    k0 += rows;
  }
}

}  // namespace

void gptoss::dense_rows_avx2(const DenseTask& t) { t.w_f32 ? Rows<true>(t) : Rows<false>(t); }
void gptoss::dense_cols_avx2(const DenseTask& t) { t.w_f32 ? Cols<true>(t) : Cols<false>(t); }
void gptoss::dense_rows_panel_avx2(const DenseTask& t) {
  t.w_f32 ? ColsPanel<true, true>(t) : ColsPanel<false, true>(t);
}
