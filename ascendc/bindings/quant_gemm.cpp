// Bindings of the quantized GEMM family: checks, scratch allocation, then the torch-free kernels of
// ascendc/kernels/quant_gemm/. Every entry point re-checks dtypes, shapes and strides (it is reachable
// directly through omniops._C), so no input can make a kernel read or write outside the tensors.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cmath>
#include <tuple>

#include "bindings/common.h"
#include "omni/ops/quant_gemm.h"

namespace omni {
constexpr const char* FAMILY = "quant_gemm";
namespace {

constexpr int64_t kMaxK8 = 131071;  // int32 accumulation of int8 products is exact up to here

void CheckDtype(const at::Tensor& t, at::ScalarType st, const char* name) {
  if (t.scalar_type() != st)
    TypeError(std::string(name) + ": expected dtype " + c10::toString(st) + ", got " + c10::toString(t.scalar_type()));
}

void CheckContiguousShape(const at::Tensor& t, const char* name, std::vector<int64_t> shape) {
  if (t.sizes().vec() != shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    ValueError(std::string(name) + ": expected shape " + s + "], got " + Shape(t));
  }
  if (!t.is_contiguous()) ValueError(std::string(name) + ": must be contiguous");
}

void CheckNoOverlap(const at::Tensor& out, const at::Tensor& in, const char* in_name) {
  if (out.numel() == 0 || in.numel() == 0) return;
  CheckAlias(out, in, "out", in_name);
  if (out.data_ptr() == in.data_ptr()) ValueError(std::string("out must not alias ") + in_name);
}

int32_t OutDType(const at::Tensor& out, bool allow_i32) {
  if (allow_i32 && out.scalar_type() == at::kInt) return OMNI_QGEMM_OUT_I32;
  if (out.scalar_type() == at::kInt) TypeError("out: expected float32, float16 or bfloat16, got Int");
  return FloatDType(out, "out");
}

const void* Bias(const std::optional<at::Tensor>& bias, const at::Tensor& out, int64_t n) {
  if (!bias.has_value()) return nullptr;
  const at::Tensor& b = *bias;
  CheckCpu(b, "bias");
  if (out.scalar_type() == at::kInt) ValueError("bias: not supported with an int32 out (the raw accumulators)");
  CheckSameDtype(b, out, "bias", "out");
  CheckContiguousShape(b, "bias", {n});
  CheckNoOverlap(out, b, "bias");
  return b.data_ptr();
}

// The activation x [M, K] (named x_name) and quantized weight w_q [N, K] of every quantized GEMM / fused linear:
// CPU, 2-D, unit inner stride; the weight of qtype with fp32 scales. Returns {M, K, N}.
std::tuple<int64_t, int64_t, int64_t> CheckXW(const at::Tensor& out, const at::Tensor& x, const char* x_name,
                                              const at::Tensor& w, const at::Tensor& w_scale, at::ScalarType qtype) {
  CheckCpu(out, "out");
  CheckCpu(x, x_name);
  CheckCpu(w, "w_q");
  CheckCpu(w_scale, "w_scale");
  CheckDtype(w, qtype, "w_q");
  CheckDtype(w_scale, at::kFloat, "w_scale");
  if (x.dim() != 2) ValueError(std::string(x_name) + ": expected a 2-D tensor [M, K], got shape " + Shape(x));
  if (w.dim() != 2) ValueError("w_q: expected a 2-D tensor [N, K], got shape " + Shape(w));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  if (K < 1) ValueError(std::string(x_name) + ": K must be > 0");
  CheckMatrix(x, x_name, M, K, false);
  CheckMatrix(w, "w_q", N, K, false);
  return {M, K, N};
}

// Operands of the quantized GEMMs: x_q / w_q of qtype, fp32 scales. Returns {M, K, N}; each GEMM then checks its
// own scale shapes.
std::tuple<int64_t, int64_t, int64_t> CheckQuantOperands(const at::Tensor& out, const at::Tensor& x,
                                                         const at::Tensor& x_scale, const at::Tensor& w,
                                                         const at::Tensor& w_scale, at::ScalarType qtype) {
  CheckCpu(x_scale, "x_scale");
  CheckDtype(x, qtype, "x_q");
  CheckDtype(x_scale, at::kFloat, "x_scale");
  return CheckXW(out, x, "x_q", w, w_scale, qtype);
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

const OmniQuantGemmKernels* Table() { return Kernels<OmniQuantGemmKernels>("omni_quant_gemm_kernels"); }

// w_tiles: w_q [N, K] prepacked for AMX-INT8 (OMNI_W_TILES_I8), [ceil(N/16), ceil(K/64), 1024] int8. Points the
// GEMM at them and gives it its workspace; only the amx library takes them.
void UseTiles(OmniW8A8Args& a, const std::optional<at::Tensor>& w_tiles, const at::Tensor& out) {
  if (!w_tiles.has_value()) return;
  const at::Tensor& t = *w_tiles;
  if ((Table()->weight_layouts & (1u << OMNI_W_TILES_I8)) == 0)
    ValueError("w8a8: tiled (AMX-INT8) weights need the amx kernel library, the active one is '" + ActiveIsaName() + "'");
  CheckCpu(t, "w_tiles");
  if (t.scalar_type() != at::kChar) TypeError("w_tiles: expected int8");
  CheckContiguousShape(t, "w_tiles", {(a.N + 15) / 16, (a.K + 63) / 64, 1024});
  CheckNoOverlap(out, t, "w_tiles");
  a.w = static_cast<const int8_t*>(t.data_ptr());
  a.w_layout = OMNI_W_TILES_I8;
  a.workspace_bytes = Table()->w8a8_workspace(&a);
  a.workspace = Workspace(a.workspace_bytes);
}

// out[M, N] (float or int32) = x_q[M, K] int8 @ w_q[N, K].T int8, scaled by x_scale[M] * w_scale[N].
void W8A8Gemm(at::Tensor out, const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
              const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_tiles) {
  const auto [M, K, N] = CheckQuantOperands(out, x, x_scale, w, w_scale, at::kChar);
  if (K > kMaxK8) ValueError("x_q: K=" + std::to_string(K) + " exceeds 131071 (int32 accumulation could overflow)");
  CheckContiguousShape(x_scale, "x_scale", {M});
  CheckContiguousShape(w_scale, "w_scale", {N});
  const int32_t odt = OutDType(out, true);
  CheckMatrix(out, "out", M, N, true);
  for (auto [t, n] : {std::pair{&x, "x_q"}, {&w, "w_q"}, {&x_scale, "x_scale"}, {&w_scale, "w_scale"}})
    CheckNoOverlap(out, *t, n);
  OmniW8A8Args a{};
  a.bias = Bias(bias, out, N);
  if (M == 0 || N == 0) return;
  FillGemmArgs(a, static_cast<const int8_t*>(x.data_ptr()), x.stride(0), x_scale.data_ptr<float>(), w, w_scale, out, M,
               N, K, odt);
  UseTiles(a, w_tiles, out);
  OmniRuntime rt = Runtime();
  Table()->w8a8_gemm(&a, &rt);
}

void W4A16Gemm(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
               const std::optional<at::Tensor>& zeros, int64_t group_size, const std::optional<at::Tensor>& bias) {
  CheckCpu(out, "out");
  CheckCpu(x, "x");
  CheckCpu(w, "w_packed");
  CheckCpu(scales, "scales");
  const int32_t dt = FloatDType(x, "x");
  if (x.dim() != 2) ValueError("x: expected a 2-D tensor [M, K], got shape " + Shape(x));
  const int64_t M = x.size(0), K = x.size(1);
  if (group_size != 32 && group_size != 64 && group_size != 128)
    ValueError("group_size: expected 32, 64 or 128, got " + std::to_string(group_size));
  if (K < 1 || K % group_size != 0)
    ValueError("x: K=" + std::to_string(K) + " must be a positive multiple of group_size=" + std::to_string(group_size));
  CheckMatrix(x, "x", M, K, false);
  CheckDtype(w, at::kByte, "w_packed");
  if (w.dim() != 2 || w.size(1) != K / 2) ValueError("w_packed: expected shape [N, " + std::to_string(K / 2) + "] (two int4 per byte), got " + Shape(w));
  const int64_t N = w.size(0), G = K / group_size;
  CheckContiguousShape(w, "w_packed", {N, K / 2});
  CheckDtype(scales, at::kFloat, "scales");
  CheckContiguousShape(scales, "scales", {N, G});
  if (zeros.has_value()) {
    CheckCpu(*zeros, "zeros");
    CheckDtype(*zeros, at::kByte, "zeros");
    CheckContiguousShape(*zeros, "zeros", {N, G});
  }
  CheckSameDtype(out, x, "out", "x");
  CheckMatrix(out, "out", M, N, true);
  CheckNoOverlap(out, x, "x");
  CheckNoOverlap(out, w, "w_packed");
  CheckNoOverlap(out, scales, "scales");
  if (zeros.has_value()) CheckNoOverlap(out, *zeros, "zeros");
  OmniW4A16Args a{};
  a.bias = Bias(bias, out, N);
  if (M == 0 || N == 0) return;
  at::Tensor work = at::empty({M, K}, x.options().dtype(at::kFloat));
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
  const auto [M, K, N] = CheckQuantOperands(out, x, x_scale, w, w_scale, at::kFloat8_e4m3fn);
  const int64_t KB = (K + 127) / 128, NB = (N + 127) / 128;
  CheckContiguousShape(x_scale, "x_scale", {M, KB});
  CheckContiguousShape(w_scale, "w_scale", {NB, KB});
  const int32_t odt = OutDType(out, false);
  CheckMatrix(out, "out", M, N, true);
  for (auto [t, n] : {std::pair{&x, "x_q"}, {&w, "w_q"}, {&x_scale, "x_scale"}, {&w_scale, "w_scale"}})
    CheckNoOverlap(out, *t, n);
  OmniFp8BlockArgs a{};
  a.bias = Bias(bias, out, N);
  if (M == 0 || N == 0) return;
  at::Tensor work = at::empty({M, K}, x.options().dtype(at::kFloat));
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

// Checks of the float activation x [M, K] and the quantized weight w_q [N, K] / w_scale of a fused linear.
std::tuple<int64_t, int64_t, int64_t> CheckLinearOperands(const at::Tensor& out, const at::Tensor& x,
                                                          const at::Tensor& w, const at::Tensor& w_scale,
                                                          at::ScalarType qtype) {
  FloatDType(x, "x");
  return CheckXW(out, x, "x", w, w_scale, qtype);
}

// out[M, N] = w8a8_gemm(quantize_per_token_int8(x[M, K] float), w_q, w_scale, bias): the two-step result.
void W8A8Linear(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_tiles) {
  const auto [M, K, N] = CheckLinearOperands(out, x, w, w_scale, at::kChar);
  if (K > kMaxK8) ValueError("x: K=" + std::to_string(K) + " exceeds 131071 (int32 accumulation could overflow)");
  CheckContiguousShape(w_scale, "w_scale", {N});
  const int32_t odt = OutDType(out, false);
  CheckMatrix(out, "out", M, N, true);
  for (auto [t, n] : {std::pair{&x, "x"}, {&w, "w_q"}, {&w_scale, "w_scale"}}) CheckNoOverlap(out, *t, n);
  OmniW8A8Args a{};
  a.bias = Bias(bias, out, N);
  if (M == 0 || N == 0) return;
  at::Tensor x_q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor x_scale = at::empty({M}, x.options().dtype(at::kFloat));
  const OmniQuantGemmKernels* table = Table();
  OmniRuntime rt = Runtime();
  OmniQuantI8Args q{x.data_ptr(), static_cast<int8_t*>(x_q.data_ptr()), x_scale.data_ptr<float>(), x.stride(0), M, K,
                    FloatDType(x, "x")};
  table->quantize_per_token_int8(&q, &rt);
  FillGemmArgs(a, static_cast<const int8_t*>(x_q.data_ptr()), K, x_scale.data_ptr<float>(), w, w_scale, out, M, N, K,
               odt);
  UseTiles(a, w_tiles, out);
  table->w8a8_gemm(&a, &rt);
}

// Per token, per 128 of K: scale = amax / 448, code = e4m3(clamp(x / scale, +-448)) (round to nearest even,
// c10's conversion = torch's .to(float8_e4m3fn)); the arithmetic of quantize_activation_fp8_group.
struct Fp8QuantCtx {
  const void* x;
  int64_t x_stride, M, K, KB, rows_per_block;
  uint8_t* q;
  float* scale;
};

template <typename T>
void QuantFp8Rows(void* ctx, int64_t block) {
  const auto* c = static_cast<const Fp8QuantCtx*>(ctx);
  const int64_t m0 = block * c->rows_per_block;
  const int64_t m1 = std::min(c->M, m0 + c->rows_per_block);
  for (int64_t m = m0; m < m1; ++m) {
    const T* src = static_cast<const T*>(c->x) + m * c->x_stride;
    uint8_t* q = c->q + m * c->K;
    for (int64_t kb = 0; kb < c->KB; ++kb) {
      const int64_t k0 = kb * 128, k1 = std::min(c->K, k0 + 128);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = std::fabs(static_cast<float>(src[k]));
        amax = v > amax ? v : amax;
      }
      const float s = amax / 448.0f;
      const float d = s == 0.0f ? 1.0f : s;
      for (int64_t k = k0; k < k1; ++k) {
        float v = static_cast<float>(src[k]) / d;
        v = v < -448.0f ? -448.0f : (v > 448.0f ? 448.0f : v);
        q[k] = c10::Float8_e4m3fn(v).x;
      }
      c->scale[m * c->KB + kb] = s;
    }
  }
}

// out[M, N] = fp8_block_gemm(quantize_activation_fp8_group(x[M, K] float), w_q, w_scale, bias).
void Fp8BlockLinear(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                    const std::optional<at::Tensor>& bias) {
  const auto [M, K, N] = CheckLinearOperands(out, x, w, w_scale, at::kFloat8_e4m3fn);
  const int64_t KB = (K + 127) / 128, NB = (N + 127) / 128;
  CheckContiguousShape(w_scale, "w_scale", {NB, KB});
  const int32_t odt = OutDType(out, false);
  CheckMatrix(out, "out", M, N, true);
  for (auto [t, n] : {std::pair{&x, "x"}, {&w, "w_q"}, {&w_scale, "w_scale"}}) CheckNoOverlap(out, *t, n);
  OmniFp8BlockArgs a{};
  a.bias = Bias(bias, out, N);
  if (M == 0 || N == 0) return;
  at::Tensor x_q = at::empty({M, K}, x.options().dtype(at::kByte));
  at::Tensor x_scale = at::empty({M, KB}, x.options().dtype(at::kFloat));
  at::Tensor work = at::empty({M, K}, x.options().dtype(at::kFloat));
  OmniRuntime rt = Runtime();
  // Small activations in one block: a pool launch costs more than quantizing a few thousand values.
  const int64_t blocks = M * K < (int64_t{1} << 15) ? 1 : std::min<int64_t>(M, std::max<int64_t>(rt.num_cores, 1));
  Fp8QuantCtx c{x.data_ptr(), x.stride(0), M, K, KB, (M + blocks - 1) / blocks,
                static_cast<uint8_t*>(x_q.data_ptr()), x_scale.data_ptr<float>()};
  const int64_t nblk = (M + c.rows_per_block - 1) / c.rows_per_block;
  switch (x.scalar_type()) {
    case at::kHalf: rt.launch(nblk, &c, &QuantFp8Rows<c10::Half>); break;
    case at::kBFloat16: rt.launch(nblk, &c, &QuantFp8Rows<c10::BFloat16>); break;
    default: rt.launch(nblk, &c, &QuantFp8Rows<float>); break;
  }
  FillGemmArgs(a, static_cast<const uint8_t*>(x_q.data_ptr()), K, x_scale.data_ptr<float>(), w, w_scale, out, M, N, K,
               odt);
  a.work = work.data_ptr<float>();
  Table()->fp8_block_gemm(&a, &rt);
}

// (x_q [M, K] int8, x_scale [M, 1] fp32) = per-token symmetric int8 quantization of x [M, K].
std::tuple<at::Tensor, at::Tensor> QuantizePerTokenInt8(const at::Tensor& x) {
  CheckCpu(x, "x");
  const int32_t dt = FloatDType(x, "x");
  if (x.dim() != 2) ValueError("x: expected a 2-D tensor [M, K], got shape " + Shape(x));
  const int64_t M = x.size(0), K = x.size(1);
  CheckMatrix(x, "x", M, K, false);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::zeros({M, 1}, x.options().dtype(at::kFloat));
  if (M == 0 || K == 0) return {q, s};
  OmniQuantI8Args a{x.data_ptr(), static_cast<int8_t*>(q.data_ptr()), s.data_ptr<float>(), x.stride(0), M, K, dt};
  OmniRuntime rt = Runtime();
  Table()->quantize_per_token_int8(&a, &rt);
  return {q, s};
}

void Register(py::module_& m) {
  m.def("quantize_per_token_int8", &QuantizePerTokenInt8, py::arg("x"),
        "(x_q int8 [M, K], x_scale fp32 [M, 1]): symmetric per-token int8, scale = amax / 127");
  m.def("w8a8_gemm", &W8A8Gemm, py::arg("out"), py::arg("x_q"), py::arg("x_scale"), py::arg("w_q"),
        py::arg("w_scale"), py::arg("bias") = py::none(), py::arg("w_tiles") = py::none(),
        "out[M,N] = (x_q[M,K] int8 @ w_q[N,K].T int8) * x_scale[M] * w_scale[N] + bias; int32 out: raw sums "
        "(w_tiles: w_q prepacked for AMX-INT8, amx library only)");
  m.def("w4a16_gemm", &W4A16Gemm, py::arg("out"), py::arg("x"), py::arg("w_packed"), py::arg("scales"),
        py::arg("zeros"), py::arg("group_size"), py::arg("bias") = py::none(),
        "out[M,N] = x[M,K] @ dequant_int4(w_packed[N,K/2], scales, zeros).T + bias");
  m.def("fp8_block_gemm", &Fp8BlockGemm, py::arg("out"), py::arg("x_q"), py::arg("x_scale"), py::arg("w_q"),
        py::arg("w_scale"), py::arg("bias") = py::none(),
        "out[M,N] = dequant(x_q, x_scale[M,K/128]) @ dequant(w_q, w_scale[N/128,K/128]).T + bias");
  m.def("w8a8_linear", &W8A8Linear, py::arg("out"), py::arg("x"), py::arg("w_q"), py::arg("w_scale"),
        py::arg("bias") = py::none(), py::arg("w_tiles") = py::none(),
        "out[M,N] = w8a8_gemm(quantize_per_token_int8(x[M,K] float), w_q, w_scale, bias) in one call");
  m.def("fp8_block_linear", &Fp8BlockLinear, py::arg("out"), py::arg("x"), py::arg("w_q"), py::arg("w_scale"),
        py::arg("bias") = py::none(),
        "out[M,N] = fp8_block_gemm(quantize_fp8_group(x[M,K] float), w_q, w_scale[N/128,K/128], bias) in one call");
  m.def("w8a8_tile_layouts", []() { return Table()->weight_layouts; }, "bitmask of the w8a8 weight layouts");
  m.def("quant_gemm_int8_path", []() { return std::string(Table()->int8_path); },
        "which int8 inner loop the active kernel library uses (avx512-vnni, avx2, scalar)");
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
