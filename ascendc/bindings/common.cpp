// Kernel-library loading, CPU feature detection, host runtime and argument checks for omniops._C.
#include "bindings/common.h"

#include <ATen/Parallel.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

#include <cmath>
#include <cstring>
#include <mutex>
#include <sstream>
#include <vector>

namespace omni {
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

// Linux hands out the AMX tile-data state (8 KiB of XSAVE area) only to processes that ask for it: the first
// tile instruction of a process that did not raises SIGILL even where cpuid and XCR0 report AMX. The request
// is process-wide and idempotent; asked once, on first need.
bool TilePermission() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;  // no known way to get the permission: never load the AMX library
#endif
}

// What each kernel library needs to run (must match the -m flags in CMakeLists.txt).
bool CanRun(const std::string& isa) {
  const CpuFeatures& f = Cpu();
  if (isa == "generic") return true;
  if (isa == "avx2") return f.avx2 && f.fma && f.f16c;
  if (isa == "avx512")
    return CanRun("avx2") && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_vnni && f.avx512_bf16;
  if (isa == "amx") return CanRun("avx512") && f.amx_tile && f.amx_bf16 && f.amx_int8 && TilePermission();
  return false;
}

const std::vector<std::string>& AllIsas() {
  static const std::vector<std::string> v = {"amx", "avx512", "avx2", "generic"};  // best first, = cache slot
  return v;
}

int IsaIndex(const std::string& isa) {
  const auto& all = AllIsas();
  for (size_t i = 0; i < all.size(); ++i)
    if (all[i] == isa) return static_cast<int>(i);
  throw py::value_error("isa: expected one of amx, avx512, avx2, generic, auto; got '" + isa + "'");
}

std::string ModuleDir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&ModuleDir), &info) == 0 || info.dli_fname == nullptr) return ".";
  std::string p = info.dli_fname;
  auto slash = p.rfind('/');
  return slash == std::string::npos ? "." : p.substr(0, slash);
}

std::string LibraryPath(const std::string& isa) { return ModuleDir() + "/libomni_kernels_" + isa + ".so"; }

struct Registry {
  std::mutex mu;
  void* handles[kMaxIsas] = {};
  std::atomic<int> active{-1};
};
Registry& Reg() {
  static Registry r;
  return r;
}

std::vector<std::string> AvailableIsas() {
  std::vector<std::string> out;
  for (const auto& isa : AllIsas())
    if (CanRun(isa) && access(LibraryPath(isa).c_str(), R_OK) == 0) out.push_back(isa);
  return out;
}

// Caller holds Reg().mu.
void LoadLocked(int idx) {
  Registry& r = Reg();
  if (r.handles[idx] != nullptr) return;
  const std::string& isa = AllIsas()[idx];
  if (!CanRun(isa)) {
    std::string why = "isa '" + isa + "' cannot run on this CPU (" + Cpu().model + ")";
    if (isa == "amx" && Cpu().amx_tile && !TilePermission()) why += ": the OS refused the AMX tile permission";
    throw py::value_error(why);
  }
  const std::string path = LibraryPath(isa);
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) throw py::value_error("isa '" + isa + "': cannot load " + path + ": " + dlerror());
  auto info_fn = reinterpret_cast<const OmniLibraryInfo* (*)()>(dlsym(h, "omni_library_info"));
  if (info_fn == nullptr || info_fn()->abi_version != OMNI_KERNEL_ABI_VERSION) {
    dlclose(h);
    throw py::value_error(path + " was built for another kernel ABI; rebuild omniops");
  }
  r.handles[idx] = h;
}

void SetIsa(const std::string& isa) {
  Registry& r = Reg();
  std::lock_guard<std::mutex> g(r.mu);
  int idx;
  if (isa.empty() || isa == "auto") {
    auto avail = AvailableIsas();
    if (avail.empty()) throw py::value_error("no omniops kernel library can run on this CPU");
    idx = IsaIndex(avail.front());
  } else {
    idx = IsaIndex(isa);
  }
  LoadLocked(idx);
  r.active.store(idx);
}

void LaunchOnTorchPool(int64_t block_num, void* ctx, OmniBlockFn fn) {
  at::parallel_for(0, block_num, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(ctx, i);
  });
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
  // Asked only where the CPU has tiles (asking elsewhere would be a pointless syscall).
  d["amx_permission"] = f.amx_tile && TilePermission();
  d["available_isas"] = AvailableIsas();
  return d;
}


std::vector<std::pair<const char*, RegisterFn>>& Families() {
  static std::vector<std::pair<const char*, RegisterFn>> v;
  return v;
}

}  // namespace

RegisterFamily::RegisterFamily(const char* name, RegisterFn fn) { Families().emplace_back(name, fn); }

int ActiveIsaIndex() {
  int idx = Reg().active.load(std::memory_order_acquire);
  if (idx >= 0) return idx;
  const char* env = std::getenv("OMNI_ISA");
  SetIsa(env != nullptr ? env : "auto");
  return Reg().active.load();
}

const void* ResolveTable(int idx, const char* symbol) {
  Registry& r = Reg();
  std::lock_guard<std::mutex> g(r.mu);
  LoadLocked(idx);
  auto fn = reinterpret_cast<const void* (*)()>(dlsym(r.handles[idx], symbol));
  if (fn == nullptr) throw py::value_error(std::string("kernel library ") + AllIsas()[idx] + " has no " + symbol + "; rebuild omniops");
  return fn();
}

void* Workspace(int64_t bytes) {
  struct Buffer {
    void* p = nullptr;
    size_t cap = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t want = bytes > 0 ? static_cast<size_t>(bytes) : 1;
  if (want > buf.cap) {
    const size_t cap = (want + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, cap);
    if (p == nullptr) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
    madvise(p, cap, MADV_HUGEPAGE);  // fewer TLB misses on the staged operands; a hint, failure is fine
#endif
    std::free(buf.p);
    buf.p = p;
    buf.cap = cap;
  }
  return buf.p;
}

const std::string& ActiveIsaName() { return AllIsas()[ActiveIsaIndex()]; }

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
static std::pair<uintptr_t, uintptr_t> Extent(const at::Tensor& t) {
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

void RegisterAll(py::module_& m) {
  m.def("cpu_info", &CpuInfo, "CPU vendor, model, ISA features and the kernel libraries that can run here");
  m.def("get_isa", []() { return AllIsas()[ActiveIsaIndex()]; }, "the ISA level of the active kernel library");
  m.def("set_isa", &SetIsa, py::arg("isa"), "switch kernel library: 'amx', 'avx512', 'avx2', 'generic' or 'auto'");
  m.def("families", []() {
    std::vector<std::string> names;
    for (auto& f : Families()) names.emplace_back(f.first);
    return names;
  }, "the op families compiled into this module");
  for (auto& f : Families()) f.second(m);
}

}  // namespace omni
