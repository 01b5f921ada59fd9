// Bindings of the MoE family: checks (shapes, dtypes, strides, every index value), then the torch-free
// kernels of ascendc/kernels/moe/.
#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

#include "bindings/common.h"
#include "omni/ops/moe.h"

namespace omni {
constexpr const char* FAMILY = "moe";
namespace {

const OmniMoeKernels* K() { return Kernels<OmniMoeKernels>("omni_moe_kernels"); }

std::string Dims(std::initializer_list<int64_t> d) {
  std::string s = "[";
  bool first = true;
  for (int64_t v : d) {
    s += (first ? "" : ", ") + std::to_string(v);
    first = false;
  }
  return s + "]";
}

void CheckContig(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  std::vector<int64_t> want(shape);
  if (t.sizes().vec() != want) ValueError(std::string(name) + ": expected shape " + Dims(shape) + ", got " + Shape(t));
  if (!t.is_contiguous()) ValueError(std::string(name) + ": must be contiguous");
}

std::string DtypeName(at::ScalarType st) {
  switch (st) {
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    default: return c10::toString(st);
  }
}

void CheckDtype(const at::Tensor& t, at::ScalarType st, const char* name) {
  if (t.scalar_type() != st) TypeError(std::string(name) + ": expected " + DtypeName(st) + ", got " + DtypeName(t.scalar_type()));
}

// Every value of an int32 tensor in [lo, hi).
void CheckRange(const at::Tensor& t, const char* name, int64_t lo, int64_t hi) {
  const int32_t* p = t.data_ptr<int32_t>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i)
    if (p[i] < lo || p[i] >= hi)
      ValueError(std::string(name) + ": values must lie in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                 "), found " + std::to_string(p[i]));
}

void CheckNoOverlap(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  if (a.numel() == 0 || b.numel() == 0) return;
  const auto a0 = reinterpret_cast<uintptr_t>(a.data_ptr());
  const auto b0 = reinterpret_cast<uintptr_t>(b.data_ptr());
  int64_t la = 0, lb = 0;
  for (int64_t d = 0; d < a.dim(); ++d) la += (a.size(d) - 1) * a.stride(d);
  for (int64_t d = 0; d < b.dim(); ++d) lb += (b.size(d) - 1) * b.stride(d);
  const uintptr_t a1 = a0 + (la + 1) * a.element_size(), b1 = b0 + (lb + 1) * b.element_size();
  if (a0 < b1 && b0 < a1) ValueError(std::string(an) + " must not overlap " + bn);
}

// Weights prepacked for AMX (OMNI_W_TILES_BF16) of B matrices [N, K]: [B, ceil(N/16), ceil(K/32), 512] bf16.
void CheckTiles(const at::Tensor& t, const char* name, int64_t B, int64_t N, int64_t K) {
  CheckCpu(t, name);
  CheckDtype(t, at::kBFloat16, name);
  CheckContig(t, name, {B, (N + 15) / 16, (K + 31) / 32, 512});
}

// The active library takes tiled weights (only the amx one does).
void CheckTilesSupported(const char* op) {
  if ((K()->weight_layouts & (1u << OMNI_W_TILES_BF16)) == 0)
    ValueError(std::string(op) + ": tiled (AMX) weights need the amx kernel library, the active one is '" +
               ActiveIsaName() + "'");
}

void MoeRoute(at::Tensor topk_weights, at::Tensor topk_ids, const at::Tensor& logits, int64_t top_k,
              const std::string& scoring, bool renormalize, int64_t num_groups, int64_t topk_groups,
              const std::optional<at::Tensor>& correction_bias, double routed_scaling) {
  CheckCpu(logits, "router_logits");
  CheckCpu(topk_weights, "topk_weights");
  CheckCpu(topk_ids, "topk_ids");
  const int32_t dt = FloatDType(logits, "router_logits");
  if (logits.dim() != 2) ValueError("router_logits: expected a 2-D tensor [tokens, experts], got " + Shape(logits));
  const int64_t T = logits.size(0), E = logits.size(1);
  if (E < 1 || E > 16384) ValueError("router_logits: number of experts must be in [1, 16384], got " + std::to_string(E));
  CheckMatrix(logits, "router_logits", T, E, false);
  if (top_k < 1 || top_k > E) ValueError("top_k: expected 1 <= top_k <= " + std::to_string(E) + ", got " + std::to_string(top_k));
  int32_t sc;
  if (scoring == "softmax") sc = OMNI_MOE_SOFTMAX;
  else if (scoring == "sigmoid") sc = OMNI_MOE_SIGMOID;
  else ValueError("scoring: expected 'softmax' or 'sigmoid', got '" + scoring + "'");
  if (num_groups > 1) {
    if (E % num_groups != 0) ValueError("num_groups: must divide the number of experts " + std::to_string(E));
    if (topk_groups < 1 || topk_groups > num_groups) ValueError("topk_groups: expected 1 <= topk_groups <= num_groups");
    if (top_k > topk_groups * (E / num_groups)) ValueError("top_k: larger than the experts in topk_groups groups");
  } else if (num_groups < 0) {
    ValueError("num_groups: expected >= 0");
  }
  if (!std::isfinite(routed_scaling)) ValueError("routed_scaling: expected a finite number");
  CheckDtype(topk_weights, at::kFloat, "topk_weights");
  CheckDtype(topk_ids, at::kInt, "topk_ids");
  CheckContig(topk_weights, "topk_weights", {T, top_k});
  CheckContig(topk_ids, "topk_ids", {T, top_k});
  CheckNoOverlap(topk_weights, topk_ids, "topk_weights", "topk_ids");
  CheckNoOverlap(topk_weights, logits, "topk_weights", "router_logits");
  CheckNoOverlap(topk_ids, logits, "topk_ids", "router_logits");
  OmniMoeRouteArgs a{};
  if (correction_bias.has_value()) {
    const at::Tensor& b = *correction_bias;
    CheckCpu(b, "correction_bias");
    CheckDtype(b, at::kFloat, "correction_bias");
    CheckContig(b, "correction_bias", {E});
    a.correction_bias = b.data_ptr<float>();
  }
  if (T == 0) return;
  a.logits = logits.data_ptr();
  a.topk_weights = topk_weights.data_ptr<float>();
  a.topk_ids = topk_ids.data_ptr<int32_t>();
  a.logits_stride = logits.stride(0);
  a.tokens = T;
  a.num_experts = E;
  a.top_k = top_k;
  a.num_groups = num_groups > 1 ? num_groups : 1;
  a.topk_groups = num_groups > 1 ? topk_groups : 1;
  a.routed_scaling = static_cast<float>(routed_scaling);
  a.scoring = sc;
  a.renormalize = renormalize ? 1 : 0;
  a.dtype = dt;
  OmniRuntime rt = Runtime();
  K()->moe_route(&a, &rt);
}

void MoeDispatch(at::Tensor x_sorted, at::Tensor sorted_token_ids, at::Tensor expert_offsets, at::Tensor expert_counts,
                 at::Tensor inverse_index, const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts,
                 int64_t block_size) {
  CheckCpu(hidden, "hidden");
  CheckCpu(topk_ids, "topk_ids");
  for (auto* p : {&x_sorted, &sorted_token_ids, &expert_offsets, &expert_counts, &inverse_index}) CheckCpu(*p, "output");
  const int32_t dt = FloatDType(hidden, "hidden");
  if (hidden.dim() != 2) ValueError("hidden: expected a 2-D tensor [tokens, hidden], got " + Shape(hidden));
  const int64_t T = hidden.size(0), H = hidden.size(1);
  CheckMatrix(hidden, "hidden", T, H, false);
  CheckDtype(topk_ids, at::kInt, "topk_ids");
  if (topk_ids.dim() != 2 || topk_ids.size(0) != T) ValueError("topk_ids: expected shape [" + std::to_string(T) + ", top_k], got " + Shape(topk_ids));
  const int64_t k = topk_ids.size(1);
  if (!topk_ids.is_contiguous()) ValueError("topk_ids: must be contiguous");
  if (num_experts < 1) ValueError("num_experts: expected >= 1");
  if (block_size < 1) ValueError("block_size: expected >= 1");
  CheckRange(topk_ids, "topk_ids", 0, num_experts);
  const int64_t M = T * k + num_experts * (block_size - 1);
  if (M >= (int64_t{1} << 31)) ValueError("moe_dispatch: too many rows for int32 indices");
  CheckSameDtype(x_sorted, hidden, "x_sorted", "hidden");
  CheckContig(x_sorted, "x_sorted", {M, H});
  CheckDtype(sorted_token_ids, at::kInt, "sorted_token_ids");
  CheckContig(sorted_token_ids, "sorted_token_ids", {M});
  CheckDtype(expert_offsets, at::kLong, "expert_offsets");
  CheckContig(expert_offsets, "expert_offsets", {num_experts + 1});
  CheckDtype(expert_counts, at::kInt, "expert_counts");
  CheckContig(expert_counts, "expert_counts", {num_experts});
  CheckDtype(inverse_index, at::kInt, "inverse_index");
  CheckContig(inverse_index, "inverse_index", {T, k});
  const at::Tensor* outs[] = {&x_sorted, &sorted_token_ids, &expert_offsets, &expert_counts, &inverse_index};
  const char* names[] = {"x_sorted", "sorted_token_ids", "expert_offsets", "expert_counts", "inverse_index"};
  for (int i = 0; i < 5; ++i) {
    CheckNoOverlap(*outs[i], hidden, names[i], "hidden");
    CheckNoOverlap(*outs[i], topk_ids, names[i], "topk_ids");
    for (int j = i + 1; j < 5; ++j) CheckNoOverlap(*outs[i], *outs[j], names[i], names[j]);
  }
  OmniMoeDispatchArgs a{};
  a.hidden = hidden.data_ptr();
  a.topk_ids = topk_ids.data_ptr<int32_t>();
  a.x_sorted = x_sorted.data_ptr();
  a.sorted_token_ids = sorted_token_ids.data_ptr<int32_t>();
  a.expert_offsets = expert_offsets.data_ptr<int64_t>();
  a.expert_counts = expert_counts.data_ptr<int32_t>();
  a.inverse_index = inverse_index.data_ptr<int32_t>();
  a.hidden_stride = hidden.stride(0);
  a.tokens = T;
  a.top_k = k;
  a.hidden_size = H;
  a.num_experts = num_experts;
  a.block_size = block_size;
  a.rows = M;
  a.dtype = dt;
  OmniRuntime rt = Runtime();
  K()->moe_dispatch(&a, &rt);
}

void GroupedGemm(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets,
                 const std::optional<at::Tensor>& w_tiles) {
  CheckCpu(out, "out");
  CheckCpu(x, "x_sorted");
  CheckCpu(w, "w");
  CheckCpu(expert_offsets, "expert_offsets");
  const int32_t dt = FloatDType(x, "x_sorted");
  if (x.dim() != 2) ValueError("x_sorted: expected a 2-D tensor [rows, K], got " + Shape(x));
  const int64_t M = x.size(0), Kd = x.size(1);
  CheckMatrix(x, "x_sorted", M, Kd, false);
  CheckSameDtype(w, x, "w", "x_sorted");
  if (w.dim() != 3 || w.size(2) != Kd) ValueError("w: expected shape [experts, N, " + std::to_string(Kd) + "], got " + Shape(w));
  const int64_t E = w.size(0), N = w.size(1);
  if (E < 1) ValueError("w: expected at least one expert");
  if (!w.is_contiguous()) ValueError("w: must be contiguous");
  CheckDtype(expert_offsets, at::kLong, "expert_offsets");
  CheckContig(expert_offsets, "expert_offsets", {E + 1});
  const int64_t* o = expert_offsets.data_ptr<int64_t>();
  const std::string bad = "expert_offsets: must be non-decreasing within [0, " + std::to_string(M) + "] (rows of x_sorted)";
  if (o[0] < 0 || o[E] > M) ValueError(bad);
  for (int64_t e = 0; e < E; ++e)
    if (o[e + 1] < o[e]) ValueError(bad);
  CheckSameDtype(out, x, "out", "x_sorted");
  CheckMatrix(out, "out", M, N, true);
  CheckNoOverlap(out, x, "out", "x_sorted");
  CheckNoOverlap(out, w, "out", "w");
  CheckNoOverlap(out, expert_offsets, "out", "expert_offsets");
  if (M == 0 || N == 0) return;
  if (Kd == 0) {
    out.zero_();
    return;
  }
  OmniGroupedGemmArgs a{x.data_ptr(), w.data_ptr(), o, out.data_ptr(), x.stride(0), out.stride(0), M, Kd, N, E, dt};
  if (w_tiles.has_value()) {
    CheckTilesSupported("grouped_gemm");
    if (dt != OMNI_BF16) TypeError("grouped_gemm: tiled weights are bfloat16; x_sorted is " + DtypeName(x.scalar_type()));
    CheckTiles(*w_tiles, "w_tiles", E, N, Kd);
    CheckNoOverlap(out, *w_tiles, "out", "w_tiles");
    a.w = w_tiles->data_ptr();
    a.w_layout = OMNI_W_TILES_BF16;
    const int64_t bytes = K()->grouped_gemm_workspace(&a);
    a.workspace = Workspace(bytes);
    a.workspace_bytes = bytes;
  }
  OmniRuntime rt = Runtime();
  K()->grouped_gemm(&a, &rt);
}

void MoeCombine(at::Tensor out, const at::Tensor& expert_out, const at::Tensor& topk_weights,
                const at::Tensor& inverse_index) {
  CheckCpu(out, "out");
  CheckCpu(expert_out, "expert_out");
  CheckCpu(topk_weights, "topk_weights");
  CheckCpu(inverse_index, "inverse_index");
  const int32_t dt = FloatDType(expert_out, "expert_out");
  if (expert_out.dim() != 2) ValueError("expert_out: expected a 2-D tensor [rows, hidden], got " + Shape(expert_out));
  const int64_t M = expert_out.size(0), H = expert_out.size(1);
  CheckMatrix(expert_out, "expert_out", M, H, false);
  CheckDtype(inverse_index, at::kInt, "inverse_index");
  if (inverse_index.dim() != 2) ValueError("inverse_index: expected a 2-D tensor [tokens, top_k], got " + Shape(inverse_index));
  const int64_t T = inverse_index.size(0), k = inverse_index.size(1);
  CheckContig(inverse_index, "inverse_index", {T, k});
  CheckDtype(topk_weights, at::kFloat, "topk_weights");
  CheckContig(topk_weights, "topk_weights", {T, k});
  CheckRange(inverse_index, "inverse_index", -1, M);
  CheckSameDtype(out, expert_out, "out", "expert_out");
  CheckMatrix(out, "out", T, H, true);
  CheckNoOverlap(out, expert_out, "out", "expert_out");
  CheckNoOverlap(out, topk_weights, "out", "topk_weights");
  CheckNoOverlap(out, inverse_index, "out", "inverse_index");
  if (T == 0 || H == 0) return;
  OmniMoeCombineArgs a{expert_out.data_ptr(), topk_weights.data_ptr<float>(), inverse_index.data_ptr<int32_t>(),
                       out.data_ptr(), expert_out.stride(0), out.stride(0), M, T, k, H, dt};
  OmniRuntime rt = Runtime();
  K()->moe_combine(&a, &rt);
}

void FusedMoe(at::Tensor out, const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
              const at::Tensor& topk_weights, const at::Tensor& topk_ids, const std::string& activation,
              const std::optional<at::Tensor>& expert_map, const std::optional<at::Tensor>& w13_tiles,
              const std::optional<at::Tensor>& w2_tiles) {
  CheckCpu(out, "out");
  CheckCpu(hidden, "hidden");
  CheckCpu(w13, "w13");
  CheckCpu(w2, "w2");
  CheckCpu(topk_weights, "topk_weights");
  CheckCpu(topk_ids, "topk_ids");
  const int32_t dt = FloatDType(hidden, "hidden");
  if (hidden.dim() != 2) ValueError("hidden: expected a 2-D tensor [tokens, hidden], got " + Shape(hidden));
  const int64_t T = hidden.size(0), H = hidden.size(1);
  if (H < 1) ValueError("hidden: hidden size must be >= 1");
  CheckMatrix(hidden, "hidden", T, H, false);
  CheckSameDtype(w13, hidden, "w13", "hidden");
  CheckSameDtype(w2, hidden, "w2", "hidden");
  if (w13.dim() != 3 || w13.size(2) != H || w13.size(1) % 2 != 0 || w13.size(1) < 2)
    ValueError("w13: expected shape [experts, 2*intermediate, " + std::to_string(H) + "], got " + Shape(w13));
  const int64_t E = w13.size(0), I = w13.size(1) / 2;
  if (E < 1) ValueError("w13: expected at least one expert");
  CheckContig(w13, "w13", {E, 2 * I, H});
  CheckContig(w2, "w2", {E, H, I});
  CheckDtype(topk_ids, at::kInt, "topk_ids");
  if (topk_ids.dim() != 2 || topk_ids.size(0) != T) ValueError("topk_ids: expected shape [" + std::to_string(T) + ", top_k], got " + Shape(topk_ids));
  const int64_t k = topk_ids.size(1);
  if (k < 1) ValueError("topk_ids: top_k must be >= 1");
  CheckContig(topk_ids, "topk_ids", {T, k});
  CheckDtype(topk_weights, at::kFloat, "topk_weights");
  CheckContig(topk_weights, "topk_weights", {T, k});
  if (activation != "silu") ValueError("activation: expected 'silu', got '" + activation + "'");
  int64_t Eg = E;
  const int32_t* map = nullptr;
  if (expert_map.has_value()) {
    const at::Tensor& m = *expert_map;
    CheckCpu(m, "expert_map");
    CheckDtype(m, at::kInt, "expert_map");
    if (m.dim() != 1 || m.size(0) < 1) ValueError("expert_map: expected a 1-D tensor [global_experts], got " + Shape(m));
    if (!m.is_contiguous()) ValueError("expert_map: must be contiguous");
    CheckRange(m, "expert_map", -1, E);
    Eg = m.size(0);
    map = m.data_ptr<int32_t>();
  }
  CheckRange(topk_ids, "topk_ids", 0, Eg);
  if (T * k >= (int64_t{1} << 31)) ValueError("fused_moe: too many (token, expert) pairs");
  CheckSameDtype(out, hidden, "out", "hidden");
  CheckMatrix(out, "out", T, H, true);
  CheckAlias(out, hidden, "out", "hidden");
  CheckNoOverlap(out, w13, "out", "w13");
  CheckNoOverlap(out, w2, "out", "w2");
  CheckNoOverlap(out, topk_weights, "out", "topk_weights");
  CheckNoOverlap(out, topk_ids, "out", "topk_ids");
  if (map != nullptr) CheckNoOverlap(out, *expert_map, "out", "expert_map");
  if (T == 0) return;
  OmniFusedMoeArgs a{};
  a.hidden = hidden.data_ptr();
  a.w13 = w13.data_ptr();
  a.w2 = w2.data_ptr();
  a.topk_weights = topk_weights.data_ptr<float>();
  a.topk_ids = topk_ids.data_ptr<int32_t>();
  a.expert_map = map;
  a.out = out.data_ptr();
  a.hidden_stride = hidden.stride(0);
  a.out_stride = out.stride(0);
  a.tokens = T;
  a.hidden_size = H;
  a.inter_size = I;
  a.num_experts = E;
  a.num_global_experts = Eg;
  a.top_k = k;
  a.dtype = dt;
  a.w_dtype = dt;
  a.activation = OMNI_MOE_SILU;
  if (w13_tiles.has_value() != w2_tiles.has_value()) ValueError("fused_moe: pass both w13_tiles and w2_tiles or neither");
  if (w13_tiles.has_value()) {
    CheckTilesSupported("fused_moe");
    if (dt != OMNI_BF16) TypeError("fused_moe: tiled weights are bfloat16; hidden is " + DtypeName(hidden.scalar_type()));
    CheckTiles(*w13_tiles, "w13_tiles", 2 * E, I, H);
    CheckTiles(*w2_tiles, "w2_tiles", E, H, I);
    CheckNoOverlap(out, *w13_tiles, "out", "w13_tiles");
    CheckNoOverlap(out, *w2_tiles, "out", "w2_tiles");
    a.w13 = w13_tiles->data_ptr();
    a.w2 = w2_tiles->data_ptr();
    a.w_layout = OMNI_W_TILES_BF16;
  }
  const int64_t bytes = K()->fused_moe_workspace(&a);
  a.workspace = Workspace(bytes);
  a.workspace_bytes = bytes;
  OmniRuntime rt = Runtime();
  K()->fused_moe(&a, &rt);
}

void Register(py::module_& m) {
  m.def("moe_route", &MoeRoute, py::arg("topk_weights"), py::arg("topk_ids"), py::arg("router_logits"),
        py::arg("top_k"), py::arg("scoring"), py::arg("renormalize"), py::arg("num_groups"), py::arg("topk_groups"),
        py::arg("correction_bias") = py::none(), py::arg("routed_scaling") = 1.0,
        "top-k routing into topk_weights (fp32) / topk_ids (int32) [tokens, top_k]");
  m.def("moe_dispatch", &MoeDispatch, py::arg("x_sorted"), py::arg("sorted_token_ids"), py::arg("expert_offsets"),
        py::arg("expert_counts"), py::arg("inverse_index"), py::arg("hidden"), py::arg("topk_ids"),
        py::arg("num_experts"), py::arg("block_size") = 1, "counting sort of (token, slot) pairs by expert");
  m.def("grouped_gemm", &GroupedGemm, py::arg("out"), py::arg("x_sorted"), py::arg("w"), py::arg("expert_offsets"),
        py::arg("w_tiles") = py::none(),
        "out[r] = x_sorted[r] @ w[e].T for rows of expert e (w_tiles: w prepacked for AMX, amx library only)");
  m.def("moe_combine", &MoeCombine, py::arg("out"), py::arg("expert_out"), py::arg("topk_weights"),
        py::arg("inverse_index"), "out[t] = sum_j topk_weights[t, j] * expert_out[inverse_index[t, j]]");
  m.def("fused_moe", &FusedMoe, py::arg("out"), py::arg("hidden"), py::arg("w13"), py::arg("w2"),
        py::arg("topk_weights"), py::arg("topk_ids"), py::arg("activation") = "silu",
        py::arg("expert_map") = py::none(), py::arg("w13_tiles") = py::none(), py::arg("w2_tiles") = py::none(),
        "the whole MoE block (gate/up, silu_and_mul, down, weighted combine); w13_tiles / w2_tiles: the weights "
        "prepacked for AMX (bf16, amx library only), w13 / w2 then only give the shapes");
  m.def("tile_layouts", []() { return K()->weight_layouts; }, "bitmask of the weight layouts the active library takes");
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
