// Compiled once per ISA level into libomni_kernels_<isa>.so (see CMakeLists.txt): the same kernel sources,
// different -m flags, each in its own inline namespace and shared object.
#include "omni/kernel_abi.h"

#include "kernels/activation/silu_and_mul.h"
#include "kernels/norm/rms_norm.h"
#include "kernels/rotary/rotary_embedding.h"

#ifndef OMNI_ISA_NAME
#define OMNI_ISA_NAME "generic"
#endif

extern "C" __attribute__((visibility("default"))) const OmniKernelTable* omni_kernel_table(void) {
  static const OmniKernelTable table = {
      OMNI_KERNEL_ABI_VERSION,
      OMNI_ISA_NAME,
      &omni_kernels::rms_norm,
      &omni_kernels::silu_and_mul,
      &omni_kernels::rotary_embedding,
  };
  return &table;
}
