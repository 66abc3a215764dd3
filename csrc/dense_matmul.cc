// Dense matmul with bf16 (or fp32) weights for XLA:CPU decode, as an XLA FFI handler and a plain C entry.
//
//   x [M, K] (f32 or bf16), W bf16 or f32: [N, K] when w_nk = 1, [K, N] when w_nk = 0  ->  y [M, N] f32
//
// Why: for a few tokens XLA:CPU converts the whole bf16 weight to an fp32 scratch copy on every call (about
// 2 GB/s, and 2.16 GiB of scratch for gpt-oss's unembedding); this reads the bf16 weight in place, once per
// call, at close to memory speed. The work is split over output rows (w_nk = 1) or column strips (w_nk = 0)
// on the library's shared thread pool; the micro-kernels are in dense_{avx512bf16,avx512,avx2,scalar}.cc, chosen at
// run time, and prefill-sized bf16 [N, K] products go to the AMX or VDPBF16PS tiles of mxfp4_amx.cc /
// mxfp4_avx512bf16.cc (on AVX2, prefill-sized products run dense_avx2.cc's panel GEMM: faster than XLA's bf16
// GEMM there).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "dense_kernel.h"
#include "mxfp4_kernel.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace gptoss {
// Weak: null when dense_avx{2,512}.cc were not built (no x86-64, or a compiler without the ISA's support).
void dense_rows_avx2(const DenseTask& t) __attribute__((weak));
void dense_cols_avx2(const DenseTask& t) __attribute__((weak));
void dense_rows_panel_avx2(const DenseTask& t) __attribute__((weak));
void dense_rows_avx512(const DenseTask& t) __attribute__((weak));
void dense_cols_avx512(const DenseTask& t) __attribute__((weak));
void dense_rows_bf16(const DenseTask& t) __attribute__((weak));  // dense_avx512bf16.cc
void tile_amx_bf16(const AmxTile& t) __attribute__((weak));  // mxfp4_amx.cc, when built
void tile_dp_bf16(const DpTile& t) __attribute__((weak));    // mxfp4_avx512bf16.cc, when built

namespace {

// kAvx512Bf16 / kAmx: the AVX-512 paths, plus VDPBF16PS / AMX tiles for bf16 x, bf16 [N, K] weights and
// prefill-sized M. kAmxEmulated (outside the cap order; tests): the AMX tiles on tile_amx_bf16_emulated, the best
// vector path elsewhere.
enum DenseIsa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4, kAmxEmulated = 5 };

int BestIsa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (&dense_rows_avx512 != nullptr && &dense_cols_avx512 != nullptr && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw"))
    return &tile_amx_bf16 != nullptr && amx_usable()       ? kAmx
           : &tile_dp_bf16 != nullptr && dp_bf16_usable() ? kAvx512Bf16
                                                           : kAvx512;
  if (&dense_rows_avx2 != nullptr && &dense_cols_avx2 != nullptr && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return kAvx2;
#endif
  return kScalar;
}

int InitialIsa() {
  // the library-wide cap (for tests): scalar/avx2/avx512/avx512bf16, or amx_emulated
  const char* env = std::getenv("GPTOSS_MXFP4_ISA");
  if (env != nullptr && std::string(env) == "scalar") return kScalar;
  if (env != nullptr && std::string(env) == "avx2") return std::min(BestIsa(), static_cast<int>(kAvx2));
  if (env != nullptr && std::string(env) == "avx512") return std::min(BestIsa(), static_cast<int>(kAvx512));
  if (env != nullptr && std::string(env) == "avx512bf16") return std::min(BestIsa(), static_cast<int>(kAvx512Bf16));
  if (env != nullptr && std::string(env) == "amx_emulated") return kAmxEmulated;
  return BestIsa();
}

// The vector path an ISA choice runs outside the AMX tiles.
int VectorIsa(int isa) {
  static const int best = BestIsa();
  return isa == kAmxEmulated ? std::min(best, static_cast<int>(kAvx512)) : isa;
}

std::atomic<int> g_isa{InitialIsa()};

struct Problem {
  const void* x;
  bool x_bf16;
  const void* w;
  bool w_f32, w_nk;
  float* y;
  int64_t M, K, N;
};

// Tasks: output chunks of `per` (rows of W, or columns) times `slabs` ranges of K (cols layout only; slab q > 0
// writes its partial sums to partial[q - 1], added to y after the run).
struct Job {
  DenseFn fn;
  DenseTask base;
  int64_t per, chunks, slab_rows, esize;
  float* partial;
  const int64_t* starts;  // the rows layout's task boundaries (GuidedTasks; per unused), else null
};

void RunTask(void* ctx, int64_t i) {
  const Job& j = *static_cast<const Job*>(ctx);
  DenseTask t = j.base;
  const int64_t q = i / j.chunks, c = i % j.chunks, k0 = q * j.slab_rows;
  t.lo = j.starts != nullptr ? j.starts[c] : c * j.per;
  t.hi = j.starts != nullptr ? j.starts[c + 1] : std::min(t.N, t.lo + j.per);
  if (q > 0) {
    t.w = static_cast<const char*>(t.w) + k0 * t.N * j.esize;
    t.x += k0;
    t.K = std::min(t.K - k0, j.slab_rows);
    t.y = j.partial + (q - 1) * t.M * t.N;
  } else {
    t.K = std::min(t.K, j.slab_rows);
  }
  j.fn(t);
}

float InputAt(const Problem& pr, int64_t i) {
  if (!pr.x_bf16) return static_cast<const float*>(pr.x)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(pr.x)[i]) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// x -> fp32 rows of ldx floats, zero padded; `permute`: each 32-block as its even then its odd elements.
void PrepareInputs(const Problem& pr, int64_t ldx, bool permute, std::vector<float>& xp) {
  xp.assign(static_cast<size_t>(pr.M * ldx), 0.0f);
  for (int64_t m = 0; m < pr.M; ++m)
    for (int64_t k = 0; k < pr.K; ++k) {
      const int64_t at = permute ? (k & ~int64_t{31}) + ((k & 31) >> 1) + 16 * (k & 1) : k;
      xp[m * ldx + at] = InputAt(pr, m * pr.K + k);
    }
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// x -> the packed fp32 layout of AVX2's cols panel GEMM (dense_kernel.h, kColsPanelMinTokens).
void PackColsPanel(const Problem& pr, std::vector<float>& xp) {
  const int64_t tiles = CeilDiv(pr.M, kColsPanelTB), chunk = kColsPanelK * kColsPanelTB;
  xp.assign(static_cast<size_t>(CeilDiv(pr.K, kColsPanelK) * tiles * chunk), 0.0f);
  for (int64_t m = 0; m < pr.M; ++m)
    for (int64_t k = 0; k < pr.K; ++k)
      xp[((k / kColsPanelK) * tiles + m / kColsPanelTB) * chunk + (k % kColsPanelK) * kColsPanelTB + m % kColsPanelTB] =
          InputAt(pr, m * pr.K + k);
}

// AMX from this many tokens: both are memory bound, but the AVX-512 rows GEMV slows down past 4 tokens (measured
// at [201088, 2880]: 8 tokens 108 ms vs ~60 ms on the tiles).
constexpr int64_t kAmxMinTokens = 4;
constexpr int64_t kAmxRows = 32, kAmxTokenBlock = 256;  // a block's packed inputs (<= 1.5 MB at K = 2880) stay in L2

// The tile function of the AMX path, or null where the ISA choice has none.
AmxFn AmxFor(int isa) {
  if (isa == kAmx) return tile_amx_bf16;
  return isa == kAmxEmulated ? tile_amx_bf16_emulated : nullptr;
}

bool AmxServes(const Problem& pr, int isa) {
  return AmxFor(isa) != nullptr && pr.x_bf16 && !pr.w_f32 && pr.w_nk && pr.K % 32 == 0 && pr.M >= kAmxMinTokens;
}

// One task per (32 weight rows, token block); the weight rows are the A tiles, read in place.
struct AmxJob {
  AmxFn fn;  // tile_amx_bf16, or its emulation
  const Problem* pr;
  int64_t G, blocks;
  std::vector<uint32_t> xb;  // token tiles of all M tokens, G * 256 words each
  std::vector<float*> ys;
};

void AmxTask(void* ctx, int64_t i) {
  const AmxJob& j = *static_cast<const AmxJob*>(ctx);
  const Problem& pr = *j.pr;
  const int64_t n0 = (i / j.blocks) * kAmxRows, t0 = (i % j.blocks) * kAmxTokenBlock;
  uint16_t* wbuf = amx_scratch(j.G);  // used only for a tail of fewer than 32 rows
  const AmxTile t{static_cast<const uint8_t*>(pr.w) + n0 * pr.K * 2, nullptr, j.G, std::min(kAmxRows, pr.N - n0),
                  j.xb.data() + (t0 / 16) * j.G * 256, std::min(kAmxTokenBlock, pr.M - t0), j.ys.data() + t0, n0,
                  nullptr, wbuf};
  j.fn(t);
}

void ComputeAmx(const Problem& pr, AmxFn fn) {
  AmxJob j;
  j.fn = fn, j.pr = &pr, j.G = pr.K / 32, j.blocks = CeilDiv(pr.M, kAmxTokenBlock);
  j.xb.assign(static_cast<size_t>(CeilDiv(pr.M, 16) * j.G * 256), 0u);
  j.ys.resize(pr.M);
  for (int64_t m = 0; m < pr.M; ++m) {
    pack_token(static_cast<const uint16_t*>(pr.x) + m * pr.K, pr.K, m, j.xb.data());
    j.ys[m] = pr.y + m * pr.N;
  }
  pool().Run(CeilDiv(pr.N, kAmxRows) * j.blocks, AmxTask, &j);
}

// The VDPBF16PS tiles: one task per (kDpRows weight rows, token block), the weight rows read in place. From 5
// tokens, as bf12's tiles: on a Zen 4 (cold [201088, 2880], interleaved against the fp32 FMA rows path) 5 tokens
// 1.27x, 6 1.26x, 8 1.2x, 12 1.4x, 4 only 1.04x. (An AMX Xeon capped to these paths had put the crossover near 16,
// [50272, 2880]: 4 tokens 14.1 vs 12.1 ms, 16 tokens 27.5 vs 27.0; there AMX's tiles serve from 4 anyway.)
constexpr int64_t kDpMinTokens = 5, kDpTokenBlock = 256, kDpRowsMaxTokens = 3;

bool DpServes(const Problem& pr, int isa) {
  return isa == kAvx512Bf16 && &tile_dp_bf16 != nullptr && pr.x_bf16 && !pr.w_f32 && pr.w_nk && pr.K % 32 == 0 &&
         pr.M >= kDpMinTokens;
}

void DpTask(void* ctx, int64_t i) {
  const Problem& pr = *static_cast<const Problem*>(ctx);
  const int64_t blocks = CeilDiv(pr.M, kDpTokenBlock);
  const int64_t n0 = (i / blocks) * kDpRows, t0 = (i % blocks) * kDpTokenBlock;
  const int64_t ntok = std::min(kDpTokenBlock, pr.M - t0);
  const uint16_t* xs[kDpTokenBlock];
  float* ys[kDpTokenBlock];
  for (int64_t m = 0; m < ntok; ++m)
    xs[m] = static_cast<const uint16_t*>(pr.x) + (t0 + m) * pr.K, ys[m] = pr.y + (t0 + m) * pr.N;
  const DpTile t{static_cast<const uint8_t*>(pr.w) + n0 * pr.K * 2, nullptr, pr.K / 32, std::min(kDpRows, pr.N - n0),
                 xs, ntok, ys, n0, nullptr};
  tile_dp_bf16(t);
}

// A vector-path product, ready to run: its tasks (RunTask on j) and the K slabs' partial sums they leave.
struct VecPlan {
  const Problem* pr = nullptr;
  Job j;
  int64_t slabs = 1, tasks = 0, first = 0;  // first: its first task in a Compute of several products
  std::vector<float> xp, partial;
  std::vector<uint16_t> xb;  // the VDPBF16PS rows path's bf16 x
  std::vector<int64_t> starts;  // Job::starts
};

// Runs `pr` if it needs no vector-path plan (nothing to do, or a tile path); returns whether it did.
bool ComputeTrivialOrTiles(const Problem& pr) {
  if (pr.M == 0 || pr.N == 0) return true;
  if (pr.K == 0) {
    std::fill(pr.y, pr.y + pr.M * pr.N, 0.0f);
    return true;
  }
  const int isa = g_isa.load();
  if (AmxServes(pr, isa)) {
    ComputeAmx(pr, AmxFor(isa));
    return true;
  }
  if (DpServes(pr, isa)) {
    pool().Run(CeilDiv(pr.N, kDpRows) * CeilDiv(pr.M, kDpTokenBlock), DpTask, const_cast<Problem*>(&pr));
    return true;
  }
  return false;
}

// `after`: the bytes of W that the run's later products read (a Compute of several).
void MakePlan(const Problem& pr, VecPlan& p, int64_t after) {
  p.pr = &pr;
  const int vec_isa = VectorIsa(g_isa.load());
  const bool vec = vec_isa >= kAvx2, avx512 = vec_isa >= kAvx512;
  Job& j = p.j;
  // 1-3 tokens times bf16 W [N, K] with x already bf16: VDPBF16PS, one instruction per 32 weights and token (the
  // products are exact; dense_avx512bf16.cc), on CPUs with AVX512_BF16 unless capped below that. Cold [201088, 2880]
  // on a Zen 4 against the fp32 FMA rows path (4 rows x 4 tokens), interleaved: 2 tokens 1.26x, 3 1.21x, 4 1.02x,
  // 5-15 0.90-0.94x (each row's x loads are not shared across rows). (W [K, N], one token, the same way with rows
  // paired by vpunpck{l,h}wd: no faster than ColsOne on the Zen 4, 0.89-0.99x; not kept.)
  const bool dp_rows = pr.M <= kDpRowsMaxTokens && pr.w_nk && pr.x_bf16 && !pr.w_f32 && vec_isa >= kAvx512Bf16 &&
                       &dense_rows_bf16 != nullptr && dp_bf16_usable();
  // dense_avx2.cc's panel GEMM, both layouts (W [N, K]: its panels transposed from the rows)
  const bool panel = vec && !avx512 && pr.M >= kColsPanelMinTokens && (!pr.w_nk || &dense_rows_panel_avx2 != nullptr);
  if (dp_rows)
    j.fn = dense_rows_bf16;
  else if (panel && pr.w_nk)
    j.fn = dense_rows_panel_avx2;
  else if (avx512)
    j.fn = pr.w_nk ? dense_rows_avx512 : dense_cols_avx512;
  else if (vec)
    j.fn = pr.w_nk ? dense_rows_avx2 : dense_cols_avx2;
  else
    j.fn = pr.w_nk ? dense_rows_scalar : dense_cols_scalar;
  const bool pad = vec && pr.w_nk;  // the vector rows paths read x 16 or 32 elements at a time
  const int64_t ldx = pad ? CeilDiv(pr.K, 32) * 32 : pr.K;
  const float* x = static_cast<const float*>(pr.x);
  if (panel) {
    PackColsPanel(pr, p.xp);
    x = p.xp.data();
  } else if (dp_rows) {
    p.xb.assign(static_cast<size_t>(pr.M * ldx), 0);
    for (int64_t m = 0; m < pr.M; ++m)
      std::memcpy(p.xb.data() + m * ldx, static_cast<const uint16_t*>(pr.x) + m * pr.K, static_cast<size_t>(pr.K) * 2);
  } else if (pr.x_bf16 || pad) {
    PrepareInputs(pr, ldx, avx512 && pr.w_nk && !pr.w_f32, p.xp);  // the AVX-512 bf16 rows path's order
    x = p.xp.data();
  }
  j.base = DenseTask{pr.w, pr.w_f32, x, ldx, pr.y, pr.M, pr.K, pr.N, 0, pr.N};
  if (dp_rows) j.base.xb = p.xb.data();
  j.esize = pr.w_f32 ? 4 : 2;
  const int64_t line_bytes = pr.K * j.esize, threads = pool().size(), want = 2 * threads;
  int64_t slabs = 1;
  j.starts = nullptr;
  if (pr.N * line_bytes < (int64_t{128} << 10)) {  // small: one task, run by the caller
    j.per = pr.N;
  } else if (panel) {  // AVX2's panel GEMM is compute-bound: `want` strips of 32-output multiples
    j.per = CeilDiv(CeilDiv(pr.N, want), 32) * 32;
  } else if (pr.w_nk) {  // rows: guided tasks, multiples of the micro-kernel's 4 rows
    GuidedTasks(pr.N, line_bytes, 4, after, static_cast<int>(threads), p.starts);
    j.starts = p.starts.data();
  } else {
    // Column strips, 32-column multiples: at most what keeps the strip's accumulators (8 tokens) within 32 KiB
    // of L1, at least 512 columns (1 KiB runs of each bf16 row stream well) unless N is smaller; then, if that
    // leaves fewer than two tasks per thread, K is split into slabs of at least 256 rows.
    // One token (ColsOne reads whole rows, from the four quarters of its slab at once): every task takes
    // all columns, so each of its four streams is contiguous, and K is split into `want` slabs of at least 64 rows.
    const int64_t cap = (int64_t{8} << 10) / std::min<int64_t>(pr.M, 8);
    if (pr.M == 1 && vec && pr.N <= cap) {
      j.per = pr.N;
      slabs = std::max<int64_t>(1, std::min(want, pr.K / 64));
    } else {
      j.per = std::min(cap, std::max<int64_t>(512, CeilDiv(pr.N, want)));
      j.per = std::min(CeilDiv(j.per, 32) * 32, CeilDiv(pr.N, 32) * 32);
      const int64_t strips = CeilDiv(pr.N, j.per);
      if (strips < want) slabs = std::max<int64_t>(1, std::min(CeilDiv(want, strips), pr.K / 256));
    }
  }
  j.chunks = j.starts != nullptr ? static_cast<int64_t>(p.starts.size()) - 1 : CeilDiv(pr.N, j.per);
  j.slab_rows = CeilDiv(pr.K, slabs);
  p.slabs = CeilDiv(pr.K, j.slab_rows);
  if (p.slabs > 1) p.partial.resize(static_cast<size_t>((p.slabs - 1) * pr.M * pr.N));
  j.partial = p.partial.data();
  p.tasks = j.chunks * p.slabs;
}

// Adds the K slabs' partial sums into y, once every task has run.
void FinishPlan(const VecPlan& p) {
  const Problem& pr = *p.pr;
  for (int64_t q = 1; q < p.slabs; ++q) {
    const float* part = p.j.partial + (q - 1) * pr.M * pr.N;
    for (int64_t i = 0; i < pr.M * pr.N; ++i) pr.y[i] += part[i];
  }
}

// Several products in one pool run (decode's q, k and v projections of one x): one wake-up of the pool instead of
// three, and no oversubscribed cores when XLA would run three kernel calls at once (the second and third then ran
// on single threads beside the first).
struct ManyJob {
  VecPlan* plans;
  size_t n;
};

void ManyTask(void* ctx, int64_t i) {
  const ManyJob& m = *static_cast<const ManyJob*>(ctx);
  size_t at = 0;
  while (at + 1 < m.n && i >= m.plans[at + 1].first) ++at;  // a handful of plans
  RunTask(&m.plans[at].j, i - m.plans[at].first);
}

void Compute(const Problem* prs, size_t count) {
  // Per thread and reused across calls (no allocation per decode step); sized before any plan is made, since a
  // plan's Job points into its own vectors.
  thread_local std::vector<VecPlan> plans;
  if (plans.size() < count) plans.resize(count);
  thread_local std::vector<size_t> vec;  // the products left to the vector paths, all in one pool run
  vec.clear();
  const auto w_bytes = [](const Problem& pr) { return pr.N * pr.K * (pr.w_f32 ? 4 : 2); };
  int64_t after = 0;
  for (size_t i = 0; i < count; ++i)
    if (!ComputeTrivialOrTiles(prs[i])) vec.push_back(i), after += w_bytes(prs[i]);
  int64_t total = 0;
  size_t n = 0;
  for (size_t i : vec) {
    after -= w_bytes(prs[i]);
    MakePlan(prs[i], plans[n], after);
    plans[n].first = total, total += plans[n++].tasks;
  }
  ManyJob m{plans.data(), n};
  pool().Run(total, ManyTask, &m);
  for (size_t i = 0; i < n; ++i) FinishPlan(plans[i]);
}

std::string CheckShapes(int64_t xr, int64_t wr, int64_t yr, const int64_t* xd, const int64_t* wd, const int64_t* yd,
                        int64_t w_nk) {
  if (w_nk != 0 && w_nk != 1) return "w_nk must be 0 (W is [K, N]) or 1 (W is [N, K]), got " + std::to_string(w_nk);
  if (xr != 2 || wr != 2 || yr != 2)
    return "x, W and y must be rank 2, got ranks " + std::to_string(xr) + ", " + std::to_string(wr) + ", " +
           std::to_string(yr);
  const int64_t K = xd[1], wk = w_nk ? wd[1] : wd[0], N = w_nk ? wd[0] : wd[1];
  const auto dims = [](const int64_t* d) { return "[" + std::to_string(d[0]) + ", " + std::to_string(d[1]) + "]"; };
  if (wk != K)
    return "x " + dims(xd) + " and W " + dims(wd) + (w_nk ? " ([N, K])" : " ([K, N])") +
           " disagree on K";
  if (yd[0] != xd[0] || yd[1] != N)
    return "y " + dims(yd) + " must be [M, N] = [" + std::to_string(xd[0]) + ", " + std::to_string(N) + "]";
  return "";
}

// ---------------------------------------------------------------------------------------------- FFI
// The Problem for x times w into y, or the reason there is none (w's dtype, the shapes) in `err`.
Problem ProblemFor(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, ffi::Buffer<ffi::F32>& y, int64_t w_nk,
                   std::string& err) {
  if (w.element_type() != ffi::F32 && w.element_type() != ffi::BF16) {
    err = "W must be bfloat16 or float32";
    return {};
  }
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  const int64_t zero[2] = {0, 0};
  err = CheckShapes(static_cast<int64_t>(xd.size()), static_cast<int64_t>(wd.size()), static_cast<int64_t>(yd.size()),
                    xd.size() == 2 ? xd.begin() : zero, wd.size() == 2 ? wd.begin() : zero,
                    yd.size() == 2 ? yd.begin() : zero, w_nk);
  if (!err.empty()) return {};
  return Problem{x.untyped_data(), x.element_type() == ffi::BF16, w.untyped_data(), w.element_type() == ffi::F32,
                 w_nk != 0, y.typed_data(), xd[0], xd[1], yd[1]};
}

ffi::Error DenseMatmul(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> y, int64_t w_nk) {
  if (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("dense matmul: x must be float32 or bfloat16");
  std::string err;
  const Problem pr = ProblemFor(x, w, *y, w_nk, err);
  if (!err.empty()) return ffi::Error::InvalidArgument("dense matmul: " + err);
  Compute(&pr, 1);
  return ffi::Error::Success();
}

// x times each of several weights (same K and layout), as one pool run: ws and ys pair up in order.
ffi::Error DenseMatmulMany(ffi::AnyBuffer x, ffi::RemainingArgs ws, ffi::RemainingRets ys, int64_t w_nk) {
  if (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("dense matmul: x must be float32 or bfloat16");
  if (ws.size() != ys.size() || ws.size() == 0)
    return ffi::Error::InvalidArgument("dense matmul: " + std::to_string(ws.size()) + " weights but " +
                                       std::to_string(ys.size()) + " results");
  std::vector<Problem> prs;
  for (size_t i = 0; i < ws.size(); ++i) {
    auto w = ws.get<ffi::AnyBuffer>(i);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value()) return w.error();
    if (!y.has_value()) return y.error();
    std::string err;
    prs.push_back(ProblemFor(x, *w, **y, w_nk, err));
    if (!err.empty()) return ffi::Error::InvalidArgument("dense matmul, weight " + std::to_string(i) + ": " + err);
  }
  Compute(prs.data(), prs.size());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gptoss

#define GPTOSS_EXPORT __attribute__((visibility("default")))

extern "C" GPTOSS_EXPORT XLA_FFI_Error* GptossDenseMatmulMany(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossDenseMatmulMany, gptoss::DenseMatmulMany,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("w_nk"));

extern "C" GPTOSS_EXPORT XLA_FFI_Error* GptossDenseMatmul(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossDenseMatmul, gptoss::DenseMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("w_nk"));

// ------------------------------------------------------------------------------------- plain C entry
extern "C" {

// Same computation without XLA (ctypes benchmarks and tests). Returns 0, or -1 on bad arguments.
GPTOSS_EXPORT int gptoss_dense_matmul(const void* x, int x_bf16, const void* w, int w_f32, int w_nk, float* y,
                                      int64_t M, int64_t K, int64_t N) {
  const int64_t xd[2] = {M, K}, wd[2] = {w_nk ? N : K, w_nk ? K : N}, yd[2] = {M, N};
  if (M < 0 || K < 0 || N < 0 || !gptoss::CheckShapes(2, 2, 2, xd, wd, yd, w_nk).empty()) return -1;
  const gptoss::Problem pr{x, x_bf16 != 0, w, w_f32 != 0, w_nk != 0, y, M, K, N};
  gptoss::Compute(&pr, 1);
  return 0;
}

GPTOSS_EXPORT int gptoss_dense_best_isa() { return gptoss::BestIsa(); }
// The token count from which AVX2's panel GEMM serves (dense_cpu.serves routes W [N, K] to it from there on).
GPTOSS_EXPORT int gptoss_dense_panel_min_tokens() { return static_cast<int>(gptoss::kColsPanelMinTokens); }
GPTOSS_EXPORT int gptoss_dense_isa() { return gptoss::g_isa.load(); }

// 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 BF16 and 4 AMX (AVX-512 plus tiles for prefill-sized bf16 [N, K] products),
// capped at what the CPU and the build support, or 5 the AMX path emulated (any CPU; tests); returns the ISA in use.
GPTOSS_EXPORT int gptoss_dense_set_isa(int isa) {
  gptoss::g_isa.store(isa == gptoss::kAmxEmulated ? isa : std::max(0, std::min(isa, gptoss::BestIsa())));
  return gptoss::g_isa.load();
}

}  // extern "C"
