// MXFP4 expert matmul for XLA:CPU, exposed as an XLA FFI handler (and a plain C entry point for ctypes).
//
//   x [M, K] (f32 or bf16), blocks [E, N, K/32, 16] u8, scales [E, N, K/32] u8, idx [M, S] i32
//   -> y [M, S, N] f32,  y[m, s, :] = W[idx[m, s]] . x[m]   (W[e] is [N, K], the checkpoint's [out, in])
//   transpose = 1 (the input gradient): dy [M, S, N] (f32 or bf16) -> dx [M, S, K] f32,
//                 dx[m, s, :] = W[idx[m, s]]^T . dy[m, s]
// A negative index skips its pair (expert parallelism marks the pairs of other devices' experts -1): its output
// row is zero and nothing is computed for it. An index >= E is an error.
//
// The packed weights are read in place: nibbles are decoded in registers (mxfp4_{avx512,avx2,scalar}.cc,
// chosen at run time from the CPU's features) and the dequantized matrix never exists in memory.
//   grouped = 0 (decode): each (m, s) pair is a GEMV over the rows of its expert. On the AVX2 tile, and on the
//                          AVX-512 one where the CPU has VNNI and VBMI (mxfp4_avx512vnni.cc), x is first rounded
//                          to 15-bit block floating point (PrepareX16) and the GEMV runs on integers unless
//                          set_exact_gemv / GPTOSS_MXFP4_EXACT_GEMV=1 keeps it on fp32 x. Opt-in on the same tiles:
//                          x8 (PrepareX8, llama.cpp's 8-bit activations), half the integer products.
//   grouped = 1 (prefill): pairs are bucketed by expert; each task streams a chunk of one expert's rows once
//                          and multiplies it with a block of that expert's inputs (register-tiled GEMM).
//                          With bf16 inputs on a CPU with AMX (mxfp4_amx.cc), the chunk is dequantized to bf16
//                          in L2 and multiplied on the tile unit instead: ~4x the FMA path's throughput.
//                          With bf16 inputs on a CPU with AVX512_BF16 but no AMX (mxfp4_avx512bf16.cc), 4 rows at a
//                          time are dequantized to bf16 in L1 and multiplied with VDPBF16PS (1.25-1.5x the FMA path
//                          on a Sapphire Rapids core capped to it, where VDPBF16PS issues at half the FMA rate).
//                          The ISA "amx_emulated" runs the same algorithm on a portable emulation of the tile
//                          instructions (mxfp4_amx_emulated.cc), on any CPU: how tests cover it without AMX.
// The transposed product splits each expert's (or pair's) work over ranges of whole 32-blocks of K instead: each
// weight block is decoded once per pass and multiplied into the accumulators of several tokens, and the packed
// rows of an expert are streamed once for all of its pairs (grouped) or once per pair (gather). No AMX version:
// an AMX CPU runs the AVX-512 one.
// Work is split over output rows and run on a small persistent thread pool (the calling thread included),
// sized by GPTOSS_MXFP4_THREADS or the CPUs this process may run on.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#if defined(GPTOSS_HAVE_AMX) || defined(GPTOSS_HAVE_AVX512BF16)
#include <cpuid.h>
#endif
#if defined(GPTOSS_HAVE_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "mxfp4_kernel.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace gptoss {

// AMX-BF16, AMX-TILE and AVX512-BF16 (CPUID leaf 7), and Linux's permission to use the tile state, which a
// process must request once (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA) before any tile instruction.
bool amx_usable() {
#if defined(GPTOSS_HAVE_AMX)
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

bool dp_bf16_usable() {
#if defined(GPTOSS_HAVE_AVX512BF16) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = [] {
    unsigned a, b, c, d;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)) != 0;  // CPUID.(7,1):EAX[5] AVX512_BF16
  }();
  return ok;
#else
  return false;
#endif
}

uint16_t* amx_scratch(int64_t G) {
  thread_local std::vector<uint16_t> scratch;
  scratch.resize(2 * G * 512 + 32);
  return scratch.data() + ((64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64) / 2;
}

void pack_token(const uint16_t* x_row, int64_t K, int64_t i, uint32_t* tiles) {
  const uint32_t* row = reinterpret_cast<const uint32_t*>(x_row);  // bf16 pairs along k
  uint32_t* dst = tiles + (i / 16) * (K / 32) * 256 + (i % 16);
  for (int64_t k2 = 0; k2 < K / 2; ++k2) dst[k2 * 16] = row[k2];
}

namespace {

// ------------------------------------------------------------------------------------------ ISA choice
// The cap order; kAvx512Bf16 and kAmx run the AVX-512 vector path outside their tiles. kAmxEmulated is outside
// the order: the AMX path on tile_amx_emulated, the best vector path elsewhere.
enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4, kAmxEmulated = 5 };

// The best path both compiled in and supported by this CPU.
int best_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(GPTOSS_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
#if defined(GPTOSS_HAVE_AMX)
    if (amx_usable()) return kAmx;
#endif
    return dp_bf16_usable() ? kAvx512Bf16 : kAvx512;
  }
#endif
#if defined(GPTOSS_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
#endif
  return kScalar;
}

// The vector path an ISA choice runs outside the AMX tiles.
int vector_isa(int isa) {
  static const int best = best_isa();
  return isa == kAmxEmulated ? std::min(best, static_cast<int>(kAvx512)) : isa;
}

// The tile function of the AMX path, or null where the ISA choice has none.
AmxFn amx_fn(int isa) {
#if defined(GPTOSS_HAVE_AMX)
  if (isa == kAmx) return tile_amx;
#endif
  return isa == kAmxEmulated ? tile_amx_emulated : nullptr;
}

#if defined(GPTOSS_HAVE_AVX512VNNI)
// Whether gemv_x16_avx512vnni may run: compiled in and the CPU has AVX512_VNNI and AVX512_VBMI (and the AVX-512
// F/BW/DQ/VL): Ice Lake, Sapphire Rapids and later, Zen 4 and later.
bool vnni_usable() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
  }();
  return ok;
}

// The AVX-512 tile whose one-token GEMVs run on the x16 (or x8) input where the driver wrote one.
void tile_avx512_x16(const Tile& t) {
  if (t.ntok == 1 && t.xi != nullptr) return t.x8 ? gemv_x8_avx512vnni(t) : gemv_x16_avx512vnni(t);
  tile_avx512(t);
}
#endif

TileFn tile_fn(int isa) {
  isa = vector_isa(isa);
#if defined(GPTOSS_HAVE_AVX512VNNI)
  if (isa >= kAvx512 && vnni_usable()) return tile_avx512_x16;
#endif
#if defined(GPTOSS_HAVE_AVX512)
  if (isa >= kAvx512) return tile_avx512;
#endif
#if defined(GPTOSS_HAVE_AVX2)
  if (isa == kAvx2) return tile_avx2;
#endif
  return tile_scalar;
}

bool tile_reads_xq(TileFn fn) {
#if defined(GPTOSS_HAVE_AVX2)
  return fn == tile_avx2;
#else
  return false;
#endif
}

// Whether the tile's one-token GEMVs read x16 inputs (when the driver writes them: g_gemv).
bool tile_reads_x16(TileFn fn) {
#if defined(GPTOSS_HAVE_AVX512VNNI)
  if (fn == tile_avx512_x16) return true;
#endif
  return tile_reads_xq(fn);
}

// Whether the tile's one-token GEMVs can read x8 inputs instead: every x16 tile.
bool tile_reads_x8(TileFn fn) { return tile_reads_x16(fn); }

TTileFn tile_t_fn(int isa) {
  isa = vector_isa(isa);
#if defined(GPTOSS_HAVE_AVX512)
  if (isa >= kAvx512) return tile_t_avx512;
#endif
#if defined(GPTOSS_HAVE_AVX2)
  if (isa == kAvx2) return tile_t_avx2;
#endif
  return tile_t_scalar;
}

int initial_isa() {
  int isa = best_isa();
  if (const char* env = std::getenv("GPTOSS_MXFP4_ISA")) {  // caps the choice (for tests)
    const std::string v(env);
    if (v == "scalar") isa = kScalar;
    else if (v == "avx2") isa = std::min(isa, static_cast<int>(kAvx2));
    else if (v == "avx512") isa = std::min(isa, static_cast<int>(kAvx512));
    else if (v == "avx512bf16") isa = std::min(isa, static_cast<int>(kAvx512Bf16));
    else if (v == "amx_emulated") isa = kAmxEmulated;
  }
  return isa;
}

std::atomic<int> g_isa{initial_isa()};

// E8M0 byte -> 2**(s-127): s = 0 is the subnormal 2**-127, s = 255 is NaN (OCP MX v1.0).
struct ScaleLut {
  float v[256];
  ScaleLut() {
    for (int s = 0; s < 256; ++s) {
      uint32_t bits = s == 0 ? 0x00400000u : s == 255 ? 0x7FC00000u : static_cast<uint32_t>(s) << 23;
      std::memcpy(&v[s], &bits, 4);
    }
  }
};
const ScaleLut g_scales;

// E8M0 byte x E2M1 code -> bf16 bits of their product (exact: one mantissa bit; NaN stays NaN), for the AMX path.
struct Bf16Lut {
  alignas(64) uint16_t v[256 * 16];
  Bf16Lut() {
    for (int s = 0; s < 256; ++s)
      for (int c = 0; c < 16; ++c) {
        const float f = kE2M1[c] * g_scales.v[s];
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        v[16 * s + c] = static_cast<uint16_t>(bits >> 16);
      }
  }
};
const Bf16Lut g_bf16_lut;

// ---------------------------------------------------------------------------------------------- driver
struct Problem {
  const void* x;
  bool x_bf16;
  const uint8_t* blocks;
  const uint8_t* scales;
  const int32_t* idx;
  float* y;
  int64_t M, K, E, N, S;
};

struct Job {
  TileFn fn;
  int64_t G, N, rows_per_task, chunks;
  std::vector<int64_t> starts;  // gather: task boundaries over the pairs' rows, pair a's rows at a * N
  const uint8_t* blocks;
  const uint8_t* scales;
  // gather: one task per run of rows of one unskipped pair (starts)
  const int32_t* idx;
  std::vector<int64_t> pairs;    // the unskipped pairs
  std::vector<const float*> xs;  // input rows, per unskipped pair (gather) or per sorted pair (grouped)
  std::vector<const uint8_t*> xis;  // gather on an x16 tile: the pair's x16 (or x8) input, or null (fp32 only)
  bool x8 = false;                  // xis are x8 inputs
  std::vector<float*> ys;
  // grouped: one task per (expert, token block, row chunk)
  struct Group { int64_t e, first, count; };
  std::vector<Group> groups;
};

// XLA runs its threads with flush-to-zero and denormals-are-zero; the pool's workers run with whatever their
// creator had. A task sets IEEE behaviour (subnormal weights exact: scale byte 0 is 2**-127) and gives the thread
// its own back at the end, so no result depends on the thread that computed it.
class ExactFp {
 public:
#if defined(__SSE__)
  ExactFp() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~0x8040u); }  // clear FTZ (bit 15) and DAZ (bit 6)
  ~ExactFp() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  ExactFp() {}
#endif
};

void GatherTask(void* ctx, int64_t task) {
  const ExactFp fp;
  const Job& j = *static_cast<const Job*>(ctx);
  const int64_t a = j.starts[task] / j.N, n0 = j.starts[task] % j.N;
  const int64_t e = j.idx[j.pairs[a]];
  Tile t{j.blocks + (e * j.N + n0) * j.G * 16, j.scales + (e * j.N + n0) * j.G, j.G,
         j.starts[task + 1] - j.starts[task], &j.xs[a], 1, &j.ys[a], n0, g_scales.v,
         j.xis.empty() ? nullptr : j.xis[a], j.x8};
  j.fn(t);
}

void GroupedTask(void* ctx, int64_t task) {
  const ExactFp fp;
  const Job& j = *static_cast<const Job*>(ctx);
  const Job::Group& grp = j.groups[task / j.chunks];
  const int64_t n0 = (task % j.chunks) * j.rows_per_task;
  Tile t{j.blocks + (grp.e * j.N + n0) * j.G * 16, j.scales + (grp.e * j.N + n0) * j.G, j.G,
         std::min(j.rows_per_task, j.N - n0), &j.xs[grp.first], grp.count, &j.ys[grp.first], n0, g_scales.v};
  j.fn(t);
}

float InputAt(const Problem& pr, int64_t i) {
  if (!pr.x_bf16) return static_cast<const float*>(pr.x)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(pr.x)[i]) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// x rows -> the order the tile function reads (fp32): "xp" (per 32-block: the 16 even elements, then the 16
// odd) or, for the AVX2 tile, "xq" (xq_position).
void PermuteInputs(const Problem& pr, bool xq, std::vector<float>& xp) {
  const int64_t G = pr.K / 32;
  int at[32];
  for (int j = 0; j < 32; ++j) at[j] = xq ? xq_position(j) : (j >> 1) + 16 * (j & 1);
  xp.resize(static_cast<size_t>(pr.M * pr.K));
  for (int64_t m = 0; m < pr.M; ++m)
    for (int64_t g = 0; g < G; ++g)
      for (int j = 0; j < 32; ++j) xp[m * pr.K + 32 * g + at[j]] = InputAt(pr, m * pr.K + 32 * g + j);
}

// What one-token GEMVs on the x16 tiles read: exact fp32 x, x16 (the default) or x8 (opt-in).
// GPTOSS_MXFP4_GEMV_INPUT=exact|x16|x8 sets it at start, GPTOSS_MXFP4_EXACT_GEMV=1 makes it exact;
// gptoss_mxfp4_set_gemv_input / set_exact_gemv change it.
constexpr int kGemvExact = 0, kGemvX16 = 1, kGemvX8 = 2;
int gemv_input_from_env() {
  const char* env = std::getenv("GPTOSS_MXFP4_GEMV_INPUT");
  const std::string v = env != nullptr ? env : "";
  return v == "x8" ? kGemvX8 : v == "exact" ? kGemvExact : kGemvX16;
}
std::atomic<int> g_inexact{gemv_input_from_env() == kGemvX8 ? kGemvX8 : kGemvX16};  // what set_exact_gemv(0) restores
std::atomic<int> g_gemv{[] {
  const char* env = std::getenv("GPTOSS_MXFP4_EXACT_GEMV");
  return env != nullptr && std::string(env) == "1" ? kGemvExact : gemv_input_from_env();
}()};

// Unskipped pairs (m, s) bucketed by expert, stable: order[start[e] .. start[e+1]) are expert e's pairs
// (p = m * S + s).
void SortPairs(const Problem& pr, std::vector<int64_t>& start, std::vector<int64_t>& order) {
  const int64_t P = pr.M * pr.S;
  start.assign(pr.E + 1, 0);
  for (int64_t p = 0; p < P; ++p)
    if (pr.idx[p] >= 0) ++start[pr.idx[p] + 1];
  for (int64_t e = 0; e < pr.E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  order.resize(start[pr.E]);
  for (int64_t p = 0; p < P; ++p)
    if (pr.idx[p] >= 0) order[fill[pr.idx[p]]++] = p;
}

// "" if K is whole blocks and every index is < E, else the error message.
std::string CheckProblem(const Problem& pr) {
  if (pr.K % 32 != 0) return "K must be a multiple of 32";
  const int64_t P = pr.M * pr.S;
  for (int64_t p = 0; p < P; ++p)
    if (pr.idx[p] >= pr.E)
      return "expert index " + std::to_string(pr.idx[p]) + " out of range [0, " + std::to_string(pr.E) + ")";
  return "";
}

// Zeroes the output rows (`width` floats each) of the skipped pairs; returns the others.
std::vector<int64_t> UnskippedPairs(const Problem& pr, int64_t width) {
  std::vector<int64_t> pairs;
  const int64_t P = pr.M * pr.S;
  pairs.reserve(P);
  for (int64_t p = 0; p < P; ++p) {
    if (pr.idx[p] >= 0)
      pairs.push_back(p);
    else
      std::fill(pr.y + p * width, pr.y + (p + 1) * width, 0.0f);
  }
  return pairs;
}

// AMX grouped path: each expert's inputs are packed once into token tiles, then one task per (expert, 32 rows)
// dequantizes those rows to bf16 and multiplies them with all of the expert's tokens.
struct AmxJob {
  AmxFn fn;  // tile_amx, or its emulation
  const Problem* pr;
  int64_t G, chunks;
  struct Group { int64_t e, first, count, xb; };  // xb: offset of the group's token tiles in `xb`
  std::vector<Group> groups;
  std::vector<uint32_t> xb;
  std::vector<float*> ys;  // per sorted pair
};

constexpr int64_t kAmxRows = 32;

void AmxTask(void* ctx, int64_t task) {
  const AmxJob& j = *static_cast<const AmxJob*>(ctx);
  const AmxJob::Group& grp = j.groups[task / j.chunks];
  const int64_t n0 = (task % j.chunks) * kAmxRows, N = j.pr->N;
  uint16_t* wbuf = amx_scratch(j.G);
  AmxTile t{j.pr->blocks + (grp.e * N + n0) * j.G * 16, j.pr->scales + (grp.e * N + n0) * j.G, j.G,
            std::min(kAmxRows, N - n0), j.xb.data() + grp.xb, grp.count, &j.ys[grp.first], n0, g_bf16_lut.v, wbuf};
  j.fn(t);
}

void ComputeAmx(const Problem& pr, Pool& workers, AmxFn fn) {
  std::vector<int64_t> start, order;
  SortPairs(pr, start, order);
  AmxJob j;
  j.fn = fn, j.pr = &pr, j.G = pr.K / 32, j.chunks = (pr.N + kAmxRows - 1) / kAmxRows;
  const int64_t tile_words = j.G * 256;
  int64_t words = 0;
  for (int64_t e = 0; e < pr.E; ++e) {
    const int64_t count = start[e + 1] - start[e];
    if (count == 0) continue;
    j.groups.push_back({e, start[e], count, words});
    words += (count + 15) / 16 * tile_words;
  }
  j.xb.assign(words, 0u);
  j.ys.resize(order.size());
  const uint16_t* x = static_cast<const uint16_t*>(pr.x);
  for (const AmxJob::Group& grp : j.groups)
    for (int64_t i = 0; i < grp.count; ++i) {
      const int64_t p = order[grp.first + i];
      j.ys[grp.first + i] = pr.y + p * pr.N;
      pack_token(x + (p / pr.S) * pr.K, pr.K, i, j.xb.data() + grp.xb);
    }
  workers.Run(static_cast<int64_t>(j.groups.size()) * j.chunks, AmxTask, &j);
}

// AVX-512 BF16 grouped path: one task per (expert, kDpRows rows) dequantizes those rows to bf16 (a few at a time)
// and multiplies them with all of the expert's tokens, read in place.
struct DpJob {
  const Problem* pr;
  int64_t G, chunks;
  struct Group { int64_t e, first, count; };
  std::vector<Group> groups;
  std::vector<const uint16_t*> xs;  // per sorted pair
  std::vector<float*> ys;
};

void DpTask(void* ctx, int64_t task) {
#if defined(GPTOSS_HAVE_AVX512BF16)
  const DpJob& j = *static_cast<const DpJob*>(ctx);
  const DpJob::Group& grp = j.groups[task / j.chunks];
  const int64_t n0 = (task % j.chunks) * kDpRows, N = j.pr->N;
  const DpTile t{j.pr->blocks + (grp.e * N + n0) * j.G * 16, j.pr->scales + (grp.e * N + n0) * j.G, j.G,
                 std::min(kDpRows, N - n0), &j.xs[grp.first], grp.count, &j.ys[grp.first], n0, g_bf16_lut.v};
  tile_dp_bf16(t);
#else
  static_cast<void>(ctx), static_cast<void>(task);
#endif
}

void ComputeDp(const Problem& pr, Pool& workers) {
  std::vector<int64_t> start, order;
  SortPairs(pr, start, order);
  DpJob j;
  j.pr = &pr, j.G = pr.K / 32, j.chunks = (pr.N + kDpRows - 1) / kDpRows;
  for (int64_t e = 0; e < pr.E; ++e)
    if (start[e + 1] > start[e]) j.groups.push_back({e, start[e], start[e + 1] - start[e]});
  const uint16_t* x = static_cast<const uint16_t*>(pr.x);
  for (int64_t p : order) j.xs.push_back(x + (p / pr.S) * pr.K), j.ys.push_back(pr.y + p * pr.N);
  workers.Run(static_cast<int64_t>(j.groups.size()) * j.chunks, DpTask, &j);
}

// Whether the AVX-512 BF16 tiles serve this ISA choice.
bool dp_serves(int isa) {
#if defined(GPTOSS_HAVE_AVX512BF16)
  return isa == kAvx512Bf16 && dp_bf16_usable();
#else
  static_cast<void>(isa);
  return false;
#endif
}

// Returns "" on success, else an error message.
std::string Compute(const Problem& pr, bool grouped) {
  const std::string err = CheckProblem(pr);
  if (!err.empty() || pr.N == 0) return err;
  Job j;
  j.pairs = UnskippedPairs(pr, pr.N);
  const int64_t A = static_cast<int64_t>(j.pairs.size());
  if (A == 0) return "";
  if (pr.K == 0) {
    for (int64_t p : j.pairs) std::fill(pr.y + p * pr.N, pr.y + (p + 1) * pr.N, 0.0f);
    return "";
  }
  Pool& workers = pool();
  const int isa = g_isa.load();
  if (const AmxFn fn = amx_fn(isa); fn != nullptr && grouped && pr.x_bf16) {
    ComputeAmx(pr, workers, fn);
    return "";
  }
  if (dp_serves(isa) && grouped && pr.x_bf16) {
    ComputeDp(pr, workers);
    return "";
  }
  thread_local std::vector<float> xp;
  j.fn = tile_fn(isa);
  PermuteInputs(pr, tile_reads_xq(j.fn), xp);
  j.G = pr.K / 32, j.N = pr.N, j.blocks = pr.blocks, j.scales = pr.scales, j.idx = pr.idx;
  j.xs.resize(A), j.ys.resize(A);
  if (!grouped) {
    // guided tasks over all pairs' rows in turn (pool.h), each cut where its pair's rows end
    thread_local std::vector<int64_t> guided;
    GuidedTasks(A * pr.N, j.G * 17, 4, 0, workers.size(), guided);
    j.starts.clear();
    for (size_t i = 0; i + 1 < guided.size(); ++i)
      for (int64_t at = guided[i]; at < guided[i + 1]; at = (at / pr.N + 1) * pr.N) j.starts.push_back(at);
    j.starts.push_back(A * pr.N);
    for (int64_t a = 0; a < A; ++a) {
      j.xs[a] = xp.data() + (j.pairs[a] / pr.S) * pr.K;
      j.ys[a] = pr.y + j.pairs[a] * pr.N;
    }
    thread_local std::vector<uint8_t> xi;
    thread_local std::vector<const uint8_t*> token_xi;  // per token: its x16 / x8 input, or null (fp32 only)
    const int mode = g_gemv.load();
    if (tile_reads_x16(j.fn) && mode != kGemvExact && j.G >= kX16Blocks) {
      j.x8 = mode == kGemvX8 && tile_reads_x8(j.fn);
      const int64_t stride = j.G / kX16Blocks * (j.x8 ? kX8GroupBytes : kX16GroupBytes);  // one token's input
      xi.resize(static_cast<size_t>(pr.M * stride + 64));
      uint8_t* base = xi.data() + (-reinterpret_cast<uintptr_t>(xi.data()) & 63);
      token_xi.resize(pr.M);
      const ExactFp fp;  // this may be an XLA thread (denormals-are-zero): subnormal x must count as nonzero
      const int64_t row = pr.K * (pr.x_bf16 ? 2 : 4);
      for (int64_t m = 0; m < pr.M; ++m) {
        const void* x = static_cast<const char*>(pr.x) + m * row;
        token_xi[m] = (j.x8 ? PrepareX8 : PrepareX16)(x, pr.x_bf16, pr.K, base + m * stride) ? base + m * stride
                                                                                              : nullptr;
      }
      j.xis.resize(A);
      for (int64_t a = 0; a < A; ++a) j.xis[a] = token_xi[j.pairs[a] / pr.S];
    }
    workers.Run(static_cast<int64_t>(j.starts.size()) - 1, GatherTask, &j);
    return "";
  }
  std::vector<int64_t> start, order;
  SortPairs(pr, start, order);
  for (int64_t at = 0; at < A; ++at) {
    j.xs[at] = xp.data() + (order[at] / pr.S) * pr.K;
    j.ys[at] = pr.y + order[at] * pr.N;
  }
  // inputs per task: kGroupTokens x K fp32 stays in L2 while a row chunk streams
  for (int64_t e = 0; e < pr.E; ++e)
    for (int64_t f = start[e]; f < start[e + 1]; f += kGroupTokens)
      j.groups.push_back({e, f, std::min(kGroupTokens, start[e + 1] - f)});
  j.rows_per_task = std::min(kGroupRows, pr.N);
  j.chunks = (pr.N + j.rows_per_task - 1) / j.rows_per_task;
  workers.Run(static_cast<int64_t>(j.groups.size()) * j.chunks, GroupedTask, &j);
  return "";
}

// ------------------------------------------------------------------------------ driver, transposed product
// Here Problem::x is dy [M, S, N] and Problem::y is dx [M, S, K].
struct TJob {
  TTileFn fn;
  const Problem* pr;
  int64_t G, blocks_per_task, chunks;
  // one task per (group, block chunk); a group is one pair (gather) or up to kTokenBlockT pairs of one expert
  struct Group { int64_t e, first, count; const float* dy; };  // dy: [N][count], token-minor (TTile::dy)
  std::vector<Group> groups;
  std::vector<int64_t> pairs;  // unskipped pairs, in group order
  std::vector<float*> dxs;     // their output rows
  float* dyt = nullptr;        // where PackTask writes the groups' dy (group g at groups[g].first * N)
};

constexpr int64_t kTokenBlockT = 64;  // pairs per group: dy of 64 tokens x a pass's rows stays in L1

// Writes a group's dy token-minor and in fp32 (where Group::dy points).
void PackTask(void* ctx, int64_t gi) {
  const TJob& j = *static_cast<const TJob*>(ctx);
  const TJob::Group& grp = j.groups[gi];
  const int64_t N = j.pr->N;
  float* out = j.dyt + grp.first * N;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < grp.count; ++i) out[n * grp.count + i] = InputAt(*j.pr, j.pairs[grp.first + i] * N + n);
}

void TransposedTask(void* ctx, int64_t task) {
  const ExactFp fp;
  const TJob& j = *static_cast<const TJob*>(ctx);
  const TJob::Group& grp = j.groups[task / j.chunks];
  const int64_t g0 = (task % j.chunks) * j.blocks_per_task, row0 = grp.e * j.pr->N;
  TTile t{j.pr->blocks + row0 * j.G * 16, j.pr->scales + row0 * j.G, j.G, j.pr->N, g0,
          std::min(j.G, g0 + j.blocks_per_task), grp.dy, grp.count, &j.dxs[grp.first], g_scales.v};
  j.fn(t);
}

std::string ComputeT(const Problem& pr, bool grouped) {
  const std::string err = CheckProblem(pr);
  if (!err.empty() || pr.K == 0) return err;
  TJob j;
  j.pairs = UnskippedPairs(pr, pr.K);
  const int64_t A = static_cast<int64_t>(j.pairs.size());
  if (A == 0) return "";
  if (pr.N == 0) {  // an empty sum
    for (int64_t p : j.pairs) std::fill(pr.y + p * pr.K, pr.y + (p + 1) * pr.K, 0.0f);
    return "";
  }
  Pool& workers = pool();
  j.fn = tile_t_fn(g_isa.load());
  j.pr = &pr, j.G = pr.K / 32;
  if (grouped) {
    std::vector<int64_t> start;
    SortPairs(pr, start, j.pairs);
    for (int64_t e = 0; e < pr.E; ++e)
      for (int64_t f = start[e]; f < start[e + 1]; f += kTokenBlockT)
        j.groups.push_back({e, f, std::min(kTokenBlockT, start[e + 1] - f), nullptr});
  } else {
    for (int64_t a = 0; a < A; ++a) j.groups.push_back({pr.idx[j.pairs[a]], a, 1, nullptr});
  }
  j.dxs.resize(A);
  for (int64_t a = 0; a < A; ++a) j.dxs[a] = pr.y + j.pairs[a] * pr.K;
  const int64_t ngroups = static_cast<int64_t>(j.groups.size());
  if (grouped || pr.x_bf16) {
    thread_local std::vector<float> dyt;
    dyt.resize(static_cast<size_t>(A * pr.N));
    j.dyt = dyt.data();
    for (TJob::Group& grp : j.groups) grp.dy = j.dyt + grp.first * pr.N;
    workers.Run(ngroups, PackTask, &j);
  } else {  // one fp32 token per group: dy's own row is already token-minor
    for (TJob::Group& grp : j.groups) grp.dy = static_cast<const float*>(pr.x) + j.pairs[grp.first] * pr.N;
  }
  // blocks per task: whole 64-byte lines of each row (4 blocks) up to 16, small enough for ~8 tasks per thread
  const int64_t per = j.G * ngroups / (8 * workers.size()) / 4 * 4;
  j.blocks_per_task = std::min<int64_t>(std::min<int64_t>(std::max<int64_t>(per, 4), 16), j.G);
  j.chunks = (j.G + j.blocks_per_task - 1) / j.blocks_per_task;
  workers.Run(ngroups * j.chunks, TransposedTask, &j);
  return "";
}

// ---------------------------------------------------------------------------------------------- FFI
// Attributes: grouped (int64, required), transpose (int64, optional, default 0).
ffi::Error Mxfp4Matmul(ffi::AnyBuffer in, ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales,
                       ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out, ffi::Dictionary attrs) {
  const ffi::ErrorOr<int64_t> grouped = attrs.get<int64_t>("grouped");
  if (!grouped.has_value()) return ffi::Error::InvalidArgument("mxfp4 matmul: needs the int64 attribute `grouped`");
  int64_t transpose = 0;
  if (attrs.contains("transpose")) {
    const ffi::ErrorOr<int64_t> t = attrs.get<int64_t>("transpose");
    if (!t.has_value()) return ffi::Error::InvalidArgument("mxfp4 matmul: the attribute `transpose` must be int64");
    transpose = *t;
  }
  const auto xd = in.dimensions(), bd = blocks.dimensions(), sd = scales.dimensions(), id = idx.dimensions();
  const auto yd = out->dimensions();
  if (in.element_type() != ffi::F32 && in.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument(transpose ? "mxfp4 matmul: dy must be float32 or bfloat16"
                                                 : "mxfp4 matmul: x must be float32 or bfloat16");
  if (xd.size() != (transpose ? 3u : 2u) || bd.size() != 4 || sd.size() != 3 || id.size() != 2 || yd.size() != 3)
    return ffi::Error::InvalidArgument(
        transpose ? "mxfp4 matmul: expected dy [M,S,N], blocks [E,N,G,16], scales [E,N,G], idx [M,S], dx [M,S,K]"
                  : "mxfp4 matmul: expected x [M,K], blocks [E,N,G,16], scales [E,N,G], idx [M,S], y [M,S,N]");
  const int64_t M = id[0], S = id[1], E = bd[0], N = bd[1], G = bd[2];
  const int64_t K = transpose ? yd[2] : xd[1];
  const bool x_ok = transpose ? xd[0] == M && xd[1] == S && xd[2] == N : xd[0] == M;
  if (bd[3] != 16 || K != 32 * G || sd[0] != E || sd[1] != N || sd[2] != G || !x_ok || yd[0] != M || yd[1] != S ||
      yd[2] != (transpose ? K : N))
    return ffi::Error::InvalidArgument("mxfp4 matmul: inconsistent operand shapes");
  const Problem pr{in.untyped_data(), in.element_type() == ffi::BF16, blocks.typed_data(), scales.typed_data(),
                   idx.typed_data(), out->typed_data(), M, K, E, N, S};
  const std::string err = transpose ? ComputeT(pr, *grouped != 0) : Compute(pr, *grouped != 0);
  if (!err.empty()) return ffi::Error::InvalidArgument("mxfp4 matmul: " + err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gptoss

#define GPTOSS_EXPORT __attribute__((visibility("default")))

extern "C" GPTOSS_EXPORT XLA_FFI_Error* GptossMxfp4Matmul(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4Matmul, gptoss::Mxfp4Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attrs());

// ------------------------------------------------------------------------------------- plain C entry
extern "C" {

// Same computation without XLA (for ctypes benchmarks and tests). Returns 0, or -1 on bad arguments.
GPTOSS_EXPORT int gptoss_mxfp4_matmul(const void* x, int x_bf16, const uint8_t* blocks, const uint8_t* scales,
                        const int32_t* idx, float* y, int64_t M, int64_t K, int64_t E, int64_t N, int64_t S,
                        int grouped) {
  const gptoss::Problem pr{x, x_bf16 != 0, blocks, scales, idx, y, M, K, E, N, S};
  return gptoss::Compute(pr, grouped != 0).empty() ? 0 : -1;
}

// The transposed product dx [M, S, K] = W[idx]^T dy [M, S, N] (dy fp32, or bf16 when dy_bf16), same conventions.
GPTOSS_EXPORT int gptoss_mxfp4_matmul_t(const void* dy, int dy_bf16, const uint8_t* blocks, const uint8_t* scales,
                                        const int32_t* idx, float* dx, int64_t M, int64_t K, int64_t E, int64_t N,
                                        int64_t S, int grouped) {
  const gptoss::Problem pr{dy, dy_bf16 != 0, blocks, scales, idx, dx, M, K, E, N, S};
  return gptoss::ComputeT(pr, grouped != 0).empty() ? 0 : -1;
}

GPTOSS_EXPORT int gptoss_mxfp4_best_isa() { return gptoss::best_isa(); }
GPTOSS_EXPORT int gptoss_mxfp4_isa() { return gptoss::g_isa.load(); }

// 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 BF16, 4 AMX, capped at what the CPU supports, or 5 the AMX path emulated
// (any CPU); returns the ISA now in use.
GPTOSS_EXPORT int gptoss_mxfp4_set_isa(int isa) {
  gptoss::g_isa.store(isa == gptoss::kAmxEmulated ? isa : std::max(0, std::min(isa, gptoss::best_isa())));
  return gptoss::g_isa.load();
}

// 1: one-token GEMVs on the x16 tiles (AVX2, AVX-512 VNNI) use exact fp32 inputs; 0: back to x16 (the default) or
// x8, whichever was chosen last. Returns the previous value.
GPTOSS_EXPORT int gptoss_mxfp4_set_exact_gemv(int exact) {
  return gptoss::g_gemv.exchange(exact != 0 ? gptoss::kGemvExact : gptoss::g_inexact.load()) == gptoss::kGemvExact;
}
GPTOSS_EXPORT int gptoss_mxfp4_exact_gemv() { return gptoss::g_gemv.load() == gptoss::kGemvExact ? 1 : 0; }
// 0 exact, 1 x16, 2 x8 (mxfp4_kernel.h); anything else is refused (-1). Returns the previous value.
GPTOSS_EXPORT int gptoss_mxfp4_set_gemv_input(int mode) {
  if (mode < gptoss::kGemvExact || mode > gptoss::kGemvX8) return -1;
  if (mode != gptoss::kGemvExact) gptoss::g_inexact.store(mode);
  return gptoss::g_gemv.exchange(mode);
}
GPTOSS_EXPORT int gptoss_mxfp4_gemv_input() { return gptoss::g_gemv.load(); }
// Whether the ISA choice now in use runs one-token GEMVs on x16 (x8) inputs: its tile has the kernels, and that mode.
GPTOSS_EXPORT int gptoss_mxfp4_x16_active() {
  return gptoss::g_gemv.load() == gptoss::kGemvX16 && gptoss::tile_reads_x16(gptoss::tile_fn(gptoss::g_isa.load()));
}
GPTOSS_EXPORT int gptoss_mxfp4_x8_active() {
  return gptoss::g_gemv.load() == gptoss::kGemvX8 && gptoss::tile_reads_x8(gptoss::tile_fn(gptoss::g_isa.load()));
}

GPTOSS_EXPORT int gptoss_mxfp4_num_threads() { return gptoss::pool().size(); }

// n <= 0 restores the default (GPTOSS_MXFP4_THREADS or the CPU count); returns the pool size.
GPTOSS_EXPORT int gptoss_mxfp4_set_num_threads(int n) {
  return gptoss::set_pool_threads(n);
}

// How long idle pool workers poll for the next call before sleeping (us); n < 0 restores the default
// (GPTOSS_POOL_SPIN_US or 1000). Returns the value in use.
GPTOSS_EXPORT int gptoss_mxfp4_set_spin_micros(int us) { return gptoss::set_spin_micros(us); }

}  // extern "C"
