// Quantized GEMM kernels (ascendc/kernels/quant_gemm/): out[M, N] = x[M, K] @ dequant(w[N, K]).T + bias.
// Layouts: omniops/quant/formats.py. Matrices have unit inner stride and the given row strides (elements);
// scales, zeros, packed int4 weights and bias are contiguous. `work` is scratch the bindings allocate with the
// size given per op; kernels write nothing outside out and work.
#pragma once
#include "omni/kernel_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

// out_dtype of w8a8: an OmniDType, or this value for the raw int32 accumulators (no scales, no bias).
#define OMNI_QGEMM_OUT_I32 100

// w_layout of w8a8: row-major [N, K] (0), or int8 prepacked for AMX tdpbssd (this value; the bit of
// weight_layouts): [ceil(N/16), ceil(K/64), 16, 16, 4] with element [nb][kb][k4][n][p] = w[16 nb + n][64 kb +
// 4 k4 + p], zero-padded, i.e. contiguous 1 KiB B tiles along K per 16-column block (cf. OMNI_W_TILES_BF16).
#define OMNI_W_TILES_I8 2

typedef struct {
  const int8_t* x;         // [M, K], row stride x_stride
  const float* x_scale;    // [M]
  const int8_t* w;         // [N, K], row stride w_stride
  const float* w_scale;    // [N]
  const void* bias;        // [N] in out_dtype, or NULL
  void* out;               // [M, N], row stride out_stride
  int64_t x_stride, w_stride, out_stride;
  int64_t M, N, K;         // K <= 131071: int32 accumulation is exact
  int32_t out_dtype;       // OmniDType or OMNI_QGEMM_OUT_I32
  int32_t w_layout;        // 0 or OMNI_W_TILES_I8 (then w points at the tiles; w_stride unused)
  void* workspace;         // w8a8_workspace(args) bytes, 64-byte aligned (tiles only)
  int64_t workspace_bytes;
} OmniW8A8Args;

typedef struct {
  const void* x;           // [M, K] in dtype, row stride x_stride
  const uint8_t* w;        // [N, K/2]: low nibble = even k, high nibble = odd k (codes 0..15)
  const float* scales;     // [N, K/group_size]
  const uint8_t* zeros;    // [N, K/group_size] codes 0..15, or NULL (symmetric: zero point 8)
  const void* bias;        // [N] in dtype, or NULL
  void* out;               // [M, N] in dtype, row stride out_stride
  float* work;             // [M, K] fp32 scratch (x widened once)
  int64_t x_stride, out_stride;
  int64_t M, N, K, group_size;  // K % group_size == 0, group_size even
  int32_t dtype;           // OmniDType of x, bias, out
} OmniW4A16Args;

typedef struct {
  const uint8_t* x;        // [M, K] float8_e4m3fn bits, row stride x_stride
  const float* x_scale;    // [M, ceil(K/128)] contiguous
  const uint8_t* w;        // [N, K] float8_e4m3fn bits, row stride w_stride
  const float* w_scale;    // [ceil(N/128), ceil(K/128)] contiguous
  const void* bias;        // [N] in out_dtype, or NULL
  void* out;               // [M, N], row stride out_stride
  float* work;             // [M, K] fp32 scratch (x dequantized once)
  int64_t x_stride, w_stride, out_stride;
  int64_t M, N, K;
  int32_t out_dtype;       // OmniDType
} OmniFp8BlockArgs;

typedef struct {
  const void* x;           // [M, K] in dtype, row stride x_stride
  int8_t* out;             // [M, K] contiguous: round_half_even(x / scale) clamped to -127..127
  float* scale;            // [M]: amax(|x[m]|) / 127 (0 for an all-zero row, whose codes are 0)
  int64_t x_stride, M, K;
  int32_t dtype;           // OmniDType
} OmniQuantI8Args;

typedef struct {
  const void* x;           // [M, K] in dtype, row stride x_stride
  uint8_t* out;            // [M, K] contiguous float8_e4m3fn bits: e4m3fn(clamp(x / scale, +-448)), RNE
  float* scale;            // [M, ceil(K/128)] contiguous: amax(|x| over the group of 128) / 448
  int64_t x_stride, M, K;
  int32_t dtype;           // OmniDType
} OmniQuantFp8Args;

typedef struct {
  void (*w8a8_gemm)(const OmniW8A8Args*, const OmniRuntime*);
  void (*w4a16_gemm)(const OmniW4A16Args*, const OmniRuntime*);
  void (*fp8_block_gemm)(const OmniFp8BlockArgs*, const OmniRuntime*);
  void (*quantize_per_token_int8)(const OmniQuantI8Args*, const OmniRuntime*);
  const char* int8_path;   // which int8 inner loop this library uses: "amx", "avx512-vnni", "avx2", "scalar"
  int64_t (*w8a8_workspace)(const OmniW8A8Args*);
  uint32_t weight_layouts;  // bit (1 << layout) for every w8a8 weight layout this library takes
  void (*quantize_fp8_group)(const OmniQuantFp8Args*, const OmniRuntime*);
} OmniQuantGemmKernels;
OMNI_EXPORT const OmniQuantGemmKernels* omni_quant_gemm_kernels(void);

#ifdef __cplusplus
}
#endif
