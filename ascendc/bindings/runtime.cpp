// The host runtime of the kernels: grid launches on torch's intra-op thread pool (or, once set_kernel_threads
// asks for it, on the cooperative pool of coop_pool.h), per-thread scratch memory.
// Compiled with -fopenmp (CMakeLists.txt): at::parallel_for's OpenMP pragma is instantiated in this file.
#include "bindings/runtime.h"

#include "bindings/coop_pool.h"

#include <ATen/Parallel.h>
#include <sys/mman.h>

#include <cstdlib>
#include <new>

namespace omni {
namespace {

constexpr int64_t kCoopBlocksPerThread = 4;

void LaunchOnTorchPool(int64_t block_num, void* ctx, OmniBlockFn fn) {
  at::parallel_for(0, block_num, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(ctx, i);
  });
}

}  // namespace

OmniRuntime Runtime() {
  const int coop = CoopThreads();
  // Four blocks per thread: a helper descheduled while it holds a block delays the launch by that block only.
  if (coop > 1) return OmniRuntime{&CoopLaunch, static_cast<int64_t>(coop) * kCoopBlocksPerThread};
  return OmniRuntime{&LaunchOnTorchPool, static_cast<int64_t>(at::get_num_threads())};
}

void* Workspace(int64_t bytes) {
  struct Buffer {
    void* p = nullptr;
    size_t cap = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t want = bytes > 0 ? static_cast<size_t>(bytes) : 1;
  if (want > buf.cap) {
    const size_t cap = (want + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, cap);
    if (p == nullptr) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
    madvise(p, cap, MADV_HUGEPAGE);  // fewer TLB misses on the staged operands; a hint, failure is fine
#endif
    std::free(buf.p);
    buf.p = p;
    buf.cap = cap;
  }
  return buf.p;
}

}  // namespace omni
