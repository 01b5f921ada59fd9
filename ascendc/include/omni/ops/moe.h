// Mixture-of-Experts kernels (ascendc/kernels/moe/): routing, dispatch, grouped GEMM, combine, fused block.
// Index tensors are int32 and contiguous; the bindings have checked every id/offset against the sizes here.
#pragma once
#include "omni/kernel_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { OMNI_MOE_SOFTMAX = 0, OMNI_MOE_SIGMOID = 1 } OmniMoeScoring;
typedef enum { OMNI_MOE_SILU = 0 } OmniMoeActivation;

// How expert weights are laid out in memory.
//   OMNI_W_ROWS: [B, N, K] row-major, as in checkpoints.
//   OMNI_W_TILES_BF16: bf16 prepacked for AMX tdpbf16ps, [B, ceil(N/16), ceil(K/32), 16, 16, 2] with element
//     [b][nb][kb][k2][n][p] = W[b][16*nb + n][32*kb + 2*k2 + p], zero-padded: each (nb, kb) is one 1 KiB B tile
//     (16 rows of 16 column pairs, the VNNI order tdpbf16ps reads) and a column block's tiles are contiguous
//     along K, so a work item streams its weights sequentially. w13 [E, 2I, H] is packed as [2E, I, H]
//     (matrix 2e = gate rows of expert e, 2e + 1 = up rows).
//   OMNI_W_PANELS_F32: fp32 in column panels for outer products, [B, ceil(N/32), K, 32] with element
//     [b][nb][k][n] = W[b][32*nb + n][k], zero-padded in N: a panel is 32 weight rows transposed, one
//     sequential stream per 32 output columns. w13 [E, 2I, H] is packed as [E, ceil(I/16), H, 32]: panel p of
//     expert e holds gate rows 16p..16p+15 in columns 0-15 and the same up rows in 16-31 (I padded to 16).
typedef enum { OMNI_W_ROWS = 0, OMNI_W_TILES_BF16 = 1, OMNI_W_PANELS_F32 = 2 } OmniWeightLayout;

typedef struct {
  const void* logits;            // [tokens, num_experts], row stride logits_stride, unit inner stride
  const float* correction_bias;  // [num_experts] fp32 or NULL (added for selection only)
  float* topk_weights;           // [tokens, top_k] fp32, contiguous
  int32_t* topk_ids;             // [tokens, top_k], contiguous
  int64_t logits_stride, tokens, num_experts, top_k;
  int64_t num_groups, topk_groups;  // num_groups <= 1: no group limit; else num_experts % num_groups == 0
  float routed_scaling;
  int32_t scoring;      // OmniMoeScoring
  int32_t renormalize;  // bool
  int32_t dtype;        // OmniDType of logits
} OmniMoeRouteArgs;

// Local-memory (UB) bytes the routing kernel reserves per block: fp32 scores and selection scores, a taken
// flag per expert, and a score + flag per group (num_groups <= 1: one), each rounded up to 64 bytes as
// TPipe::InitBuffer does. Must stay <= OMNI_UB_BYTES; the bindings reject larger configurations.
static inline int64_t omni_moe_route_ub_bytes(int64_t num_experts, int64_t num_groups) {
  const int64_t g = num_groups > 1 ? num_groups : 1;
  return 2 * ((num_experts * 4 + 63) / 64 * 64) + (num_experts + 63) / 64 * 64 + (g * 5 + 63) / 64 * 64;
}

typedef struct {
  const void* hidden;        // [tokens, hidden_size], row stride hidden_stride
  const int32_t* topk_ids;   // [tokens, top_k], values in [0, num_experts)
  void* x_sorted;            // [rows, hidden_size] contiguous
  int32_t* sorted_token_ids; // [rows]; -1 on padding rows
  int64_t* expert_offsets;   // [num_experts + 1]
  int32_t* expert_counts;    // [num_experts]
  int32_t* inverse_index;    // [tokens, top_k]
  int64_t hidden_stride, tokens, top_k, hidden_size, num_experts;
  int64_t block_size;        // >= 1 (1: no padding)
  int64_t rows;              // tokens*top_k + num_experts*(block_size-1)
  int32_t dtype;
} OmniMoeDispatchArgs;

typedef struct {
  const void* x;                 // [rows, k_dim], row stride x_stride
  const void* w;                 // [num_experts, n_dim, k_dim] contiguous
  const int64_t* expert_offsets; // [num_experts + 1], 0 <= o[0] <= ... <= o[E] <= rows
  void* out;                     // [rows, n_dim], row stride out_stride
  int64_t x_stride, out_stride, rows, k_dim, n_dim, num_experts;
  int32_t dtype;
  int32_t w_layout;              // OmniWeightLayout (tiles: w is [E, ceil(N/16), ceil(K/32), 512])
  void* workspace;               // grouped_gemm_workspace(args) bytes, 64-byte aligned (tiles only)
  int64_t workspace_bytes;
} OmniGroupedGemmArgs;

typedef struct {
  const void* expert_out;       // [rows, hidden_size], row stride expert_out_stride
  const float* topk_weights;    // [tokens, top_k] fp32 contiguous
  const int32_t* inverse_index; // [tokens, top_k], values in [-1, rows) (-1: skipped)
  void* out;                    // [tokens, hidden_size], row stride out_stride
  int64_t expert_out_stride, out_stride, rows, tokens, top_k, hidden_size;
  int32_t dtype;
} OmniMoeCombineArgs;

// out = sum_j topk_weights[t, j] * W2[e] @ silu_and_mul(W13[e] @ hidden[t]), e = map(topk_ids[t, j]).
// w_dtype is the weights' storage type: today equal to dtype; quantized formats (int8/fp8 with scales) extend
// this struct and the enum without a new entry point.
typedef struct {
  const void* hidden;          // [tokens, hidden_size], row stride hidden_stride
  const void* w13;             // [num_experts, 2*inter_size, hidden_size] contiguous (gate rows, then up rows)
  const void* w2;              // [num_experts, hidden_size, inter_size] contiguous
  const float* topk_weights;   // [tokens, top_k] fp32 contiguous
  const int32_t* topk_ids;     // [tokens, top_k] in [0, num_global_experts)
  const int32_t* expert_map;   // [num_global_experts] in [-1, num_experts), or NULL (identity)
  void* out;                   // [tokens, hidden_size], row stride out_stride; may be hidden itself
  void* workspace;             // fused_moe_workspace(args) bytes, 64-byte aligned
  int64_t hidden_stride, out_stride, tokens, hidden_size, inter_size, num_experts, num_global_experts, top_k;
  int64_t workspace_bytes;
  int32_t dtype;       // activations / output
  int32_t w_dtype;     // weights (== dtype for now)
  int32_t activation;  // OmniMoeActivation
  int32_t w_layout;    // OmniWeightLayout of w13 and w2
} OmniFusedMoeArgs;

typedef struct {
  void (*moe_route)(const OmniMoeRouteArgs*, const OmniRuntime*);
  void (*moe_dispatch)(const OmniMoeDispatchArgs*, const OmniRuntime*);
  void (*grouped_gemm)(const OmniGroupedGemmArgs*, const OmniRuntime*);
  void (*moe_combine)(const OmniMoeCombineArgs*, const OmniRuntime*);
  int64_t (*fused_moe_workspace)(const OmniFusedMoeArgs*);
  void (*fused_moe)(const OmniFusedMoeArgs*, const OmniRuntime*);
  int64_t (*grouped_gemm_workspace)(const OmniGroupedGemmArgs*);
  uint32_t weight_layouts;  // bit (1 << OmniWeightLayout) for every layout this library's kernels take
} OmniMoeKernels;
OMNI_EXPORT const OmniMoeKernels* omni_moe_kernels(void);

#ifdef __cplusplus
}
#endif
