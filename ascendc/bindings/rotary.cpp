// Bindings of the rotary-embedding family (ascendc/kernels/rotary/).
#include "bindings/common.h"
#include "omni/ops/rotary.h"

namespace omni {
constexpr const char* FAMILY = "rotary";
namespace {

// q, k: [tokens, heads, head_size] (unit inner stride); q_out/k_out same shape, may be the same tensors.
void Rotary(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_sin_cache,
            int64_t rotary_dim, bool is_neox, at::Tensor q_out, at::Tensor k_out) {
  CheckCpu(positions, "positions");
  CheckCpu(q, "q");
  CheckCpu(k, "k");
  CheckCpu(cos_sin_cache, "cos_sin_cache");
  CheckCpu(q_out, "q_out");
  CheckCpu(k_out, "k_out");
  if (positions.scalar_type() != at::kLong) TypeError("positions: expected int64, got " + std::string(c10::toString(positions.scalar_type())));
  if (positions.dim() != 1) ValueError("positions: expected a 1-D tensor [tokens], got shape " + Shape(positions));
  const int32_t dt = FloatDType(q, "q");
  const int32_t cdt = FloatDType(cos_sin_cache, "cos_sin_cache");
  if (q.dim() != 3) ValueError("q: expected [tokens, heads, head_size], got shape " + Shape(q));
  const int64_t tokens = q.size(0), qh = q.size(1), hs = q.size(2);
  if (positions.size(0) != tokens) ValueError("positions: expected " + std::to_string(tokens) + " entries (one per token of q), got " + Shape(positions));
  if (positions.numel() > 1 && positions.stride(0) != 1) ValueError("positions: must be contiguous");
  if (k.dim() != 3 || k.size(0) != tokens || k.size(2) != hs)
    ValueError("k: expected [" + std::to_string(tokens) + ", heads, " + std::to_string(hs) + "], got shape " + Shape(k));
  const int64_t kh = k.size(1);
  CheckSameDtype(k, q, "k", "q");
  CheckSameDtype(q_out, q, "q_out", "q");
  CheckSameDtype(k_out, q, "k_out", "q");
  if (q_out.sizes() != q.sizes()) ValueError("q_out: expected shape " + Shape(q) + ", got " + Shape(q_out));
  if (k_out.sizes() != k.sizes()) ValueError("k_out: expected shape " + Shape(k) + ", got " + Shape(k_out));
  if (rotary_dim <= 0 || rotary_dim > hs || rotary_dim % 2 != 0)
    ValueError("rotary_dim: expected an even value in [2, head_size=" + std::to_string(hs) + "], got " + std::to_string(rotary_dim));
  // One head (in, out and fp32 copies) plus the cos/sin row must fit the kernel's 192 KiB local buffer.
  if (hs > 8192) ValueError("q: head_size " + std::to_string(hs) + " exceeds the cpu kernel's limit of 8192");
  if (cos_sin_cache.dim() != 2 || cos_sin_cache.size(1) != rotary_dim)
    ValueError("cos_sin_cache: expected [max_position, rotary_dim=" + std::to_string(rotary_dim) + "], got shape " + Shape(cos_sin_cache));
  if (!cos_sin_cache.is_contiguous()) ValueError("cos_sin_cache: must be contiguous");
  for (const at::Tensor* pt : {&q, &k, static_cast<const at::Tensor*>(&q_out), static_cast<const at::Tensor*>(&k_out)}) {
    const at::Tensor& t = *pt;
    if (t.numel() > 0 && t.size(2) > 1 && t.stride(2) != 1) ValueError("q, k, q_out, k_out: head_size dimension must have stride 1");
  }
  auto check_out = [](const at::Tensor& o, const char* name) {
    // Written tensors: with positive strides nested token > head > dim, no two elements share memory.
    if (o.numel() == 0) return;
    const bool heads_ok = o.size(1) <= 1 || o.stride(1) >= o.size(2);
    const bool tokens_ok = o.size(0) <= 1 || o.stride(0) >= (o.size(1) - 1) * o.stride(1) + o.size(2);
    if (!heads_ok || !tokens_ok) ValueError(std::string(name) + ": heads or tokens overlap in memory");
  };
  check_out(q_out, "q_out");
  check_out(k_out, "k_out");
  CheckAlias(q_out, q, "q_out", "q");
  CheckAlias(k_out, k, "k_out", "k");
  CheckAlias(q_out, k, "q_out", "k");
  CheckAlias(k_out, q, "k_out", "q");
  CheckAlias(q_out, k_out, "q_out", "k_out");
  const int64_t max_pos = cos_sin_cache.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i)
    if (pos[i] < 0 || pos[i] >= max_pos)
      ValueError("positions: entry " + std::to_string(i) + " = " + std::to_string(pos[i]) + " is outside [0, " + std::to_string(max_pos) + ") (the rows of cos_sin_cache)");
  if (tokens == 0 || (qh == 0 && kh == 0)) return;
  // Dims past rotary_dim are copied unless both outputs are their inputs (then they are already there).
  const bool inplace = q_out.data_ptr() == q.data_ptr() && (kh == 0 || k_out.data_ptr() == k.data_ptr());
  OmniRotaryArgs a{};
  a.positions = pos;
  a.q = q.data_ptr();
  a.k = kh > 0 ? k.data_ptr() : nullptr;
  a.q_out = q_out.data_ptr();
  a.k_out = kh > 0 ? k_out.data_ptr() : nullptr;
  a.cos_sin_cache = cos_sin_cache.data_ptr();
  a.q_token_stride = q.stride(0);
  a.q_head_stride = q.stride(1);
  a.k_token_stride = k.stride(0);
  a.k_head_stride = k.stride(1);
  a.qo_token_stride = q_out.stride(0);
  a.qo_head_stride = q_out.stride(1);
  a.ko_token_stride = k_out.stride(0);
  a.ko_head_stride = k_out.stride(1);
  a.tokens = tokens;
  a.q_heads = qh;
  a.k_heads = kh;
  a.head_size = hs;
  a.rotary_dim = rotary_dim;
  a.max_position = max_pos;
  a.is_neox = is_neox ? 1 : 0;
  a.copy_tail = inplace ? 0 : 1;
  a.dtype = dt;
  a.cache_dtype = cdt;
  OmniRuntime rt = Runtime();
  Kernels<OmniRotaryKernels>("omni_rotary_kernels")->rotary_embedding(&a, &rt);
}


void Register(py::module_& m) {
  m.def("rotary_embedding", &Rotary, py::arg("positions"), py::arg("q"), py::arg("k"), py::arg("cos_sin_cache"),
        py::arg("rotary_dim"), py::arg("is_neox"), py::arg("q_out"), py::arg("k_out"),
        "rotary embedding of q, k [tokens, heads, head_size] into q_out, k_out (may be q, k)");
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
