// AVX2 dense matmul (compiled with -mavx2 -mfma; called only when the CPU has them): CPUs without AVX-512.
//
// Same tiling as dense_avx512.cc at half the vector width, with inputs in their natural order: 8 bf16 weights
// are one 16-byte load, zero-extended to dwords and shifted left by 16 (the fp32 values, exactly).
// rows (W [N, K]): R <= 4 output rows x TB <= 2 tokens of 8-lane accumulators over the whole of K; the rows stay
//   in L1 for further token blocks. cols (W [K, N]): sweeps of kKG input rows across a strip, 16 columns by
//   TB <= 4 tokens, accumulating in y; one token streams kOneRows rows at a time instead (ColsOne), and 8 tokens
//   or more run a packed fp32 GEMM (ColsPanel).
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
void RowsMK(const gptoss::DenseTask& t, int64_t n0, int64_t m0, bool prefetch) {
  constexpr int64_t E = F32 ? 4 : 2;
  const int64_t K = t.K, kfull = K & ~int64_t{15};
  const char* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const char*>(t.w) + (n0 + r) * K * E;
  const float* x[TB];
  for (int i = 0; i < TB; ++i) x[i] = t.x + (m0 + i) * t.ldx;
  __m256 acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < TB; ++i) acc[r][i] = _mm256_setzero_ps();
  // Past a row's end the prefetch runs on into the same row of the next R-row group (R - 1 rows further on): the
  // hardware prefetcher does not see R interleaved streams coming, and every group's first kRowPrefetch bytes per
  // row used to arrive unprefetched (the 201088 x 2880 bf16 unembedding on two Zen 3 cores: 14-16 -> 17-20 GB/s).
  const int64_t wrap_at = K * E - kRowPrefetch, wrap = (R - 1) * K * E;
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
      t.y[(m0 + i) * t.N + n0 + r] = s;
    }
}

template <int R, bool F32>
void RowsTokens(const gptoss::DenseTask& t, int64_t n0, int64_t m0, int64_t nt, bool prefetch) {
  if (nt == 1)
    RowsMK<R, 1, F32>(t, n0, m0, prefetch);
  else
    RowsMK<R, 2, F32>(t, n0, m0, prefetch);
}

template <bool F32>
void Rows(const gptoss::DenseTask& t) {
  constexpr int kR = 4, kTB = 2;
  for (int64_t n = t.lo; n < t.hi; n += kR) {
    const int64_t nr = t.hi - n < kR ? t.hi - n : kR;
    for (int64_t m0 = 0; m0 < t.M; m0 += kTB) {
      const int64_t nt = t.M - m0 < kTB ? t.M - m0 : kTB;
      const bool prefetch = m0 == 0;
      switch (nr) {
        case 1: RowsTokens<1, F32>(t, n, m0, nt, prefetch); break;
        case 2: RowsTokens<2, F32>(t, n, m0, nt, prefetch); break;
        case 3: RowsTokens<3, F32>(t, n, m0, nt, prefetch); break;
        default: RowsTokens<4, F32>(t, n, m0, nt, prefetch); break;
      }
    }
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

// One token (decode): kOneRows input rows at a time, each read once along the strip (whole rows when the driver
// gives one task all columns: a contiguous stream), y accumulating in place in L1. 1.3-1.5x the kKG sweep's
// GB/s at M = 1 on a Zen 3 (attention's wq and wo: 11-13 -> 16-17 GB/s on two cores), which kept 16 rows' streams
// open at once. Whole rows are prefetched kOneRowPrefetch ahead and, past their end, on into the same row of the
// next group: the hardware prefetcher does not ramp up on short rows (k and v: 1 KiB; 5.5 -> 7-8 GB/s with it).
// 4 rows with the prefetch vs 8 without: q, k, v and o of one layer on two Zen 3 cores 10.6 -> 12.1 GB/s (8 rows
// with a 1 KiB prefetch were slower than without on wide rows).
constexpr int kOneRows = 4;
constexpr int64_t kOneRowPrefetch = 512;

template <bool F32>
void ColsOne(const gptoss::DenseTask& t) {
  constexpr int64_t E = F32 ? 4 : 2;
  const int64_t ws = t.N * E, n_end = t.lo + ((t.hi - t.lo) & ~int64_t{7});
  const bool prefetch = t.lo == 0 && t.hi == t.N;
  const float* x = t.x;
  float* y = t.y;
  int64_t k0 = 0;
  for (; k0 + kOneRows <= t.K; k0 += kOneRows) {
    const char* w = static_cast<const char*>(t.w) + k0 * ws;
    __m256 xk[kOneRows];
    for (int r = 0; r < kOneRows; ++r) xk[r] = _mm256_set1_ps(x[k0 + r]);
    for (int64_t n = t.lo; n < n_end; n += 8) {
      if (prefetch && (n & (64 / E - 1)) == 0) {  // once per cache line of each row
        const int64_t ahead = n * E + kOneRowPrefetch, next = ahead >= ws ? (kOneRows - 1) * ws : 0;
        for (int r = 0; r < kOneRows; ++r) _mm_prefetch(w + r * ws + ahead + next, _MM_HINT_T0);
      }
      __m256 acc = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y + n);
#pragma GCC unroll 8
      for (int r = 0; r < kOneRows; ++r) acc = _mm256_fmadd_ps(Load8<F32>(w + r * ws + n * E), xk[r], acc);
      _mm256_storeu_ps(y + n, acc);
    }
    for (int64_t n = n_end; n < t.hi; ++n) {
      float a = k0 == 0 ? 0.0f : y[n];
      for (int r = 0; r < kOneRows; ++r) a += x[k0 + r] * Scalar<F32>(w + r * ws, n);
      y[n] = a;
    }
  }
  for (; k0 < t.K; ++k0) {  // the K tail, one row at a time
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

template <bool F32>
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
        const char* w = static_cast<const char*>(t.w) + (k0 * t.N + n0) * E;
        for (int64_t k = 0; k < kc; ++k) {
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
               Scalar<F32>(static_cast<const char*>(t.w) + k * t.N * E, n);
      t.y[m * t.N + n] = acc;
    }
}

template <bool F32>
void Cols(const gptoss::DenseTask& t) {
  if (t.M == 1) return ColsOne<F32>(t);
  if (t.M >= gptoss::kColsPanelMinTokens) return ColsPanel<F32>(t);
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
