// Shared by the binding translation units of omniops._C: kernel-library loading, the host runtime, argument
// checks that raise ValueError/TypeError naming the argument, and self-registration of op families.
// Binding TUs include only ATen's Tensor and torch's pybind casters (not torch/extension.h): ~6 s to compile
// instead of ~45 s each.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <string>
#include <utility>

#include "omni/kernel_abi.h"

namespace omni {
namespace py = pybind11;

// ---- op-family registration: each bindings/<family>.cpp has one `static RegisterFamily r("name", fn);` ----
using RegisterFn = void (*)(py::module_&);
struct RegisterFamily {
  RegisterFamily(const char* name, RegisterFn fn);
};
void RegisterAll(py::module_& m);

// ---- kernel libraries ------------------------------------------------------------------------------------
constexpr int kMaxIsas = 4;  // amx, avx512, avx2, generic
// Index of the active library (loading the best one for this CPU on first use).
int ActiveIsaIndex();
// Resolve `symbol` (an `omni_<family>_kernels` function) in library `isa_index`; throws if absent.
const void* ResolveTable(int isa_index, const char* symbol);
// The active library's ISA name ("amx", "avx512", ...).
const std::string& ActiveIsaName();

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

// ---- host runtime ------------------------------------------------------------------------------------------
OmniRuntime Runtime();
// Scratch memory for one kernel call, 64-byte aligned, reused across calls of the calling thread (grown when a
// call needs more). A fresh allocation per call of a large workspace is mmap'ed by malloc and page-faulted in
// on every call: at prefill sizes (100+ MiB for fused_moe) that costs more than the kernel. Valid until the
// next Workspace call on this thread.
void* Workspace(int64_t bytes);

// ---- argument checks ---------------------------------------------------------------------------------------
[[noreturn]] void ValueError(const std::string& msg);
[[noreturn]] void TypeError(const std::string& msg);
std::string Shape(const at::Tensor& t);
int32_t FloatDType(const at::Tensor& t, const char* name);
void CheckCpu(const at::Tensor& t, const char* name);
void CheckSameDtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name);
// A [rows, cols] matrix with unit inner stride; `written` tensors must not have overlapping rows.
void CheckMatrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, bool written);
// An output may be the very same view as an input (in place) but must not partly overlap it.
void CheckAlias(const at::Tensor& out, const at::Tensor& in, const char* out_name, const char* in_name);

}  // namespace omni
