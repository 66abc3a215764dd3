// One-token attention over a KV cache: the problem shared by the driver (attention_decode.cc) and its AVX2 unit.
#ifndef GPTOSS_ATTENTION_KERNEL_H_
#define GPTOSS_ATTENTION_KERNEL_H_

#include <stdint.h>

#include <cstring>
#include <vector>

namespace gptoss {

struct DecodeAttention {
  const void* q;  // [B, N, H] before RoPE, fp32 or bf16 (q_bf16)
  bool q_bf16;
  const void* k_new;  // [B, K, H] the new key (before RoPE) and value, both fp32 or both bf16 (new_bf16)
  const void* v_new;
  bool new_bf16;
  const float* cos;  // [B, H / 2] RoPE tables of the query's position
  const float* sin;
  void* k;  // [B, S, K, H] caches (updated in place), both fp32 or both bf16 (kv_bf16)
  void* v;
  bool kv_bf16;
  const void* sinks;  // [N]
  bool sinks_bf16;
  const int32_t* q_pos;  // [B]
  const int32_t* k_pos;  // [B, S]; < 0: an empty slot (already holds the new key's position)
  const int64_t* slot;   // [B]: where row b's new key and value go; < 0: dropped (not written)
  float* o;              // [B, N, H]
  int64_t B, S, N, K, H;
  int64_t window;  // 0: none
  float scale;
};

// Element i of an fp32 or bf16 array. static: no shared inline symbol across units built with different ISA flags.
static inline float ValueAt(const void* p, bool bf16, int64_t i) {
  if (!bf16) return static_cast<const float*>(p)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// fp32 -> bf16, rounded to nearest even (NaN stays NaN), as jnp's astype.
static inline uint16_t ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// f rounded to the precision of an array of that dtype.
static inline float RoundTo(bool bf16, float f) {
  if (!bf16) return f;
  const uint32_t bits = static_cast<uint32_t>(ToBf16(f)) << 16;
  float r;
  std::memcpy(&r, &bits, 4);
  return r;
}

// Slot s of row b may be attended: 0 <= k_pos <= q_pos and, with a window W, k_pos > q_pos - W.
static inline void AllowedSlots(const DecodeAttention& a, int64_t b, std::vector<int64_t>& slots) {
  const int64_t qp = a.q_pos[b];
  const int32_t* kp = a.k_pos + b * a.S;
  slots.clear();
  for (int64_t s = 0; s < a.S; ++s)
    if (kp[s] >= 0 && kp[s] <= qp && (a.window <= 0 || kp[s] > qp - a.window)) slots.push_back(s);
}

// Task b * K + kh: row b's query heads kh * G .. kh * G + G - 1 (G = N / K), given as q_GH (fp32, after RoPE),
// against its allowed slots of kv head kh (the new key already written). The AVX2 + FMA version
// (attention_avx2.cc) needs H % 8 == 0.
void attend_task_avx2(const DecodeAttention& a, int64_t task, const float* q_GH);

}  // namespace gptoss

#endif  // GPTOSS_ATTENTION_KERNEL_H_
