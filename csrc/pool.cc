#include "pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <thread>

namespace gptoss {
namespace {

int default_spin() {
  const char* env = std::getenv("GPTOSS_POOL_SPIN_US");
  return env != nullptr ? std::max(0, std::atoi(env)) : 1000;
}
std::atomic<int> g_spin{default_spin()};

// Polls done() for up to spin_micros(); whether it became true. Yields now and then, so a spinning worker leaves
// its core to any other runnable thread (XLA's own between the kernel calls).
template <typename Done>
bool Poll(Done done) {
  const int us = g_spin.load(std::memory_order_relaxed);
  if (us <= 0) return done();
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  for (int i = 1;; ++i) {
    if (done()) return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if (i % 64 == 0) {
      if (std::chrono::steady_clock::now() >= until) return done();
      sched_yield();
    }
  }
}

}  // namespace

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
    posted_gen_.store(++gen_, std::memory_order_release);
  }
  cv_.notify_all();  // no system call while every worker polls
  Work();
  std::unique_lock<std::mutex> l(mu_);
  open_ = false;
  if (joined_ != 0) {
    l.unlock();
    Poll([this] { return joined_now_.load(std::memory_order_acquire) == 0; });
    l.lock();
  }
  done_.wait(l, [this] { return joined_ == 0; });  // no worker may still hold ctx when we return
}

void Pool::Work() {
  for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < ntasks_;) fn_(ctx_, i);
}

void Pool::Loop() {
  uint64_t seen = 0;
  for (;;) {
    Poll([&] { return posted_gen_.load(std::memory_order_acquire) != seen; });
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || gen_ != seen; });
      if (stop_) return;
      seen = gen_;
      if (!open_) continue;  // woke after the job was done
      joined_now_.store(++joined_, std::memory_order_relaxed);
    }
    Work();
    std::lock_guard<std::mutex> l(mu_);
    joined_now_.store(--joined_, std::memory_order_release);
    if (joined_ == 0) done_.notify_one();
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

void GuidedTasks(int64_t units, int64_t unit_bytes, int64_t align, int64_t after, int threads,
                 std::vector<int64_t>& starts) {
  constexpr int64_t kMinBytes = int64_t{256} << 10, kMaxBytes = int64_t{4} << 20;
  starts.clear();
  const int64_t row = std::max<int64_t>(1, unit_bytes), step = std::max<int64_t>(1, align);
  for (int64_t at = 0; at < units;) {
    starts.push_back(at);
    const int64_t left = (units - at) * row + after;
    const int64_t bytes = std::clamp<int64_t>(left / (2 * std::max(1, threads)), kMinBytes, kMaxBytes);
    at = std::min(units, at + std::max<int64_t>(1, bytes / row / step) * step);
  }
  starts.push_back(units);
}

int spin_micros() { return g_spin.load(); }

int set_spin_micros(int us) {
  g_spin.store(us < 0 ? default_spin() : us);
  return g_spin.load();
}

int set_pool_threads(int n) {
  {
    std::lock_guard<std::mutex> l(g_pool_mu);
    g_threads = std::max(0, n);
  }
  return pool().size();
}

}  // namespace gptoss
