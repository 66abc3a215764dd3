// bf12: a lossless 12.25-bit form of a bf16 matrix W [R, K] (K % 32 == 0), for decode's dense GEMVs, which read
// every weight once per token and so run at the memory's speed: 77 % of the bytes is ~1.3x the GEMV.
//
// Within a 32-element block of a row the bf16 exponents span few binades. Per row of G = K / 32 blocks, 49 * G bytes:
//   G bytes   H_g = (the largest 8-bit exponent in block g) >> 1;
//   per block 48 bytes: the 32 weights' low bf16 bytes as they are (exponent LSB and 7 mantissa bits), then 16
//             bytes of 4-bit codes, weight j's in the low nibble of byte j for j < 16, the high nibble of byte
//             j - 16 otherwise: sign << 3 | (H_g - (exponent >> 1)) when that offset is 0..6, else sign << 3 | 7
//             with the low byte 0 (decoded as a signed zero).
// A weight's high bf16 byte is sign << 7 | (exponent >> 1) = sign << 7 | (H_g - offset), so every weight whose offset
// is 0..6 decodes to its exact bits, NaN and Inf included. Code 7 is exact for +-0; the other weights it takes
// (subnormals, and weights more than ~13 binades below their block's largest: ~0.03 % of N(0, sigma) weights) are
// the exceptions, kept beside the rows as (row, column, bf16 bits), sorted, and added back by the kernels.
#ifndef GPTOSS_BF12_KERNEL_H_
#define GPTOSS_BF12_KERNEL_H_

#include <stdint.h>

namespace gptoss {

constexpr int64_t kBf12Block = 32, kBf12BlockBytes = 48, kBf12RowBytesPerBlock = 49;

// Rows [lo, hi) of one GEMV y [M, R] = x [M, K] . W^T on the packed rows (exceptions not included).
struct Bf12Task {
  const uint8_t* w;    // [R, 49 * G]
  const uint16_t* x;   // M rows of K bf16
  float* y;            // [M, R]
  int64_t M, K, R;
  int64_t lo, hi;
};

// Rows [lo, hi) of W decoded to bf16 bits, out [R, K] (exceptions not included).
struct Bf12UnpackTask {
  const uint8_t* w;
  uint16_t* out;
  int64_t K, lo, hi;
};

// The reference (bf12_matmul.cc): fp32 sums over k in order. The AVX-512 path (bf12_avx512.cc; VBMI and BF16):
// VDPBF16PS with the accumulators and order of dense_rows_bf16, so a row without exceptions gives the bits
// the bf16 weight gives there (bf16 subnormals in x read as zero, as that instruction defines).
void bf12_rows_scalar(const Bf12Task& t);
void bf12_unpack_scalar(const Bf12UnpackTask& t);
void bf12_rows_avx512(const Bf12Task& t);
void bf12_unpack_avx512(const Bf12UnpackTask& t);

}  // namespace gptoss

#endif  // GPTOSS_BF12_KERNEL_H_
