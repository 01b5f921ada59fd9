// Bindings of the MoE family: checks (shapes, dtypes, strides, every index value), then the torch-free
// kernels of ascendc/kernels/moe/.
#include "bindings/common.h"
#include "omni/ops/moe.h"

namespace omni {
constexpr const char* FAMILY = "moe";
namespace {

constexpr int64_t kMaxExperts = 16384;

const OmniMoeKernels* K() { return Kernels<OmniMoeKernels>("omni_moe_kernels"); }

// Prepacked weights of B matrices [N, K] (omni/ops/moe.h): bf16 tiles for AMX / vdpbf16ps (OMNI_W_TILES_BF16,
// [B, ceil(N/16), ceil(K/32), 512]) or fp32 panels (OMNI_W_PANELS_F32, [B, ceil(N/cols), K, 32] with `cols` = 32
// weight rows per panel, 16 for w13's gate/up pairs). The layout follows the activations' dtype.
void CheckPacked(const at::Tensor& t, const char* name, int32_t layout, int64_t B, int64_t N, int64_t K,
                 int64_t cols = 32) {
  if (layout == OMNI_W_PANELS_F32) {
    CheckDtype(t, at::kFloat, name);
    CheckContig(t, name, {B, DivUp(N, cols), K, 32});
  } else {
    CheckDtype(t, at::kBFloat16, name);
    CheckContig(t, name, {B, DivUp(N, 16), DivUp(K, 32), 512});
  }
}

// The layout of the prepacked weights `arg` for `op` on the activations x (named x_name): bf16 tiles for bf16
// x, fp32 panels for fp32 x; the active library must take it (tiles: amx with AMX, avx512 with vdpbf16ps;
// panels: both).
int32_t PackedLayout(const char* op, const char* arg, const at::Tensor& x, const char* x_name) {
  const bool f32 = x.scalar_type() == at::kFloat;
  if (!f32 && x.scalar_type() != at::kBFloat16)
    TypeError(std::string(arg) + ": prepacked weights are bfloat16 tiles or float32 panels; " + x_name + " is " +
              DtypeName(x.scalar_type()));
  const int32_t layout = f32 ? OMNI_W_PANELS_F32 : OMNI_W_TILES_BF16;
  if ((K()->weight_layouts & (1u << layout)) == 0)
    ValueError(std::string(op) + ": " + (f32 ? "fp32 panels" : "tiled weights") +
               " need the amx or avx512 kernel library, the active one is '" + ActiveIsaName() + "'");
  return layout;
}

// The token rows of dispatch and the fused block (fields named alike): hidden [T, H] and its row stride, top_k.
template <typename Args>
void SetTokens(Args& a, const at::Tensor& hidden, int64_t top_k, int32_t dtype) {
  a.hidden = hidden.data_ptr();
  a.hidden_stride = hidden.stride(0);
  a.tokens = hidden.size(0);
  a.hidden_size = hidden.size(1);
  a.top_k = top_k;
  a.dtype = dtype;
}

void MoeRoute(at::Tensor topk_weights, at::Tensor topk_ids, const at::Tensor& logits, int64_t top_k,
              const std::string& scoring, bool renormalize, int64_t num_groups, int64_t topk_groups,
              const std::optional<at::Tensor>& correction_bias, double routed_scaling) {
  const int32_t dt = FloatDType(logits, "router_logits");
  if (logits.dim() != 2) ValueError("router_logits: expected a 2-D tensor [tokens, experts], got " + Shape(logits));
  const int64_t T = logits.size(0), E = logits.size(1);
  if (E < 1 || E > kMaxExperts) ValueError("router_logits: number of experts must be in [1, 16384], got " + S(E));
  CheckMatrix(logits, "router_logits", T, E);
  if (top_k < 1 || top_k > E) ValueError("top_k: expected 1 <= top_k <= " + S(E) + ", got " + S(top_k));
  int32_t sc;
  if (scoring == "softmax") sc = OMNI_MOE_SOFTMAX;
  else if (scoring == "sigmoid") sc = OMNI_MOE_SIGMOID;
  else ValueError("scoring: expected 'softmax' or 'sigmoid', got '" + scoring + "'");
  if (num_groups < 0) ValueError("num_groups: expected >= 0 (0 or 1 = no group limit), got " + S(num_groups));
  if (topk_groups < 0) ValueError("topk_groups: expected >= 0, got " + S(topk_groups));
  if (num_groups > 1) {
    if (num_groups > E || E % num_groups != 0) ValueError("num_groups: must divide the number of experts " + S(E));
    if (topk_groups < 1 || topk_groups > num_groups) ValueError("topk_groups: expected 1 <= topk_groups <= num_groups");
    if (top_k > topk_groups * (E / num_groups)) ValueError("top_k: larger than the experts in topk_groups groups");
  }
  // The kernel keeps a token's scores, flags and group scores in the 192 KiB local buffer.
  const int64_t ub = omni_moe_route_ub_bytes(E, num_groups);
  if (ub > OMNI_UB_BYTES)
    ValueError("num_groups: routing " + S(E) + " experts in " + S(num_groups) + " groups needs " + S(ub) +
               " bytes of local scratch, over the cpu kernel's limit of " + S(OMNI_UB_BYTES) +
               " (192 KiB); use fewer groups");
  CheckDtype(topk_weights, at::kFloat, "topk_weights");
  CheckDtype(topk_ids, at::kInt, "topk_ids");
  CheckContig(topk_weights, "topk_weights", {T, top_k});
  CheckContig(topk_ids, "topk_ids", {T, top_k});
  OmniMoeRouteArgs a{};
  if (correction_bias.has_value()) {
    const at::Tensor& b = *correction_bias;
    CheckDtype(b, at::kFloat, "correction_bias");
    CheckContig(b, "correction_bias", {E});
    a.correction_bias = b.data_ptr<float>();
  }
  CheckOutputs({{&topk_weights, "topk_weights"}, {&topk_ids, "topk_ids"}},
               {{&logits, "router_logits"}, {Opt(correction_bias), "correction_bias"}});
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
  const int32_t dt = FloatDType(hidden, "hidden");
  if (hidden.dim() != 2) ValueError("hidden: expected a 2-D tensor [tokens, hidden], got " + Shape(hidden));
  const int64_t T = hidden.size(0), H = hidden.size(1);
  CheckMatrix(hidden, "hidden", T, H);
  CheckDtype(topk_ids, at::kInt, "topk_ids");
  if (topk_ids.dim() != 2 || topk_ids.size(0) != T) ValueError("topk_ids: expected shape [" + S(T) + ", top_k], got " + Shape(topk_ids));
  const int64_t k = topk_ids.size(1);
  if (!topk_ids.is_contiguous()) ValueError("topk_ids: must be contiguous");
  if (num_experts < 1) ValueError("num_experts: expected >= 1, got " + S(num_experts));
  if (block_size < 1) ValueError("block_size: expected >= 1, got " + S(block_size));
  // Rows, tokens and (token, slot) pairs are int32 in the kernel and in sorted_token_ids / inverse_index.
  const int64_t pairs = Mul(T, k, "topk_ids");
  CheckLimit(pairs, kMaxInt32, "topk_ids", "tokens * top_k");
  const int64_t M = Add(pairs, Mul(num_experts, block_size - 1, "block_size"), "block_size");
  CheckLimit(M, kMaxInt32, "block_size", "rows tokens*top_k + num_experts*(block_size - 1)");
  CheckSameDtype(x_sorted, hidden, "x_sorted", "hidden");
  CheckContig(x_sorted, "x_sorted", {M, H});
  CheckDtype(sorted_token_ids, at::kInt, "sorted_token_ids");
  CheckContig(sorted_token_ids, "sorted_token_ids", {M});
  CheckDtype(expert_offsets, at::kLong, "expert_offsets");
  CheckContig(expert_offsets, "expert_offsets", {Add(num_experts, 1, "num_experts")});
  CheckDtype(expert_counts, at::kInt, "expert_counts");
  CheckContig(expert_counts, "expert_counts", {num_experts});
  CheckDtype(inverse_index, at::kInt, "inverse_index");
  CheckContig(inverse_index, "inverse_index", {T, k});
  CheckOutputs({{&x_sorted, "x_sorted"}, {&sorted_token_ids, "sorted_token_ids"}, {&expert_offsets, "expert_offsets"},
                {&expert_counts, "expert_counts"}, {&inverse_index, "inverse_index"}},
               {{&hidden, "hidden"}, {&topk_ids, "topk_ids"}});
  CheckRange(topk_ids, "topk_ids", 0, num_experts);
  OmniMoeDispatchArgs a{};
  SetTokens(a, hidden, k, dt);
  a.topk_ids = topk_ids.data_ptr<int32_t>();
  a.x_sorted = x_sorted.data_ptr();
  a.sorted_token_ids = sorted_token_ids.data_ptr<int32_t>();
  a.expert_offsets = expert_offsets.data_ptr<int64_t>();
  a.expert_counts = expert_counts.data_ptr<int32_t>();
  a.inverse_index = inverse_index.data_ptr<int32_t>();
  a.num_experts = num_experts;
  a.block_size = block_size;
  a.rows = M;
  OmniRuntime rt = Runtime();
  K()->moe_dispatch(&a, &rt);
}

void GroupedGemm(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets,
                 const std::optional<at::Tensor>& w_tiles) {
  const int32_t dt = FloatDType(x, "x_sorted");
  if (x.dim() != 2) ValueError("x_sorted: expected a 2-D tensor [rows, K], got " + Shape(x));
  const int64_t M = x.size(0), Kd = x.size(1);
  CheckMatrix(x, "x_sorted", M, Kd);
  CheckSameDtype(w, x, "w", "x_sorted");
  if (w.dim() != 3 || w.size(2) != Kd) ValueError("w: expected shape [experts, N, " + S(Kd) + "], got " + Shape(w));
  const int64_t E = w.size(0), N = w.size(1);
  if (E < 1) ValueError("w: expected at least one expert");
  if (!w.is_contiguous()) ValueError("w: must be contiguous");
  CheckDtype(expert_offsets, at::kLong, "expert_offsets");
  CheckContig(expert_offsets, "expert_offsets", {E + 1});
  CheckSameDtype(out, x, "out", "x_sorted");
  CheckMatrix(out, "out", M, N);
  CheckOutputs({{&out, "out"}}, {{&x, "x_sorted"}, {&w, "w"}, {&expert_offsets, "expert_offsets"},
                                 {Opt(w_tiles), "w_tiles"}});
  const int64_t* o = expert_offsets.data_ptr<int64_t>();
  const std::string bad = "expert_offsets: must be non-decreasing within [0, " + S(M) + "] (rows of x_sorted)";
  if (o[0] < 0 || o[E] > M) ValueError(bad);
  for (int64_t e = 0; e < E; ++e)
    if (o[e + 1] < o[e]) ValueError(bad);
  if (M == 0 || N == 0) return;
  if (Kd == 0) {
    out.zero_();
    return;
  }
  OmniGroupedGemmArgs a{x.data_ptr(), w.data_ptr(), o, out.data_ptr(), x.stride(0), out.stride(0), M, Kd, N, E, dt};
  if (w_tiles.has_value()) {
    a.w_layout = PackedLayout("grouped_gemm", "w_tiles", x, "x_sorted");
    CheckPacked(*w_tiles, "w_tiles", a.w_layout, E, N, Kd);
    a.w = w_tiles->data_ptr();
    SetWorkspace(a, K()->grouped_gemm_workspace(&a));
  }
  OmniRuntime rt = Runtime();
  K()->grouped_gemm(&a, &rt);
}

void MoeCombine(at::Tensor out, const at::Tensor& expert_out, const at::Tensor& topk_weights,
                const at::Tensor& inverse_index) {
  const int32_t dt = FloatDType(expert_out, "expert_out");
  if (expert_out.dim() != 2) ValueError("expert_out: expected a 2-D tensor [rows, hidden], got " + Shape(expert_out));
  const int64_t M = expert_out.size(0), H = expert_out.size(1);
  CheckMatrix(expert_out, "expert_out", M, H);
  CheckDtype(inverse_index, at::kInt, "inverse_index");
  if (inverse_index.dim() != 2) ValueError("inverse_index: expected a 2-D tensor [tokens, top_k], got " + Shape(inverse_index));
  const int64_t T = inverse_index.size(0), k = inverse_index.size(1);
  CheckContig(inverse_index, "inverse_index", {T, k});
  CheckDtype(topk_weights, at::kFloat, "topk_weights");
  CheckContig(topk_weights, "topk_weights", {T, k});
  CheckSameDtype(out, expert_out, "out", "expert_out");
  CheckMatrix(out, "out", T, H);
  CheckOutputs({{&out, "out"}},
               {{&expert_out, "expert_out"}, {&topk_weights, "topk_weights"}, {&inverse_index, "inverse_index"}});
  CheckRange(inverse_index, "inverse_index", -1, M);
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
  const int32_t dt = FloatDType(hidden, "hidden");
  if (hidden.dim() != 2) ValueError("hidden: expected a 2-D tensor [tokens, hidden], got " + Shape(hidden));
  const int64_t T = hidden.size(0), H = hidden.size(1);
  if (H < 1) ValueError("hidden: hidden size must be >= 1");
  CheckMatrix(hidden, "hidden", T, H);
  CheckSameDtype(w13, hidden, "w13", "hidden");
  CheckSameDtype(w2, hidden, "w2", "hidden");
  if (w13.dim() != 3 || w13.size(2) != H || w13.size(1) % 2 != 0 || w13.size(1) < 2)
    ValueError("w13: expected shape [experts, 2*intermediate, " + S(H) + "], got " + Shape(w13));
  const int64_t E = w13.size(0), I = w13.size(1) / 2;
  if (E < 1) ValueError("w13: expected at least one expert");
  CheckContig(w13, "w13", {E, 2 * I, H});
  CheckContig(w2, "w2", {E, H, I});
  CheckDtype(topk_ids, at::kInt, "topk_ids");
  if (topk_ids.dim() != 2 || topk_ids.size(0) != T) ValueError("topk_ids: expected shape [" + S(T) + ", top_k], got " + Shape(topk_ids));
  const int64_t k = topk_ids.size(1);
  if (k < 1) ValueError("topk_ids: top_k must be >= 1");
  CheckContig(topk_ids, "topk_ids", {T, k});
  CheckDtype(topk_weights, at::kFloat, "topk_weights");
  CheckContig(topk_weights, "topk_weights", {T, k});
  if (activation != "silu") ValueError("activation: expected 'silu', got '" + activation + "'");
  // (token, expert) pairs index int32 rows of the kernel's sorted scratch.
  CheckLimit(Mul(T, k, "topk_ids"), kMaxInt32, "topk_ids", "tokens * top_k");
  CheckSameDtype(out, hidden, "out", "hidden");
  CheckMatrix(out, "out", T, H);
  if (w13_tiles.has_value() != w2_tiles.has_value()) ValueError("w2_tiles: pass both w13_tiles and w2_tiles or neither");
  CheckOutputs({{&out, "out"}}, {{&hidden, "hidden"}, {&w13, "w13"}, {&w2, "w2"}, {&topk_weights, "topk_weights"},
                                 {&topk_ids, "topk_ids"}, {Opt(expert_map), "expert_map"},
                                 {Opt(w13_tiles), "w13_tiles"}, {Opt(w2_tiles), "w2_tiles"}},
               {{"out", "hidden"}});
  int64_t Eg = E;
  const int32_t* map = nullptr;
  if (expert_map.has_value()) {
    const at::Tensor& m = *expert_map;
    CheckDtype(m, at::kInt, "expert_map");
    if (m.dim() != 1 || m.size(0) < 1) ValueError("expert_map: expected a 1-D tensor [global_experts], got " + Shape(m));
    CheckRange(m, "expert_map", -1, E);
    Eg = m.size(0);
    map = m.data_ptr<int32_t>();
  }
  CheckRange(topk_ids, "topk_ids", 0, Eg);
  if (T == 0) return;
  OmniFusedMoeArgs a{};
  SetTokens(a, hidden, k, dt);
  a.w13 = w13.data_ptr();
  a.w2 = w2.data_ptr();
  a.topk_weights = topk_weights.data_ptr<float>();
  a.topk_ids = topk_ids.data_ptr<int32_t>();
  a.expert_map = map;
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  a.inter_size = I;
  a.num_experts = E;
  a.num_global_experts = Eg;
  a.w_dtype = dt;
  a.activation = OMNI_MOE_SILU;
  if (w13_tiles.has_value()) {
    a.w_layout = PackedLayout("fused_moe", "w13_tiles", hidden, "hidden");
    if (a.w_layout == OMNI_W_PANELS_F32) {
      CheckPacked(*w13_tiles, "w13_tiles", a.w_layout, E, I, H, 16);
    } else {
      CheckPacked(*w13_tiles, "w13_tiles", a.w_layout, 2 * E, I, H);
    }
    CheckPacked(*w2_tiles, "w2_tiles", a.w_layout, E, H, I);
    a.w13 = w13_tiles->data_ptr();
    a.w2 = w2_tiles->data_ptr();
  }
  SetWorkspace(a, K()->fused_moe_workspace(&a));
  OmniRuntime rt = Runtime();
  K()->fused_moe(&a, &rt);
}

int64_t TileLayouts() { return K()->weight_layouts; }

void Register(py::module_& m) {
  Def(m, "moe_route", &MoeRoute, "top-k routing into topk_weights (fp32) / topk_ids (int32) [tokens, top_k]",
      py::arg("topk_weights"), py::arg("topk_ids"), py::arg("router_logits"), py::arg("top_k"), py::arg("scoring"),
      py::arg("renormalize"), py::arg("num_groups"), py::arg("topk_groups"), py::arg("correction_bias") = py::none(),
      py::arg("routed_scaling") = 1.0);
  Def(m, "moe_dispatch", &MoeDispatch, "counting sort of (token, slot) pairs by expert", py::arg("x_sorted"),
      py::arg("sorted_token_ids"), py::arg("expert_offsets"), py::arg("expert_counts"), py::arg("inverse_index"),
      py::arg("hidden"), py::arg("topk_ids"), py::arg("num_experts"), py::arg("block_size") = 1);
  Def(m, "grouped_gemm", &GroupedGemm,
      "out[r] = x_sorted[r] @ w[e].T for rows of expert e (w_tiles: w prepacked, bf16 tiles or fp32 panels, on the "
      "amx / avx512 libraries)",
      py::arg("out"), py::arg("x_sorted"), py::arg("w"), py::arg("expert_offsets"), py::arg("w_tiles") = py::none());
  Def(m, "moe_combine", &MoeCombine, "out[t] = sum_j topk_weights[t, j] * expert_out[inverse_index[t, j]]",
      py::arg("out"), py::arg("expert_out"), py::arg("topk_weights"), py::arg("inverse_index"));
  Def(m, "fused_moe", &FusedMoe,
      "the whole MoE block (gate/up, silu_and_mul, down, weighted combine); w13_tiles / w2_tiles: the weights "
      "prepacked (bf16 tiles or fp32 panels, amx / avx512 libraries), w13 / w2 then only give the shapes",
      py::arg("out"), py::arg("hidden"), py::arg("w13"), py::arg("w2"), py::arg("topk_weights"), py::arg("topk_ids"),
      py::arg("activation") = "silu", py::arg("expert_map") = py::none(), py::arg("w13_tiles") = py::none(),
      py::arg("w2_tiles") = py::none());
  m.def("tile_layouts", &TileLayouts, "bitmask of the weight layouts the active library takes");
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
