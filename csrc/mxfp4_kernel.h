// MXFP4 x fp32 matmul micro-kernels: the interface shared by the per-ISA translation units and the driver.
//
// Weights stay in the checkpoint layout: for expert e and output row n, the packed row is
// blocks[e, n, :, :] (G blocks of 16 bytes, low nibble = even element, high nibble = odd element) and
// scales[e, n, :] (G E8M0 bytes, value 2**(s - 127)). Inputs are pre-permuted once per call ("xp" layout):
// within each 32-element block, the 16 even elements come first, then the 16 odd ones, so a vector of low
// nibbles multiplies a contiguous vector of x. The AVX2 tile reads "xq" instead (xq_position below).
// Accumulation is fp32.
//
// Each ISA translation unit (scalar / AVX2 / AVX-512; the tile paths AVX-512 BF16 / AMX) is compiled with its own
// -m flags and exposes only its extern tile functions (declared below); nothing else in it has external linkage, so
// no AVX-512 code can leak into a shared inline symbol used by another path.
#ifndef GPTOSS_MXFP4_KERNEL_H_
#define GPTOSS_MXFP4_KERNEL_H_

#include <stdint.h>

namespace gptoss {

// One unit of work: `rows` consecutive output rows of one expert, times `ntok` input rows.
struct Tile {
  const uint8_t* w;       // packed bytes of the first row; row r starts at w + r * G * 16
  const uint8_t* s;       // scale bytes of the first row; row r starts at s + r * G
  int64_t G;              // blocks per row (K / 32)
  int64_t rows;           // output rows in this tile
  const float* const* x;  // ntok pointers to xp- (or xq-) permuted input rows of K floats
  int64_t ntok;
  float* const* y;        // ntok pointers to output rows; writes y[t][col0 + r]
  int64_t col0;
  const float* scale_lut;  // 256 floats: E8M0 byte -> 2**(s-127) (255 -> NaN)
  const uint8_t* xi = nullptr;  // one token's input in the x16 layout below (x16 GEMVs), or null: fp32 x only
  bool x8 = false;              // xi is in the x8 layout below instead
};

// The one-token GEMVs' integer input ("x16"; the AVX2 and AVX-512 VNNI kernels), written by the driver once per
// token. Each 32-block of x is rounded to q * 2**(E - 13), E = floor(log2 max|x|) of the block, q an integer in
// [-16384, 16383]: 15-bit block floating point, off by at most 2**-14 * max|x| of the block per element (bf16
// elements within 2**6 of the block's largest are exact). The weights are looked up as the unsigned bytes
// 2 * value + 12 and multiplied with the two signed bytes of q = 128 h + l (vpmaddubsw, vpdpbusd); -12 * sum(q)
// corrects the offset. Per 8 blocks, kX16GroupBytes: for each pair of blocks (2p, 2p + 1), 4 x 32 bytes, l of the
// even elements, l of the odd, h of the even, h of the odd (byte i of 128-bit lane L is element 2i, or 2i + 1, of
// block 2p + L); then 8 int32 -12 * sum(q) and 8 floats 2**(E - 14), both for the group's blocks in the order 0, 2,
// 4, 6, 1, 3, 5, 7 (the order in which the AVX2 kernel's vphaddd leave the block sums). Blocks past the last whole
// group run on the fp32 path.
constexpr int64_t kX16Blocks = 8, kX16GroupBytes = 4 * 128 + 32 + 32;
// The x8 input (opt-in, gptoss_mxfp4_set_gemv_input(2); the x16 kernels): each 32-block of x becomes q * d with
// d = max|x| / 127 and q = rint(x * (127 / max|x|)) in [-127, 127] (fp32 division and product, then round half to
// even), as llama.cpp's Q8_0 (with an fp32 d): off by at most d / 2 = max|x| / 254 of the block per element, so half
// the integer products of x16. Per 8 blocks, kX8GroupBytes: for each 4 blocks (4p .. 4p + 3), 2 x 64 bytes, q of the
// even elements, then of the odd (byte i of 128-bit lane L is element 2i, or 2i + 1, of block 4p + L); then 8 int32
// -12 * sum(q) and 8 floats d / 2, both in x16's block order 0, 2, 4, 6, 1, 3, 5, 7. Blocks past the last whole
// group run on the fp32 path, as for x16.
constexpr int64_t kX8GroupBytes = 4 * 64 + 32 + 32;
// Write one token's x (K fp32 or bf16 values) as its x16 or x8 input, K / 32 / kX16Blocks groups at `out` (64-byte
// aligned; mxfp4_gemv_input.cc). False, leaving the token on the fp32 path, where a block's exponent could leave the
// range the kernels' scale products assume: a non-finite element, or a block whose largest magnitude is >= 2**60 or
// nonzero below 2**-100. The caller runs them with IEEE subnormals (ExactFp): subnormal x must count as nonzero.
bool PrepareX16(const void* x, bool x_bf16, int64_t K, uint8_t* out);
bool PrepareX8(const void* x, bool x_bf16, int64_t K, uint8_t* out);
// E2M1 code -> the unsigned weight byte 2 * value + 12 the x16 and x8 kernels multiply (a vpshufb table).
#define GPTOSS_X16_WEIGHT_BYTES 12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0

using TileFn = void (*)(const Tile&);

// The driver's grouped (several-token) tasks: at most kGroupRows rows of one expert times kGroupTokens of its inputs.
constexpr int64_t kGroupRows = 16, kGroupTokens = 64;

// The transposed product (the input gradient dx = W^T dy): blocks [g0, g1) of the K axis of one expert, for `ntok`
// tokens, each summed over all `rows` rows of the expert. Written in the natural k order (not "xp").
struct TTile {
  const uint8_t* w;        // packed bytes of the expert's row 0; row n starts at w + n * G * 16
  const uint8_t* s;        // scale bytes of row 0; row n starts at s + n * G
  int64_t G;               // blocks per row (K / 32)
  int64_t rows;            // N, the reduction length
  int64_t g0, g1;          // the blocks this tile writes
  const float* dy;         // dy[n * ntok + t]: row n's output gradient for token t (token-minor)
  int64_t ntok;
  float* const* dx;        // ntok output rows of G * 32 floats; writes dx[t][32 * g0 .. 32 * g1)
  const float* scale_lut;  // as in Tile
};

using TTileFn = void (*)(const TTile&);

// "xq": where element j (0..31) of a 32-block sits in the input row the AVX2 tile reads; the order its byte-shuffle
// decode produces (mxfp4_avx2.cc, Decoder). static: no shared symbol across the per-ISA units.
static constexpr int xq_position(int j) { return (j & 16) + 8 * ((j >> 1) & 1) + 4 * (j & 1) + ((j & 15) >> 2); }

// E2M1 code -> value; bit 3 is the sign.
alignas(64) static const float kE2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                            -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// The AMX path (bf16 inputs, grouped): up to 32 output rows of one expert times `ntok` inputs packed in token
// tiles of 16, [G * 16 pair-rows][16 tokens] uint32 (two bf16 consecutive along k), zero-padded.
struct AmxTile {
  const uint8_t* w;        // as in Tile
  const uint8_t* s;
  int64_t G;
  int64_t rows;            // <= 32
  const uint32_t* xb;      // ceil(ntok / 16) token tiles of G * 256 uint32
  int64_t ntok;
  float* const* y;         // ntok output rows; writes y[t][col0 + r]
  int64_t col0;
  const uint16_t* bf16_lut;  // 32-byte aligned [256 scale bytes][16 codes]: the scaled E2M1 values as bf16
  uint16_t* wbuf;          // 64-byte aligned scratch of 2 * G * 512 bf16 (the dequantized rows)
};

using AmxFn = void (*)(const AmxTile&);

// The AVX-512 BF16 path (bf16 inputs; CPUs with VDPBF16PS but no AMX): up to kDpRows output rows of one expert, or
// of a dense bf16 weight, times `ntok` bf16 input rows read in place.
constexpr int64_t kDpRows = 64;
struct DpTile {
  const uint8_t* w;          // MXFP4 rows as in Tile, or (s == nullptr) bf16 rows of G * 32, row r at w + r * G * 64
  const uint8_t* s;          // scale bytes as in Tile, or null for dense bf16 rows
  int64_t G;
  int64_t rows;              // <= kDpRows
  const uint16_t* const* x;  // ntok bf16 input rows of G * 32, in k order
  int64_t ntok;
  float* const* y;           // ntok output rows; writes y[t][col0 + r]
  int64_t col0;
  const uint16_t* bf16_lut;  // as in AmxTile (MXFP4 only)
};

void tile_scalar(const Tile& t);
void tile_avx2(const Tile& t);    // linked in when GPTOSS_HAVE_AVX2 is defined
void tile_avx512(const Tile& t);  // linked in when GPTOSS_HAVE_AVX512 is defined
void tile_amx(const AmxTile& t);  // linked in when GPTOSS_HAVE_AMX is defined
void tile_dp_bf16(const DpTile& t);  // mxfp4_avx512bf16.cc, linked in when GPTOSS_HAVE_AVX512BF16 is defined
// The one-token GEMV on t.xi (x16; t.x: the fp32 "xp" input for blocks past the last group), AVX-512 VNNI
// (mxfp4_avx512vnni.cc, linked in when GPTOSS_HAVE_AVX512VNNI is defined).
void gemv_x16_avx512vnni(const Tile& t);
// The same on the x8 input (t.x8).
void gemv_x8_avx512vnni(const Tile& t);
// The transposed product; no AMX version (an AMX CPU runs tile_t_avx512).
void tile_t_scalar(const TTile& t);
void tile_t_avx2(const TTile& t);
void tile_t_avx512(const TTile& t);
// The same for dense bf16 rows: w points at `rows` rows of G * 32 bf16 (row r at w + r * G * 64 bytes).
void tile_amx_bf16(const AmxTile& t);
// The same two on a portable emulation of the tile instructions (mxfp4_amx_emulated.cc, every build; for tests).
void tile_amx_emulated(const AmxTile& t);
void tile_amx_bf16_emulated(const AmxTile& t);
// This thread's 64-byte aligned AmxTile::wbuf for rows of G blocks (grown as needed, reused across calls).
uint16_t* amx_scratch(int64_t G);
// Writes token i's bf16 row (K elements, K % 32 == 0) into the AMX token tiles at `tiles` (zeroed beforehand).
void pack_token(const uint16_t* x_row, int64_t K, int64_t i, uint32_t* tiles);
// Whether tile_amx* may run: compiled in, CPU support, and the OS's permission (requested on the first call).
bool amx_usable();
// Whether tile_dp_bf16 may run: compiled in and the CPU has AVX512_BF16 (and the AVX-512 F/BW/DQ/VL it builds on).
bool dp_bf16_usable();

}  // namespace gptoss

#endif  // GPTOSS_MXFP4_KERNEL_H_
