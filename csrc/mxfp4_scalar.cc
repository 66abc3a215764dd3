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

#include "mxfp4_tile_loop.h"

}  // namespace

void gptoss::tile_scalar(const gptoss::Tile& t) { run_tile<MK, 4, 2, 8, 16>(t); }
