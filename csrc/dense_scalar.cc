// Portable dense matmul: plain C++, the fallback on any CPU and the twin the AVX-512 path is tested against.
// Inputs arrive unpermuted (x[m * ldx + k] is element k of token m).
#include <cstring>

#include "dense_kernel.h"

namespace {

inline float Weight(const void* w, bool f32, int64_t i) {
  if (f32) return static_cast<const float*>(w)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(w)[i]) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

}  // namespace

void gptoss::dense_rows_scalar(const DenseTask& t) {
  for (int64_t n = t.lo; n < t.hi; ++n)
    for (int64_t m = 0; m < t.M; ++m) {
      const float* x = t.x + m * t.ldx;
      float acc = 0.0f;
      for (int64_t k = 0; k < t.K; ++k) acc += Weight(t.w, t.w_f32, n * t.K + k) * x[k];
      t.y[m * t.N + n] = acc;
    }
}

void gptoss::dense_cols_scalar(const DenseTask& t) {
  for (int64_t m = 0; m < t.M; ++m) {
    float* y = t.y + m * t.N;
    for (int64_t n = t.lo; n < t.hi; ++n) y[n] = 0.0f;
  }
  for (int64_t k = 0; k < t.K; ++k)
    for (int64_t m = 0; m < t.M; ++m) {
      const float xk = t.x[m * t.ldx + k];
      float* y = t.y + m * t.N;
      for (int64_t n = t.lo; n < t.hi; ++n) y[n] += xk * Weight(t.w, t.w_f32, k * t.N + n);
    }
}
