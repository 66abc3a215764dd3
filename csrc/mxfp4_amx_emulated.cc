// The AMX tile path on a portable emulation of the tile instructions (plain C++, no ISA flags, every build): the
// algorithm is mxfp4_amx_loop.h, as in mxfp4_amx.cc, so the driver's packing, scratch and bf16 table and the
// tile loop are tested on CPUs without AMX (ISA "amx_emulated"). Slow; for tests only.
//
// TDPBF16PS as the Intel SDM writes it: for each row m, pair p, column n, C[m][n] += A[m][2p] * B[p][2n], then
// += A[m][2p+1] * B[p][2n+1]; bf16 products are exact in fp32, each sum is rounded to nearest even, denormal
// inputs and results count as zero (DAZ/FTZ, whatever the thread's MXCSR says), MXCSR is not used.
#include <float.h>
#include <math.h>
#include <string.h>

#include <atomic>

#include "mxfp4_kernel.h"

namespace {

std::atomic<int64_t> g_tiles{0};  // tile calls served, for tests (gptoss_amx_emulated_tiles)

void configure() {}
void release() {}

// denormal results count as zero (with their sign)
float flush(float v) { return fabsf(v) < FLT_MIN ? copysignf(0.0f, v) : v; }
float flush(double v) { return static_cast<float>(fabs(v) < FLT_MIN ? copysign(0.0, v) : v); }

float bf16_daz(uint16_t h) {
  if ((h & 0x7F80) == 0) h &= 0x8000;  // a denormal input is a zero
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// tmm0..7, each 16 rows x 64 bytes (the configuration tile_amx uses)
struct TileRegs {
  alignas(64) uint8_t tmm[8][16][64];

  void zero(int c) { memset(tmm[c], 0, sizeof(tmm[c])); }
  void load(int t, const void* base, int64_t stride) {
    for (int r = 0; r < 16; ++r) memcpy(tmm[t][r], static_cast<const char*>(base) + r * stride, 64);
  }
  void store(int t, void* base, int64_t stride) const {
    for (int r = 0; r < 16; ++r) memcpy(static_cast<char*>(base) + r * stride, tmm[t][r], 64);
  }
  void dot(int c, int a, int b) {
    uint16_t A[16][32], B[16][32];
    float C[16][16];
    memcpy(A, tmm[a], sizeof(A));
    memcpy(B, tmm[b], sizeof(B));
    memcpy(C, tmm[c], sizeof(C));
    for (int m = 0; m < 16; ++m)
      for (int p = 0; p < 16; ++p)
        for (int n = 0; n < 16; ++n)
          for (int j = 0; j < 2; ++j) {
            // the product (exact in double, and in fp32 unless it is out of range), then one rounded fp32 sum
            const double prod = static_cast<double>(bf16_daz(A[m][2 * p + j])) * bf16_daz(B[p][2 * n + j]);
            C[m][n] = flush(C[m][n] + flush(prod));
          }
    memcpy(tmm[c], C, sizeof(C));
  }
};

#define AMX_ZERO(regs, c) (regs).zero(c)
#define AMX_LOAD(regs, tile, base, stride) (regs).load(tile, base, stride)
#define AMX_DOT(regs, c, a, b) (regs).dot(c, a, b)
#define AMX_STORE(regs, tile, base, stride) (regs).store(tile, base, stride)

void dequantize_block(const uint8_t* w, const uint16_t* table, uint16_t* dst) {
  for (int j = 0; j < 16; ++j) dst[2 * j] = table[w[j] & 15], dst[2 * j + 1] = table[w[j] >> 4];
}

#include "mxfp4_amx_loop.h"

}  // namespace

void gptoss::tile_amx_emulated(const gptoss::AmxTile& t) {
  g_tiles.fetch_add(1, std::memory_order_relaxed);
  amx_mxfp4(t);
}

void gptoss::tile_amx_bf16_emulated(const gptoss::AmxTile& t) {
  g_tiles.fetch_add(1, std::memory_order_relaxed);
  amx_bf16(t);
}

extern "C" __attribute__((visibility("default"))) int64_t gptoss_amx_emulated_tiles() {
  return g_tiles.load(std::memory_order_relaxed);
}
