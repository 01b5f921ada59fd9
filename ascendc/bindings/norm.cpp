// Bindings of the norm family: checks, then the torch-free kernels of ascendc/kernels/norm/.
#include "bindings/common.h"
#include "omni/ops/norm.h"

namespace omni {
constexpr const char* FAMILY = "norm";
namespace {

// out / residual_out [rows, hidden] = rms_norm(x [+ residual]); out may be x, residual_out may be residual.
void RmsNorm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps,
             const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_out) {
  const int32_t dt = FloatDType(x, "x");
  if (x.dim() != 2) ValueError("x: expected a 2-D tensor [rows, hidden], got shape " + Shape(x));
  const int64_t rows = x.size(0), hidden = x.size(1);
  if (hidden == 0 && rows > 0) ValueError("x: hidden size must be > 0");
  CheckMatrix(x, "x", rows, hidden);
  CheckSameDtype(weight, x, "weight", "x");
  if (weight.dim() != 1 || weight.size(0) != hidden) ValueError("weight: expected shape [" + S(hidden) + "], got " + Shape(weight));
  if (hidden > 1 && weight.stride(0) != 1) ValueError("weight: must be contiguous");
  CheckSameDtype(out, x, "out", "x");
  CheckMatrix(out, "out", rows, hidden);
  if (!(eps >= 0.0)) ValueError("eps: expected a finite value >= 0, got " + std::to_string(eps));
  if (residual.has_value() != residual_out.has_value()) ValueError("residual and residual_out go together");
  OmniRmsNormArgs a{};
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    const at::Tensor& ro = *residual_out;
    CheckSameDtype(r, x, "residual", "x");
    CheckSameDtype(ro, x, "residual_out", "x");
    CheckMatrix(r, "residual", rows, hidden);
    CheckMatrix(ro, "residual_out", rows, hidden);
    a.residual = r.data_ptr();
    a.residual_stride = r.stride(0);
    a.residual_out = ro.data_ptr();
    a.residual_out_stride = ro.stride(0);
  }
  CheckOutputs({{&out, "out"}, {Opt(residual_out), "residual_out"}},
               {{&x, "x"}, {&weight, "weight"}, {Opt(residual), "residual"}},
               {{"out", "x"}, {"residual_out", "residual"}});
  if (rows == 0) return;
  a.x = x.data_ptr();
  a.x_stride = x.stride(0);
  a.weight = weight.data_ptr();
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  a.rows = rows;
  a.hidden = hidden;
  a.eps = static_cast<float>(eps);
  a.dtype = dt;
  OmniRuntime rt = Runtime();
  Kernels<OmniNormKernels>("omni_norm_kernels")->rms_norm(&a, &rt);
}

void Register(py::module_& m) {
  Def(m, "rms_norm", &RmsNorm,
      "out = rms_norm(x [+ residual]) * weight; x, residual, out: [rows, hidden]; residual_out = x + residual",
      py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none(),
      py::arg("residual_out") = py::none());
}

RegisterFamily registered(FAMILY, &Register);

}  // namespace
}  // namespace omni
