// Activation kernels (ascendc/kernels/activation/).
#pragma once
#include "omni/kernel_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* x;           // [rows, 2*d]: gate = x[:, :d], up = x[:, d:]
  void* out;               // [rows, d]
  int64_t x_stride, out_stride;
  int64_t rows, d;
  int32_t dtype;
} OmniSiluAndMulArgs;

typedef struct {
  void (*silu_and_mul)(const OmniSiluAndMulArgs*, const OmniRuntime*);
} OmniActivationKernels;
OMNI_EXPORT const OmniActivationKernels* omni_activation_kernels(void);

#ifdef __cplusplus
}
#endif
