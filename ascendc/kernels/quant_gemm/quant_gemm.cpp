// Exports the quantized GEMM kernels of this ISA library.
#include "kernels/quant_gemm/dequant_gemm.h"
#include "kernels/quant_gemm/w8a8_gemm.h"

extern "C" const OmniQuantGemmKernels* omni_quant_gemm_kernels(void) {
  static const OmniQuantGemmKernels t = {&omni_kernels::w8a8_gemm, &omni_kernels::w4a16_gemm,
                                         &omni_kernels::fp8_block_gemm,
                                         &omni_kernels::quantize_per_token_int8, OMNI_QGEMM_I8_PATH};
  return &t;
}
