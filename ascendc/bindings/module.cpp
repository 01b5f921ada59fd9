// omniops._C: the pybind11 module. Each op family's bindings (ascendc/bindings/<family>.cpp) register
// themselves with RegisterFamily; this file adds cpu_info / get_isa / set_isa / families.
#include <utility>
#include <vector>

#include "bindings/common.h"
#include "bindings/coop_pool.h"
#include "bindings/cpu_features.h"

namespace omni {
namespace {

std::vector<std::pair<const char*, RegisterFn>>& Families() {
  static std::vector<std::pair<const char*, RegisterFn>> v;
  return v;
}

py::dict CpuInfo() {
  py::dict d = CpuFeaturesDict();
  d["available_isas"] = AvailableIsas();
  return d;
}

void SetIsaArg(const std::string& isa) { SetIsa(isa); }

std::vector<std::string> FamilyNames() {
  std::vector<std::string> names;
  for (auto& f : Families()) names.emplace_back(f.first);
  return names;
}

}  // namespace

RegisterFamily::RegisterFamily(const char* name, RegisterFn fn) { Families().emplace_back(name, fn); }

void RegisterAll(py::module_& m) {
  m.def("cpu_info", &CpuInfo, "CPU vendor, model, ISA features and the kernel libraries that can run here");
  m.def("get_isa", []() { return ActiveIsaName(); }, "the ISA level of the active kernel library");
  Def(m, "set_isa", &SetIsaArg, "switch kernel library: 'amx', 'avx512', 'avx2', 'generic' or 'auto'",
      py::arg("isa"));
  m.def("families", &FamilyNames, "the op families compiled into this module");
  m.def("set_kernel_threads", &SetCoopThreads, py::arg("threads"),
        "run the kernels on a cooperative pool of this many threads (the caller included; <= 1: torch's pool)");
  m.def("get_kernel_threads", &CoopThreads, "threads of the cooperative kernel pool (1: torch's pool is used)");
  for (auto& f : Families()) f.second(m);
}

}  // namespace omni

PYBIND11_MODULE(_C, m) {
  m.doc() = "omniops C++ kernels (AscendC-style, host build)";
  m.attr("KERNEL_ABI_VERSION") = OMNI_KERNEL_ABI_VERSION;
  omni::RegisterAll(m);
}
