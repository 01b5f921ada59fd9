// omniops._C: the pybind11 module. It
//   * detects the CPU's features and dlopen()s the matching libomni_kernels_<isa>.so (switchable at run time
//     with set_isa, so tests can force the AVX2 path on an AVX-512 machine);
//   * provides the host runtime (grid launches run on torch's intra-op thread pool);
//   * turns tensors into the raw pointers of the torch-free kernel ABI after checking device, dtype, rank,
//     sizes, strides and aliasing, so that no input reachable from Python can make a kernel read or write
//     out of bounds. Errors are ValueError / TypeError naming the argument.
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/extension.h>

#include <cpuid.h>

#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "omni/kernel_abi.h"

namespace py = pybind11;

namespace {

// ---- CPU features ---------------------------------------------------------------------------------------
struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
  std::string vendor, model;
};

uint64_t Xgetbv() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

CpuFeatures DetectCpu() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  const unsigned max_leaf = a;
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  f.vendor = vendor;
  __get_cpuid(1, &a, &b, &c, &d);
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  const uint64_t xcr0 = osxsave ? Xgetbv() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  const bool os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;
  const bool os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = os_avx && (b & (1u << 5));
    f.avx512f = os_avx512 && (b & (1u << 16));
    f.avx512dq = os_avx512 && (b & (1u << 17));
    f.avx512bw = os_avx512 && (b & (1u << 30));
    f.avx512vl = os_avx512 && (b & (1u << 31));
    f.avx512_vnni = os_avx512 && (c & (1u << 11));
    f.amx_bf16 = os_amx && (d & (1u << 22));
    f.amx_tile = os_amx && (d & (1u << 24));
    f.amx_int8 = os_amx && (d & (1u << 25));
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512_bf16 = os_avx512 && (a & (1u << 5));
  }
  f.fma = f.fma && os_avx;
  f.f16c = f.f16c && os_avx;
  unsigned brand[12] = {};
  __get_cpuid(0x80000000, &a, &b, &c, &d);
  if (a >= 0x80000004) {
    for (unsigned i = 0; i < 3; ++i) __get_cpuid(0x80000002 + i, &brand[4 * i], &brand[4 * i + 1], &brand[4 * i + 2], &brand[4 * i + 3]);
    f.model = std::string(reinterpret_cast<const char*>(brand), 48).c_str();
    while (!f.model.empty() && f.model.back() == ' ') f.model.pop_back();
  }
  return f;
}

const CpuFeatures& Cpu() {
  static const CpuFeatures f = DetectCpu();
  return f;
}

// What each kernel library needs to run (must match the -m flags in CMakeLists.txt).
bool CanRun(const std::string& isa) {
  const CpuFeatures& f = Cpu();
  if (isa == "generic") return true;
  if (isa == "avx2") return f.avx2 && f.fma && f.f16c;
  if (isa == "avx512")
    return CanRun("avx2") && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_vnni && f.avx512_bf16;
  return false;
}

// ---- kernel libraries -----------------------------------------------------------------------------------
std::string ModuleDir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&ModuleDir), &info) == 0 || info.dli_fname == nullptr) return ".";
  std::string p = info.dli_fname;
  auto slash = p.rfind('/');
  return slash == std::string::npos ? "." : p.substr(0, slash);
}

struct Registry {
  std::mutex mu;
  std::map<std::string, const OmniKernelTable*> loaded;
  const OmniKernelTable* active = nullptr;
};
Registry& Reg() {
  static Registry r;
  return r;
}

const std::vector<std::string>& AllIsas() {
  static const std::vector<std::string> v = {"avx512", "avx2", "generic"};  // best first
  return v;
}

bool LibraryExists(const std::string& isa) {
  std::string path = ModuleDir() + "/libomni_kernels_" + isa + ".so";
  return access(path.c_str(), R_OK) == 0;
}

const OmniKernelTable* Load(const std::string& isa) {
  Registry& r = Reg();
  auto it = r.loaded.find(isa);
  if (it != r.loaded.end()) return it->second;
  if (!CanRun(isa)) throw py::value_error("isa '" + isa + "' cannot run on this CPU");
  std::string path = ModuleDir() + "/libomni_kernels_" + isa + ".so";
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) throw py::value_error("isa '" + isa + "': cannot load " + path + ": " + dlerror());
  auto fn = reinterpret_cast<OmniKernelTableFn>(dlsym(h, "omni_kernel_table"));
  if (fn == nullptr) throw py::value_error(path + " has no omni_kernel_table");
  const OmniKernelTable* t = fn();
  if (t->abi_version != OMNI_KERNEL_ABI_VERSION)
    throw py::value_error(path + " was built for another kernel ABI; rebuild omniops");
  r.loaded[isa] = t;
  return t;
}

std::vector<std::string> AvailableIsas() {
  std::vector<std::string> out;
  for (const auto& isa : AllIsas())
    if (CanRun(isa) && LibraryExists(isa)) out.push_back(isa);
  return out;
}

const OmniKernelTable* Kernels() {
  Registry& r = Reg();
  std::lock_guard<std::mutex> g(r.mu);
  if (r.active == nullptr) {
    const char* env = std::getenv("OMNI_ISA");
    if (env != nullptr && *env != '\0') {
      r.active = Load(env);
    } else {
      auto avail = AvailableIsas();
      if (avail.empty()) throw py::value_error("no omniops kernel library can run on this CPU");
      r.active = Load(avail.front());
    }
  }
  return r.active;
}

void SetIsa(const std::string& isa) {
  Registry& r = Reg();
  std::lock_guard<std::mutex> g(r.mu);
  if (isa.empty() || isa == "auto") {
    auto avail = AvailableIsas();
    r.active = Load(avail.front());
  } else {
    r.active = Load(isa);
  }
}

// ---- host runtime ---------------------------------------------------------------------------------------
void LaunchOnTorchPool(int64_t block_num, void* ctx, OmniBlockFn fn) {
  at::parallel_for(0, block_num, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(ctx, i);
  });
}

OmniRuntime Runtime() { return OmniRuntime{&LaunchOnTorchPool, static_cast<int64_t>(at::get_num_threads())}; }

// ---- argument checks ------------------------------------------------------------------------------------
[[noreturn]] void ValueError(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void TypeError(const std::string& msg) { throw py::type_error(msg); }

std::string Shape(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

int32_t FloatDType(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return OMNI_F32;
    case at::kHalf: return OMNI_F16;
    case at::kBFloat16: return OMNI_BF16;
    default: TypeError(std::string(name) + ": expected float32, float16 or bfloat16, got " + std::string(c10::toString(t.scalar_type())));
  }
}

void CheckCpu(const at::Tensor& t, const char* name) {
  if (!t.defined()) ValueError(std::string(name) + ": undefined tensor");
  if (!t.device().is_cpu()) ValueError(std::string(name) + ": expected a CPU tensor, got " + t.device().str());
  if (t.numel() > 0 && t.data_ptr() == nullptr) ValueError(std::string(name) + ": tensor has no storage");
}

void CheckSameDtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  if (t.scalar_type() != ref.scalar_type())
    TypeError(std::string(name) + ": expected dtype " + c10::toString(ref.scalar_type()) + " (as " + ref_name + "), got " + c10::toString(t.scalar_type()));
}

// A [rows, cols] matrix view with unit inner stride and a row stride that cannot make rows overlap when the
// tensor is written.
void CheckMatrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, bool written) {
  if (t.dim() != 2) ValueError(std::string(name) + ": expected a 2-D tensor [" + std::to_string(rows) + ", " + std::to_string(cols) + "], got shape " + Shape(t));
  if (t.size(0) != rows || t.size(1) != cols)
    ValueError(std::string(name) + ": expected shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "], got " + Shape(t));
  if (rows > 0 && cols > 1 && t.stride(1) != 1) ValueError(std::string(name) + ": last dimension must be contiguous (stride 1)");
  if (rows > 1 && t.stride(0) < 0) ValueError(std::string(name) + ": negative row stride");
  if (written && rows > 1 && t.stride(0) < cols) ValueError(std::string(name) + ": rows overlap (row stride < row length)");
}

// Byte ranges [lo, hi) of the memory a strided tensor can touch.
std::pair<uintptr_t, uintptr_t> Extent(const at::Tensor& t) {
  uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {lo, lo + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// An output may be the very same view as an input (in-place) but must not partly overlap it: a kernel
// that streams rows would read values it already overwrote.
void CheckAlias(const at::Tensor& out, const at::Tensor& in, const char* out_name, const char* in_name) {
  if (out.numel() == 0 || in.numel() == 0) return;
  auto [a0, a1] = Extent(out);
  auto [b0, b1] = Extent(in);
  if (a1 <= b0 || b1 <= a0) return;
  if (out.data_ptr() == in.data_ptr() && out.sizes() == in.sizes() && out.strides() == in.strides()) return;
  ValueError(std::string(out_name) + " partially overlaps " + in_name + ": pass the same tensor for in-place, or non-overlapping memory");
}

// ---- ops ------------------------------------------------------------------------------------------------
void RmsNorm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps,
             const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_out) {
  CheckCpu(x, "x");
  CheckCpu(weight, "weight");
  CheckCpu(out, "out");
  const int32_t dt = FloatDType(x, "x");
  if (x.dim() != 2) ValueError("x: expected a 2-D tensor [rows, hidden], got shape " + Shape(x));
  const int64_t rows = x.size(0), hidden = x.size(1);
  if (hidden == 0 && rows > 0) ValueError("x: hidden size must be > 0");
  CheckMatrix(x, "x", rows, hidden, false);
  CheckSameDtype(weight, x, "weight", "x");
  if (weight.dim() != 1 || weight.size(0) != hidden) ValueError("weight: expected shape [" + std::to_string(hidden) + "], got " + Shape(weight));
  if (hidden > 1 && weight.stride(0) != 1) ValueError("weight: must be contiguous");
  CheckSameDtype(out, x, "out", "x");
  CheckMatrix(out, "out", rows, hidden, true);
  CheckAlias(out, x, "out", "x");
  CheckAlias(out, weight, "out", "weight");
  if (!(eps >= 0.0) || !std::isfinite(eps)) ValueError("eps: expected a finite value >= 0, got " + std::to_string(eps));
  if (residual.has_value() != residual_out.has_value()) ValueError("residual and residual_out go together");
  OmniRmsNormArgs a{};
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    const at::Tensor& ro = *residual_out;
    CheckCpu(r, "residual");
    CheckCpu(ro, "residual_out");
    CheckSameDtype(r, x, "residual", "x");
    CheckSameDtype(ro, x, "residual_out", "x");
    CheckMatrix(r, "residual", rows, hidden, false);
    CheckMatrix(ro, "residual_out", rows, hidden, true);
    CheckAlias(ro, r, "residual_out", "residual");
    CheckAlias(ro, x, "residual_out", "x");
    CheckAlias(ro, out, "residual_out", "out");
    CheckAlias(out, r, "out", "residual");
    a.residual = r.data_ptr();
    a.residual_stride = r.stride(0);
    a.residual_out = ro.data_ptr();
    a.residual_out_stride = ro.stride(0);
  }
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
  Kernels()->rms_norm(&a, &rt);
}

void SiluAndMul(at::Tensor out, const at::Tensor& x) {
  CheckCpu(x, "x");
  CheckCpu(out, "out");
  const int32_t dt = FloatDType(x, "x");
  if (x.dim() != 2) ValueError("x: expected a 2-D tensor [rows, 2*d], got shape " + Shape(x));
  const int64_t rows = x.size(0);
  if (x.size(1) % 2 != 0) ValueError("x: last dimension must be even (gate and up halves), got " + Shape(x));
  const int64_t d = x.size(1) / 2;
  CheckMatrix(x, "x", rows, 2 * d, false);
  CheckSameDtype(out, x, "out", "x");
  CheckMatrix(out, "out", rows, d, true);
  CheckAlias(out, x, "out", "x");
  if (out.numel() > 0 && x.numel() > 0 && out.data_ptr() == x.data_ptr()) ValueError("out: must not alias x");
  if (rows == 0 || d == 0) return;
  OmniSiluAndMulArgs a{x.data_ptr(), out.data_ptr(), x.stride(0), out.stride(0), rows, d, dt};
  OmniRuntime rt = Runtime();
  Kernels()->silu_and_mul(&a, &rt);
}

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
  Kernels()->rotary_embedding(&a, &rt);
}

py::dict CpuInfo() {
  const CpuFeatures& f = Cpu();
  py::dict d;
  d["vendor"] = f.vendor;
  d["model"] = f.model;
  py::dict feats;
  feats["avx2"] = f.avx2;
  feats["fma"] = f.fma;
  feats["f16c"] = f.f16c;
  feats["avx512f"] = f.avx512f;
  feats["avx512bw"] = f.avx512bw;
  feats["avx512vl"] = f.avx512vl;
  feats["avx512dq"] = f.avx512dq;
  feats["avx512_vnni"] = f.avx512_vnni;
  feats["avx512_bf16"] = f.avx512_bf16;
  feats["amx_tile"] = f.amx_tile;
  feats["amx_int8"] = f.amx_int8;
  feats["amx_bf16"] = f.amx_bf16;
  d["features"] = feats;
  d["available_isas"] = AvailableIsas();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "omniops C++ kernels (AscendC-style, host build)";
  m.attr("KERNEL_ABI_VERSION") = OMNI_KERNEL_ABI_VERSION;
  m.def("cpu_info", &CpuInfo, "CPU vendor, model, ISA features and the kernel libraries that can run here");
  m.def("get_isa", []() { return std::string(Kernels()->isa); }, "the ISA level of the active kernel library");
  m.def("set_isa", &SetIsa, py::arg("isa"), "switch kernel library: 'avx512', 'avx2', 'generic' or 'auto'");
  m.def("rms_norm", &RmsNorm, py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("residual") = py::none(), py::arg("residual_out") = py::none(),
        "out = rms_norm(x [+ residual]) * weight; x, residual, out: [rows, hidden]; residual_out = x + residual");
  m.def("silu_and_mul", &SiluAndMul, py::arg("out"), py::arg("x"), "out[rows, d] = silu(x[:, :d]) * x[:, d:]");
  m.def("rotary_embedding", &Rotary, py::arg("positions"), py::arg("q"), py::arg("k"), py::arg("cos_sin_cache"),
        py::arg("rotary_dim"), py::arg("is_neox"), py::arg("q_out"), py::arg("k_out"),
        "rotary embedding of q, k [tokens, heads, head_size] into q_out, k_out (may be q, k)");
}
