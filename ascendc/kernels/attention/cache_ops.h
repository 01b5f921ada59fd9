// Writing new tokens into paged caches: reshape_and_cache (GQA K/V) and mla_cache (latent ++ rope key).
// Pure data movement: one token row per work item, slot -1 = padding (skipped). Slots were range-checked by
// the bindings.
#pragma once
#include "host/kernel_operator.h"
#include "omni/ops/attention.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

// write(t, block, offset) for every token t with a slot (slot_mapping[t] >= 0), tokens split over the blocks;
// bytes: per token, for sizing the launch.
template <typename WriteFn>
void ForEachSlot(int64_t tokens, const int64_t* slot_mapping, int64_t block_size, int64_t bytes, const OmniRuntime* rt,
                 WriteFn write) {
  auto body = [&]() {
    int64_t begin, end;
    BlockRange(tokens, GetBlockIdx(), GetBlockNum(), &begin, &end);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slot_mapping[t];
      if (slot < 0) continue;
      write(t, slot / block_size, slot % block_size);
    }
  };
  LaunchBlocks(BlocksFor(tokens, bytes, rt), rt, body);
}

template <typename T>
void ReshapeAndCacheLaunch(const OmniReshapeAndCacheArgs* ap, const OmniRuntime* rt) {
  const OmniReshapeAndCacheArgs& a = *ap;
  const int64_t bytes = a.kv_heads * (a.head_dim + a.v_dim) * static_cast<int64_t>(sizeof(T)) * 2;
  ForEachSlot(a.tokens, a.slot_mapping, a.block_size, bytes, rt, [&](int64_t t, int64_t blk, int64_t off) {
    for (int64_t h = 0; h < a.kv_heads; ++h) {
      GlobalTensor<T> ks, vs, kd, vd;
      ks.SetGlobalBuffer((__gm__ T*)a.key + t * a.key_token_stride + h * a.key_head_stride, a.head_dim);
      vs.SetGlobalBuffer((__gm__ T*)a.value + t * a.value_token_stride + h * a.value_head_stride, a.v_dim);
      kd.SetGlobalBuffer((__gm__ T*)a.k_cache + blk * a.k_block_stride + off * a.k_token_stride + h * a.k_head_stride);
      vd.SetGlobalBuffer((__gm__ T*)a.v_cache + blk * a.v_block_stride + off * a.v_token_stride + h * a.v_head_stride);
      std::memcpy(kd.GetPhyAddr(), ks.GetPhyAddr(), a.head_dim * sizeof(T));
      std::memcpy(vd.GetPhyAddr(), vs.GetPhyAddr(), a.v_dim * sizeof(T));
    }
  });
}

template <typename T>
void MlaCacheLaunch(const OmniMlaCacheArgs* ap, const OmniRuntime* rt) {
  const OmniMlaCacheArgs& a = *ap;
  const int64_t bytes = (a.kv_lora_rank + a.rope_dim) * static_cast<int64_t>(sizeof(T)) * 2;
  ForEachSlot(a.tokens, a.slot_mapping, a.block_size, bytes, rt, [&](int64_t t, int64_t blk, int64_t off) {
    T* dst = static_cast<T*>(a.kv_cache) + blk * a.block_stride + off * a.token_stride;
    std::memcpy(dst, static_cast<const T*>(a.kv_c) + t * a.kv_c_stride, a.kv_lora_rank * sizeof(T));
    std::memcpy(dst + a.kv_lora_rank, static_cast<const T*>(a.k_pe) + t * a.k_pe_stride, a.rope_dim * sizeof(T));
  });
}

inline void reshape_and_cache(const OmniReshapeAndCacheArgs* a, const OmniRuntime* rt) {
  OMNI_DISPATCH_FLOAT(a->dtype, T, ReshapeAndCacheLaunch<T>(a, rt));
}

inline void mla_cache(const OmniMlaCacheArgs* a, const OmniRuntime* rt) {
  OMNI_DISPATCH_FLOAT(a->dtype, T, MlaCacheLaunch<T>(a, rt));
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
