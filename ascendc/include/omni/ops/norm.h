// RMSNorm kernels (ascendc/kernels/norm/).
#pragma once
#include "omni/kernel_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* x;           // [rows, hidden], row stride x_stride (elements), unit inner stride
  const void* residual;    // [rows, hidden] or NULL
  const void* weight;      // [hidden]
  void* out;               // [rows, hidden]; may alias x (in-place)
  void* residual_out;      // [rows, hidden] (x + residual, rounded to dtype) or NULL; may alias residual
  int64_t x_stride, residual_stride, out_stride, residual_out_stride;
  int64_t rows, hidden;
  float eps;
  int32_t dtype;           // OmniDType of x, residual, weight, out
} OmniRmsNormArgs;

typedef struct {
  void (*rms_norm)(const OmniRmsNormArgs*, const OmniRuntime*);
} OmniNormKernels;
OMNI_EXPORT const OmniNormKernels* omni_norm_kernels(void);

#ifdef __cplusplus
}
#endif
