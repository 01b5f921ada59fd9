// The argument checks every entry point of omniops._C shares: one vocabulary, one message style ("<arg>: ...").
// omniops._C is reachable directly, so these run on every call whatever the Python layer checked before:
//   * Python arguments arrive as py::object and are converted here, so a wrong Python type (None, a list, an int
//     past int64, a float where an int is meant) is a TypeError/ValueError naming the argument, not pybind's
//     anonymous "incompatible function arguments" (Def in common.h wires this up);
//   * size arithmetic on user-controlled sizes goes through Mul/Add, which raise instead of wrapping;
//   * CheckOutputs is the single overlap rule: every output against every input and every other output.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

namespace omni {
namespace py = pybind11;

[[noreturn]] void ValueError(const std::string& msg);
[[noreturn]] void TypeError(const std::string& msg);
std::string S(int64_t v);
std::string Shape(const at::Tensor& t);
std::string DtypeName(at::ScalarType st);

// ---- Python arguments -------------------------------------------------------------------------------------
at::Tensor TensorArg(py::handle o, const char* name);  // a strided CPU tensor with storage
std::optional<at::Tensor> OptTensorArg(py::handle o, const char* name);  // None or TensorArg
int64_t IntArg(py::handle o, const char* name);      // an int within int64 (not a bool, not a float)
bool BoolArg(py::handle o, const char* name);        // a bool (not an int)
double Fp32Arg(py::handle o, const char* name);      // a real number finite as float32 (what kernels use)
std::string StrArg(py::handle o, const char* name);  // a str

// Arg<T>::Get: the converter for a C++ parameter of type T (see Def in common.h).
template <typename T>
struct Arg;
template <>
struct Arg<at::Tensor> {
  static at::Tensor Get(py::handle o, const char* n) { return TensorArg(o, n); }
};
template <>
struct Arg<std::optional<at::Tensor>> {
  static std::optional<at::Tensor> Get(py::handle o, const char* n) { return OptTensorArg(o, n); }
};
template <>
struct Arg<int64_t> {
  static int64_t Get(py::handle o, const char* n) { return IntArg(o, n); }
};
template <>
struct Arg<bool> {
  static bool Get(py::handle o, const char* n) { return BoolArg(o, n); }
};
template <>
struct Arg<double> {  // every floating-point scalar of the kernels is an fp32
  static double Get(py::handle o, const char* n) { return Fp32Arg(o, n); }
};
template <>
struct Arg<std::string> {
  static std::string Get(py::handle o, const char* n) { return StrArg(o, n); }
};

// ---- checked size arithmetic (sizes come from users: a stride-0 view can have 2**63 - 1 rows) --------------
int64_t Mul(int64_t a, int64_t b, const char* name);  // ValueError naming `name` on int64 overflow
int64_t Add(int64_t a, int64_t b, const char* name);
int64_t DivUp(int64_t a, int64_t b);                  // ceil(a / b) for a >= 0, b > 0, without a + b - 1
constexpr int64_t kMaxInt32 = 2147483647;
// `value` (what: how it is derived) must not exceed `limit`: the kernels index it with int32, or tile it.
void CheckLimit(int64_t value, int64_t limit, const char* name, const std::string& what);

// ---- dtype --------------------------------------------------------------------------------------------------
int32_t FloatDType(const at::Tensor& t, const char* name);  // float32 / float16 / bfloat16 -> OmniDType
void CheckDtype(const at::Tensor& t, at::ScalarType st, const char* name);
void CheckSameDtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name);

// ---- shape and layout ---------------------------------------------------------------------------------------
// t.dim() == expected.size() and every expected size >= 0 matches (-1 = any); `what` explains the sizes.
void CheckDims(const at::Tensor& t, const char* name, std::initializer_list<int64_t> expected, const char* what);
void CheckContig(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape);  // shape, contiguous
// `dim` dims, unit inner stride, non-negative strides: any index below the sizes is inside the tensor.
void CheckReadable(const at::Tensor& t, const char* name, int64_t dim);
// A [rows, cols] matrix with unit inner stride and a non-negative row stride.
void CheckMatrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols);

// ---- the overlap rule ---------------------------------------------------------------------------------------
struct Named {
  const at::Tensor* t;  // nullptr (an absent optional) or an empty tensor: nothing to check
  const char* name;
};
inline const at::Tensor* Opt(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }
using InPlace = std::pair<const char*, const char*>;  // (output, input) that may be the very same view
// Memory ranges come from the data pointer, sizes and strides. Every output must have distinct memory per
// element, must not overlap any other output, and must not overlap any input, except that an (output, input)
// pair listed in `inplace` (the op documents in-place use) may be the identical view.
void CheckOutputs(std::initializer_list<Named> outs, std::initializer_list<Named> ins,
                  std::initializer_list<InPlace> inplace = {});

// ---- allocation ---------------------------------------------------------------------------------------------
// at::empty of a scratch or output whose size comes from `name`'s sizes: overflow and a failed allocation are a
// ValueError naming it (a stride-0 input view can claim any size).
at::Tensor Empty(at::IntArrayRef sizes, at::ScalarType st, const char* name);

// ---- index values -------------------------------------------------------------------------------------------
// Every value of a contiguous int32, int64 or uint8 tensor in [lo, hi).
void CheckRange(const at::Tensor& t, const char* name, int64_t lo, int64_t hi);

}  // namespace omni
