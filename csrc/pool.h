// The persistent thread pool shared by every gptoss CPU kernel in the library (the calling thread works too).
#ifndef GPTOSS_POOL_H_
#define GPTOSS_POOL_H_

#include <stdint.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <vector>

namespace gptoss {

using TaskFn = void (*)(void*, int64_t);

// A worker joins a job only while it is open; the caller closes it once every task is claimed and then waits
// only for the workers that joined, so a worker that the OS has not yet woken (the cores are shared with other
// processes) never delays a call. A second concurrent Run (another XLA thread) runs its tasks inline.
// Between jobs a worker polls for the next one for spin_micros() before it sleeps, and the caller polls for the
// joined workers to finish: decode's kernel calls come every 0.1-2 ms, and each wake-up through the condition
// variable cost ~30 us of the call on a 2-core VM.
class Pool {
 public:
  explicit Pool(int n);
  int size() const { return n_; }
  void Stop();  // workers exit once idle; the object itself is leaked, so they never see freed memory
  void Run(int64_t ntasks, TaskFn fn, void* ctx);

 private:
  void Work();
  void Loop();

  const int n_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_;
  uint64_t gen_ = 0;
  std::atomic<uint64_t> posted_gen_{0};  // gen_, for polling without the lock
  std::atomic<int> joined_now_{0};       // joined_, for polling without the lock
  bool stop_ = false, open_ = false;
  int joined_ = 0;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t ntasks_ = 0;
  std::atomic<int64_t> next_{0};
};

// The process-wide pool, sized by set_pool_threads, else GPTOSS_MXFP4_THREADS, else the CPUs this process may
// run on. Recreated after fork (the child has none of the parent's workers).
Pool& pool();

// n <= 0 restores the default; returns the pool size.
int set_pool_threads(int n);

// How long idle workers (and a caller waiting for them) poll before sleeping: GPTOSS_POOL_SPIN_US, else 1000 us;
// 0 sleeps at once. set_spin_micros(n < 0) restores the default; both return the value in use.
int spin_micros();
int set_spin_micros(int us);

// Task boundaries for one pool run that streams `units` units (rows of a weight) of `unit_bytes` bytes, largest
// first: each task takes about (this call's bytes left + `after`) / (2 * threads), kept within [256 KiB, 4 MiB]
// and a multiple of `align` units. Each task start is a claim and a cold stream that the hardware prefetcher must
// find again: at 512 KiB tasks a Zen 4 read ~10 % below its rate at 2-8 MiB when memory was fast; shrinking tasks
// keep the run's tail (threads waiting for the last task) short. `after`: bytes later tasks of the same run read.
// Appends the starts to `starts` (cleared first) and then `units`.
void GuidedTasks(int64_t units, int64_t unit_bytes, int64_t align, int64_t after, int threads,
                 std::vector<int64_t>& starts);

}  // namespace gptoss

#endif  // GPTOSS_POOL_H_
