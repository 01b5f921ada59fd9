// Bindings of the paged-cache writes (ascendc/kernels/attention/cache_ops.h): reshape_and_cache, mla_cache. Every
// slot value is checked against the cache before a kernel writes it.
#include "bindings/attention_common.h"

namespace omni {
constexpr const char* FAMILY = "attention.cache";
namespace {

void CheckSlots(const at::Tensor& slots, int64_t tokens, int64_t num_slots) {
  CheckIndex(slots, "slot_mapping", at::kLong, 1);
  if (slots.size(0) != tokens) ValueError("slot_mapping: expected shape [" + S(tokens) + "], got " + Shape(slots));
  const int64_t* p = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i)
    if (p[i] < -1 || p[i] >= num_slots)
      ValueError("slot_mapping[" + S(i) + "] = " + S(p[i]) + " is outside [-1, " + S(num_slots) +
                 ") (-1 = skip; num_blocks * block_size slots)");
}

// The fields both cache writes name alike: the token -> slot map, the token count, the block size, the dtype.
template <typename Args>
void SetSlots(Args& a, const at::Tensor& slots, int64_t tokens, int64_t block_size, int32_t dtype) {
  a.slot_mapping = slots.data_ptr<int64_t>();
  a.tokens = tokens;
  a.block_size = block_size;
  a.dtype = dtype;
}

void ReshapeAndCache(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
                     const at::Tensor& slot_mapping) {
  CheckReadable(key, "key", 3);
  CheckReadable(value, "value", 3);
  const int32_t dt = FloatDType(key, "key");
  CheckSameDtype(value, key, "value", "key");
  CheckReadable(k_cache, "k_cache", 4);
  CheckReadable(v_cache, "v_cache", 4);
  CheckSameDtype(k_cache, key, "k_cache", "key");
  CheckSameDtype(v_cache, key, "v_cache", "key");
  const int64_t T = key.size(0), H = key.size(1), D = key.size(2), Dv = value.size(2);
  CheckDims(value, "value", {T, H, -1}, "tokens, kv_heads as key");
  CheckDims(k_cache, "k_cache", {-1, -1, H, D}, "num_blocks, block_size, kv_heads, head_dim of key");
  CheckDims(v_cache, "v_cache", {k_cache.size(0), k_cache.size(1), H, Dv}, "as k_cache, head_dim of value");
  CheckOutputs({{&k_cache, "k_cache"}, {&v_cache, "v_cache"}},
               {{&key, "key"}, {&value, "value"}, {&slot_mapping, "slot_mapping"}});
  const int64_t bs = k_cache.size(1);
  CheckSlots(slot_mapping, T, Mul(k_cache.size(0), bs, "k_cache"));
  if (T == 0 || H == 0 || k_cache.numel() == 0) return;
  OmniReshapeAndCacheArgs a{};
  SetTokenRows(key, a.key, a.key_token_stride, a.key_head_stride);
  SetTokenRows(value, a.value, a.value_token_stride, a.value_head_stride);
  SetCache(a, k_cache, v_cache, true);
  SetSlots(a, slot_mapping, T, bs, dt);
  a.kv_heads = H;
  a.head_dim = D;
  a.v_dim = Dv;
  OmniRuntime rt = Runtime();
  K()->reshape_and_cache(&a, &rt);
}

void MlaCache(const at::Tensor& kv_c, const at::Tensor& k_pe, at::Tensor kv_cache, const at::Tensor& slot_mapping) {
  CheckReadable(kv_c, "kv_c", 2);
  CheckReadable(k_pe, "k_pe", 2);
  const int32_t dt = FloatDType(kv_c, "kv_c");
  CheckSameDtype(k_pe, kv_c, "k_pe", "kv_c");
  CheckReadable(kv_cache, "kv_cache", 3);
  CheckSameDtype(kv_cache, kv_c, "kv_cache", "kv_c");
  const int64_t T = kv_c.size(0), R = kv_c.size(1), P = k_pe.size(1);
  CheckDims(k_pe, "k_pe", {T, -1}, "tokens as kv_c");
  CheckDims(kv_cache, "kv_cache", {-1, -1, Add(R, P, "k_pe")}, "num_blocks, block_size, kv_lora_rank + rope_dim");
  const int64_t nb = kv_cache.size(0), bs = kv_cache.size(1);
  CheckOutputs({{&kv_cache, "kv_cache"}}, {{&kv_c, "kv_c"}, {&k_pe, "k_pe"}, {&slot_mapping, "slot_mapping"}});
  CheckSlots(slot_mapping, T, Mul(nb, bs, "kv_cache"));
  if (T == 0 || kv_cache.numel() == 0) return;
  OmniMlaCacheArgs a{};
  a.kv_c = kv_c.data_ptr();
  a.k_pe = k_pe.data_ptr();
  a.kv_c_stride = kv_c.stride(0);
  a.k_pe_stride = k_pe.stride(0);
  a.kv_cache = kv_cache.data_ptr();
  a.block_stride = kv_cache.stride(0);
  a.token_stride = kv_cache.stride(1);
  SetSlots(a, slot_mapping, T, bs, dt);
  a.kv_lora_rank = R;
  a.rope_dim = P;
  OmniRuntime rt = Runtime();
  K()->mla_cache(&a, &rt);
}

void Register(py::module_& m) {
  Def(m, "reshape_and_cache", &ReshapeAndCache, "write key/value [T, H, D] into paged caches (slot -1 = skip)",
      py::arg("key"), py::arg("value"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"));
  Def(m, "mla_cache", &MlaCache, "kv_cache[slot] = cat(kv_c, k_pe) (slot -1 = skip)", py::arg("kv_c"),
      py::arg("k_pe"), py::arg("kv_cache"), py::arg("slot_mapping"));
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
