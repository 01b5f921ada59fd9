// Exports the norm kernels of this ISA library.
#include "kernels/norm/rms_norm.h"

extern "C" const OmniNormKernels* omni_norm_kernels(void) {
  static const OmniNormKernels t = {&omni_kernels::rms_norm};
  return &t;
}
