// Compiled into every libomni_kernels_<isa>.so: which ISA level and ABI this library was built for.
#include "omni/kernel_abi.h"

#ifndef OMNI_ISA_NAME
#define OMNI_ISA_NAME "generic"
#endif

extern "C" const OmniLibraryInfo* omni_library_info(void) {
  static const OmniLibraryInfo info = {OMNI_KERNEL_ABI_VERSION, OMNI_ISA_NAME};
  return &info;
}
