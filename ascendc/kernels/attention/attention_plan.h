// Scheduling of the paged-attention kernel (paged_attention.h) and its use for contiguous K/V (dense attention):
// how many key splits a decode gets (flash-decoding), and the per-sequence launches of the dense prefill. Kept
// out of the bindings: like the kernels' tilings, these depend only on sizes and the runtime's core count.
#pragma once
#include <algorithm>

#include "kernels/attention/paged_launch.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
namespace attn {

// Enough (sequence, kv head, split) items for every core, but splits of at least 256 keys. The AMX decode path
// takes every kv head of a sequence in one item (sequential cache reads), so it splits keys rather than heads.
inline void PlanSplits(OmniPagedAttnArgs& a, int64_t max_len, const OmniRuntime* rt) {
  const bool amx = a.kv_heads > 0 && AmxRowsFit(a, a.q_heads / a.kv_heads);
  const int64_t items = amx ? a.batch : a.batch * a.kv_heads;
  const int64_t cores = std::max<int64_t>(1, rt->num_cores);
  int64_t s = 1;
  if (items > 0 && max_len > 0) s = std::max<int64_t>(1, std::min((2 * cores + items - 1) / items, (max_len + 255) / 256));
  a.num_splits = s;
  a.split_len = std::max<int64_t>(16, ((max_len + s - 1) / s + 15) / 16 * 16);
}

inline int64_t DecodeWorkspaceBytes(const OmniPagedAttnArgs& a) {
  return omni_attention_workspace_floats(a.batch, a.num_splits, a.q_heads, a.head_dim, a.v_dim) * 4;
}

// Dense K/V as a paged cache: sequence b is block b of kv_len slots, key position p is slot p.
inline OmniPagedAttnArgs DenseAsPaged(const OmniDenseAttnArgs& d) {
  OmniPagedAttnArgs a{};
  a.k_cache = d.k;
  a.v_cache = d.v;
  a.k_block_stride = d.k_strides[0];
  a.k_head_stride = d.k_strides[1];
  a.k_token_stride = d.k_strides[2];
  a.v_block_stride = d.v_strides[0];
  a.v_head_stride = d.v_strides[1];
  a.v_token_stride = d.v_strides[2];
  a.block_size = d.kv_len;
  a.batch = d.batch;
  a.q_heads = d.q_heads;
  a.kv_heads = d.kv_heads;
  a.head_dim = d.head_dim;
  a.v_dim = d.v_dim;
  a.scale = d.scale;
  a.dtype = d.dtype;
  a.mask = d.mask;
  a.mask_kind = d.mask_kind;
  a.mask_batch_stride = d.mask_batch_stride;
  a.mask_head_stride = d.mask_head_stride;
  a.mask_q_stride = d.mask_q_stride;
  return a;
}

// q / out rows of the paged kernel: token stride from dim `tok` of the dense layout (decode: the batch, prefill:
// the position), head stride from dim 1.
inline void SetRows(OmniPagedAttnArgs& a, const OmniDenseAttnArgs& d, int tok) {
  a.q_token_stride = d.q_strides[tok];
  a.q_head_stride = d.q_strides[1];
  a.out_token_stride = d.out_strides[tok];
  a.out_head_stride = d.out_strides[1];
}

// Decode over the batch: the block table [b] = b and lengths kv_len, int32, in front of the decode workspace.
inline int64_t DenseTableBytes(int64_t batch) { return AlignUp(2 * batch * 4, 64); }

inline void DenseDecode(const OmniDenseAttnArgs& d, const OmniRuntime* rt) {
  OmniPagedAttnArgs a = DenseAsPaged(d);
  int32_t* table = static_cast<int32_t*>(d.workspace);
  int32_t* lens = table + d.batch;
  for (int64_t b = 0; b < d.batch; ++b) {
    table[b] = static_cast<int32_t>(b);
    lens[b] = static_cast<int32_t>(d.kv_len);
  }
  a.q = d.q;
  a.out = d.out;
  SetRows(a, d, 0);
  a.block_table = table;
  a.table_stride = 1;
  a.ctx_lens = lens;
  PlanSplits(a, d.kv_len, rt);
  a.workspace = reinterpret_cast<float*>(static_cast<char*>(d.workspace) + DenseTableBytes(d.batch));
  paged_attention(&a, rt);
}

// One prefill per sequence: the kernel indexes new tokens as cu_seqlens[b] * token_stride, which a batch stride
// cannot express; each launch still spreads (kv head, head chunk, query tile) items over the cores.
inline void DensePrefill(const OmniDenseAttnArgs& d, const OmniRuntime* rt) {
  OmniPagedAttnArgs a = DenseAsPaged(d);
  const int32_t table0 = 0, ctx = static_cast<int32_t>(d.kv_len - d.q_len);
  const int32_t cu[2] = {0, static_cast<int32_t>(d.q_len)};
  const int64_t es = d.dtype == OMNI_F32 ? 4 : 2;
  a.block_table = &table0;
  a.table_stride = 1;
  a.ctx_lens = &ctx;
  a.cu_seqlens = cu;
  a.batch = 1;
  a.num_splits = 1;
  a.causal = d.causal;
  SetRows(a, d, 2);
  a.kn_token_stride = d.k_strides[2];
  a.kn_head_stride = d.k_strides[1];
  a.vn_token_stride = d.v_strides[2];
  a.vn_head_stride = d.v_strides[1];
  const char* mask0 = static_cast<const char*>(d.mask);
  const int64_t mask_step = d.mask_batch_stride * (d.mask_kind == OMNI_MASK_BOOL ? 1 : 4);
  a.mask_batch_stride = 0;  // each launch sees one sequence (b = 0)
  for (int64_t b = 0; b < d.batch; ++b) {
    const char* kb = static_cast<const char*>(d.k) + b * d.k_strides[0] * es;
    const char* vb = static_cast<const char*>(d.v) + b * d.v_strides[0] * es;
    a.q = static_cast<const char*>(d.q) + b * d.q_strides[0] * es;
    a.out = static_cast<char*>(d.out) + b * d.out_strides[0] * es;
    a.k_cache = kb;
    a.v_cache = vb;
    a.k = kb + ctx * d.k_strides[2] * es;
    a.v = vb + ctx * d.v_strides[2] * es;
    if (mask0 != nullptr) a.mask = mask0 + b * mask_step;
    paged_attention(&a, rt);
  }
}

}  // namespace attn

inline int64_t plan_decode(OmniPagedAttnArgs* a, int64_t max_len, const OmniRuntime* rt) {
  attn::PlanSplits(*a, max_len, rt);
  return attn::DecodeWorkspaceBytes(*a);
}

inline int64_t dense_attention_workspace(const OmniDenseAttnArgs* d, const OmniRuntime* rt) {
  if (d->q_len != 1) return 0;
  OmniPagedAttnArgs a = attn::DenseAsPaged(*d);
  attn::PlanSplits(a, d->kv_len, rt);
  return attn::DenseTableBytes(d->batch) + attn::DecodeWorkspaceBytes(a);
}

inline void dense_attention(const OmniDenseAttnArgs* d, const OmniRuntime* rt) {
  if (d->batch <= 0 || d->q_heads <= 0 || d->q_len <= 0 || d->v_dim <= 0 || d->kv_len <= 0) return;
  if (d->q_len == 1) return attn::DenseDecode(*d, rt);
  attn::DensePrefill(*d, rt);
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
