// Exports the MoE kernels of this ISA library.
#include "kernels/moe/fused_moe.h"
#include "kernels/moe/moe_ops.h"

extern "C" const OmniMoeKernels* omni_moe_kernels(void) {
  namespace m = omni_kernels::moe;
  static const OmniMoeKernels t = {&m::moe_route, &m::moe_dispatch, &m::grouped_gemm,
                                   &m::moe_combine, &m::fused_moe_workspace, &m::fused_moe};
  return &t;
}
