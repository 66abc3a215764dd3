// Portable MXFP4 tile: plain C++, the fallback on any CPU and the twin the vector paths are tested against.
#include "mxfp4_kernel.h"

namespace {

template <int R, int TB>
struct MK {
  static void run(const gptoss::Tile& t, int64_t r0, int64_t t0, int64_t g0, int64_t g1, float* part) {
    const int64_t G = t.G;
    for (int tb = 0; tb < TB; ++tb) {
      const float* x = t.x[t0 + tb];
      for (int r = 0; r < R; ++r) {
        const uint8_t* w = t.w + (r0 + r) * G * 16;
        const uint8_t* s = t.s + (r0 + r) * G;
        float* keep = part ? part + (r * TB + tb) * 16 : nullptr;
        float acc = keep && g0 > 0 ? *keep : 0.0f;
        for (int64_t g = g0; g < g1; ++g) {
          const uint8_t* b = w + 16 * g;
          const float* xe = x + 32 * g;
          float part = 0.0f;
          for (int j = 0; j < 16; ++j)
            part += gptoss::kE2M1[b[j] & 15] * xe[j] + gptoss::kE2M1[b[j] >> 4] * xe[16 + j];
          acc += part * t.scale_lut[s[g]];
        }
        if (keep && g1 < G)
          *keep = acc;
        else
          t.y[t0 + tb][t.col0 + r0 + r] = acc;
      }
    }
  }
};

// The transposed product: partial sums are kept in dx in k order.
template <int B, int TB>
struct MKT {
  static void run(const gptoss::TTile& t, int64_t n0, int64_t n1, int64_t t0, int64_t g) {
    float acc[B][TB][32];
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < TB; ++i)
        for (int k = 0; k < 32; ++k) acc[b][i][k] = n0 > 0 ? t.dx[t0 + i][32 * (g + b) + k] : 0.0f;
    for (int64_t n = n0; n < n1; ++n) {
      const float* dy = t.dy + n * t.ntok + t0;
      for (int b = 0; b < B; ++b) {
        const uint8_t* blk = t.w + (n * t.G + g + b) * 16;
        const float scale = t.scale_lut[t.s[n * t.G + g + b]];
        float w[32];
        for (int j = 0; j < 16; ++j) {
          w[2 * j] = gptoss::kE2M1[blk[j] & 15] * scale;
          w[2 * j + 1] = gptoss::kE2M1[blk[j] >> 4] * scale;
        }
        for (int i = 0; i < TB; ++i)
          for (int k = 0; k < 32; ++k) acc[b][i][k] += dy[i] * w[k];
      }
    }
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < TB; ++i)
        for (int k = 0; k < 32; ++k) t.dx[t0 + i][32 * (g + b) + k] = acc[b][i][k];
  }
};

#include "mxfp4_tile_loop.h"
#include "mxfp4_tile_t_loop.h"

}  // namespace

void gptoss::tile_scalar(const gptoss::Tile& t) { run_tile<MK, 4, 2, 8, 16>(t); }
void gptoss::tile_t_scalar(const gptoss::TTile& t) { run_tile_t<MKT, 1, 1, 4, 64>(t); }
