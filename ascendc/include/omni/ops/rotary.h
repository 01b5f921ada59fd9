// Rotary embedding kernels (ascendc/kernels/rotary/).
#pragma once
#include "omni/kernel_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

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
  void (*rotary_embedding)(const OmniRotaryArgs*, const OmniRuntime*);
} OmniRotaryKernels;
OMNI_EXPORT const OmniRotaryKernels* omni_rotary_kernels(void);

#ifdef __cplusplus
}
#endif
