// The x16 one-token GEMVs' shared steps (mxfp4_kernel.h: the x16 layout), included inside the anonymous namespace of
// the AVX2 and AVX-512 VNNI kernels, each compiled with its own ISA flags; both take them from here so that their
// results stay equal bit for bit. (No #includes here on purpose: every definition lands in the includer's anonymous
// namespace.)

// The 8 lane sums of a, in the order both kernels reduce a row's accumulator.
inline float hsum(__m256 a) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// A group's 8 block scales times x's: 2**(s - 127) (s = 0 -> 0, a lost 2**-127; 255 -> inf, made NaN) times xs[j]
// (x16: 2**(E - 14); x8: d / 2), in x16's block order 0, 2, 4, 6, 1, 3, 5, 7 (sg: the row's 8 scale bytes of the
// group). IEEE rounding handles the products that leave fp32's range.
inline __m256 block_scales(const uint8_t* sg, const float* xs) {
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m256i sb =
      _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sg)), order));
  return _mm256_or_ps(_mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(sb, 23)),
                                    _mm256_load_ps(xs)),
                      _mm256_castsi256_ps(_mm256_cmpeq_epi32(sb, _mm256_set1_epi32(255))));
}
// The same with x16's scales (xg: the group's x16 input).
inline __m256 x16_scales(const uint8_t* sg, const uint8_t* xg) {
  return block_scales(sg, reinterpret_cast<const float*>(xg + 544));
}
