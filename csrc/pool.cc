#include "pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <thread>

namespace gptoss {

Pool::Pool(int n) : n_(std::max(1, n)) {
  for (int i = 1; i < n_; ++i) std::thread([this] { Loop(); }).detach();
}

void Pool::Stop() {
  std::lock_guard<std::mutex> l(mu_);
  stop_ = true;
  cv_.notify_all();
}

void Pool::Run(int64_t ntasks, TaskFn fn, void* ctx) {
  std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
  if (n_ == 1 || ntasks <= 1 || !busy.owns_lock()) {
    for (int64_t i = 0; i < ntasks; ++i) fn(ctx, i);
    return;
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    fn_ = fn, ctx_ = ctx, ntasks_ = ntasks, open_ = true;
    next_.store(0);
    ++gen_;
  }
  cv_.notify_all();
  Work();
  std::unique_lock<std::mutex> l(mu_);
  open_ = false;
  done_.wait(l, [this] { return joined_ == 0; });  // no worker may still hold ctx when we return
}

void Pool::Work() {
  for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < ntasks_;) fn_(ctx_, i);
}

void Pool::Loop() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || gen_ != seen; });
      if (stop_) return;
      seen = gen_;
      if (!open_) continue;  // woke after the job was done
      ++joined_;
    }
    Work();
    std::lock_guard<std::mutex> l(mu_);
    if (--joined_ == 0) done_.notify_one();
  }
}

namespace {

int default_threads() {
  if (const char* env = std::getenv("GPTOSS_MXFP4_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

std::mutex g_pool_mu;
Pool* g_pool = nullptr;  // leaked on purpose: detached workers may outlive static destructors
int g_threads = 0;       // requested size; 0 = default_threads()

void AfterFork() { g_pool = nullptr; }
struct ForkHook {
  ForkHook() { pthread_atfork(nullptr, nullptr, AfterFork); }
};
const ForkHook g_fork_hook;

}  // namespace

Pool& pool() {
  std::lock_guard<std::mutex> l(g_pool_mu);
  const int want = g_threads > 0 ? g_threads : default_threads();
  if (g_pool == nullptr || g_pool->size() != want) {
    if (g_pool != nullptr) g_pool->Stop();
    g_pool = new Pool(want);
  }
  return *g_pool;
}

int set_pool_threads(int n) {
  {
    std::lock_guard<std::mutex> l(g_pool_mu);
    g_threads = std::max(0, n);
  }
  return pool().size();
}

}  // namespace gptoss
