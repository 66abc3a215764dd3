// The AMX tile algorithm, shared by the real tile unit (mxfp4_amx.cc) and its portable emulation
// (mxfp4_amx_emulated.cc), so that the emulation, which runs on every CPU, tests the same scratch layout, tile
// order, strides and C-tile -> y transpose as the hardware path. Include it inside an anonymous namespace, after
// mxfp4_kernel.h and <atomic> / <string.h>, once these are defined:
//   struct TileRegs                 the tile registers (empty on real hardware; a plain array when emulated)
//   AMX_ZERO(regs, c), AMX_LOAD(regs, tile, base, stride), AMX_DOT(regs, c, a, b), AMX_STORE(regs, tile, base,
//   stride)                         tilezero / tileloadd / tdpbf16ps / tilestored, with literal tile numbers
//                                   (GCC's intrinsics paste them into the instruction text)
//   void configure(), release()     ldtilecfg (every tile 16 rows x 64 bytes) / tilerelease
//   void dequantize_block(const uint8_t* w, const uint16_t* table, uint16_t* dst)
//                                   one 16-byte block -> its 32 bf16 values in k order, via the scale byte's
//                                   16-entry row of AmxTile::bf16_lut
// It defines amx_mxfp4 and amx_bf16, the bodies of tile_amx* (mxfp4_kernel.h).
//   A (tmm0, tmm1) = 16 weight rows x 32 k each, in the checkpoint's k order: byte j of a block holds elements 2j
//                    (low nibble) and 2j+1 (high), already the pairwise order TDPBF16PS wants along k;
//   B (tmm2, tmm3) = 32 k x 16 tokens each, from inputs the driver packed as [k/2][token] pairs (pack_token);
//   C (tmm4..7)    = 16 rows x 16 tokens fp32, transposed into y at the end.

// The scratch layout [row tile (2)][block g][16 rows][32 values]: where row r's block 0 goes.
inline uint16_t* scratch_row(uint16_t* buf, int64_t G, int r) { return buf + (r >> 4) * G * 512 + (r & 15) * 32; }

// Rows [0, rows) of an MXFP4 tile -> bf16 scratch; missing rows (a tail tile) are zero.
inline void dequantize(const gptoss::AmxTile& t, uint16_t* out) {
  for (int r = 0; r < 32; ++r) {
    uint16_t* dst = scratch_row(out, t.G, r);
    if (r >= t.rows) {
      for (int64_t g = 0; g < t.G; ++g) memset(dst + g * 512, 0, 64);
      continue;
    }
    const uint8_t* w = t.w + r * t.G * 16;
    const uint8_t* s = t.s + r * t.G;
    for (int64_t g = 0; g < t.G; ++g) dequantize_block(w + 16 * g, t.bf16_lut + 16 * s[g], dst + g * 512);
  }
}

// Rows [0, rows) of dense bf16 weights (K = G * 32 each) -> the zero-padded scratch, for a tail of < 32 rows.
inline void copy_rows(const gptoss::AmxTile& t, const uint16_t* w, uint16_t* out) {
  for (int r = 0; r < 32; ++r)
    for (int64_t g = 0; g < t.G; ++g) {
      uint16_t* dst = scratch_row(out, t.G, r) + g * 512;
      if (r < t.rows)
        memcpy(dst, w + r * t.G * 32 + g * 32, 64);
      else
        memset(dst, 0, 64);
    }
}

// Accumulates NB token tiles (1 or 2) starting at token tile `tt` over all blocks, then writes y. The A tiles
// of block g are at a0 + g * step and a1 + g * step (bf16 elements), rows `stride` bytes apart.
template <int NB>
void run_tokens(const gptoss::AmxTile& t, const uint16_t* a0, const uint16_t* a1, int64_t step, int64_t stride,
                int64_t tt) {
  TileRegs regs;
  static_cast<void>(regs);  // (empty on real hardware)
  const uint32_t* xb0 = t.xb + tt * t.G * 256;  // a token tile: G * 16 pair-rows of 16 tokens
  const uint32_t* xb1 = xb0 + t.G * 256;
  AMX_ZERO(regs, 4);
  AMX_ZERO(regs, 5);
  if (NB == 2) {
    AMX_ZERO(regs, 6);
    AMX_ZERO(regs, 7);
  }
  for (int64_t g = 0; g < t.G; ++g) {
    AMX_LOAD(regs, 0, a0 + g * step, stride);
    AMX_LOAD(regs, 1, a1 + g * step, stride);
    AMX_LOAD(regs, 2, xb0 + g * 256, 64);
    AMX_DOT(regs, 4, 0, 2);
    AMX_DOT(regs, 5, 1, 2);
    if (NB == 2) {
      AMX_LOAD(regs, 3, xb1 + g * 256, 64);
      AMX_DOT(regs, 6, 0, 3);
      AMX_DOT(regs, 7, 1, 3);
    }
  }
  alignas(64) float c[4][16][16];  // [row tile + 2 * token tile][row][token]
  AMX_STORE(regs, 4, c[0], 64);
  AMX_STORE(regs, 5, c[1], 64);
  if (NB == 2) {
    AMX_STORE(regs, 6, c[2], 64);
    AMX_STORE(regs, 7, c[3], 64);
  }
  for (int b = 0; b < NB; ++b)
    for (int i = 0; i < 16; ++i) {
      const int64_t tok = (tt + b) * 16 + i;
      if (tok >= t.ntok) break;
      float* y = t.y[tok] + t.col0;
      for (int r = 0; r < t.rows; ++r) y[r] = c[2 * b + (r >> 4)][r & 15][i];
    }
}

inline void run_all_tokens(const gptoss::AmxTile& t, const uint16_t* a0, const uint16_t* a1, int64_t step,
                           int64_t stride) {
  // the scratch was written by plain stores; the tile loads are asm the compiler cannot see reading it
  std::atomic_signal_fence(std::memory_order_seq_cst);
  const int64_t tiles = (t.ntok + 15) / 16;
  int64_t tt = 0;
  for (; tt + 2 <= tiles; tt += 2) run_tokens<2>(t, a0, a1, step, stride, tt);
  if (tt < tiles) run_tokens<1>(t, a0, a1, step, stride, tt);
}

inline void amx_mxfp4(const gptoss::AmxTile& t) {
  configure();
  dequantize(t, t.wbuf);
  run_all_tokens(t, t.wbuf, t.wbuf + t.G * 512, 512, 64);
  release();
}

inline void amx_bf16(const gptoss::AmxTile& t) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(t.w);
  const int64_t K = t.G * 32;
  configure();
  if (t.rows == 32) {  // A tiles straight from the weight rows
    run_all_tokens(t, w, w + 16 * K, 32, 2 * K);
  } else {  // a tail: copy the rows into the zero-padded scratch layout first
    copy_rows(t, w, t.wbuf);
    run_all_tokens(t, t.wbuf, t.wbuf + t.G * 512, 512, 64);
  }
  release();
}
