// The host runtime the kernels run on: grid launches on torch's intra-op thread pool and per-thread scratch.
#pragma once
#include <cstdint>

#include "omni/kernel_abi.h"

namespace omni {

OmniRuntime Runtime();
// Scratch memory for one kernel call, 64-byte aligned, reused across calls of the calling thread (grown when a
// call needs more). A fresh allocation per call of a large workspace is mmap'ed by malloc and page-faulted in
// on every call: at prefill sizes (100+ MiB for fused_moe) that costs more than the kernel. Valid until the
// next Workspace call on this thread.
void* Workspace(int64_t bytes);
// A kernel's scratch: a.workspace / a.workspace_bytes = `bytes` of this thread's workspace.
template <typename Args>
void SetWorkspace(Args& a, int64_t bytes) {
  a.workspace = Workspace(bytes);
  a.workspace_bytes = bytes;
}

}  // namespace omni
