// A roofline probe for decode: reads byte ranges on the kernels' own pool and does nothing else with them. A decode
// step's weight bytes read this way, in the same seconds as the step, take what a kernel bound only by memory
// would take: on a shared machine whose read bandwidth drifts by 2x within minutes, the only fair yardstick.
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "pool.h"

namespace gptoss {
namespace {

struct Chunk {
  const uint8_t* p;
  int64_t n;
};

struct Job {
  std::vector<Chunk> chunks;
  std::vector<uint64_t> sums;
};

// The sum of the 64-bit little-endian words (mod 2**64; a last partial word zero-padded): something the compiler
// cannot drop, and numpy can check.
uint64_t SumWords(const uint8_t* p, int64_t n) {
  uint64_t s[8] = {};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    for (int j = 0; j < 8; ++j) {
      uint64_t w;
      memcpy(&w, p + i + 8 * j, 8);
      s[j] += w;
    }
  }
  uint64_t t = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    t += w;
  }
  if (i < n) {
    uint64_t w = 0;
    memcpy(&w, p + i, n - i);
    t += w;
  }
  return t;
}

void Task(void* ctx, int64_t i) {
  Job& job = *static_cast<Job*>(ctx);
  job.sums[i] = SumWords(job.chunks[i].p, job.chunks[i].n);
}

}  // namespace
}  // namespace gptoss

#define GPTOSS_EXPORT __attribute__((visibility("default")))

extern "C" {

// Reads n byte ranges (ptrs[i], nbytes[i]) as one pool run, each cut into forward-streamed chunks of a multiple of
// 4 KiB (about 4 per thread, 64 KiB to 4 MiB: the kernels' task sizes); returns the sum of every range's words.
GPTOSS_EXPORT uint64_t gptoss_read_probe(const void* const* ptrs, const int64_t* nbytes, int64_t n) {
  gptoss::Pool& workers = gptoss::pool();
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += std::max<int64_t>(0, nbytes[i]);
  int64_t chunk = std::clamp<int64_t>(total / (4 * workers.size()), 64 << 10, 4 << 20);
  chunk = (chunk + 4095) & ~int64_t{4095};
  gptoss::Job job;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* p = static_cast<const uint8_t*>(ptrs[i]);
    for (int64_t off = 0; off < nbytes[i]; off += chunk) {
      job.chunks.push_back({p + off, std::min(chunk, nbytes[i] - off)});
    }
  }
  job.sums.assign(job.chunks.size(), 0);
  workers.Run(static_cast<int64_t>(job.chunks.size()), gptoss::Task, &job);
  uint64_t sum = 0;
  for (uint64_t s : job.sums) sum += s;
  return sum;
}

}  // extern "C"
