// CPU feature detection (cpuid / xgetbv) and the AMX tile permission, for choosing a kernel library.
#include "bindings/cpu_features.h"

#include <cpuid.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

#include <cstring>

namespace omni {
namespace py = pybind11;
namespace {

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

}  // namespace

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

py::dict CpuFeaturesDict() {
  const CpuFeatures& f = Cpu();
  py::dict d;
  d["vendor"] = f.vendor;
  d["model"] = f.model;
  py::dict feats;
#define OMNI_FLAG(name) feats[#name] = f.name;
  OMNI_CPU_FEATURE_FLAGS(OMNI_FLAG)
#undef OMNI_FLAG
  d["features"] = feats;
  // Asked only where the CPU has tiles (asking elsewhere would be a pointless syscall).
  d["amx_permission"] = f.amx_tile && TilePermission();
  return d;
}

}  // namespace omni
