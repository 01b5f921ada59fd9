// Bindings of the rotary-embedding family (ascendc/kernels/rotary/).
#include "bindings/common.h"
#include "omni/ops/rotary.h"

namespace omni {
constexpr const char* FAMILY = "rotary";
namespace {

// One head (in, out and fp32 copies) plus the cos/sin row must fit the kernel's 192 KiB local buffer.
constexpr int64_t kMaxHeadSize = 8192;

// q, k: [tokens, heads, head_size] (unit inner stride); q_out/k_out same shape, may be q / k themselves.
void Rotary(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_sin_cache,
            int64_t rotary_dim, bool is_neox, at::Tensor q_out, at::Tensor k_out) {
  CheckDtype(positions, at::kLong, "positions");
  if (positions.dim() != 1) ValueError("positions: expected a 1-D tensor [tokens], got shape " + Shape(positions));
  const int32_t dt = FloatDType(q, "q");
  const int32_t cdt = FloatDType(cos_sin_cache, "cos_sin_cache");
  if (q.dim() != 3) ValueError("q: expected [tokens, heads, head_size], got shape " + Shape(q));
  const int64_t tokens = q.size(0), qh = q.size(1), hs = q.size(2);
  if (positions.size(0) != tokens) ValueError("positions: expected " + S(tokens) + " entries (one per token of q), got " + Shape(positions));
  if (positions.numel() > 1 && positions.stride(0) != 1) ValueError("positions: must be contiguous");
  if (k.dim() != 3 || k.size(0) != tokens || k.size(2) != hs)
    ValueError("k: expected [" + S(tokens) + ", heads, " + S(hs) + "], got shape " + Shape(k));
  const int64_t kh = k.size(1);
  CheckSameDtype(k, q, "k", "q");
  CheckSameDtype(q_out, q, "q_out", "q");
  CheckSameDtype(k_out, q, "k_out", "q");
  if (q_out.sizes() != q.sizes()) ValueError("q_out: expected shape " + Shape(q) + ", got " + Shape(q_out));
  if (k_out.sizes() != k.sizes()) ValueError("k_out: expected shape " + Shape(k) + ", got " + Shape(k_out));
  if (rotary_dim <= 0 || rotary_dim > hs || rotary_dim % 2 != 0)
    ValueError("rotary_dim: expected an even value in [2, head_size=" + S(hs) + "], got " + S(rotary_dim));
  CheckLimit(hs, kMaxHeadSize, "q", "head_size");
  if (cos_sin_cache.dim() != 2 || cos_sin_cache.size(1) != rotary_dim)
    ValueError("cos_sin_cache: expected [max_position, rotary_dim=" + S(rotary_dim) + "], got shape " + Shape(cos_sin_cache));
  if (!cos_sin_cache.is_contiguous()) ValueError("cos_sin_cache: must be contiguous");
  CheckReadable(q, "q", 3);
  CheckReadable(k, "k", 3);
  CheckReadable(q_out, "q_out", 3);
  CheckReadable(k_out, "k_out", 3);
  CheckOutputs({{&q_out, "q_out"}, {&k_out, "k_out"}},
               {{&positions, "positions"}, {&q, "q"}, {&k, "k"}, {&cos_sin_cache, "cos_sin_cache"}},
               {{"q_out", "q"}, {"k_out", "k"}});
  const int64_t max_pos = cos_sin_cache.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i)
    if (pos[i] < 0 || pos[i] >= max_pos)
      ValueError("positions: entry " + S(i) + " = " + S(pos[i]) + " is outside [0, " + S(max_pos) +
                 ") (the rows of cos_sin_cache)");
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
  Def(m, "rotary_embedding", &Rotary, "rotary embedding of q, k [tokens, heads, head_size] into q_out, k_out (may be q, k)",
      py::arg("positions"), py::arg("q"), py::arg("k"), py::arg("cos_sin_cache"), py::arg("rotary_dim"),
      py::arg("is_neox"), py::arg("q_out"), py::arg("k_out"));
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
