// The cooperative kernel pool (coop_pool.h).
//
// One job at a time (launches are serialised). A job is published as (ctx, fn, num) plus a 64-bit ticket word
// = epoch << 32 | blocks not yet claimed; a thread claims one by a CAS (e, r) -> (e, r - 1) and runs block
// num - r. A successful claim means the job still had blocks left, so it is live and its fields are the ones
// read; a helper holding an older ticket fails its CAS. The caller returns once every block is done. A launch
// from inside a block (or while another thread's launch runs) would wait on itself: it runs inline. After a
// launch that waited long on a helper twice in a row the caller runs alone for kSoloSpell (another process has
// the cores).
#include "bindings/coop_pool.h"

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace omni {
namespace {

class CoopPool {
 public:
  // A forked child has this object but not the helper threads: forget them (never join or destroy them there).
  // The locks and the condition variable may be mid-use by a parent's thread that the child does not have:
  // start them afresh too (the old state is dropped, not destroyed).
  void ForgetHelpersAfterFork() {
    new std::vector<std::thread>(std::move(helpers_));  // leaked on purpose: a thread object of no thread
    helpers_.clear();
    threads_.store(1, std::memory_order_release);
    new (&mu_) std::mutex;
    new (&launch_mu_) std::mutex;
    new (&cv_) std::condition_variable;
    sleepers_.store(0, std::memory_order_relaxed);
    solo_until_ = {};
  }

  void Resize(int threads) {
    std::lock_guard<std::mutex> job(launch_mu_);  // not while another thread's launch uses the helpers
    StopHelpers();
    for (int i = 1; i < threads; ++i) helpers_.emplace_back([this] { HelperLoop(); });
    threads_.store(threads, std::memory_order_release);
  }
  // Read on every kernel call (Runtime()): an atomic, not the helper vector that Resize changes.
  int Threads() const { return threads_.load(std::memory_order_acquire); }

  void Launch(int64_t num, void* ctx, OmniBlockFn fn) {
    std::unique_lock<std::mutex> job(launch_mu_, std::defer_lock);
    // helpers_ is read only under the job lock (Resize takes it too)
    if (num <= 1 || in_block_ || !job.try_lock() || helpers_.empty() || Clock::now() < solo_until_) {
      for (int64_t i = 0; i < num; ++i) fn(ctx, i);
      return;
    }
    ctx_ = ctx;
    fn_ = fn;
    num_ = num;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t epoch = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
    ticket_.store(epoch << 32 | static_cast<uint64_t>(num), std::memory_order_release);  // publishes the fields
    if (sleepers_.load(std::memory_order_acquire) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    const Clock::time_point start = Clock::now();
    RunBlocks(epoch);
    const Clock::time_point own = Clock::now();
    // Blocks still running on helpers: spin a little (they are short), then let the core go.
    for (int s = 0; done_.load(std::memory_order_acquire) < num; ++s) {
      if (s < 4096) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
    // A helper that held a block far longer than the caller's whole share was descheduled. Twice within
    // kStallWindow: another process wants these cores now; run alone for a while rather than wait on it at every
    // launch (a rare preemption, e.g. by a niced batch job's slice, is cheaper to wait out).
    const Clock::time_point end = Clock::now();
    if (end - own > 2 * (own - start) + std::chrono::microseconds(200)) {
      if (end - last_stall_ < kStallWindow) solo_until_ = end + kSoloSpell;
      last_stall_ = end;
    }
    if (error_) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

 private:
  // Claims and runs blocks of `epoch` until none is left.
  void RunBlocks(uint64_t epoch) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while ((t >> 32) == epoch && (t & 0xffffffffu) != 0) {
      if (!ticket_.compare_exchange_weak(t, t - 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const int64_t i = num_ - static_cast<int64_t>(t & 0xffffffffu);
      in_block_ = true;
      try {
        fn_(ctx_, i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
      in_block_ = false;
      done_.fetch_add(1, std::memory_order_acq_rel);
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  void HelperLoop() {
    uint64_t seen = ticket_.load(std::memory_order_acquire) >> 32;
    // Spin this many polls for the next job before sleeping: a decode step launches kernels tens of microseconds
    // apart, and a futex wake-up costs about as much as a small kernel.
    constexpr int kSpins = 1 << 14;
    while (!stop_.load(std::memory_order_acquire)) {
      uint64_t epoch = ticket_.load(std::memory_order_acquire) >> 32;
      for (int s = 0; epoch == seen && s < kSpins && !stop_.load(std::memory_order_relaxed); ++s) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
        epoch = ticket_.load(std::memory_order_acquire) >> 32;
      }
      if (epoch == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lock, [&] {
          return stop_.load(std::memory_order_acquire) || (ticket_.load(std::memory_order_acquire) >> 32) != seen;
        });
        sleepers_.fetch_sub(1, std::memory_order_acq_rel);
        continue;
      }
      seen = epoch;
      RunBlocks(epoch);
    }
  }

  void StopHelpers() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true, std::memory_order_release);
      cv_.notify_all();
    }
    for (std::thread& t : helpers_) t.join();
    helpers_.clear();
    stop_.store(false, std::memory_order_release);
  }

  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds kSoloSpell{20}, kStallWindow{5};

  std::vector<std::thread> helpers_;
  Clock::time_point solo_until_{}, last_stall_{};
  std::atomic<int> threads_{1};
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  void* ctx_ = nullptr;
  OmniBlockFn fn_ = nullptr;
  int64_t num_ = 0;
  std::exception_ptr error_;
  std::mutex mu_, launch_mu_;
  std::condition_variable cv_;
  static thread_local bool in_block_;
};

thread_local bool CoopPool::in_block_ = false;

// Never destroyed: at exit the helpers may still be parked in a wait, and joining them from a static destructor
// (or destroying joinable threads) aborts the process; the OS reclaims them with it.
CoopPool& Pool() {
  static CoopPool* pool = [] {
    auto* p = new CoopPool;
    pthread_atfork(nullptr, nullptr, [] { Pool().ForgetHelpersAfterFork(); });
    return p;
  }();
  return *pool;
}

}  // namespace

void SetCoopThreads(int threads) {
  if (threads < 1 || threads > 1024)
    throw std::invalid_argument("threads: expected 1 to 1024 kernel threads, got " + std::to_string(threads));
  Pool().Resize(threads);
}
int CoopThreads() { return Pool().Threads(); }
void CoopLaunch(int64_t block_num, void* ctx, OmniBlockFn fn) { Pool().Launch(block_num, ctx, fn); }

}  // namespace omni
