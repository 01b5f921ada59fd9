// omniops._C: the pybind11 module. Each op family's bindings (ascendc/bindings/<family>.cpp) register
// themselves; common.cpp adds cpu_info/get_isa/set_isa. See common.h for what the bindings guarantee.
#include "bindings/common.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "omniops C++ kernels (AscendC-style, host build)";
  m.attr("KERNEL_ABI_VERSION") = OMNI_KERNEL_ABI_VERSION;
  omni::RegisterAll(m);
}
