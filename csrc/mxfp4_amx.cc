// AMX MXFP4 tile for bf16 inputs (compiled with -mamx-tile -mamx-bf16 -mavx512bf16 and the AVX-512 flags; called
// only when the CPU has AMX-BF16 and the OS granted this process the tile state).
//
// Prefill is compute bound, and the AVX-512 fp32 FMA path tops out near 150 GFLOP/s on two cores. Here a tile of
// up to 32 output rows is dequantized once, exactly, to bf16 (an E2M1 value times 2**(s-127) has one mantissa
// bit, so bf16 holds it; a 16-entry table per scale byte, looked up with vpermw; subnormal weights, |w| < 2**-126,
// act as zero in TDPBF16PS) into an L2-resident scratch buffer, and TDPBF16PS multiplies it with the tokens' bf16 inputs, accumulating in fp32:
//   A (tmm0, tmm1) = 16 weight rows x 32 k each, straight from the scratch in the checkpoint's k order: byte j
//                    of a block holds elements 2j (low nibble) and 2j+1 (high), which is already the pairwise
//                    (VNNI) order TDPBF16PS wants along k;
//   B (tmm2, tmm3) = 32 k x 16 tokens each, from inputs the driver packed as [k/2][token] pairs;
//   C (tmm4..7)    = 16 rows x 16 tokens fp32, transposed into y at the end.
// tile_amx_bf16 is the same product for dense bf16 weight rows (the unembedding [V, D] in a full-logits prefill):
// the A tiles load straight from the weight, no dequantization.
#include <immintrin.h>
#include <string.h>

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

// Rows [0, rows) of the tile -> bf16 scratch laid out [row tile (2)][block g][16 rows][32 values]; missing
// rows (a tail tile) are zero.
void dequantize(const gptoss::AmxTile& t, uint16_t* out) {
  const __m512i low = _mm512_set1_epi32(0xF);
  for (int r = 0; r < 32; ++r) {
    uint16_t* dst = out + (r >> 4) * t.G * 512 + (r & 15) * 32;
    if (r >= t.rows) {
      for (int64_t g = 0; g < t.G; ++g) _mm512_store_si512(dst + g * 512, _mm512_setzero_si512());
      continue;
    }
    const uint8_t* w = t.w + r * t.G * 16;
    const uint8_t* s = t.s + r * t.G;
    for (int64_t g = 0; g < t.G; ++g) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + 16 * g)));
      // dword j = (low nibble j) | (high nibble j) << 16: the word indices of elements 2j and 2j+1
      const __m512i idx = _mm512_or_si512(_mm512_and_si512(v, low), _mm512_slli_epi32(_mm512_srli_epi32(v, 4), 16));
      const __m256i table = _mm256_load_si256((const __m256i*)(t.bf16_lut + 16 * s[g]));
      const __m512i vals = _mm512_permutexvar_epi16(idx, _mm512_castsi256_si512(table));
      _mm512_store_si512(dst + g * 512, vals);
    }
  }
}

// Accumulates NB token tiles (1 or 2) starting at token tile `tt` over all blocks, then writes y. The A tiles
// of block g are at a0 + g * step and a1 + g * step (bf16 elements), rows `stride` bytes apart.
template <int NB>
void run_tokens(const gptoss::AmxTile& t, const uint16_t* a0, const uint16_t* a1, int64_t step, int64_t stride,
                int64_t tt) {
  const uint32_t* xb0 = t.xb + tt * t.G * 256;  // a token tile: G * 16 pair-rows of 16 tokens
  const uint32_t* xb1 = xb0 + t.G * 256;
  _tile_zero(4);
  _tile_zero(5);
  if (NB == 2) {
    _tile_zero(6);
    _tile_zero(7);
  }
  for (int64_t g = 0; g < t.G; ++g) {
    _tile_loadd(0, a0 + g * step, stride);
    _tile_loadd(1, a1 + g * step, stride);
    _tile_loadd(2, xb0 + g * 256, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 1, 2);
    if (NB == 2) {
      _tile_loadd(3, xb1 + g * 256, 64);
      _tile_dpbf16ps(6, 0, 3);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  alignas(64) float c[4][16][16];  // [row tile + 2 * token tile][row][token]
  _tile_stored(4, c[0], 64);
  _tile_stored(5, c[1], 64);
  if (NB == 2) {
    _tile_stored(6, c[2], 64);
    _tile_stored(7, c[3], 64);
  }
  for (int b = 0; b < NB; ++b)
    for (int i = 0; i < 16; ++i) {
      const int64_t tok = (tt + b) * 16 + i;
      if (tok >= t.ntok) break;
      float* y = t.y[tok] + t.col0;
      for (int r = 0; r < t.rows; ++r) y[r] = c[2 * b + (r >> 4)][r & 15][i];
    }
}

void run_all_tokens(const gptoss::AmxTile& t, const uint16_t* a0, const uint16_t* a1, int64_t step, int64_t stride) {
  const int64_t tiles = (t.ntok + 15) / 16;
  int64_t tt = 0;
  for (; tt + 2 <= tiles; tt += 2) run_tokens<2>(t, a0, a1, step, stride, tt);
  if (tt < tiles) run_tokens<1>(t, a0, a1, step, stride, tt);
}

}  // namespace

void gptoss::tile_amx(const gptoss::AmxTile& t) {
  configure();
  dequantize(t, t.wbuf);
  run_all_tokens(t, t.wbuf, t.wbuf + t.G * 512, 512, 64);
  _tile_release();
}

void gptoss::tile_amx_bf16(const gptoss::AmxTile& t) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(t.w);
  const int64_t K = t.G * 32;
  configure();
  if (t.rows == 32) {  // A tiles straight from the weight rows
    run_all_tokens(t, w, w + 16 * K, 32, 2 * K);
  } else {  // a tail: copy the rows into the zero-padded scratch layout first
    for (int r = 0; r < 32; ++r)
      for (int64_t g = 0; g < t.G; ++g) {
        uint16_t* dst = t.wbuf + (r >> 4) * t.G * 512 + (r & 15) * 32 + g * 512;
        if (r < t.rows)
          memcpy(dst, w + r * K + g * 32, 64);
        else
          memset(dst, 0, 64);
      }
    run_all_tokens(t, t.wbuf, t.wbuf + t.G * 512, 512, 64);
  }
  _tile_release();
}
