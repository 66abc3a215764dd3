// AVX-512 dense matmul (compiled with -mavx512f -mavx512bw -mfma; called only when the CPU has them).
//
// rows (W [N, K]): a micro-kernel computes R <= 4 output rows for TB <= 4 tokens over the whole of K with
//   R x TB vector accumulators; the R rows (R x K x 2 bytes, 23 KiB at K = 2880) stay in L1 while further
//   token blocks reuse them, so W is read from memory once per call for any M. One token reads its rows one
//   after the other instead (RowOne).
// cols (W [K, N]): a task owns a strip of columns (and a range of K); it sweeps kKG input rows at a time across
//   the strip, 32 columns by TB <= 8 tokens per micro-kernel, with the accumulators kept in y (L1-sized strips),
//   so memory sees kKG sequential row runs at a time, with a software prefetch ahead along them; one token reads
//   kOneRows rows at a time from four streams instead (ColsOne).
// bf16 weights: 32 of them are one 64-byte load; a dword's low half is the even element (<< 16 makes it the
// fp32 value), its high half the odd one (mask the low half). fp32 weights: two plain loads.
#include <immintrin.h>

#include "dense_kernel.h"

namespace {

#ifndef GPTOSS_DENSE_PREFETCH
#define GPTOSS_DENSE_PREFETCH 1024
#endif
constexpr int64_t kRowPrefetch = GPTOSS_DENSE_PREFETCH;  // bytes ahead in each W row (rows layout; 0: off)

// 32 weights at p (masked: element j read only if bit j of m is set, else 0) -> two vectors.
// bf16: (even, odd) elements; fp32: (first 16, last 16).
template <bool F32>
inline void LoadW(const void* p, __mmask32 m, __m512& a, __m512& b) {
  if (F32) {
    const float* f = static_cast<const float*>(p);
    a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), f);
    b = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), f + 16);
  } else {
    const __m512i v = _mm512_maskz_loadu_epi16(m, p);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
}

template <bool F32>
inline void LoadW(const void* p, __m512& a, __m512& b) {
  if (F32) {
    a = _mm512_loadu_ps(static_cast<const float*>(p));
    b = _mm512_loadu_ps(static_cast<const float*>(p) + 16);
  } else {
    const __m512i v = _mm512_loadu_si512(p);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
}

// ------------------------------------------------------------------------------------------ rows layout
template <int R, int TB, bool F32>
void RowsMK(const gptoss::DenseTask& t, int64_t n0, int64_t m0, bool prefetch) {
  constexpr int64_t E = F32 ? 4 : 2;  // bytes per weight
  const int64_t K = t.K, kfull = K & ~int64_t{31};
  const char* w[R];
  for (int r = 0; r < R; ++r) w[r] = static_cast<const char*>(t.w) + (n0 + r) * K * E;
  const float* x[TB];
  for (int i = 0; i < TB; ++i) x[i] = t.x + (m0 + i) * t.ldx;
  __m512 acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < TB; ++i) acc[r][i] = _mm512_setzero_ps();
  auto step = [&](int64_t k, const __m512 (&wa)[R], const __m512 (&wb)[R]) {
#pragma GCC unroll 4
    for (int i = 0; i < TB; ++i) {
      const __m512 xa = _mm512_loadu_ps(x[i] + k), xb = _mm512_loadu_ps(x[i] + k + 16);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][i] = _mm512_fmadd_ps(wb[r], xb, _mm512_fmadd_ps(wa[r], xa, acc[r][i]));
    }
  };
  for (int64_t k = 0; k < kfull; k += 32) {
    __m512 wa[R], wb[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if (kRowPrefetch > 0 && prefetch) {
        _mm_prefetch(w[r] + k * E + kRowPrefetch, _MM_HINT_T0);
        if (F32) _mm_prefetch(w[r] + k * E + kRowPrefetch + 64, _MM_HINT_T0);
      }
      LoadW<F32>(w[r] + k * E, wa[r], wb[r]);
    }
    step(k, wa, wb);
  }
  if (kfull < K) {  // the tail: missing weights read as 0 and meet the zero padding of x
    const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << (K - kfull)) - 1);
    __m512 wa[R], wb[R];
    for (int r = 0; r < R; ++r) LoadW<F32>(w[r] + kfull * E, m, wa[r], wb[r]);
    step(kfull, wa, wb);
  }
  for (int i = 0; i < TB; ++i)
    for (int r = 0; r < R; ++r) t.y[(m0 + i) * t.N + n0 + r] = _mm512_reduce_add_ps(acc[r][i]);
}

template <int R, bool F32>
void RowsTokens(const gptoss::DenseTask& t, int64_t n0, int64_t m0, int64_t nt, bool prefetch) {
  switch (nt) {
    case 1: RowsMK<R, 1, F32>(t, n0, m0, prefetch); break;
    case 2: RowsMK<R, 2, F32>(t, n0, m0, prefetch); break;
    case 3: RowsMK<R, 3, F32>(t, n0, m0, prefetch); break;
    default: RowsMK<R, 4, F32>(t, n0, m0, prefetch); break;
  }
}

// One token, one row at a time: the task's rows are one forward stream. On a Zen 4 VM the unembedding (201088 x 2880,
// two cores) reads as fast this way as from four quarter streams when the machine is slow (30-33 GB/s) and 4-8 %
// faster when it is fast (46-52 vs 45-49 GB/s; 150 interleaved rounds); a plain read loop there: one stream per core
// 50 GB/s, four 41 (on the Zen 3 of dense_avx2.cc four far-apart streams were the faster).
template <bool F32>
void RowOne(const gptoss::DenseTask& t, int64_t n) {
  constexpr int64_t E = F32 ? 4 : 2;
  const int64_t K = t.K, kfull = K & ~int64_t{127};
  const char* w = static_cast<const char*>(t.w) + n * K * E;
  const float* x = t.x;
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = 0; k < kfull; k += 128) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      __m512 wa, wb;
      LoadW<F32>(w + (k + 32 * u) * E, wa, wb);
      acc[u] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(x + k + 32 * u + 16),
                               _mm512_fmadd_ps(wa, _mm512_loadu_ps(x + k + 32 * u), acc[u]));
    }
  }
  for (int64_t k = kfull; k < K; k += 32) {  // missing weights read as 0 and meet the zero padding of x
    const __mmask32 m = K - k >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    __m512 wa, wb;
    LoadW<F32>(w + k * E, m, wa, wb);
    acc[0] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(x + k + 16), _mm512_fmadd_ps(wa, _mm512_loadu_ps(x + k), acc[0]));
  }
  t.y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

template <bool F32>
void Rows(const gptoss::DenseTask& t) {
  if (t.M == 1) {
    for (int64_t n = t.lo; n < t.hi; ++n) RowOne<F32>(t, n);
    return;
  }
  constexpr int kR = 4, kTB = 4;
  for (int64_t n = t.lo; n < t.hi; n += kR) {
    const int64_t nr = t.hi - n < kR ? t.hi - n : kR;
    for (int64_t m0 = 0; m0 < t.M; m0 += kTB) {
      const int64_t nt = t.M - m0 < kTB ? t.M - m0 : kTB;
      const bool prefetch = m0 == 0;  // later token blocks find the rows in L1
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
#ifndef GPTOSS_DENSE_KG
#define GPTOSS_DENSE_KG 16
#endif
#ifndef GPTOSS_DENSE_COLS_PREFETCH
#define GPTOSS_DENSE_COLS_PREFETCH 1024
#endif
constexpr int kKG = GPTOSS_DENSE_KG;                              // input rows per sweep across the strip
constexpr int64_t kColsPrefetch = GPTOSS_DENSE_COLS_PREFETCH;  // bytes ahead along the strip's rows (0: off)

// A strip of y holds, per 32-column block of width w, bf16 accumulators as "split": the ceil(w/2) even columns,
// then the floor(w/2) odd ones (the natural order once the strip is done; fp32 weights keep the natural order).
struct Block {
  __mmask16 a, b;  // lanes of the two vectors that hold columns
  int64_t b_at;    // where the second vector starts
  Block(int64_t width, bool natural) {
    const int64_t na = natural ? (width < 16 ? width : 16) : (width + 1) / 2;
    const int64_t nb = width - na;
    a = static_cast<__mmask16>((1u << na) - 1), b = static_cast<__mmask16>((1u << nb) - 1), b_at = na;
  }
};

// y[m0 + i, n0 : n0 + width] += sum_{g < G} x[m0 + i, k0 + g] W[k0 + g, n0 : n0 + width], y strip in split order.
template <int TB, int G, bool F32>
void ColsMK(const gptoss::DenseTask& t, int64_t n0, int64_t width, int64_t m0, int64_t k0, bool first,
            const char* pf, int64_t pf_stride) {
  constexpr int64_t E = F32 ? 4 : 2;
  const int64_t ws = t.N * E;
  if (kColsPrefetch > 0 && pf != nullptr)
    for (int g = 0; g < G; ++g) {
      _mm_prefetch(pf + g * pf_stride, _MM_HINT_T0);
      if (F32) _mm_prefetch(pf + g * pf_stride + 64, _MM_HINT_T0);
    }
  const Block blk(width, F32);
  __m512 acc[TB][2];
  for (int i = 0; i < TB; ++i) {
    float* y = t.y + (m0 + i) * t.N + n0;
    acc[i][0] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(blk.a, y);
    acc[i][1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(blk.b, y + blk.b_at);
  }
  const char* w = static_cast<const char*>(t.w) + (k0 * t.N + n0) * E;
  const float* x = t.x + m0 * t.ldx + k0;
  const __mmask32 m = width >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << width) - 1);
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g) {
    __m512 wa, wb;
    if (width >= 32)
      LoadW<F32>(w + g * ws, wa, wb);
    else
      LoadW<F32>(w + g * ws, m, wa, wb);
#pragma GCC unroll 8
    for (int i = 0; i < TB; ++i) {
      const __m512 xk = _mm512_set1_ps(x[i * t.ldx + g]);
      acc[i][0] = _mm512_fmadd_ps(wa, xk, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(wb, xk, acc[i][1]);
    }
  }
  for (int i = 0; i < TB; ++i) {
    float* y = t.y + (m0 + i) * t.N + n0;
    _mm512_mask_storeu_ps(y, blk.a, acc[i][0]);
    _mm512_mask_storeu_ps(y + blk.b_at, blk.b, acc[i][1]);
  }
}

template <int G, bool F32>
void ColsTokens(int64_t nt, const gptoss::DenseTask& t, int64_t n0, int64_t width, int64_t m0, int64_t k0,
                bool first, const char* pf, int64_t pf_stride) {
  switch (nt) {
    case 1: ColsMK<1, G, F32>(t, n0, width, m0, k0, first, pf, pf_stride); break;
    case 2: ColsMK<2, G, F32>(t, n0, width, m0, k0, first, pf, pf_stride); break;
    case 3: ColsMK<3, G, F32>(t, n0, width, m0, k0, first, pf, pf_stride); break;
    case 4: ColsMK<4, G, F32>(t, n0, width, m0, k0, first, pf, pf_stride); break;
    case 5: ColsMK<5, G, F32>(t, n0, width, m0, k0, first, pf, pf_stride); break;
    case 6: ColsMK<6, G, F32>(t, n0, width, m0, k0, first, pf, pf_stride); break;
    case 7: ColsMK<7, G, F32>(t, n0, width, m0, k0, first, pf, pf_stride); break;
    default: ColsMK<8, G, F32>(t, n0, width, m0, k0, first, pf, pf_stride); break;
  }
}

// Split order -> natural order, for every 32-column block of the strip.
void Unsplit(const gptoss::DenseTask& t) {
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t mi = 0; mi < t.M; ++mi)
    for (int64_t n0 = t.lo; n0 < t.hi; n0 += 32) {
      const int64_t width = t.hi - n0 < 32 ? t.hi - n0 : 32;
      const Block split(width, false), natural(width, true);
      float* y = t.y + mi * t.N + n0;
      const __m512 even = _mm512_maskz_loadu_ps(split.a, y), odd = _mm512_maskz_loadu_ps(split.b, y + split.b_at);
      _mm512_mask_storeu_ps(y, natural.a, _mm512_permutex2var_ps(even, lo_idx, odd));
      _mm512_mask_storeu_ps(y + 16, natural.b, _mm512_permutex2var_ps(even, hi_idx, odd));
    }
}

// One token (decode), as dense_avx2.cc's ColsOne (why: there): kOneRows input rows at a time, one from each quarter
// of the task's K range, each read once along the strip, y accumulating in place (split order, as in ColsMK).
constexpr int kOneRows = 4;

// y[lo, hi) += sum_r x[k_r] W[k_r, lo:hi) over R input rows at w[r] (+= unless first).
template <int R, bool F32>
void OneRows(const gptoss::DenseTask& t, const char* const* w, const float* xk, bool first) {
  constexpr int64_t E = F32 ? 4 : 2;
  __m512 xv[R];
  for (int r = 0; r < R; ++r) xv[r] = _mm512_set1_ps(xk[r]);
  for (int64_t n0 = t.lo; n0 < t.hi; n0 += 32) {
    const int64_t width = t.hi - n0 < 32 ? t.hi - n0 : 32;
    const Block blk(width, F32);
    const __mmask32 m = width >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << width) - 1);
    float* y = t.y + n0;
    __m512 a = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(blk.a, y);
    __m512 b = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(blk.b, y + blk.b_at);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m512 wa, wb;
      LoadW<F32>(w[r] + n0 * E, m, wa, wb);
      a = _mm512_fmadd_ps(wa, xv[r], a);
      b = _mm512_fmadd_ps(wb, xv[r], b);
    }
    _mm512_mask_storeu_ps(y, blk.a, a);
    _mm512_mask_storeu_ps(y + blk.b_at, blk.b, b);
  }
}

template <bool F32>
void ColsOne(const gptoss::DenseTask& t) {
  constexpr int64_t E = F32 ? 4 : 2;
  const int64_t ws = t.N * E, rs = t.K / kOneRows;  // input row j + r * rs is stream r's j-th
  const char* base = static_cast<const char*>(t.w);
  for (int64_t j = 0; j < rs; ++j) {
    const char* w[kOneRows];
    float xk[kOneRows];
    for (int r = 0; r < kOneRows; ++r) w[r] = base + (j + r * rs) * ws, xk[r] = t.x[j + r * rs];
    OneRows<kOneRows, F32>(t, w, xk, j == 0);
  }
  for (int64_t k = kOneRows * rs; k < t.K; ++k) {  // the K tail, one row at a time
    const char* w = base + k * ws;
    OneRows<1, F32>(t, &w, t.x + k, k == 0);
  }
  if (!F32) Unsplit(t);
}

// The strip [lo, hi) of y: sweeps of kKG input rows across the strip, 32 columns by TB <= 8 tokens at a time
// (a sweep's weights, kKG x strip, are reused from L1 by further token blocks); each sweep prefetches
// kColsPrefetch bytes ahead along its rows, continuing into the next sweep's rows near the strip's end.
template <bool F32>
void Cols(const gptoss::DenseTask& t) {
  if (t.M == 1) return ColsOne<F32>(t);
  constexpr int64_t E = F32 ? 4 : 2, kTB = 8;
  const char* w = static_cast<const char*>(t.w);
  const int64_t strip = (t.hi - t.lo) * E, ws = t.N * E;
  for (int64_t k0 = 0; k0 < t.K;) {
    const int64_t rows = t.K - k0 >= kKG ? kKG : 1;
    for (int64_t m0 = 0; m0 < t.M; m0 += kTB) {
      const int64_t nt = t.M - m0 < kTB ? t.M - m0 : kTB;
      for (int64_t n0 = t.lo; n0 < t.hi; n0 += 32) {
        const int64_t width = t.hi - n0 < 32 ? t.hi - n0 : 32;
        const char* pf = nullptr;
        if (m0 == 0 && rows == kKG) {
          const int64_t ahead = (n0 - t.lo) * E + kColsPrefetch;
          pf = ahead < strip ? w + k0 * ws + t.lo * E + ahead : w + (k0 + kKG) * ws + t.lo * E + (ahead - strip);
        }
        if (rows == kKG)
          ColsTokens<kKG, F32>(nt, t, n0, width, m0, k0, k0 == 0, pf, ws);
        else
          ColsTokens<1, F32>(nt, t, n0, width, m0, k0, k0 == 0, nullptr, ws);
      }
    }
    k0 += rows;
  }
  if (!F32) Unsplit(t);
}

}  // namespace

void gptoss::dense_rows_avx512(const DenseTask& t) { t.w_f32 ? Rows<true>(t) : Rows<false>(t); }
void gptoss::dense_cols_avx512(const DenseTask& t) { t.w_f32 ? Cols<true>(t) : Cols<false>(t); }
