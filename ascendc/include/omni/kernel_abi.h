// The C ABI between the pybind11 module (omniops._C, links torch) and the per-ISA kernel libraries
// (libomni_kernels_<isa>.so, torch-free). One library is built per ISA level with its own compiler flags and
// loaded with dlopen(RTLD_LOCAL), so inline/template code compiled for AVX-512 can never be picked by the
// linker for the AVX2 path (the ODR trap of mixing -m flags in one shared object).
//
// Every argument struct carries raw pointers plus the sizes the kernel may touch. The bindings have already
// checked dtype, device, shapes and strides against these sizes; kernels trust them.
#pragma once
#include <stdint.h>

#define OMNI_KERNEL_ABI_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { OMNI_F32 = 0, OMNI_F16 = 1, OMNI_BF16 = 2 } OmniDType;

// A grid launch: run fn(ctx, i) for every i in [0, block_num), possibly in parallel. Provided by the host
// runtime in the bindings (torch's intra-op thread pool), so omniops shares threads with torch.
typedef void (*OmniBlockFn)(void* ctx, int64_t block_idx);
typedef void (*OmniLaunchFn)(int64_t block_num, void* ctx, OmniBlockFn fn);

typedef struct {
  OmniLaunchFn launch;
  int64_t num_cores;  // how many blocks can run at once (torch.get_num_threads())
} OmniRuntime;

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
  const void* x;           // [rows, 2*d]: gate = x[:, :d], up = x[:, d:]
  void* out;               // [rows, d]
  int64_t x_stride, out_stride;
  int64_t rows, d;
  int32_t dtype;
} OmniSiluAndMulArgs;

typedef struct {
  const int64_t* positions;  // [tokens], each in [0, max_position) (checked by the bindings)
  const void* q;             // [tokens, q_heads, head_size] with strides (q_token_stride, q_head_stride, 1)
  const void* k;             // [tokens, k_heads, head_size] or NULL when k_heads == 0
  void* q_out;               // same layout rules as q; may alias q
  void* k_out;
  const void* cos_sin_cache; // [max_position, rotary_dim] = cat(cos, sin), dtype cache_dtype, contiguous
  int64_t q_token_stride, q_head_stride, k_token_stride, k_head_stride;
  int64_t qo_token_stride, qo_head_stride, ko_token_stride, ko_head_stride;
  int64_t tokens, q_heads, k_heads, head_size, rotary_dim, max_position;
  int32_t is_neox;           // 1: rotate halves (GPT-NeoX/Llama); 0: interleaved pairs (GPT-J)
  int32_t copy_tail;         // 1: copy dims [rotary_dim, head_size) to the output (out-of-place call)
  int32_t dtype;             // of q, k, q_out, k_out
  int32_t cache_dtype;
} OmniRotaryArgs;

typedef struct {
  int32_t abi_version;
  const char* isa;  // "avx2", "avx512", "generic"
  void (*rms_norm)(const OmniRmsNormArgs*, const OmniRuntime*);
  void (*silu_and_mul)(const OmniSiluAndMulArgs*, const OmniRuntime*);
  void (*rotary_embedding)(const OmniRotaryArgs*, const OmniRuntime*);
} OmniKernelTable;

// Exported by each libomni_kernels_<isa>.so.
const OmniKernelTable* omni_kernel_table(void);
typedef const OmniKernelTable* (*OmniKernelTableFn)(void);

#ifdef __cplusplus
}
#endif
