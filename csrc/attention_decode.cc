// One-token (decode) attention over a KV cache for XLA:CPU, as an XLA FFI handler.
//
//   q [B, 1, N, H], k and v caches [B, S, K, H] (f32 or bf16), sinks [N], q_pos [B, 1], k_pos [B, S] (int32)
//   -> o [B, 1, N, H] f32
//
// The same attention as gptoss.layers.attention.attend for one query per row: query head n reads kv head n // (N / K);
// slot s is allowed when 0 <= k_pos <= q_pos and, with a window W > 0, k_pos > q_pos - W; each head's sink is one
// more logit (not scaled) with no value; softmax and sums in fp32. Why: XLA:CPU spends ~0.2-0.4 ms per layer on this
// step (converting and transposing the whole cache to fp32, a batched dot for 8 queries per kv head, the softmax
// ops, a copy of the cache before its in-place update), where the arithmetic is ~1 MFLOP; here it reads the cache
// in place, one task per (row, kv head) on the library's thread pool.
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
void attend_task_avx2(const DecodeAttention& a, int64_t task) __attribute__((weak));

namespace {

constexpr int64_t kMaxHeadDim = 256, kMaxGroup = 64;
std::atomic<int> g_decode_attention_isa{1};  // 0: the portable task everywhere (tests); 1: AVX2 where it can

// The portable task (any CPU, any H): the same steps as attend_task_avx2, one row and query head at a time.
void TaskScalar(const DecodeAttention& a, int64_t task) {
  const int64_t b = task / a.K, kh = task % a.K, G = a.N / a.K, H = a.H;
  thread_local std::vector<int64_t> slots;
  thread_local std::vector<float> logits;
  AllowedSlots(a, b, slots);
  const int64_t n = static_cast<int64_t>(slots.size());
  logits.resize(static_cast<size_t>(n));
  for (int64_t g = 0; g < G; ++g) {
    const int64_t head = kh * G + g, q0 = (b * a.N + head) * H;
    const float sink = ValueAt(a.sinks, a.sinks_bf16, head);
    float m = sink;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = ((b * a.S + slots[i]) * a.K + kh) * H;
      float dot = 0.0f;
      for (int64_t h = 0; h < H; ++h) dot += ValueAt(a.q, a.q_bf16, q0 + h) * ValueAt(a.k, a.kv_bf16, r + h);
      logits[i] = dot * a.scale;
      m = std::fmax(m, logits[i]);
    }
    float denom = std::exp(sink - m);
    for (int64_t i = 0; i < n; ++i) denom += logits[i] = std::exp(logits[i] - m);
    float* out = a.o + q0;
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

struct Job {
  const DecodeAttention* a;
  bool avx2;
};

void Task(void* ctx, int64_t task) {
  const Job& j = *static_cast<const Job*>(ctx);
  if (j.avx2)
    attend_task_avx2(*j.a, task);
  else
    TaskScalar(*j.a, task);
}

bool IsFloat(ffi::DataType t) { return t == ffi::F32 || t == ffi::BF16; }

std::string Dims(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error Attend(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer sinks,
                  ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> k_pos, ffi::ResultBuffer<ffi::F32> o,
                  int64_t window, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), sd = sinks.dimensions();
  const auto qpd = q_pos.dimensions(), kpd = k_pos.dimensions();
  auto bad = [&](const std::string& why) {
    return ffi::Error::InvalidArgument("decode attention: " + why + " (q " + Dims(qd) + ", k " + Dims(kd) + ", v " +
                                       Dims(vd) + ", sinks " + Dims(sd) + ", q_pos " + Dims(qpd) + ", k_pos " +
                                       Dims(kpd) + ")");
  };
  if (!IsFloat(q.element_type()) || !IsFloat(k.element_type()) || !IsFloat(sinks.element_type()) ||
      k.element_type() != v.element_type())
    return bad("q, sinks and the caches must be float32 or bfloat16, the caches alike");
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || sd.size() != 1 || qpd.size() != 2 || kpd.size() != 2)
    return bad("expected q [B, 1, N, H], caches [B, S, K, H], sinks [N], q_pos [B, 1], k_pos [B, S]");
  const int64_t B = qd[0], N = qd[2], H = qd[3], S = kd[1], K = kd[2];
  if (qd[1] != 1 || kd[0] != B || kd[3] != H || vd[0] != B || vd[1] != S || vd[2] != K || vd[3] != H || sd[0] != N ||
      qpd[0] != B || qpd[1] != 1 || kpd[0] != B || kpd[1] != S)
    return bad("shapes do not match");
  if (K == 0 || N % K != 0 || N / K > kMaxGroup || H > kMaxHeadDim)
    return bad("query heads must be a multiple of kv heads (at most " + std::to_string(kMaxGroup) +
               " per kv head), head_dim at most " + std::to_string(kMaxHeadDim));
  const DecodeAttention a{q.untyped_data(), q.element_type() == ffi::BF16, k.untyped_data(), v.untyped_data(),
                          k.element_type() == ffi::BF16, sinks.untyped_data(), sinks.element_type() == ffi::BF16,
                          q_pos.typed_data(), k_pos.typed_data(), o->typed_data(), B, S, N, K, H, window, scale};
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
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));

// 0: the portable task on every CPU (tests); 1: the AVX2 task where the CPU and H allow it. Returns the setting.
extern "C" GPTOSS_EXPORT int gptoss_decode_attention_set_isa(int isa) {
  gptoss::g_decode_attention_isa.store(isa != 0 ? 1 : 0);
  return gptoss::g_decode_attention_isa.load();
}
