// Loading the per-ISA kernel libraries (dlopen RTLD_LOCAL, ABI check) and resolving kernel tables in them.
#include "bindings/libraries.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>

#include "bindings/checks.h"
#include "bindings/cpu_features.h"
#include "omni/kernel_abi.h"

namespace omni {
namespace {

const std::vector<std::string>& AllIsas() {
  static const std::vector<std::string> v = {"amx", "avx512", "avx2", "generic"};  // best first, = cache slot
  return v;
}

int IsaIndex(const std::string& isa) {
  const auto& all = AllIsas();
  for (size_t i = 0; i < all.size(); ++i)
    if (all[i] == isa) return static_cast<int>(i);
  ValueError("isa: expected one of amx, avx512, avx2, generic, auto; got '" + isa + "'");
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

// Caller holds Reg().mu.
void LoadLocked(int idx) {
  Registry& r = Reg();
  if (r.handles[idx] != nullptr) return;
  const std::string& isa = AllIsas()[idx];
  if (!CanRun(isa)) {
    std::string why = "isa '" + isa + "' cannot run on this CPU (" + Cpu().model + ")";
    if (isa == "amx" && Cpu().amx_tile && !TilePermission()) why += ": the OS refused the AMX tile permission";
    ValueError(why);
  }
  const std::string path = LibraryPath(isa);
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) ValueError("isa '" + isa + "': cannot load " + path + ": " + dlerror());
  auto info_fn = reinterpret_cast<const OmniLibraryInfo* (*)()>(dlsym(h, "omni_library_info"));
  if (info_fn == nullptr || info_fn()->abi_version != OMNI_KERNEL_ABI_VERSION) {
    dlclose(h);
    ValueError(path + " was built for another kernel ABI; rebuild omniops");
  }
  r.handles[idx] = h;
}

}  // namespace

std::vector<std::string> AvailableIsas() {
  std::vector<std::string> out;
  for (const auto& isa : AllIsas())
    if (CanRun(isa) && access(LibraryPath(isa).c_str(), R_OK) == 0) out.push_back(isa);
  return out;
}

void SetIsa(const std::string& isa) {
  Registry& r = Reg();
  std::lock_guard<std::mutex> g(r.mu);
  int idx;
  if (isa.empty() || isa == "auto") {
    auto avail = AvailableIsas();
    if (avail.empty()) ValueError("no omniops kernel library can run on this CPU");
    idx = IsaIndex(avail.front());
  } else {
    idx = IsaIndex(isa);
  }
  LoadLocked(idx);
  r.active.store(idx);
}

int ActiveIsaIndex() {
  int idx = Reg().active.load(std::memory_order_acquire);
  if (idx >= 0) return idx;
  const char* env = std::getenv("OMNI_ISA");
  SetIsa(env != nullptr ? env : "auto");
  return Reg().active.load();
}

const std::string& ActiveIsaName() { return AllIsas()[ActiveIsaIndex()]; }

const void* ResolveTable(int idx, const char* symbol) {
  Registry& r = Reg();
  std::lock_guard<std::mutex> g(r.mu);
  LoadLocked(idx);
  auto fn = reinterpret_cast<const void* (*)()>(dlsym(r.handles[idx], symbol));
  if (fn == nullptr) ValueError(std::string("kernel library ") + AllIsas()[idx] + " has no " + symbol + "; rebuild omniops");
  return fn();
}

}  // namespace omni
