// Exports the rotary-embedding kernels of this ISA library.
#include "kernels/rotary/rotary_embedding.h"

extern "C" const OmniRotaryKernels* omni_rotary_kernels(void) {
  static const OmniRotaryKernels t = {&omni_kernels::rotary_embedding};
  return &t;
}
