// Dense matmul with bf16 (or fp32) weights, y [M, N] fp32 = x [M, K] . W: the interface shared by the
// per-ISA translation units (dense_scalar.cc, dense_avx2.cc, dense_avx512.cc, dense_avx512bf16.cc) and the driver
// (dense_matmul.cc).
//
// Two weight layouts, both read in place:
//   rows (w_nk = 1): W is [N, K], row n holds output n's weights (a dot product per output row);
//   cols (w_nk = 0): W is [K, N], input-major (each input row k scales a row of N weights).
// bf16 -> fp32 is exact (the bf16 bits are the top half of the fp32); every product and sum is fp32.
//
// The driver prepares the inputs once per call as fp32 rows of `ldx` floats (zero padded past K). For the
// AVX-512 rows path with bf16 weights each 32-element block of x is stored as its 16 even elements, then its
// 16 odd ones (`perm_x`): one 64-byte load of 32 bf16 weights then yields the even weights by a left shift
// and the odd ones by masking each dword's low half, each matching a contiguous vector of x.
#ifndef GPTOSS_DENSE_KERNEL_H_
#define GPTOSS_DENSE_KERNEL_H_

#include <stdint.h>

namespace gptoss {

// One task: outputs [lo, hi) (rows of W for the rows layout, columns for the cols layout) for all M tokens.
struct DenseTask {
  const void* w;   // the whole weight, [N, K] (rows) or [K, N] (cols)
  bool w_f32;      // fp32 weights (else bf16)
  const float* x;  // M prepared input rows, ldx floats apart
  int64_t ldx;
  float* y;        // [M, N] row-major
  int64_t M, K, N;
  int64_t lo, hi;
  const uint16_t* xb = nullptr;  // dense_rows_bf16 only: the M tokens' bf16 x, each zero padded to ldx elements
};

using DenseFn = void (*)(const DenseTask&);

// dense_cols_avx2 runs a compute-bound panel GEMM from this many tokens (the driver then splits only columns; for W
// [N, K] the driver calls dense_rows_panel_avx2, the same GEMM on panels transposed from W's rows). Its x
// comes packed by the driver (DenseTask::x, ldx unused): per chunk c of kColsPanelK rows of K, per tile of
// kColsPanelTB tokens, [k][kColsPanelTB] floats, at x + (c * tiles + tile) * kColsPanelK * kColsPanelTB
// (tiles = ceil(M / kColsPanelTB); a short last chunk or tile leaves its unused floats unread).
constexpr int64_t kColsPanelMinTokens = 8, kColsPanelK = 128, kColsPanelTB = 6;

void dense_rows_scalar(const DenseTask& t);
void dense_cols_scalar(const DenseTask& t);
// AVX2 + FMA and AVX-512 (F + BW) paths; the driver checks that they were linked in and that the CPU has them.
void dense_rows_avx2(const DenseTask& t);
void dense_cols_avx2(const DenseTask& t);
// AVX2's panel GEMM (kColsPanelMinTokens or more, x packed as for dense_cols_avx2) on W [N, K].
void dense_rows_panel_avx2(const DenseTask& t);
void dense_rows_avx512(const DenseTask& t);
void dense_cols_avx512(const DenseTask& t);
// A few tokens (the driver: 1-3), bf16 x and bf16 W [N, K] on VDPBF16PS (CPUs with AVX512_BF16; t.xb set): each
// weight load serves up to 4 tokens, each token's sum in the same order whatever M is.
void dense_rows_bf16(const DenseTask& t);

}  // namespace gptoss

#endif  // GPTOSS_DENSE_KERNEL_H_
