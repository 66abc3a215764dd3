// One MXFP4 block as bf16, for the units compiled with AVX-512 BW (mxfp4_amx.cc, mxfp4_avx512bf16.cc): the 16 bytes
// of a block -> its 32 values in k order as 16 dwords, dword j = (element 2j, low nibble of byte j) | (element 2j + 1,
// high nibble) << 16, each looked up in `table`, the block's scale byte's row of 16 bf16 values (the scaled E2M1
// codes; mxfp4_matmul.cc's Bf16Lut, 32-byte aligned). static: no shared symbol across the per-ISA units.
#ifndef GPTOSS_MXFP4_BF16_BLOCK_H_
#define GPTOSS_MXFP4_BF16_BLOCK_H_

#include <immintrin.h>
#include <stdint.h>

static inline __m512i gptoss_bf16_block(const uint8_t* w, const uint16_t* table) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w));
  const __m512i idx =
      _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(0xF)), _mm512_slli_epi32(_mm512_srli_epi32(v, 4), 16));
  return _mm512_permutexvar_epi16(idx, _mm512_castsi256_si512(_mm256_load_si256((const __m256i*)table)));
}

#endif  // GPTOSS_MXFP4_BF16_BLOCK_H_
