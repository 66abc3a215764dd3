// AVX2 + FMA one-token attention task (compiled with -mavx2 -mfma; see attention_decode.cc): the allowed cache rows
// of one kv head are widened to fp32 kChunk rows at a time into an L1 scratch that all G query heads of the kv head
// read (four rows at a time, four FMA chains); the softmax runs in fp32 with the sink; the values are widened the same
// way and each chunk adds to the G heads' outputs (8 floats per FMA). Chunks: a whole long cache widened at once
// (1 MiB per kv head at 4096 slots, H = 64) would be read G times from L3 per step.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention_kernel.h"

namespace {

// n rows of H values (row i at p + at[i] elements) -> out [n, H] fp32; the rows kPrefetchRows ahead are prefetched
// (cache rows of one kv head lie K * H elements apart).
constexpr int64_t kPrefetchRows = 8;

void Widen(const void* p, bool bf16, const int64_t* at, int64_t n, int64_t H, float* out) {
  const char* base = static_cast<const char*>(p);
  const int64_t esize = bf16 ? 2 : 4, bytes = H * esize;
  for (int64_t i = 0; i < n; ++i, out += H) {
    if (i + kPrefetchRows < n)
      for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(base + at[i + kPrefetchRows] * esize + l, _MM_HINT_T0);
    if (!bf16) {
      std::memcpy(out, static_cast<const float*>(p) + at[i], H * sizeof(float));
      continue;
    }
    const uint16_t* s = static_cast<const uint16_t*>(p) + at[i];
    for (int64_t h = 0; h < H; h += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + h)));
      _mm256_storeu_ps(out + h, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
  }
}

inline float Hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

inline float Hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

// e**x for x <= 0 (softmax terms), 8 at a time, as std::exp's ~25 cycles each were a third of the task: x = k ln2 + r
// (|r| <= ln2 / 2, ln2 in two parts), e**r = 1 + r + r**2 P(r) with Cephes' degree-5 expf coefficients (~2 ulp), times
// 2**k. Below -87.3 it gives ~1e-38 instead of a smaller number (each softmax sum has a term 1); NaN stays NaN (vmaxps
// returns its second operand when either is NaN).
inline __m256 Exp(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
  const __m256 k =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

}  // namespace

void gptoss::attend_task_avx2(const DecodeAttention& a, int64_t task, const float* q) {
  constexpr int64_t kChunk = 64;  // rows widened at a time: 16 KiB of fp32 at H = 64
  const int64_t b = task / a.K, kh = task % a.K, G = a.N / a.K, H = a.H;
  thread_local std::vector<int64_t> slots, rows;
  thread_local std::vector<float> buf;
  AllowedSlots(a, b, slots);
  const int64_t n = static_cast<int64_t>(slots.size());
  rows.resize(slots.size());
  for (int64_t i = 0; i < n; ++i) rows[i] = ((b * a.S + slots[i]) * a.K + kh) * H;
  buf.resize(static_cast<size_t>(kChunk * H + G * n + 8));
  float* kv = buf.data();    // [kChunk, H]: a chunk of keys, later of values
  float* p = kv + kChunk * H;  // [G, n]: logits, then weights
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t cn = std::min(kChunk, n - c0);
    Widen(a.k, a.kv_bf16, rows.data() + c0, cn, H, kv);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * H;
      float* pg = p + g * n + c0;
      int64_t i = 0;
      for (; i + 4 <= cn; i += 4) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t h = 0; h < H; h += 8) {
          const __m256 x = _mm256_loadu_ps(qg + h);
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(kv + (i + j) * H + h), acc[j]);
        }
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) pg[i + j] = Hsum(acc[j]) * a.scale;
      }
      for (; i < cn; ++i) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t h = 0; h < H; h += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + h), _mm256_loadu_ps(kv + i * H + h), acc);
        pg[i] = Hsum(acc) * a.scale;
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * n;
    const float sink = ValueAt(a.sinks, a.sinks_bf16, kh * G + g);
    __m256 vm = _mm256_set1_ps(sink);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(pg + j));
    float m = Hmax(vm);
    for (; j < n; ++j) m = std::max(m, pg[j]);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
      const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(pg + j), mv));
      _mm256_storeu_ps(pg + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    float denom = Hsum(sum) + std::exp(sink - m);
    for (; j < n; ++j) denom += pg[j] = std::exp(pg[j] - m);
    const __m256 inv = _mm256_set1_ps(1.0f / denom);
    for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(pg + j, _mm256_mul_ps(_mm256_loadu_ps(pg + j), inv));
    for (; j < n; ++j) pg[j] *= 1.0f / denom;
    std::fill(a.o + (b * a.N + kh * G + g) * H, a.o + (b * a.N + kh * G + g + 1) * H, 0.0f);
  }
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t cn = std::min(kChunk, n - c0);
    Widen(a.v, a.kv_bf16, rows.data() + c0, cn, H, kv);
    for (int64_t g = 0; g < G; ++g) {
      const float* pg = p + g * n + c0;
      float* out = a.o + (b * a.N + kh * G + g) * H;
      int64_t h0 = 0;
      for (; h0 + 64 <= H; h0 += 64) {  // 8 accumulators of 8 floats (registers: a fixed count)
        __m256 acc[8];
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(out + h0 + 8 * c);
        for (int64_t j = 0; j < cn; ++j) {
          const __m256 pj = _mm256_broadcast_ss(pg + j);
          const float* vr = kv + j * H + h0;
#pragma GCC unroll 8
          for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * c), acc[c]);
        }
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + h0 + 8 * c, acc[c]);
      }
      for (; h0 < H; h0 += 8) {  // the rest, 8 at a time
        __m256 acc = _mm256_loadu_ps(out + h0);
        for (int64_t j = 0; j < cn; ++j)
          acc = _mm256_fmadd_ps(_mm256_broadcast_ss(pg + j), _mm256_loadu_ps(kv + j * H + h0), acc);
        _mm256_storeu_ps(out + h0, acc);
      }
    }
  }
}
