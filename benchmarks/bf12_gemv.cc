// A prototype, not part of the library: one-token GEMV over a bf16 W [N, K] read as bf16 or as "bf12", a lossless
// 12.25-bit form of the same weights (benchmarks/RESULTS.md, "A lossless 12-bit form of the bf16 weights").
// Built and run by bf12_gemv.py (AVX512_BF16 + AVX512_VBMI); prints one JSON object.
//
// bf12, per row: G bytes H_g = (largest exponent of block g) >> 1, then per 32-block 48 bytes: the 32 weights' low
// bf16 bytes as they are (exponent LSB, 7 mantissa bits) and 16 bytes of 4-bit codes (code j in the low nibble of
// byte j for j < 16, the high nibble of byte j - 16 otherwise): sign << 3 | (H - (exponent >> 1)) for 0..6, or
// sign << 3 | 7 for a zero (its low byte 0: exact) or an exception (a nonzero weight > ~13 binades below the block's
// largest, or subnormal; decoded as zero here: a per-row list would add it back, and the check below counts them).
// "plain" is the same information decoded with shifts (sign, exponent and mantissa assembled), to show what the
// table decode saves: per row G exponent bytes E_g (the block's largest), 32 bytes sign << 7 | mantissa, 16 bytes
// of 4-bit offsets E - exponent (0..14; 15 = zero or exception).
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <thread>
#include <vector>

namespace {

uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

void gemv_bf16(const uint16_t* W, const uint16_t* x, float* y, int64_t r0, int64_t r1, int64_t K) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* w = W + r * K;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
    y[r] = _mm512_reduce_add_ps(acc);
  }
}

// The table decode: per 32 weights one load, a shift, vpermt2b (low bytes to the even bytes, codes to the odd), an
// and, and a masked vpshufb through the block's 16-entry high-byte table (3 operations to build).
void gemv_bf12(const uint8_t* W, const uint16_t* x, float* y, int64_t r0, int64_t r1, int64_t K) {
  const int64_t G = K / 32, row = G * 49;
  alignas(64) uint8_t idx[64], offs[64], sign[64];
  for (int j = 0; j < 32; ++j) idx[2 * j] = j, idx[2 * j + 1] = j < 16 ? 32 + j : 64 + 32 + (j - 16);
  for (int c = 0; c < 64; ++c) offs[c] = c & 7, sign[c] = (c & 8) << 4;
  const __m512i vidx = _mm512_load_si512(idx), voffs = _mm512_load_si512(offs), vsign = _mm512_load_si512(sign);
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __mmask64 odd = 0xAAAAAAAAAAAAAAAAull;
  __mmask64 valid = 0;  // table entries with an offset (7: zero, the sign only)
  for (int c = 0; c < 64; ++c) valid |= static_cast<__mmask64>((c & 7) != 7) << c;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* h = W + r * row;
    const uint8_t* b = h + G;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g, b += 48) {
      const __m512i table = _mm512_or_si512(_mm512_maskz_sub_epi8(valid, _mm512_set1_epi8(h[g]), voffs), vsign);
      const __m512i z = _mm512_loadu_si512(b);  // 16 bytes past the block: the row's padding or the next block
      const __m512i p = _mm512_permutex2var_epi8(z, vidx, _mm512_srli_epi16(z, 4));
      const __m512i v = _mm512_mask_shuffle_epi8(p, odd, table, _mm512_and_si512(p, low_nibbles));
      acc = _mm512_dpbf16_ps(acc, (__m512bh)v, (__m512bh)_mm512_loadu_si512(x + 32 * g));
    }
    y[r] = _mm512_reduce_add_ps(acc);
  }
}

void gemv_plain(const uint8_t* W, const uint16_t* x, float* y, int64_t r0, int64_t r1, int64_t K) {
  const int64_t G = K / 32, row = G * 49;
  const __m512i m80 = _mm512_set1_epi16(0x80), m7f = _mm512_set1_epi16(0x7F), f15 = _mm512_set1_epi16(15);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* e = W + r * row;
    const uint8_t* b = e + G;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g, b += 48) {
      const __m512i sm = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
      const __m256i n16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32)));
      const __m512i off = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(n16, _mm256_set1_epi16(15))),
                                             _mm256_srli_epi16(n16, 4), 1);
      const __m512i ex = _mm512_slli_epi16(_mm512_sub_epi16(_mm512_set1_epi16(e[g]), off), 7);
      __m512i v = _mm512_ternarylogic_epi32(_mm512_slli_epi16(_mm512_and_si512(sm, m80), 8),
                                            _mm512_and_si512(sm, m7f), ex, 0xFE);  // a | b | c
      v = _mm512_mask_mov_epi16(v, _mm512_cmpeq_epi16_mask(off, f15), _mm512_setzero_si512());
      acc = _mm512_dpbf16_ps(acc, (__m512bh)v, (__m512bh)_mm512_loadu_si512(x + 32 * g));
    }
    y[r] = _mm512_reduce_add_ps(acc);
  }
}

// Packs W's rows; returns the exceptions (nonzero weights decoded as zero).
int64_t pack_bf12(const uint16_t* W, int64_t N, int64_t K, uint8_t* out) {
  const int64_t G = K / 32;
  int64_t exceptions = 0;
  for (int64_t r = 0; r < N; ++r) {
    uint8_t* h = out + r * G * 49;
    uint8_t* b = h + G;
    for (int64_t g = 0; g < G; ++g, b += 48) {
      const uint16_t* w = W + r * K + 32 * g;
      int emax = 0;
      for (int j = 0; j < 32; ++j) emax = std::max(emax, (w[j] >> 7) & 0xFF);
      const int H = emax >> 1;
      h[g] = static_cast<uint8_t>(H);
      memset(b + 32, 0, 16);
      for (int j = 0; j < 32; ++j) {
        const int e = (w[j] >> 7) & 0xFF, off = H - (e >> 1), s = w[j] >> 15;
        int code = s << 3 | off, low = w[j] & 0xFF;
        if (e == 0 || off >= 7) {
          code = s << 3 | 7;
          exceptions += (w[j] & 0x7FFF) != 0;
          low = 0;
        }
        b[j] = static_cast<uint8_t>(low);
        b[32 + (j & 15)] |= static_cast<uint8_t>(code << (j < 16 ? 0 : 4));
      }
    }
  }
  return exceptions;
}

int64_t pack_plain(const uint16_t* W, int64_t N, int64_t K, uint8_t* out) {
  const int64_t G = K / 32;
  int64_t exceptions = 0;
  for (int64_t r = 0; r < N; ++r) {
    uint8_t* e = out + r * G * 49;
    uint8_t* b = e + G;
    for (int64_t g = 0; g < G; ++g, b += 48) {
      const uint16_t* w = W + r * K + 32 * g;
      int emax = 0;
      for (int j = 0; j < 32; ++j) emax = std::max(emax, (w[j] >> 7) & 0xFF);
      e[g] = static_cast<uint8_t>(emax);
      memset(b + 32, 0, 16);
      for (int j = 0; j < 32; ++j) {
        const int ex = (w[j] >> 7) & 0xFF;
        int off = emax - ex;
        if (ex == 0 || off >= 15) {
          off = 15;
          exceptions += (w[j] & 0x7FFF) != 0;
        }
        b[j] = static_cast<uint8_t>(((w[j] >> 8) & 0x80) | (w[j] & 0x7F));
        b[32 + (j & 15)] |= static_cast<uint8_t>(off << (j < 16 ? 0 : 4));
      }
    }
  }
  return exceptions;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? atol(argv[1]) : 201088, K = 2880, G = K / 32;
  const int rounds = argc > 2 ? atoi(argv[2]) : 40;
  const int threads = argc > 3 ? atoi(argv[3]) : 2;
  std::mt19937 gen(0);
  std::normal_distribution<float> normal(0, 0.02f);
  const size_t huge = size_t{2} << 20, packed = N * G * 49;
  auto alloc = [&](size_t bytes) { return static_cast<uint8_t*>(aligned_alloc(huge, (bytes + 64 + huge) / huge * huge)); };
  uint16_t* W = reinterpret_cast<uint16_t*>(alloc(N * K * 2));
  for (int64_t i = 0; i < N * K; ++i) W[i] = to_bf16(normal(gen));
  uint8_t* B12 = alloc(packed);
  uint8_t* PL = alloc(packed);
  const int64_t exc12 = pack_bf12(W, N, K, B12), exc_plain = pack_plain(W, N, K, PL);
  std::vector<uint16_t> x(K);
  for (auto& v : x) v = to_bf16(normal(gen) * 50);

  std::vector<float> ys[3] = {std::vector<float>(N), std::vector<float>(N), std::vector<float>(N)};
  auto run = [&](int mode) {
    const auto t0 = std::chrono::steady_clock::now();
    auto part = [&](int64_t a, int64_t b) {
      if (mode == 0) gemv_bf16(W, x.data(), ys[0].data(), a, b, K);
      if (mode == 1) gemv_bf12(B12, x.data(), ys[1].data(), a, b, K);
      if (mode == 2) gemv_plain(PL, x.data(), ys[2].data(), a, b, K);
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(part, N * t / threads, N * (t + 1) / threads);
    part(0, N / threads);
    for (auto& t : pool) t.join();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  for (int m = 0; m < 3; ++m) run(m);
  // Same products in the same order where a row has no exception: equal; else off by the dropped terms.
  double worst[3] = {0, 0, 0}, scale = 0;
  for (int64_t r = 0; r < N; ++r) {
    scale = std::max(scale, static_cast<double>(std::fabs(ys[0][r])));
    for (int m = 1; m < 3; ++m) worst[m] = std::max(worst[m], static_cast<double>(std::fabs(ys[m][r] - ys[0][r])));
  }
  std::vector<double> t[3];
  int order[3] = {0, 1, 2};
  for (int i = 0; i < rounds; ++i) {
    std::shuffle(order, order + 3, gen);
    for (int m : order) t[m].push_back(run(m));
  }
  printf("{\"N\": %ld, \"K\": %ld, \"threads\": %d, \"rounds\": %d, \"bf16_bytes\": %ld, \"packed_bytes\": %zu, ", N, K,
         threads, rounds, N * K * 2, packed);
  printf("\"exceptions\": {\"bf12\": %ld, \"plain\": %ld}, \"max_abs_diff\": {\"bf12\": %.3g, \"plain\": %.3g}, "
         "\"max_abs_y\": %.3g, \"seconds\": {", exc12, exc_plain, worst[1], worst[2], scale);
  const char* names[3] = {"bf16", "bf12", "plain"};
  for (int m = 0; m < 3; ++m) {
    printf("\"%s\": [", names[m]);
    for (int i = 0; i < rounds; ++i) printf("%s%.6f", i ? ", " : "", t[m][i]);
    printf("]%s", m < 2 ? ", " : "");
  }
  printf("}, \"median_s\": {\"bf16\": %.6f, \"bf12\": %.6f, \"plain\": %.6f}}\n", median(t[0]), median(t[1]),
         median(t[2]));
  return 0;
}
