// Exports the activation kernels of this ISA library.
#include "kernels/activation/silu_and_mul.h"

extern "C" const OmniActivationKernels* omni_activation_kernels(void) {
  static const OmniActivationKernels t = {&omni_kernels::silu_and_mul};
  return &t;
}
