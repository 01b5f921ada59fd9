// Shared by the attention bindings (attention.cpp: decode, prefill, dense; cache_ops.cpp: cache writes).
#pragma once
#include "bindings/common.h"
#include "omni/ops/attention.h"

namespace omni {

inline const OmniAttentionKernels* K() { return Kernels<OmniAttentionKernels>("omni_attention_kernels"); }

// An index tensor: dtype st, `dim` dims, unit inner stride, non-negative strides.
inline void CheckIndex(const at::Tensor& t, const char* name, at::ScalarType st, int64_t dim) {
  CheckDtype(t, st, name);
  CheckReadable(t, name, dim);
}

// A [tokens, heads, dims] operand: its data and its token and head strides.
template <typename Ptr>
inline void SetTokenRows(const at::Tensor& t, Ptr& data, int64_t& token_stride, int64_t& head_stride) {
  data = t.data_ptr();
  token_stride = t.stride(0);
  head_stride = t.stride(1);
}

// Paged k / v caches [blocks, slots, heads, dims] (heads = false: [blocks, slots, dims], one shared head).
// Args: OmniPagedAttnArgs (read) or OmniReshapeAndCacheArgs (written), which name these fields alike.
template <typename Args>
inline void SetCache(Args& a, const at::Tensor& kc, const at::Tensor& vc, bool heads) {
  a.k_cache = kc.data_ptr();
  a.v_cache = vc.data_ptr();
  a.k_block_stride = kc.stride(0);
  a.k_token_stride = kc.stride(1);
  a.k_head_stride = heads ? kc.stride(2) : 0;
  a.v_block_stride = vc.stride(0);
  a.v_token_stride = vc.stride(1);
  a.v_head_stride = heads ? vc.stride(2) : 0;
}

}  // namespace omni
