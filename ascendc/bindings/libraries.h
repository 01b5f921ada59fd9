// The per-ISA kernel libraries: which one is active, loading it (dlopen, RTLD_LOCAL) and resolving the op
// families' kernel tables in it.
#pragma once
#include <atomic>
#include <string>
#include <vector>

namespace omni {

constexpr int kMaxIsas = 4;  // amx, avx512, avx2, generic
// Index of the active library (loading the best one for this CPU, or OMNI_ISA's, on first use).
int ActiveIsaIndex();
// The active library's ISA name ("amx", "avx512", ...).
const std::string& ActiveIsaName();
// Switch to `isa` ("auto" = the best this CPU can run); ValueError if it cannot run or load here.
void SetIsa(const std::string& isa);
// The ISA levels whose library exists and can run on this CPU, best first.
std::vector<std::string> AvailableIsas();
// Resolve `symbol` (an `omni_<family>_kernels` function) in library `isa_index` and call it.
const void* ResolveTable(int isa_index, const char* symbol);

// The kernel table of a family in the active library, e.g. Kernels<OmniNormKernels>("omni_norm_kernels").
template <typename Table>
const Table* Kernels(const char* symbol) {
  static std::atomic<const Table*> cache[kMaxIsas];
  const int idx = ActiveIsaIndex();
  const Table* t = cache[idx].load(std::memory_order_acquire);
  if (t == nullptr) {
    t = static_cast<const Table*>(ResolveTable(idx, symbol));
    cache[idx].store(t, std::memory_order_release);
  }
  return t;
}

}  // namespace omni
