// Bindings of the quantized GEMM family: checks, scratch allocation, then the torch-free kernels of
// ascendc/kernels/quant_gemm/. Every entry point re-checks dtypes, shapes and strides (it is reachable
// directly through omniops._C), so no input can make a kernel read or write outside the tensors.
#include <tuple>

#include "bindings/common.h"
#include "omni/ops/quant_gemm.h"

namespace omni {
constexpr const char* FAMILY = "quant_gemm";
namespace {

constexpr int64_t kMaxK8 = 131071;  // int32 accumulation of int8 products is exact up to here

const OmniQuantGemmKernels* Table() { return Kernels<OmniQuantGemmKernels>("omni_quant_gemm_kernels"); }

int32_t OutDType(const at::Tensor& out, bool allow_i32) {
  if (allow_i32 && out.scalar_type() == at::kInt) return OMNI_QGEMM_OUT_I32;
  return FloatDType(out, "out");
}

const void* Bias(const std::optional<at::Tensor>& bias, const at::Tensor& out, int64_t n) {
  if (!bias.has_value()) return nullptr;
  const at::Tensor& b = *bias;
  if (out.scalar_type() == at::kInt) ValueError("bias: not supported with an int32 out (the raw accumulators)");
  CheckSameDtype(b, out, "bias", "out");
  CheckContig(b, "bias", {n});
  return b.data_ptr();
}

// The activation x [M, K] (named x_name) and quantized weight w_q [N, K] of every quantized GEMM / fused linear:
// 2-D, unit inner stride; the weight of qtype with fp32 scales. Returns {M, K, N}.
std::tuple<int64_t, int64_t, int64_t> CheckXW(const at::Tensor& x, const char* x_name, const at::Tensor& w,
                                              const at::Tensor& w_scale, at::ScalarType qtype) {
  CheckDtype(w, qtype, "w_q");
  CheckDtype(w_scale, at::kFloat, "w_scale");
  if (x.dim() != 2) ValueError(std::string(x_name) + ": expected a 2-D tensor [M, K], got shape " + Shape(x));
  if (w.dim() != 2) ValueError("w_q: expected a 2-D tensor [N, K], got shape " + Shape(w));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  if (K < 1) ValueError(std::string(x_name) + ": K must be > 0");
  CheckMatrix(x, x_name, M, K);
  CheckMatrix(w, "w_q", N, K);
  return {M, K, N};
}

// Operands of the quantized GEMMs: x_q / w_q of qtype, fp32 scales. Returns {M, K, N}; each GEMM then checks its
// own scale shapes.
std::tuple<int64_t, int64_t, int64_t> CheckQuantOperands(const at::Tensor& x, const at::Tensor& x_scale,
                                                         const at::Tensor& w, const at::Tensor& w_scale,
                                                         at::ScalarType qtype) {
  CheckDtype(x, qtype, "x_q");
  CheckDtype(x_scale, at::kFloat, "x_scale");
  return CheckXW(x, "x_q", w, w_scale, qtype);
}

// The fields the W8A8 and FP8 GEMM args share: quantized activation rows, weight, output.
template <typename Args, typename Q>
void FillGemmArgs(Args& a, const Q* x, int64_t x_stride, const float* x_scale, const at::Tensor& w,
                  const at::Tensor& w_scale, at::Tensor& out, int64_t M, int64_t N, int64_t K, int32_t out_dtype) {
  a.x = x;
  a.x_scale = x_scale;
  a.w = static_cast<const Q*>(w.data_ptr());
  a.w_scale = w_scale.data_ptr<float>();
  a.out = out.data_ptr();
  a.x_stride = x_stride;
  a.w_stride = w.stride(0);
  a.out_stride = out.stride(0);
  a.M = M;
  a.N = N;
  a.K = K;
  a.out_dtype = out_dtype;
}

// w_tiles: w_q [N, K] prepacked for AMX-INT8 (OMNI_W_TILES_I8), [ceil(N/16), ceil(K/64), 1024] int8. Points the
// GEMM at them and gives it its workspace; the amx and avx512 libraries take them.
void UseTiles(OmniW8A8Args& a, const std::optional<at::Tensor>& w_tiles) {
  if (!w_tiles.has_value()) return;
  const at::Tensor& t = *w_tiles;
  if ((Table()->weight_layouts & (1u << OMNI_W_TILES_I8)) == 0)
    ValueError("w_tiles: tiled int8 weights need the amx or avx512 kernel library, the active one is '" + ActiveIsaName() + "'");
  CheckDtype(t, at::kChar, "w_tiles");
  CheckContig(t, "w_tiles", {DivUp(a.N, 16), DivUp(a.K, 64), 1024});
  a.w = static_cast<const int8_t*>(t.data_ptr());
  a.w_layout = OMNI_W_TILES_I8;
  SetWorkspace(a, Table()->w8a8_workspace(&a));
}

// out[M, N] (float or int32) = x_q[M, K] int8 @ w_q[N, K].T int8, scaled by x_scale[M] * w_scale[N].
void W8A8Gemm(at::Tensor out, const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
              const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_tiles) {
  const auto [M, K, N] = CheckQuantOperands(x, x_scale, w, w_scale, at::kChar);
  if (K > kMaxK8) ValueError("x_q: K=" + S(K) + " exceeds 131071 (int32 accumulation could overflow)");
  CheckContig(x_scale, "x_scale", {M});
  CheckContig(w_scale, "w_scale", {N});
  const int32_t odt = OutDType(out, true);
  CheckMatrix(out, "out", M, N);
  CheckOutputs({{&out, "out"}}, {{&x, "x_q"}, {&x_scale, "x_scale"}, {&w, "w_q"}, {&w_scale, "w_scale"},
                                 {Opt(bias), "bias"}, {Opt(w_tiles), "w_tiles"}});
  OmniW8A8Args a{};
  a.bias = Bias(bias, out, N);
  if (M == 0 || N == 0) return;
  FillGemmArgs(a, static_cast<const int8_t*>(x.data_ptr()), x.stride(0), x_scale.data_ptr<float>(), w, w_scale, out, M,
               N, K, odt);
  UseTiles(a, w_tiles);
  OmniRuntime rt = Runtime();
  Table()->w8a8_gemm(&a, &rt);
}

void W4A16Gemm(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
               const std::optional<at::Tensor>& zeros, int64_t group_size, const std::optional<at::Tensor>& bias) {
  const int32_t dt = FloatDType(x, "x");
  if (x.dim() != 2) ValueError("x: expected a 2-D tensor [M, K], got shape " + Shape(x));
  const int64_t M = x.size(0), K = x.size(1);
  if (group_size != 32 && group_size != 64 && group_size != 128)
    ValueError("group_size: expected 32, 64 or 128, got " + S(group_size));
  if (K < 1 || K % group_size != 0)
    ValueError("x: K=" + S(K) + " must be a positive multiple of group_size=" + S(group_size));
  CheckMatrix(x, "x", M, K);
  CheckDtype(w, at::kByte, "w_packed");
  if (w.dim() != 2 || w.size(1) != K / 2) ValueError("w_packed: expected shape [N, " + S(K / 2) + "] (two int4 per byte), got " + Shape(w));
  const int64_t N = w.size(0), G = K / group_size;
  CheckContig(w, "w_packed", {N, K / 2});
  CheckDtype(scales, at::kFloat, "scales");
  CheckContig(scales, "scales", {N, G});
  if (zeros.has_value()) {
    CheckDtype(*zeros, at::kByte, "zeros");
    CheckContig(*zeros, "zeros", {N, G});
    CheckRange(*zeros, "zeros", 0, 16);  // int4 zero-point codes
  }
  CheckSameDtype(out, x, "out", "x");
  CheckMatrix(out, "out", M, N);
  CheckOutputs({{&out, "out"}}, {{&x, "x"}, {&w, "w_packed"}, {&scales, "scales"}, {Opt(zeros), "zeros"},
                                 {Opt(bias), "bias"}});
  OmniW4A16Args a{};
  a.bias = Bias(bias, out, N);
  if (M == 0 || N == 0) return;
  at::Tensor work = Empty({M, K}, at::kFloat, "x");
  a.x = x.data_ptr();
  a.w = static_cast<const uint8_t*>(w.data_ptr());
  a.scales = scales.data_ptr<float>();
  a.zeros = zeros.has_value() ? static_cast<const uint8_t*>(zeros->data_ptr()) : nullptr;
  a.out = out.data_ptr();
  a.work = work.data_ptr<float>();
  a.x_stride = x.stride(0);
  a.out_stride = out.stride(0);
  a.M = M;
  a.N = N;
  a.K = K;
  a.group_size = group_size;
  a.dtype = dt;
  OmniRuntime rt = Runtime();
  Table()->w4a16_gemm(&a, &rt);
}

void Fp8BlockGemm(at::Tensor out, const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                  const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
  const auto [M, K, N] = CheckQuantOperands(x, x_scale, w, w_scale, at::kFloat8_e4m3fn);
  const int64_t KB = DivUp(K, 128), NB = DivUp(N, 128);
  CheckContig(x_scale, "x_scale", {M, KB});
  CheckContig(w_scale, "w_scale", {NB, KB});
  const int32_t odt = OutDType(out, false);
  CheckMatrix(out, "out", M, N);
  CheckOutputs({{&out, "out"}}, {{&x, "x_q"}, {&x_scale, "x_scale"}, {&w, "w_q"}, {&w_scale, "w_scale"},
                                 {Opt(bias), "bias"}});
  OmniFp8BlockArgs a{};
  a.bias = Bias(bias, out, N);
  if (M == 0 || N == 0) return;
  at::Tensor work = Empty({M, K}, at::kFloat, "x_q");
  FillGemmArgs(a, static_cast<const uint8_t*>(x.data_ptr()), x.stride(0), x_scale.data_ptr<float>(), w, w_scale, out,
               M, N, K, odt);
  a.work = work.data_ptr<float>();
  OmniRuntime rt = Runtime();
  Table()->fp8_block_gemm(&a, &rt);
}

// ---- fused linears: quantize the float activation into scratch, then the GEMM kernel, in one call --------------
// The A-tile loads of the GEMM kernels read quantized bytes through the kernel ABI (OmniW8A8Args /
// OmniFp8BlockArgs), so the quantization runs as its own grid over the rows first; what the fusion saves is the
// Python round trip, the second set of checks and the extra allocations of the two-step path.

// out[M, N] = w8a8_gemm(quantize_per_token_int8(x[M, K] float), w_q, w_scale, bias): the two-step result.
void W8A8Linear(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_tiles) {
  const int32_t xdt = FloatDType(x, "x");
  const auto [M, K, N] = CheckXW(x, "x", w, w_scale, at::kChar);
  if (K > kMaxK8) ValueError("x: K=" + S(K) + " exceeds 131071 (int32 accumulation could overflow)");
  CheckContig(w_scale, "w_scale", {N});
  const int32_t odt = OutDType(out, false);
  CheckMatrix(out, "out", M, N);
  CheckOutputs({{&out, "out"}}, {{&x, "x"}, {&w, "w_q"}, {&w_scale, "w_scale"}, {Opt(bias), "bias"},
                                 {Opt(w_tiles), "w_tiles"}});
  OmniW8A8Args a{};
  a.bias = Bias(bias, out, N);
  if (M == 0 || N == 0) return;
  at::Tensor x_q = Empty({M, K}, at::kChar, "x");
  at::Tensor x_scale = Empty({M}, at::kFloat, "x");
  const OmniQuantGemmKernels* table = Table();
  OmniRuntime rt = Runtime();
  OmniQuantI8Args q{x.data_ptr(), static_cast<int8_t*>(x_q.data_ptr()), x_scale.data_ptr<float>(), x.stride(0), M, K,
                    xdt};
  table->quantize_per_token_int8(&q, &rt);
  FillGemmArgs(a, static_cast<const int8_t*>(x_q.data_ptr()), K, x_scale.data_ptr<float>(), w, w_scale, out, M, N, K,
               odt);
  UseTiles(a, w_tiles);
  table->w8a8_gemm(&a, &rt);
}

// out[M, N] = fp8_block_gemm(quantize_activation_fp8_group(x[M, K] float), w_q, w_scale, bias).
void Fp8BlockLinear(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                    const std::optional<at::Tensor>& bias) {
  const int32_t xdt = FloatDType(x, "x");
  const auto [M, K, N] = CheckXW(x, "x", w, w_scale, at::kFloat8_e4m3fn);
  const int64_t KB = DivUp(K, 128), NB = DivUp(N, 128);
  CheckContig(w_scale, "w_scale", {NB, KB});
  const int32_t odt = OutDType(out, false);
  CheckMatrix(out, "out", M, N);
  CheckOutputs({{&out, "out"}}, {{&x, "x"}, {&w, "w_q"}, {&w_scale, "w_scale"}, {Opt(bias), "bias"}});
  OmniFp8BlockArgs a{};
  a.bias = Bias(bias, out, N);
  if (M == 0 || N == 0) return;
  at::Tensor x_q = Empty({M, K}, at::kByte, "x");
  at::Tensor x_scale = Empty({M, KB}, at::kFloat, "x");
  at::Tensor work = Empty({M, K}, at::kFloat, "x");
  OmniRuntime rt = Runtime();
  OmniQuantFp8Args q{x.data_ptr(), static_cast<uint8_t*>(x_q.data_ptr()), x_scale.data_ptr<float>(), x.stride(0), M,
                     K, xdt};
  Table()->quantize_fp8_group(&q, &rt);
  FillGemmArgs(a, static_cast<const uint8_t*>(x_q.data_ptr()), K, x_scale.data_ptr<float>(), w, w_scale, out, M, N, K,
               odt);
  a.work = work.data_ptr<float>();
  Table()->fp8_block_gemm(&a, &rt);
}

// (x_q [M, K] int8, x_scale [M, 1] fp32) = per-token symmetric int8 quantization of x [M, K].
std::tuple<at::Tensor, at::Tensor> QuantizePerTokenInt8(const at::Tensor& x) {
  const int32_t dt = FloatDType(x, "x");
  if (x.dim() != 2) ValueError("x: expected a 2-D tensor [M, K], got shape " + Shape(x));
  const int64_t M = x.size(0), K = x.size(1);
  CheckMatrix(x, "x", M, K);
  at::Tensor q = Empty({M, K}, at::kChar, "x");
  at::Tensor s = Empty({M, 1}, at::kFloat, "x");
  s.zero_();
  if (M == 0 || K == 0) return {q, s};
  OmniQuantI8Args a{x.data_ptr(), static_cast<int8_t*>(q.data_ptr()), s.data_ptr<float>(), x.stride(0), M, K, dt};
  OmniRuntime rt = Runtime();
  Table()->quantize_per_token_int8(&a, &rt);
  return {q, s};
}

int64_t TileLayouts() { return Table()->weight_layouts; }
std::string Int8Path() { return Table()->int8_path; }

void Register(py::module_& m) {
  Def(m, "quantize_per_token_int8", &QuantizePerTokenInt8,
      "(x_q int8 [M, K], x_scale fp32 [M, 1]): symmetric per-token int8, scale = amax / 127", py::arg("x"));
  Def(m, "w8a8_gemm", &W8A8Gemm,
      "out[M,N] = (x_q[M,K] int8 @ w_q[N,K].T int8) * x_scale[M] * w_scale[N] + bias; int32 out: raw sums "
      "(w_tiles: w_q prepacked for AMX-INT8, amx library only)",
      py::arg("out"), py::arg("x_q"), py::arg("x_scale"), py::arg("w_q"), py::arg("w_scale"),
      py::arg("bias") = py::none(), py::arg("w_tiles") = py::none());
  Def(m, "w4a16_gemm", &W4A16Gemm, "out[M,N] = x[M,K] @ dequant_int4(w_packed[N,K/2], scales, zeros).T + bias",
      py::arg("out"), py::arg("x"), py::arg("w_packed"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
      py::arg("bias") = py::none());
  Def(m, "fp8_block_gemm", &Fp8BlockGemm,
      "out[M,N] = dequant(x_q, x_scale[M,K/128]) @ dequant(w_q, w_scale[N/128,K/128]).T + bias", py::arg("out"),
      py::arg("x_q"), py::arg("x_scale"), py::arg("w_q"), py::arg("w_scale"), py::arg("bias") = py::none());
  Def(m, "w8a8_linear", &W8A8Linear,
      "out[M,N] = w8a8_gemm(quantize_per_token_int8(x[M,K] float), w_q, w_scale, bias) in one call", py::arg("out"),
      py::arg("x"), py::arg("w_q"), py::arg("w_scale"), py::arg("bias") = py::none(), py::arg("w_tiles") = py::none());
  Def(m, "fp8_block_linear", &Fp8BlockLinear,
      "out[M,N] = fp8_block_gemm(quantize_fp8_group(x[M,K] float), w_q, w_scale[N/128,K/128], bias) in one call",
      py::arg("out"), py::arg("x"), py::arg("w_q"), py::arg("w_scale"), py::arg("bias") = py::none());
  m.def("w8a8_tile_layouts", &TileLayouts, "bitmask of the w8a8 weight layouts");
  m.def("quant_gemm_int8_path", &Int8Path, "which int8 inner loop the active kernel library uses (avx512-vnni, avx2, scalar)");
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
