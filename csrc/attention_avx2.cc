// AVX2 + FMA one-token attention task (compiled with -mavx2 -mfma; see attention_decode.cc): the allowed cache rows
// of one kv head are widened to fp32 once into an L1/L2 scratch, then each query head's logits take four rows at a
// time (four FMA chains), the softmax runs in fp32 with the sink, and the output sums 8 floats per FMA.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention_kernel.h"

namespace {

// n rows of H values (row i at p + at[i] elements) -> out [n, H] fp32.
void Widen(const void* p, bool bf16, const std::vector<int64_t>& at, int64_t H, float* out) {
  for (size_t i = 0; i < at.size(); ++i, out += H) {
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

}  // namespace

void gptoss::attend_task_avx2(const DecodeAttention& a, int64_t task) {
  const int64_t b = task / a.K, kh = task % a.K, G = a.N / a.K, H = a.H;
  thread_local std::vector<int64_t> slots, rows;
  thread_local std::vector<float> buf;
  AllowedSlots(a, b, slots);
  const int64_t n = static_cast<int64_t>(slots.size());
  rows.resize(slots.size());
  for (int64_t i = 0; i < n; ++i) rows[i] = ((b * a.S + slots[i]) * a.K + kh) * H;
  buf.resize(static_cast<size_t>(G * H + n * H + G * n + 8));
  float* q = buf.data();  // [G, H]
  float* kv = q + G * H;  // [n, H]: keys, then values
  float* p = kv + n * H;  // [G, n]: logits, then weights
  const int64_t q0 = (b * a.N + kh * G) * H;
  for (int64_t i = 0; i < G * H; ++i) q[i] = ValueAt(a.q, a.q_bf16, q0 + i);
  Widen(a.k, a.kv_bf16, rows, H, kv);
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * H;
    float* pg = p + g * n;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t h = 0; h < H; h += 8) {
        const __m256 x = _mm256_loadu_ps(qg + h);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(kv + (i + j) * H + h), acc[j]);
      }
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) pg[i + j] = Hsum(acc[j]) * a.scale;
    }
    for (; i < n; ++i) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t h = 0; h < H; h += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + h), _mm256_loadu_ps(kv + i * H + h), acc);
      pg[i] = Hsum(acc) * a.scale;
    }
    const float sink = ValueAt(a.sinks, a.sinks_bf16, kh * G + g);
    float m = sink;
    for (int64_t j = 0; j < n; ++j) m = std::fmax(m, pg[j]);
    float denom = std::exp(sink - m);
    for (int64_t j = 0; j < n; ++j) denom += pg[j] = std::exp(pg[j] - m);
    const float inv = 1.0f / denom;
    for (int64_t j = 0; j < n; ++j) pg[j] *= inv;
  }
  Widen(a.v, a.kv_bf16, rows, H, kv);
  for (int64_t g = 0; g < G; ++g) {
    const float* pg = p + g * n;
    float* out = a.o + (b * a.N + kh * G + g) * H;
    int64_t h0 = 0;
    for (; h0 + 64 <= H; h0 += 64) {  // 8 accumulators of 8 floats (registers: a fixed count)
      __m256 acc[8];
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_broadcast_ss(pg + j);
        const float* vr = kv + j * H + h0;
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * c), acc[c]);
      }
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + h0 + 8 * c, acc[c]);
    }
    for (; h0 < H; h0 += 8) {  // the rest, 8 at a time
      __m256 acc = _mm256_setzero_ps();
      for (int64_t j = 0; j < n; ++j) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(pg + j), _mm256_loadu_ps(kv + j * H + h0), acc);
      _mm256_storeu_ps(out + h0, acc);
    }
  }
}
