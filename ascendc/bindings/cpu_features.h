// What the CPU can run: cpuid/xgetbv feature detection (OS-enabled register state included) and the Linux AMX
// tile-state permission. Used to pick the kernel library (libraries.cpp).
#pragma once
#include <torch/csrc/utils/pybind.h>

#include <string>

namespace omni {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
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
