// One decode step of attention for XLA:CPU, as an XLA FFI handler: RoPE, the KV cache write and attention over it.
//
//   q [B, 1, N, H], k_new, v_new [B, 1, K, H] (before RoPE; f32 or bf16), cos, sin [B, 1, H / 2] f32,
//   k and v caches [B, S, K, H] (f32 or bf16), k_pos [B, S], sinks [N], q_pos [B, 1] (int32)
//   -> o [B, 1, N, H] f32, and the caches and k_pos updated (aliased to the inputs: written in place)
//
// The same as gptoss.layers.attention's decode step (apply_rope, LayerCache.write, attend) for one query per row:
// RoPE in fp32, rounded back to the input's dtype; the new key and value go to slot q_pos (a ring: q_pos % S; a
// negative position, or one past a linear cache, is not written); query head n reads kv head n // (N / K); slot s
// is allowed when 0 <= k_pos <= q_pos and, with a window W > 0, k_pos > q_pos - W; each head's sink is one more
// logit (not scaled) with no value; softmax and sums in fp32. Why: XLA:CPU spends ~0.2-0.4 ms per layer on the
// attention itself (converting and transposing the whole cache to fp32, a batched dot for 8 queries per kv head, the
// softmax ops), and its cache write runs over the whole cache (a loop fusion with a convert, not in place) and then
// copies it: ~0.15 ms a layer at 256 slots, growing with the cache. Here one task per (row, kv head) on the library's
// thread pool writes that head's new key and value and reads the cache in place.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "attention_kernel.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace gptoss {
// Weak: null when attention_avx2.cc was not built (no x86-64, or a compiler without AVX2).
void attend_task_avx2(const DecodeAttention& a, int64_t task, const float* q_GH) __attribute__((weak));

namespace {

constexpr int64_t kMaxHeadDim = 256, kMaxGroup = 64;
std::atomic<int> g_decode_attention_isa{1};  // 0: the portable task everywhere (tests); 1: AVX2 where it can

// The portable task (any CPU, any H): the same steps as attend_task_avx2, one row and query head at a time.
void TaskScalar(const DecodeAttention& a, int64_t task, const float* q_GH) {
  const int64_t b = task / a.K, kh = task % a.K, G = a.N / a.K, H = a.H;
  thread_local std::vector<int64_t> slots;
  thread_local std::vector<float> logits;
  AllowedSlots(a, b, slots);
  const int64_t n = static_cast<int64_t>(slots.size());
  logits.resize(static_cast<size_t>(n));
  for (int64_t g = 0; g < G; ++g) {
    const int64_t head = kh * G + g;
    const float* qg = q_GH + g * H;
    const float sink = ValueAt(a.sinks, a.sinks_bf16, head);
    float m = sink;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = ((b * a.S + slots[i]) * a.K + kh) * H;
      float dot = 0.0f;
      for (int64_t h = 0; h < H; ++h) dot += qg[h] * ValueAt(a.k, a.kv_bf16, r + h);
      logits[i] = dot * a.scale;
      m = std::max(m, logits[i]);
    }
    float denom = std::exp(sink - m);
    for (int64_t i = 0; i < n; ++i) denom += logits[i] = std::exp(logits[i] - m);
    float* out = a.o + (b * a.N + head) * H;
    std::fill(out, out + H, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = ((b * a.S + slots[i]) * a.K + kh) * H;
      const float w = logits[i] / denom;
      for (int64_t h = 0; h < H; ++h) out[h] += w * ValueAt(a.v, a.kv_bf16, r + h);
    }
  }
}

bool HaveAvx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return &attend_task_avx2 != nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// x [H] at element `at` (before RoPE) -> out [H]: the halves rotated in fp32 by the row's tables (x1 * cos - x2 * sin,
// x2 * cos + x1 * sin, as apply_rope), rounded to the input's dtype.
void Rope(const void* x, bool bf16, int64_t at, const float* cos, const float* sin, int64_t H, float* out) {
  const int64_t h2 = H / 2;
  for (int64_t i = 0; i < h2; ++i) {
    const float x1 = ValueAt(x, bf16, at + i), x2 = ValueAt(x, bf16, at + h2 + i);
    out[i] = RoundTo(bf16, x1 * cos[i] - x2 * sin[i]);
    out[h2 + i] = RoundTo(bf16, x2 * cos[i] + x1 * sin[i]);
  }
}

void Store(void* cache, bool bf16, int64_t at, const float* x, int64_t n) {
  if (!bf16) {
    std::memcpy(static_cast<float*>(cache) + at, x, n * sizeof(float));
    return;
  }
  uint16_t* c = static_cast<uint16_t*>(cache) + at;
  for (int64_t i = 0; i < n; ++i) c[i] = ToBf16(x[i]);
}

struct Job {
  const DecodeAttention* a;
  bool avx2;
};

// Task (b, kh): writes kv head kh's new key (after RoPE) and value into the row's slot, then attends with the row's
// query heads of that kv head (after RoPE). Only this task touches that head's slot: no race.
void Task(void* ctx, int64_t task) {
  const Job& j = *static_cast<const Job*>(ctx);
  const DecodeAttention& a = *j.a;
  const int64_t b = task / a.K, kh = task % a.K, G = a.N / a.K, H = a.H;
  const float* cos = a.cos + b * (H / 2);
  const float* sin = a.sin + b * (H / 2);
  thread_local std::vector<float> q, kv;
  q.resize(static_cast<size_t>(G * H));
  kv.resize(static_cast<size_t>(H));
  for (int64_t g = 0; g < G; ++g) Rope(a.q, a.q_bf16, (b * a.N + kh * G + g) * H, cos, sin, H, q.data() + g * H);
  if (a.slot[b] >= 0) {
    const int64_t src = (b * a.K + kh) * H, dst = ((b * a.S + a.slot[b]) * a.K + kh) * H;
    Rope(a.k_new, a.new_bf16, src, cos, sin, H, kv.data());
    Store(a.k, a.kv_bf16, dst, kv.data(), H);
    for (int64_t h = 0; h < H; ++h) kv[h] = ValueAt(a.v_new, a.new_bf16, src + h);
    Store(a.v, a.kv_bf16, dst, kv.data(), H);
  }
  if (j.avx2)
    attend_task_avx2(a, task, q.data());
  else
    TaskScalar(a, task, q.data());
}

bool IsFloat(ffi::DataType t) { return t == ffi::F32 || t == ffi::BF16; }

std::string Dims(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// The output buffer of an updated input: the same memory when XLA aliased them (the usual case), else a copy first.
void* InPlace(ffi::AnyBuffer in, ffi::Result<ffi::AnyBuffer> out) {
  if (out->untyped_data() != in.untyped_data()) std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
  return out->untyped_data();
}

ffi::Error Attend(ffi::AnyBuffer q, ffi::AnyBuffer k_new, ffi::AnyBuffer v_new, ffi::Buffer<ffi::F32> cos,
                  ffi::Buffer<ffi::F32> sin, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer k_pos,
                  ffi::AnyBuffer sinks, ffi::Buffer<ffi::S32> q_pos, ffi::ResultBuffer<ffi::F32> o,
                  ffi::Result<ffi::AnyBuffer> k_out, ffi::Result<ffi::AnyBuffer> v_out,
                  ffi::Result<ffi::AnyBuffer> k_pos_out, int64_t window, float scale, int64_t ring) {
  const auto qd = q.dimensions(), knd = k_new.dimensions(), vnd = v_new.dimensions(), cd = cos.dimensions(),
             snd = sin.dimensions(), kd = k.dimensions(), vd = v.dimensions(), sd = sinks.dimensions();
  const auto qpd = q_pos.dimensions(), kpd = k_pos.dimensions();
  auto bad = [&](const std::string& why) {
    return ffi::Error::InvalidArgument("decode attention: " + why + " (q " + Dims(qd) + ", k_new " + Dims(knd) +
                                       ", v_new " + Dims(vnd) + ", cos " + Dims(cd) + ", sin " + Dims(snd) + ", k " +
                                       Dims(kd) + ", v " + Dims(vd) + ", k_pos " + Dims(kpd) + ", sinks " + Dims(sd) +
                                       ", q_pos " + Dims(qpd) + ")");
  };
  if (!IsFloat(q.element_type()) || !IsFloat(k_new.element_type()) || k_new.element_type() != v_new.element_type() ||
      !IsFloat(k.element_type()) || k.element_type() != v.element_type() || !IsFloat(sinks.element_type()) ||
      k_pos.element_type() != ffi::S32)
    return bad("q, the new key and value, sinks and the caches must be float32 or bfloat16 (k and v alike), k_pos "
               "int32");
  if (qd.size() != 4 || knd.size() != 4 || vnd.size() != 4 || cd.size() != 3 || snd.size() != 3 || kd.size() != 4 ||
      vd.size() != 4 || sd.size() != 1 || qpd.size() != 2 || kpd.size() != 2)
    return bad("expected q [B, 1, N, H], k_new and v_new [B, 1, K, H], cos and sin [B, 1, H / 2], caches "
               "[B, S, K, H], k_pos [B, S], sinks [N], q_pos [B, 1]");
  const int64_t B = qd[0], N = qd[2], H = qd[3], S = kd[1], K = kd[2];
  bool same = qd[1] == 1 && kd[0] == B && kd[3] == H && H % 2 == 0 && sd[0] == N && qpd[0] == B && qpd[1] == 1 &&
              kpd[0] == B && kpd[1] == S;
  for (const auto& d : {knd, vnd}) same = same && d[0] == B && d[1] == 1 && d[2] == K && d[3] == H;
  for (const auto& d : {cd, snd}) same = same && d[0] == B && d[1] == 1 && d[2] == H / 2;
  for (int i = 0; i < 4; ++i) same = same && vd[i] == kd[i];
  if (!same) return bad("shapes do not match (head_dim even)");
  if (K == 0 || N % K != 0 || N / K > kMaxGroup || H > kMaxHeadDim)
    return bad("query heads must be a multiple of kv heads (at most " + std::to_string(kMaxGroup) +
               " per kv head), head_dim at most " + std::to_string(kMaxHeadDim));
  void* kc = InPlace(k, k_out);
  void* vc = InPlace(v, v_out);
  int32_t* kp = static_cast<int32_t*>(InPlace(k_pos, k_pos_out));
  std::vector<int64_t> slot(B);  // LayerCache.write of one token per row
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = q_pos.typed_data()[b];
    slot[b] = p < 0 || S == 0 || (!ring && p >= S) ? -1 : p % S;
    if (slot[b] >= 0) kp[b * S + slot[b]] = static_cast<int32_t>(p);
  }
  const DecodeAttention a{q.untyped_data(), q.element_type() == ffi::BF16, k_new.untyped_data(),
                          v_new.untyped_data(), k_new.element_type() == ffi::BF16, cos.typed_data(),
                          sin.typed_data(), kc, vc, k.element_type() == ffi::BF16, sinks.untyped_data(),
                          sinks.element_type() == ffi::BF16, q_pos.typed_data(), kp, slot.data(), o->typed_data(),
                          B, S, N, K, H, window, scale};
  static const bool avx2 = HaveAvx2();
  Job job{&a, avx2 && H % 8 == 0 && g_decode_attention_isa.load() != 0};
  if (B * N * H > 0) pool().Run(B * K, Task, &job);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gptoss

#define GPTOSS_EXPORT __attribute__((visibility("default")))

extern "C" GPTOSS_EXPORT XLA_FFI_Error* GptossDecodeAttention(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossDecodeAttention, gptoss::Attend,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // q
                                  .Arg<ffi::AnyBuffer>()         // k_new
                                  .Arg<ffi::AnyBuffer>()         // v_new
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::AnyBuffer>()         // k cache
                                  .Arg<ffi::AnyBuffer>()         // v cache
                                  .Arg<ffi::AnyBuffer>()         // k_pos
                                  .Arg<ffi::AnyBuffer>()         // sinks
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Ret<ffi::Buffer<ffi::F32>>()  // o
                                  .Ret<ffi::AnyBuffer>()         // k cache, updated
                                  .Ret<ffi::AnyBuffer>()         // v cache, updated
                                  .Ret<ffi::AnyBuffer>()         // k_pos, updated
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("ring"));

// 0: the portable task on every CPU (tests); 1: the AVX2 task where the CPU and H allow it. Returns the setting.
extern "C" GPTOSS_EXPORT int gptoss_decode_attention_set_isa(int isa) {
  gptoss::g_decode_attention_isa.store(isa != 0 ? 1 : 0);
  return gptoss::g_decode_attention_isa.load();
}
