// What the CPU can run: cpuid/xgetbv feature detection (OS-enabled register state included) and the Linux AMX
// tile-state permission. Used to pick the kernel library (libraries.cpp).
#pragma once
#include <torch/csrc/utils/pybind.h>

#include <string>

namespace omni {

// The feature flags, in the order cpu_info()["features"] lists them: X(name) for each (the struct's fields and
// the dict's keys come from this one list).
#define OMNI_CPU_FEATURE_FLAGS(X)                                                                  \
  X(avx2) X(fma) X(f16c) X(avx512f) X(avx512bw) X(avx512vl) X(avx512dq) X(avx512_vnni) X(avx512_bf16) \
  X(amx_tile) X(amx_int8) X(amx_bf16)

struct CpuFeatures {
#define OMNI_FLAG(name) bool name = false;
  OMNI_CPU_FEATURE_FLAGS(OMNI_FLAG)
#undef OMNI_FLAG
  std::string vendor, model;
};

const CpuFeatures& Cpu();
// Linux grants the AMX tile-data state only on request (arch_prctl); asked once, on first need.
bool TilePermission();
// Whether the kernel library built for `isa` ("amx", "avx512", "avx2", "generic") can run here.
bool CanRun(const std::string& isa);
// vendor, model, features, amx_permission (the "available_isas" key is added by the caller).
pybind11::dict CpuFeaturesDict();

}  // namespace omni
