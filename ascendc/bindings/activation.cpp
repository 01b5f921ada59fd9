// Bindings of the activation family (ascendc/kernels/activation/).
#include "bindings/common.h"
#include "omni/ops/activation.h"

namespace omni {
constexpr const char* FAMILY = "activation";
namespace {

void SiluAndMul(at::Tensor out, const at::Tensor& x) {
  const int32_t dt = FloatDType(x, "x");
  if (x.dim() != 2) ValueError("x: expected a 2-D tensor [rows, 2*d], got shape " + Shape(x));
  const int64_t rows = x.size(0);
  if (x.size(1) % 2 != 0) ValueError("x: last dimension must be even (gate and up halves), got " + Shape(x));
  const int64_t d = x.size(1) / 2;
  CheckMatrix(x, "x", rows, 2 * d);
  CheckSameDtype(out, x, "out", "x");
  CheckMatrix(out, "out", rows, d);
  CheckOutputs({{&out, "out"}}, {{&x, "x"}});
  if (rows == 0 || d == 0) return;
  OmniSiluAndMulArgs a{x.data_ptr(), out.data_ptr(), x.stride(0), out.stride(0), rows, d, dt};
  OmniRuntime rt = Runtime();
  Kernels<OmniActivationKernels>("omni_activation_kernels")->silu_and_mul(&a, &rt);
}

void Register(py::module_& m) {
  Def(m, "silu_and_mul", &SiluAndMul, "out[rows, d] = silu(x[:, :d]) * x[:, d:]", py::arg("out"), py::arg("x"));
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
