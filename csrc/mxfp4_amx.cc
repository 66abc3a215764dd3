// AMX MXFP4 tile for bf16 inputs (compiled with -mamx-tile -mamx-bf16 -mavx512bf16 and the AVX-512 flags; called
// only when the CPU has AMX-BF16 and the OS granted this process the tile state).
//
// Prefill is compute bound, and the AVX-512 fp32 FMA path tops out near 150 GFLOP/s on two cores. Here a tile of
// up to 32 output rows is dequantized once, exactly, to bf16 (an E2M1 value times 2**(s-127) has one mantissa
// bit, so bf16 holds it; a 16-entry table per scale byte, looked up with vpermw; subnormal weights, |w| < 2**-126,
// act as zero in TDPBF16PS) into an L2-resident scratch buffer, and TDPBF16PS multiplies it with the tokens' bf16
// inputs, accumulating in fp32. The algorithm (layout, tile order, transpose into y) is mxfp4_amx_loop.h, shared
// with the portable emulation in mxfp4_amx_emulated.cc; this file supplies the instructions.
// tile_amx_bf16 is the same product for dense bf16 weight rows (the unembedding [V, D] in a full-logits prefill):
// the A tiles load straight from the weight, no dequantization.
#include <immintrin.h>
#include <string.h>

#include <atomic>

#include "mxfp4_bf16_block.h"
#include "mxfp4_kernel.h"

namespace {

// TILECFG memory layout (palette 1): byte 0 palette, bytes 16.. colsb[16] (u16), bytes 48.. rows[16] (u8).
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure() {
  TileConfig cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;  // every tile is 16 x 64 bytes
  _tile_loadconfig(&cfg);
}

void release() { _tile_release(); }

struct TileRegs {};  // the hardware's tmm0..7

#define AMX_ZERO(regs, c) _tile_zero(c)
#define AMX_LOAD(regs, tile, base, stride) _tile_loadd(tile, base, stride)
#define AMX_DOT(regs, c, a, b) _tile_dpbf16ps(c, a, b)
#define AMX_STORE(regs, tile, base, stride) _tile_stored(tile, base, stride)

void dequantize_block(const uint8_t* w, const uint16_t* table, uint16_t* dst) {
  _mm512_store_si512(dst, gptoss_bf16_block(w, table));
}

#include "mxfp4_amx_loop.h"

}  // namespace

void gptoss::tile_amx(const gptoss::AmxTile& t) { amx_mxfp4(t); }
void gptoss::tile_amx_bf16(const gptoss::AmxTile& t) { amx_bf16(t); }
