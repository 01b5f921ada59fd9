// The shared argument checks of omniops._C (see checks.h).
#include "bindings/checks.h"

#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <vector>

#include "omni/kernel_abi.h"

namespace omni {

[[noreturn]] void ValueError(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void TypeError(const std::string& msg) { throw py::type_error(msg); }
std::string S(int64_t v) { return std::to_string(v); }

std::string Shape(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

std::string DtypeName(at::ScalarType st) {
  switch (st) {
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kFloat8_e4m3fn: return "float8_e4m3fn";
    default: return c10::toString(st);
  }
}

// ---- Python arguments -------------------------------------------------------------------------------------
namespace {
std::string TypeName(py::handle o) { return Py_TYPE(o.ptr())->tp_name; }
std::string Str(const char* name) { return std::string(name); }
}  // namespace

at::Tensor TensorArg(py::handle o, const char* name) {
  if (!THPVariable_Check(o.ptr())) TypeError(Str(name) + ": expected a torch.Tensor, got " + TypeName(o));
  at::Tensor t = THPVariable_Unpack(o.ptr());
  if (t.layout() != at::kStrided) TypeError(Str(name) + ": expected a dense (strided) tensor");
  // Meta and fake tensors report no CPU device here (a FakeTensor's C++ tensor is a meta tensor).
  if (!t.device().is_cpu()) ValueError(Str(name) + ": expected a CPU tensor, got " + t.device().str());
  if (t.is_conj() || t.is_neg())
    ValueError(Str(name) + ": has a lazy conjugate/negative bit; call resolve_conj() / resolve_neg() first");
  if (t.numel() > 0 && (!t.has_storage() || t.data_ptr() == nullptr))
    ValueError(Str(name) + ": tensor has no storage");
  return t;
}

std::optional<at::Tensor> OptTensorArg(py::handle o, const char* name) {
  if (o.is_none()) return std::nullopt;
  if (!THPVariable_Check(o.ptr())) TypeError(Str(name) + ": expected a torch.Tensor or None, got " + TypeName(o));
  return TensorArg(o, name);
}

int64_t IntArg(py::handle o, const char* name) {
  PyObject* p = o.ptr();
  if (PyBool_Check(p) || PyFloat_Check(p) || !PyIndex_Check(p))
    TypeError(Str(name) + ": expected an int, got " + TypeName(o));
  PyObject* idx = PyNumber_Index(p);  // numpy / 0-dim integer tensors too
  if (idx == nullptr) {
    PyErr_Clear();
    TypeError(Str(name) + ": expected an int, got " + TypeName(o));
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
  Py_DECREF(idx);
  if (overflow != 0) ValueError(Str(name) + ": " + py::str(o).cast<std::string>() + " is outside the int64 range");
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    TypeError(Str(name) + ": expected an int, got " + TypeName(o));
  }
  return v;
}

bool BoolArg(py::handle o, const char* name) {
  if (!PyBool_Check(o.ptr())) TypeError(Str(name) + ": expected a bool, got " + TypeName(o));
  return o.ptr() == Py_True;
}

double Fp32Arg(py::handle o, const char* name) {
  PyObject* p = o.ptr();
  PyNumberMethods* nm = Py_TYPE(p)->tp_as_number;
  // Reals only: float, int, numpy scalars, 0-dim tensors (their __float__); not bool, str or None.
  const bool real = PyFloat_Check(p) || PyLong_Check(p) || (nm != nullptr && nm->nb_float != nullptr);
  if (PyBool_Check(p) || !real) TypeError(Str(name) + ": expected a real number, got " + TypeName(o));
  const double v = PyFloat_AsDouble(p);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();  // an int past the double range, or a failing __float__
    ValueError(Str(name) + ": " + py::str(o).cast<std::string>() + " is not representable as float32");
  }
  // The kernels compute in fp32: a double such as 1e39 is finite but becomes inf there.
  if (!std::isfinite(v) || !std::isfinite(static_cast<float>(v)))
    ValueError(Str(name) + ": expected a number finite in float32 (|x| <= 3.4e38), got " +
               py::str(o).cast<std::string>());
  return v;
}

std::string StrArg(py::handle o, const char* name) {
  if (!PyUnicode_Check(o.ptr())) TypeError(Str(name) + ": expected a str, got " + TypeName(o));
  return o.cast<std::string>();
}

// ---- checked size arithmetic ------------------------------------------------------------------------------
int64_t Mul(int64_t a, int64_t b, const char* name) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) ValueError(Str(name) + ": size " + S(a) + " * " + S(b) + " overflows int64");
  return r;
}

int64_t Add(int64_t a, int64_t b, const char* name) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) ValueError(Str(name) + ": size " + S(a) + " + " + S(b) + " overflows int64");
  return r;
}

int64_t DivUp(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

void CheckLimit(int64_t value, int64_t limit, const char* name, const std::string& what) {
  if (value > limit)
    ValueError(Str(name) + ": " + what + " = " + S(value) + " exceeds the cpu kernels' limit of " + S(limit));
}

// ---- dtype --------------------------------------------------------------------------------------------------
int32_t FloatDType(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return OMNI_F32;
    case at::kHalf: return OMNI_F16;
    case at::kBFloat16: return OMNI_BF16;
    default: TypeError(Str(name) + ": expected float32, float16 or bfloat16, got " + DtypeName(t.scalar_type()));
  }
}

void CheckDtype(const at::Tensor& t, at::ScalarType st, const char* name) {
  if (t.scalar_type() != st)
    TypeError(Str(name) + ": expected dtype " + DtypeName(st) + ", got " + DtypeName(t.scalar_type()));
}

void CheckSameDtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  if (t.scalar_type() != ref.scalar_type())
    TypeError(Str(name) + ": expected dtype " + DtypeName(ref.scalar_type()) + " (as " + ref_name + "), got " +
              DtypeName(t.scalar_type()));
}

// ---- shape and layout ---------------------------------------------------------------------------------------
void CheckDims(const at::Tensor& t, const char* name, std::initializer_list<int64_t> expected, const char* what) {
  const std::vector<int64_t> e(expected);
  bool ok = t.dim() == static_cast<int64_t>(e.size());
  for (size_t i = 0; ok && i < e.size(); ++i) ok = e[i] < 0 || t.size(i) == e[i];
  if (ok) return;
  std::string s = "[";
  for (size_t i = 0; i < e.size(); ++i) s += (i ? ", " : "") + (e[i] < 0 ? std::string("*") : S(e[i]));
  ValueError(Str(name) + ": expected shape " + s + "] (" + what + "), got " + Shape(t));
}

void CheckContig(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  const std::vector<int64_t> want(shape);
  if (t.sizes().vec() != want) {
    std::string s = "[";
    for (size_t i = 0; i < want.size(); ++i) s += (i ? ", " : "") + S(want[i]);
    ValueError(Str(name) + ": expected shape " + s + "], got " + Shape(t));
  }
  if (!t.is_contiguous()) ValueError(Str(name) + ": must be contiguous");
}

void CheckReadable(const at::Tensor& t, const char* name, int64_t dim) {
  if (t.dim() != dim) ValueError(Str(name) + ": expected a " + S(dim) + "-D tensor, got shape " + Shape(t));
  if (t.numel() > 0 && t.size(dim - 1) > 1 && t.stride(dim - 1) != 1)
    ValueError(Str(name) + ": last dimension must be contiguous (stride 1)");
  for (int64_t d = 0; d < dim; ++d)
    if (t.stride(d) < 0) ValueError(Str(name) + ": negative strides are not supported");
}

void CheckMatrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  if (t.dim() != 2) ValueError(Str(name) + ": expected a 2-D tensor [" + S(rows) + ", " + S(cols) + "], got shape " + Shape(t));
  if (t.size(0) != rows || t.size(1) != cols)
    ValueError(Str(name) + ": expected shape [" + S(rows) + ", " + S(cols) + "], got " + Shape(t));
  if (rows > 0 && cols > 1 && t.stride(1) != 1) ValueError(Str(name) + ": last dimension must be contiguous (stride 1)");
  if (rows > 1 && t.stride(0) < 0) ValueError(Str(name) + ": negative row stride");
}

// ---- the overlap rule ---------------------------------------------------------------------------------------
namespace {

// A strided tensor as the offsets it touches: its dims of size > 1 as (stride, size) in bytes, largest stride
// first (stride-0 dims repeat the same memory and are dropped), its element size and lowest address;
// real tensors' extents fit in memory, __int128 keeps a corrupt one from wrapping.
struct Layout {
  std::vector<std::pair<__int128, __int128>> dims;
  __int128 elem = 0;
  __int128 base = 0;  // the lowest byte address it touches
};

Layout LayoutOf(const at::Tensor& t) {
  Layout l;
  l.elem = t.element_size();
  l.base = static_cast<__int128>(reinterpret_cast<uintptr_t>(t.data_ptr()));
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) <= 1 || t.stride(d) == 0) continue;
    const __int128 st = static_cast<__int128>(t.stride(d)) * l.elem;
    if (st < 0) l.base += (t.size(d) - 1) * st;
    l.dims.emplace_back(st < 0 ? -st : st, t.size(d));
  }
  std::sort(l.dims.begin(), l.dims.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  return l;
}

// Bytes from the first touched offset to one past the last, of dims[from:].
__int128 Extent(const Layout& l, size_t from) {
  __int128 e = l.elem;
  for (size_t i = from; i < l.dims.size(); ++i) e += (l.dims[i].second - 1) * l.dims[i].first;
  return e;
}

// Whether tensors a (dims a.dims[ia:], at byte offset a0) and b (b.dims[ib:], at b0) touch no common byte.
// Sufficient, and exact for the interleaved views ops meet (q / k column slices of one qkv matrix, k / v halves
// of one cache): with S the larger outermost stride and both remaining rows no longer than S, b's rows sit at
// offset d = (b0 - a0) mod S, or d - S, from a's, so it is the same question one dimension down.
bool Disjoint(const Layout& a, size_t ia, __int128 a0, const Layout& b, size_t ib, __int128 b0) {
  const __int128 ea = Extent(a, ia), eb = Extent(b, ib);
  if (a0 + ea <= b0 || b0 + eb <= a0) return true;
  if (ia == a.dims.size() && ib == b.dims.size()) return false;
  const __int128 sa = ia < a.dims.size() ? a.dims[ia].first : 0, sb = ib < b.dims.size() ? b.dims[ib].first : 0;
  const __int128 S = sa > sb ? sa : sb;
  const size_t ra = ia + (sa == S ? 1 : 0), rb = ib + (sb == S ? 1 : 0);  // rows: peel the dim of stride S
  if (Extent(a, ra) > S || Extent(b, rb) > S) return false;
  const __int128 d = ((b0 - a0) % S + S) % S;
  return Disjoint(a, ra, 0, b, rb, d) && Disjoint(a, ra, 0, b, rb, d - S);
}

bool SameView(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         a.strides() == b.strides();
}

enum class Overlap { kNone, kSame, kPartial };

Overlap OverlapOf(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return Overlap::kNone;
  if (SameView(a, b)) return Overlap::kSame;
  const Layout x = LayoutOf(a), y = LayoutOf(b);
  return Disjoint(x, 0, x.base, y, 0, y.base) ? Overlap::kNone : Overlap::kPartial;
}

// A written tensor must have distinct memory per element: sorted by stride, every stride must step past the
// extent of the smaller ones (sufficient, and what every layout the ops produce satisfies).
bool SelfOverlaps(const at::Tensor& t) {
  std::vector<std::pair<__int128, __int128>> dims;  // (|stride|, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) <= 1) continue;
    if (t.stride(d) == 0) return true;
    dims.emplace_back(t.stride(d) < 0 ? -static_cast<__int128>(t.stride(d)) : t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  __int128 ext = 0;
  for (const auto& [st, n] : dims) {
    if (st <= ext) return true;
    ext += (n - 1) * st;
  }
  return false;
}

bool Allowed(std::initializer_list<InPlace> inplace, const char* out, const char* in) {
  for (const auto& [o, i] : inplace)
    if (std::string(o) == out && std::string(i) == in) return true;
  return false;
}

}  // namespace

void CheckOutputs(std::initializer_list<Named> outs, std::initializer_list<Named> ins,
                  std::initializer_list<InPlace> inplace) {
  for (auto o = outs.begin(); o != outs.end(); ++o) {
    if (o->t == nullptr || o->t->numel() == 0) continue;
    if (SelfOverlaps(*o->t))
      ValueError(Str(o->name) + ": its elements overlap in memory (shape " + Shape(*o->t) + ", strides " +
                 [&] { std::ostringstream s; s << o->t->strides(); return s.str(); }() +
                 "); an output needs distinct memory per element");
    for (auto p = o + 1; p != outs.end(); ++p)
      if (p->t != nullptr && OverlapOf(*o->t, *p->t) != Overlap::kNone)
        ValueError(Str(o->name) + " must not overlap " + p->name + " (two outputs cannot share memory)");
    for (const Named& i : ins) {
      if (i.t == nullptr) continue;
      const Overlap ov = OverlapOf(*o->t, *i.t);
      if (ov == Overlap::kNone) continue;
      const bool ok = Allowed(inplace, o->name, i.name);
      if (ov == Overlap::kSame && ok) continue;
      if (ok)
        ValueError(Str(o->name) + " partially overlaps " + i.name +
                   ": pass the same tensor for in-place, or non-overlapping memory");
      if (ov == Overlap::kSame)
        ValueError(Str(o->name) + " must not overlap " + i.name + " (it is the same memory; the op has no in-place "
                   "form for this pair)");
      ValueError(Str(o->name) + " partially overlaps " + i.name + ": " + o->name + " must not overlap " + i.name +
                 ", an input the op reads while it writes " + o->name);
    }
  }
}

// ---- allocation ---------------------------------------------------------------------------------------------
at::Tensor Empty(at::IntArrayRef sizes, at::ScalarType st, const char* name) {
  int64_t n = 1;
  for (int64_t s : sizes) n = Mul(n, s, name);
  Mul(n, c10::elementSize(st), name);
  try {
    return at::empty(sizes, at::TensorOptions().dtype(st));
  } catch (const c10::Error&) {
    ValueError(Str(name) + ": cannot allocate the " + S(n) + "-element " + DtypeName(st) + " scratch its size needs");
  }
}

// ---- index values -------------------------------------------------------------------------------------------
void CheckRange(const at::Tensor& t, const char* name, int64_t lo, int64_t hi) {
  if (!t.is_contiguous()) ValueError(Str(name) + ": must be contiguous");
  const int64_t n = t.numel();
  auto bad = [&](int64_t v) {
    ValueError(Str(name) + ": values must lie in [" + S(lo) + ", " + S(hi) + "), found " + S(v));
  };
  if (t.scalar_type() == at::kInt) {
    const int32_t* p = t.data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i)
      if (p[i] < lo || p[i] >= hi) bad(p[i]);
  } else if (t.scalar_type() == at::kLong) {
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      if (p[i] < lo || p[i] >= hi) bad(p[i]);
  } else if (t.scalar_type() == at::kByte) {
    const uint8_t* p = t.data_ptr<uint8_t>();
    for (int64_t i = 0; i < n; ++i)
      if (p[i] < lo || p[i] >= hi) bad(p[i]);
  } else {
    TypeError(Str(name) + ": expected an integer dtype, got " + DtypeName(t.scalar_type()));
  }
}

}  // namespace omni
