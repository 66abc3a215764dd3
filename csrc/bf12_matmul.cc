// bf12 (bf12_kernel.h) weights: pack, unpack and decode's GEMV, as XLA FFI handlers and plain C entries.
//
//   y [M, R] f32 = x [M, K] bf16 . W^T, W packed [R, 49 * K / 32] plus its exceptions (rows, cols: int32 [E]; bf16
//   bits: uint16 [E], sorted by row then column)
//
// A few tokens (decode): the rows are split over the library's thread pool as the dense rows path splits them
// (GuidedTasks), each block decoded in registers once for up to 4 tokens, and each row's exceptions x[k] * w added
// after its sum. More tokens (prefill): per task kDpRows (32 on AMX) rows are decoded once into a thread's scratch,
// their exceptions written in, and multiplied by the dense bf16 tiles (VDPBF16PS, or AMX: the dense tiles' sums),
// so a prefill reads the packed bytes instead of a bf16 copy unpacked per call. The AVX-512 paths (bf12_avx512.cc)
// need VBMI and BF16; elsewhere the scalar reference runs (correct, not fast: gptoss packs weights only where the
// fast path exists).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bf12_kernel.h"
#include "mxfp4_kernel.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace gptoss {
void bf12_rows_avx512(const Bf12Task& t) __attribute__((weak));  // bf12_avx512.cc, when built
void bf12_unpack_avx512(const Bf12UnpackTask& t) __attribute__((weak));
void tile_dp_bf16(const DpTile& t) __attribute__((weak));    // mxfp4_avx512bf16.cc, when built
void tile_amx_bf16(const AmxTile& t) __attribute__((weak));  // mxfp4_amx.cc, when built

namespace {

// kAvx512: the decode in registers, and from kTileMinTokens tokens the VDPBF16PS tiles; kAmx: the AMX tiles there;
// kAmxEmulated (outside the cap order; tests): the AMX tile loop on emulated tile instructions.
enum Bf12Isa { kScalar = 0, kAvx512 = 1, kAmx = 2, kAmxEmulated = 3 };
constexpr int64_t kTileMinTokens = 5, kTileTokenBlock = 256;

int BestIsa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (&bf12_rows_avx512 != nullptr && &tile_dp_bf16 != nullptr && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi") && dp_bf16_usable())
    return &tile_amx_bf16 != nullptr && amx_usable() ? kAmx : kAvx512;
#endif
  return kScalar;
}

int InitialIsa() {  // the library-wide cap GPTOSS_MXFP4_ISA (tests): below AVX-512 BF16 means the reference
  const char* env = std::getenv("GPTOSS_MXFP4_ISA");
  const std::string cap = env != nullptr ? env : "";
  if (cap == "amx_emulated") return BestIsa() >= kAvx512 ? kAmxEmulated : kScalar;
  if (cap == "avx512bf16") return std::min(BestIsa(), static_cast<int>(kAvx512));
  return cap == "scalar" || cap == "avx2" || cap == "avx512" ? kScalar : BestIsa();
}

std::atomic<int> g_isa{InitialIsa()};

float Bf16ToFloat(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Weight k's bf16 bits in a packed row of G blocks (exceptions read as signed zeros).
uint16_t Weight(const uint8_t* row, int64_t G, int64_t k) {
  const uint8_t* b = row + G + (k / kBf12Block) * kBf12BlockBytes;
  const int j = static_cast<int>(k % kBf12Block);
  const int code = j < 16 ? b[32 + j] & 15 : b[32 + j - 16] >> 4, off = code & 7;
  const int high = (code & 8) << 4 | (off == 7 ? 0 : row[k / kBf12Block] - off);
  return static_cast<uint16_t>(high << 8 | b[j]);
}

struct Exceptions {
  const int32_t* rows = nullptr;
  const int32_t* cols = nullptr;
  const uint16_t* bits = nullptr;
  int64_t count = 0;

  // [first, last) of the exceptions in rows [lo, hi)
  std::pair<int64_t, int64_t> Range(int64_t lo, int64_t hi) const {
    const int32_t* a = std::lower_bound(rows, rows + count, lo);
    const int32_t* b = std::lower_bound(a, rows + count, hi);
    return {a - rows, b - rows};
  }
};

}  // namespace

void bf12_rows_scalar(const Bf12Task& t) {
  const int64_t G = t.K / kBf12Block, row_bytes = G * kBf12RowBytesPerBlock;
  for (int64_t n = t.lo; n < t.hi; ++n)
    for (int64_t m = 0; m < t.M; ++m) {
      float acc = 0.0f;
      for (int64_t k = 0; k < t.K; ++k)
        acc += Bf16ToFloat(t.x[m * t.K + k]) * Bf16ToFloat(Weight(t.w + n * row_bytes, G, k));
      t.y[m * t.R + n] = acc;
    }
}

void bf12_unpack_scalar(const Bf12UnpackTask& t) {
  const int64_t G = t.K / kBf12Block, row_bytes = G * kBf12RowBytesPerBlock;
  for (int64_t n = t.lo; n < t.hi; ++n)
    for (int64_t k = 0; k < t.K; ++k) t.out[n * t.K + k] = Weight(t.w + n * row_bytes, G, k);
}

namespace {

struct Problem {
  const uint16_t* x;
  const uint8_t* w;
  Exceptions exc;
  float* y;
  int64_t M, K, R;
};

struct Plan {
  const Problem* pr;
  std::vector<int64_t> starts;
  int64_t first;  // its first task in the pool run
};

struct Job {
  std::vector<Plan>* plans;
  bool avx512;
};

void AddExceptions(const Problem& pr, int64_t lo, int64_t hi, int64_t m0, int64_t m1) {
  const auto [e0, e1] = pr.exc.Range(lo, hi);
  for (int64_t e = e0; e < e1; ++e)
    for (int64_t m = m0; m < m1; ++m)
      pr.y[m * pr.R + pr.exc.rows[e]] += Bf16ToFloat(pr.x[m * pr.K + pr.exc.cols[e]]) * Bf16ToFloat(pr.exc.bits[e]);
}

void GemvTask(void* ctx, int64_t i) {
  const Job& j = *static_cast<const Job*>(ctx);
  size_t at = 0;
  while (at + 1 < j.plans->size() && i >= (*j.plans)[at + 1].first) ++at;
  const Plan& p = (*j.plans)[at];
  const Problem& pr = *p.pr;
  const int64_t c = i - p.first;
  const Bf12Task t{pr.w, pr.x, pr.y, pr.M, pr.K, pr.R, p.starts[c], p.starts[c + 1]};
  (j.avx512 ? bf12_rows_avx512 : bf12_rows_scalar)(t);
  AddExceptions(pr, t.lo, t.hi, 0, pr.M);
}

// Prefill: one task per (rows, token block); the rows decoded into the thread's scratch with their exceptions
// written in (exact bits: the dense bf16 tile then gives the dense kernel's sums; adding them after the sums cost a
// scattered multiply-add per exception and token, 21 of bf12's 24 extra ms on 8 layers' q/k/v at 128 tokens).
void PatchExceptions(const Exceptions& exc, int64_t lo, int64_t hi, int64_t K, uint16_t* rows_lo) {
  const auto [e0, e1] = exc.Range(lo, hi);
  for (int64_t e = e0; e < e1; ++e) rows_lo[(exc.rows[e] - lo) * K + exc.cols[e]] = exc.bits[e];
}

struct TileJob {
  const Problem* pr;
  int isa;
  int64_t rows, blocks;
  std::vector<const uint16_t*> xs;
  std::vector<float*> ys;
  std::vector<uint32_t> xb;  // AMX: the tokens packed as tiles (pack_token)
};

void TileTask(void* ctx, int64_t i) {
  const TileJob& j = *static_cast<const TileJob*>(ctx);
  const Problem& pr = *j.pr;
  const int64_t G = pr.K / kBf12Block, n0 = (i / j.blocks) * j.rows, t0 = (i % j.blocks) * kTileTokenBlock;
  const int64_t rows = std::min(j.rows, pr.R - n0), ntok = std::min(kTileTokenBlock, pr.M - t0);
  thread_local std::vector<uint16_t> scratch;
  scratch.resize(static_cast<size_t>(j.rows * pr.K + 32));
  uint16_t* w = scratch.data() + ((64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64) / 2;
  bf12_unpack_avx512({pr.w + n0 * G * kBf12RowBytesPerBlock, w, pr.K, 0, rows});
  PatchExceptions(pr.exc, n0, n0 + rows, pr.K, w);
  const uint8_t* wb = reinterpret_cast<const uint8_t*>(w);
  if (j.isa == kAvx512) {
    tile_dp_bf16({wb, nullptr, G, rows, j.xs.data() + t0, ntok, j.ys.data() + t0, n0, nullptr});
  } else {
    const AmxTile t{wb, nullptr, G, rows, j.xb.data() + (t0 / 16) * G * 256, ntok, j.ys.data() + t0, n0, nullptr,
                    amx_scratch(G)};
    (j.isa == kAmx ? tile_amx_bf16 : tile_amx_bf16_emulated)(t);
  }
}

void ComputeTiles(const Problem& pr, int isa) {
  TileJob j{&pr, isa, isa == kAvx512 ? kDpRows : 32, (pr.M + kTileTokenBlock - 1) / kTileTokenBlock, {}, {}, {}};
  for (int64_t m = 0; m < pr.M; ++m) j.xs.push_back(pr.x + m * pr.K), j.ys.push_back(pr.y + m * pr.R);
  if (isa != kAvx512) {
    j.xb.assign(static_cast<size_t>((pr.M + 15) / 16 * (pr.K / kBf12Block) * 256), 0u);
    for (int64_t m = 0; m < pr.M; ++m) pack_token(pr.x + m * pr.K, pr.K, m, j.xb.data());
  }
  pool().Run((pr.R + j.rows - 1) / j.rows * j.blocks, TileTask, &j);
}

void Compute(const Problem* prs, size_t count) {
  const int isa = g_isa.load();
  if (isa != kScalar && count > 0 && prs[0].M >= kTileMinTokens) {
    for (size_t i = 0; i < count; ++i) ComputeTiles(prs[i], isa);
    return;
  }
  thread_local std::vector<Plan> plans;
  plans.resize(count);
  int64_t after = 0, total = 0;
  const auto bytes = [](const Problem& pr) { return pr.R * (pr.K / kBf12Block) * kBf12RowBytesPerBlock; };
  for (size_t i = 0; i < count; ++i) after += bytes(prs[i]);
  for (size_t i = 0; i < count; ++i) {
    after -= bytes(prs[i]);
    plans[i].pr = &prs[i];
    GuidedTasks(prs[i].R, bytes(prs[i]) / std::max<int64_t>(1, prs[i].R), 4, after, pool().size(),
                plans[i].starts);
    plans[i].first = total;
    total += static_cast<int64_t>(plans[i].starts.size()) - 1;
  }
  Job j{&plans, isa != kScalar};
  pool().Run(total, GemvTask, &j);
}

struct UnpackJob {
  Bf12UnpackTask base;
  std::vector<int64_t> starts;
  bool avx512;
};

void UnpackTask(void* ctx, int64_t i) {
  const UnpackJob& j = *static_cast<const UnpackJob*>(ctx);
  Bf12UnpackTask t = j.base;
  t.lo = j.starts[i], t.hi = j.starts[i + 1];
  (j.avx512 ? bf12_unpack_avx512 : bf12_unpack_scalar)(t);
}

void Unpack(const uint8_t* w, int64_t R, int64_t K, const Exceptions& exc, uint16_t* out) {
  UnpackJob j{{w, out, K, 0, R}, {}, g_isa.load() != kScalar};
  GuidedTasks(R, (K / kBf12Block) * kBf12RowBytesPerBlock, 4, 0, pool().size(), j.starts);
  pool().Run(static_cast<int64_t>(j.starts.size()) - 1, UnpackTask, &j);
  for (int64_t e = 0; e < exc.count; ++e) out[exc.rows[e] * K + exc.cols[e]] = exc.bits[e];
}

// Packs rows [lo, hi) of the bf16 W [R, K]; counts[r] = row r's exceptions.
struct PackJob {
  const uint16_t* w;
  uint8_t* out;
  int64_t* counts;
  int64_t R, K, per;
};

void PackRow(const uint16_t* w, int64_t K, uint8_t* out, int64_t* count) {
  const int64_t G = K / kBf12Block;
  int64_t exceptions = 0;
  for (int64_t g = 0; g < G; ++g) {
    const uint16_t* v = w + g * kBf12Block;
    uint8_t* b = out + G + g * kBf12BlockBytes;
    int emax = 0;
    for (int j = 0; j < kBf12Block; ++j) emax = std::max(emax, (v[j] >> 7) & 0xFF);
    const int H = emax >> 1;
    out[g] = static_cast<uint8_t>(H);
    std::memset(b + 32, 0, 16);
    for (int j = 0; j < kBf12Block; ++j) {
      const int e = (v[j] >> 7) & 0xFF, off = H - (e >> 1), s = v[j] >> 15;
      int code = s << 3 | off, low = v[j] & 0xFF;
      if (e == 0 || off >= 7) {
        code = s << 3 | 7, low = 0;
        exceptions += (v[j] & 0x7FFF) != 0;
      }
      b[j] = static_cast<uint8_t>(low);
      b[32 + (j & 15)] |= static_cast<uint8_t>(code << (j < 16 ? 0 : 4));
    }
  }
  *count = exceptions;
}

void PackTask(void* ctx, int64_t i) {
  const PackJob& j = *static_cast<const PackJob*>(ctx);
  const int64_t row_bytes = (j.K / kBf12Block) * kBf12RowBytesPerBlock;
  for (int64_t r = i * j.per; r < std::min(j.R, (i + 1) * j.per); ++r)
    PackRow(j.w + r * j.K, j.K, j.out + r * row_bytes, j.counts + r);
}

bool IsException(uint16_t v, int H) {
  const int e = (v >> 7) & 0xFF;
  return (v & 0x7FFF) != 0 && (e == 0 || H - (e >> 1) >= 7);
}

// ---------------------------------------------------------------------------------------------- FFI
std::string PackedShape(const ffi::AnyBuffer& w, int64_t& R, int64_t& K) {
  const auto d = w.dimensions();
  if (w.element_type() != ffi::U8 || d.size() != 2 || d[1] % kBf12RowBytesPerBlock != 0)
    return "the packed rows must be uint8 [R, 49 * K / 32]";
  R = d[0], K = d[1] / kBf12RowBytesPerBlock * kBf12Block;
  return "";
}

std::string ExceptionsOf(const ffi::AnyBuffer& rows, const ffi::AnyBuffer& cols, const ffi::AnyBuffer& bits,
                         Exceptions& exc) {
  const int64_t E = static_cast<int64_t>(rows.element_count());
  if (rows.element_type() != ffi::S32 || cols.element_type() != ffi::S32 || bits.element_type() != ffi::U16 ||
      rows.dimensions().size() != 1 || static_cast<int64_t>(cols.element_count()) != E ||
      static_cast<int64_t>(bits.element_count()) != E)
    return "exceptions must be int32 rows [E], int32 columns [E] and uint16 bits [E]";
  exc = Exceptions{static_cast<const int32_t*>(rows.untyped_data()), static_cast<const int32_t*>(cols.untyped_data()),
                   static_cast<const uint16_t*>(bits.untyped_data()), E};
  return "";
}

std::string ProblemFor(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, const ffi::AnyBuffer& er,
                       const ffi::AnyBuffer& ec, const ffi::AnyBuffer& eb, ffi::Buffer<ffi::F32>& y, Problem& pr) {
  int64_t R, K;
  std::string err = PackedShape(w, R, K);
  if (err.empty()) err = ExceptionsOf(er, ec, eb, pr.exc);
  if (!err.empty()) return err;
  const auto xd = x.dimensions(), yd = y.dimensions();
  if (x.element_type() != ffi::BF16 || xd.size() != 2 || xd[1] != K)
    return "x must be bfloat16 [M, K] with K = " + std::to_string(K);
  if (yd.size() != 2 || yd[0] != xd[0] || yd[1] != R) return "y must be [M, R]";
  pr.x = static_cast<const uint16_t*>(x.untyped_data()), pr.w = static_cast<const uint8_t*>(w.untyped_data());
  pr.y = y.typed_data(), pr.M = xd[0], pr.K = K, pr.R = R;
  return "";
}

ffi::Error Bf12Matmul(ffi::AnyBuffer x, ffi::RemainingArgs args, ffi::RemainingRets ys) {
  if (args.size() != 4 * ys.size() || ys.size() == 0)
    return ffi::Error::InvalidArgument("bf12 matmul: want 4 arrays per weight (rows, exception rows, columns, bits) "
                                       "and one result each, got " + std::to_string(args.size()) + " arrays and " +
                                       std::to_string(ys.size()) + " results");
  std::vector<Problem> prs(ys.size());
  for (size_t i = 0; i < ys.size(); ++i) {
    auto w = args.get<ffi::AnyBuffer>(4 * i), er = args.get<ffi::AnyBuffer>(4 * i + 1);
    auto ec = args.get<ffi::AnyBuffer>(4 * i + 2), eb = args.get<ffi::AnyBuffer>(4 * i + 3);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !er.has_value() || !ec.has_value() || !eb.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("bf12 matmul: weight " + std::to_string(i) + ": bad buffers");
    const std::string err = ProblemFor(x, *w, *er, *ec, *eb, **y, prs[i]);
    if (!err.empty()) return ffi::Error::InvalidArgument("bf12 matmul, weight " + std::to_string(i) + ": " + err);
  }
  Compute(prs.data(), prs.size());
  return ffi::Error::Success();
}

ffi::Error Bf12Unpack(ffi::AnyBuffer w, ffi::AnyBuffer er, ffi::AnyBuffer ec, ffi::AnyBuffer eb,
                      ffi::Result<ffi::AnyBuffer> out) {
  int64_t R, K;
  Exceptions exc;
  std::string err = PackedShape(w, R, K);
  if (err.empty()) err = ExceptionsOf(er, ec, eb, exc);
  const auto od = out->dimensions();
  if (err.empty() && (out->element_type() != ffi::BF16 || od.size() != 2 || od[0] != R || od[1] != K))
    err = "the result must be bfloat16 [R, K]";
  if (!err.empty()) return ffi::Error::InvalidArgument("bf12 unpack: " + err);
  Unpack(static_cast<const uint8_t*>(w.untyped_data()), R, K, exc, static_cast<uint16_t*>(out->untyped_data()));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gptoss

#define GPTOSS_EXPORT __attribute__((visibility("default")))

extern "C" GPTOSS_EXPORT XLA_FFI_Error* GptossBf12Matmul(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf12Matmul, gptoss::Bf12Matmul,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().RemainingArgs().RemainingRets());

extern "C" GPTOSS_EXPORT XLA_FFI_Error* GptossBf12Unpack(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf12Unpack, gptoss::Bf12Unpack,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// ------------------------------------------------------------------------------------- plain C entries
extern "C" {

// Packs the bf16 W [R, K] (K % 32 == 0) into out [R, 49 * K / 32]; counts[r] = row r's exceptions. Returns the
// total, or -1 on bad arguments.
GPTOSS_EXPORT int64_t gptoss_bf12_pack(const uint16_t* w, int64_t R, int64_t K, uint8_t* out, int64_t* counts) {
  if (R < 0 || K <= 0 || K % gptoss::kBf12Block != 0) return -1;
  const int64_t per = std::max<int64_t>(1, std::min<int64_t>(1024, R / (8 * gptoss::pool().size()) + 1));
  gptoss::PackJob j{w, out, counts, R, K, per};
  gptoss::pool().Run((R + per - 1) / per, gptoss::PackTask, &j);
  int64_t total = 0;
  for (int64_t r = 0; r < R; ++r) total += counts[r];
  return total;
}

// The exceptions of W (after gptoss_bf12_pack): offsets [R + 1] = the prefix sums of its counts; fills rows, cols
// and bits in order.
GPTOSS_EXPORT void gptoss_bf12_exceptions(const uint16_t* w, int64_t R, int64_t K, const int64_t* offsets,
                                          int32_t* rows, int32_t* cols, uint16_t* bits) {
  for (int64_t r = 0; r < R; ++r) {
    int64_t at = offsets[r];
    if (offsets[r + 1] == at) continue;
    for (int64_t g = 0; g < K / gptoss::kBf12Block; ++g) {
      const uint16_t* v = w + r * K + g * gptoss::kBf12Block;
      int emax = 0;
      for (int j = 0; j < gptoss::kBf12Block; ++j) emax = std::max(emax, (v[j] >> 7) & 0xFF);
      for (int j = 0; j < gptoss::kBf12Block; ++j)
        if (gptoss::IsException(v[j], emax >> 1))
          rows[at] = static_cast<int32_t>(r), cols[at] = static_cast<int32_t>(g * gptoss::kBf12Block + j),
          bits[at++] = v[j];
    }
  }
}

// y [M, R] = x [M, K] . W^T without XLA (ctypes tests and benchmarks). Returns 0, or -1 on bad arguments.
GPTOSS_EXPORT int gptoss_bf12_matmul(const uint16_t* x, const uint8_t* w, int64_t M, int64_t K, int64_t R,
                                     const int32_t* exc_rows, const int32_t* exc_cols, const uint16_t* exc_bits,
                                     int64_t E, float* y) {
  if (M < 0 || R < 0 || K <= 0 || K % gptoss::kBf12Block != 0 || E < 0) return -1;
  const gptoss::Problem pr{x, w, {exc_rows, exc_cols, exc_bits, E}, y, M, K, R};
  gptoss::Compute(&pr, 1);
  return 0;
}

GPTOSS_EXPORT int gptoss_bf12_unpack(const uint8_t* w, int64_t R, int64_t K, const int32_t* exc_rows,
                                     const int32_t* exc_cols, const uint16_t* exc_bits, int64_t E, uint16_t* out) {
  if (R < 0 || K <= 0 || K % gptoss::kBf12Block != 0 || E < 0) return -1;
  gptoss::Unpack(w, R, K, {exc_rows, exc_cols, exc_bits, E}, out);
  return 0;
}

GPTOSS_EXPORT int gptoss_bf12_best_isa() { return gptoss::BestIsa(); }
GPTOSS_EXPORT int gptoss_bf12_isa() { return gptoss::g_isa.load(); }
// The token count from which the tiles serve (where the ISA in use has them).
GPTOSS_EXPORT int gptoss_bf12_tile_min_tokens() { return static_cast<int>(gptoss::kTileMinTokens); }
// 0 the scalar reference, 1 AVX-512 (VBMI + BF16), 2 AVX-512 with AMX tiles for prefill, capped at what the CPU and
// build support, or 3 the AMX tiles emulated (on a CPU with the AVX-512 path; tests); returns the one in use.
GPTOSS_EXPORT int gptoss_bf12_set_isa(int isa) {
  const int best = gptoss::BestIsa();
  gptoss::g_isa.store(isa == gptoss::kAmxEmulated && best >= gptoss::kAvx512 ? isa : std::max(0, std::min(isa, best)));
  return gptoss::g_isa.load();
}

}  // extern "C"
