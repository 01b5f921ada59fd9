// Attention kernels over a paged KV cache (ascendc/kernels/attention/).
//
// One kernel serves GQA decode, MLA decode (= one kv head shared by all H query heads, V = the first v_dim dims
// of the K rows) and varlen prefill with an optional paged prefix. The keys of sequence b are the positions
// [0, ctx_lens[b]) in the paged cache, followed (prefill only) by its new tokens k[cu_seqlens[b]:cu_seqlens[b+1]].
// The bindings have checked every index (block ids of the covered table entries, lengths, slots) and every
// shape/stride against the sizes below; the kernels trust them.
#pragma once
#include "omni/kernel_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  // query [rows, q_heads, head_dim] (rows = batch for decode, tokens for prefill); unit inner stride
  const void* q;
  int64_t q_token_stride, q_head_stride;
  // output [rows, q_heads, v_dim]; unit inner stride
  void* out;
  int64_t out_token_stride, out_head_stride;
  // paged cache: element (block, slot, kv_head, d) at block*block_stride + slot*token_stride + head*head_stride + d.
  // NULL when there is no cached prefix (plain prefill). k_cache == v_cache for MLA.
  const void* k_cache;
  const void* v_cache;
  int64_t k_block_stride, k_token_stride, k_head_stride;
  int64_t v_block_stride, v_token_stride, v_head_stride;
  int64_t block_size;
  const int32_t* block_table;  // [batch, table_stride]
  int64_t table_stride;
  const int32_t* ctx_lens;     // [batch] cached tokens per sequence (decode: seq_lens), or NULL (= 0)
  // prefill: new keys/values [tokens, kv_heads, *] and cu_seqlens [batch + 1]; NULL for decode
  const void* k;
  const void* v;
  int64_t kn_token_stride, kn_head_stride, vn_token_stride, vn_head_stride;
  const int32_t* cu_seqlens;
  // fp32 scratch of omni_attention_workspace_floats() floats (decode only; prefill keeps its state in the UB)
  float* workspace;
  int64_t batch, q_heads, kv_heads, head_dim, v_dim;
  int64_t num_splits;  // decode: key splits per (sequence, kv head) (flash-decoding); prefill: 1
  int64_t split_len;   // decode: keys per split
  int64_t window;      // decode: attend only to the last `window` keys (0 = all)
  float scale, soft_cap;  // soft_cap 0 = none
  int32_t causal;      // prefill
  int32_t dtype;       // OmniDType of q, out, caches, k, v
  // Optional attention mask (contiguous-KV attention, where key position p is column p): element (sequence b,
  // q head h, query row s of the sequence, key p) at mask + b*mask_batch_stride + h*mask_head_stride +
  // s*mask_q_stride + p (strides may be 0 to broadcast). kind: 0 none, 1 bool (uint8, nonzero = attend),
  // 2 fp32 added to the scaled (and soft-capped) scores. Decode rows have s = 0.
  const void* mask;
  int64_t mask_batch_stride, mask_head_stride, mask_q_stride;
  int32_t mask_kind;
} OmniPagedAttnArgs;

enum { OMNI_MASK_NONE = 0, OMNI_MASK_BOOL = 1, OMNI_MASK_ADD_F32 = 2 };

// Head-dim limits of the cpu kernels (tiles of the 192 KiB UB).
#define OMNI_ATTN_MAX_DECODE_DIM 768
#define OMNI_ATTN_MAX_PREFILL_DIM 256

static inline int64_t omni_attention_workspace_floats(int64_t batch, int64_t num_splits, int64_t q_heads,
                                                      int64_t head_dim, int64_t v_dim) {
  return batch * num_splits * q_heads * (head_dim + v_dim + 2);
}

typedef struct {
  const void* key;     // [tokens, kv_heads, head_dim], strides (key_token_stride, key_head_stride, 1)
  const void* value;   // [tokens, kv_heads, v_dim]
  int64_t key_token_stride, key_head_stride, value_token_stride, value_head_stride;
  void* k_cache;       // [num_blocks, block_size, kv_heads, head_dim] with strides
  void* v_cache;
  int64_t k_block_stride, k_token_stride, k_head_stride;
  int64_t v_block_stride, v_token_stride, v_head_stride;
  const int64_t* slot_mapping;  // [tokens], -1 or in [0, num_blocks * block_size)
  int64_t tokens, kv_heads, head_dim, v_dim, block_size;
  int32_t dtype;
} OmniReshapeAndCacheArgs;

typedef struct {
  const void* kv_c;    // [tokens, kv_lora_rank], row stride kv_c_stride
  const void* k_pe;    // [tokens, rope_dim], row stride k_pe_stride
  int64_t kv_c_stride, k_pe_stride;
  void* kv_cache;      // [num_blocks, block_size, kv_lora_rank + rope_dim], strides (block, token, 1)
  int64_t block_stride, token_stride;
  const int64_t* slot_mapping;
  int64_t tokens, kv_lora_rank, rope_dim, block_size;
  int32_t dtype;
} OmniMlaCacheArgs;

// Attention over contiguous K/V in SDPA layout (HF's DynamicCache). Element (b, h, s, d) of q is at
// q + b*q_strides[0] + h*q_strides[1] + s*q_strides[2] + d (likewise k, v, out with their heads and positions).
// The kernel serves it with the paged kernel: sequence b's keys are one "block" of kv_len slots. q_len == 1 runs
// the split-KV decode over the batch; q_len > 1 the prefill once per sequence with the first kv_len - q_len keys
// as the cached prefix (causal = bottom-right aligned). The mask as in OmniPagedAttnArgs; broadcast dims have
// stride 0.
typedef struct {
  const void* q;    // [batch, q_heads, q_len, head_dim]
  const void* k;    // [batch, kv_heads, kv_len, head_dim]
  const void* v;    // [batch, kv_heads, kv_len, v_dim]
  void* out;        // [batch, q_heads, q_len, v_dim]
  int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3];  // (batch, head, position), elements
  const void* mask;
  int64_t mask_batch_stride, mask_head_stride, mask_q_stride;
  int32_t mask_kind;
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim;  // kv_len in [q_len, 2**31), > 0
  float scale;
  int32_t causal;
  int32_t dtype;
  void* workspace;  // dense_attention_workspace(args) bytes, 64-byte aligned
} OmniDenseAttnArgs;

typedef struct {
  void (*paged_attention)(const OmniPagedAttnArgs*, const OmniRuntime*);
  void (*reshape_and_cache)(const OmniReshapeAndCacheArgs*, const OmniRuntime*);
  void (*mla_cache)(const OmniMlaCacheArgs*, const OmniRuntime*);
  // Decode scheduling: sets num_splits / split_len of a decode over keys [0, max_len) for the runtime's cores;
  // returns the workspace bytes the call then needs (a->workspace).
  int64_t (*plan_decode)(OmniPagedAttnArgs* a, int64_t max_len, const OmniRuntime* rt);
  int64_t (*dense_attention_workspace)(const OmniDenseAttnArgs*, const OmniRuntime*);
  void (*dense_attention)(const OmniDenseAttnArgs*, const OmniRuntime*);
} OmniAttentionKernels;
OMNI_EXPORT const OmniAttentionKernels* omni_attention_kernels(void);

#ifdef __cplusplus
}
#endif
