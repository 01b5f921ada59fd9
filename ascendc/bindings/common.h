// What every binding translation unit of omniops._C uses: the shared argument checks (checks.h), the kernel
// libraries (libraries.h), the host runtime (runtime.h), and how an op family registers its entry points.
// Binding TUs include only ATen's Tensor and torch's pybind casters (not torch/extension.h): ~6 s to compile
// instead of ~45 s each.
#pragma once
#include <array>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include "bindings/checks.h"
#include "bindings/libraries.h"
#include "bindings/runtime.h"
#include "omni/kernel_abi.h"

namespace omni {

// ---- op-family registration: each bindings/<family>.cpp has one `static RegisterFamily r("name", fn);` ----
using RegisterFn = void (*)(py::module_&);
struct RegisterFamily {
  RegisterFamily(const char* name, RegisterFn fn);
};
void RegisterAll(py::module_& m);

// ---- entry points with named arguments ----------------------------------------------------------------------
// Def(m, "name", &Fn, "doc", py::arg("a"), py::arg("b") = default, ...) registers Fn with every parameter
// received as a py::object and converted by Arg<T> under its py::arg name, left to right. pybind's own
// conversion error ("incompatible function arguments") names no argument; this way a None, a list or an int past
// int64 is a TypeError/ValueError that says which argument it was.
namespace detail {
template <size_t>
using Obj = py::object;

template <typename R, typename... P, size_t... I>
auto NamedArgs(R (*fn)(P...), std::array<const char*, sizeof...(P)> names, std::index_sequence<I...>) {
  return [fn, names](Obj<I>... o) -> R {
    // Braced initialisation evaluates the conversions in order, so the first bad argument is the one reported.
    std::tuple<std::decay_t<P>...> args{Arg<std::decay_t<P>>::Get(o, names[I])...};
    return std::apply(fn, std::move(args));
  };
}
}  // namespace detail

template <typename R, typename... P, typename... A>
void Def(py::module_& m, const char* name, R (*fn)(P...), const char* doc, A&&... args) {
  static_assert(sizeof...(A) == sizeof...(P), "one py::arg per parameter");
  const std::array<const char*, sizeof...(P)> names{args.name...};
  m.def(name, detail::NamedArgs(fn, names, std::index_sequence_for<P...>{}), std::forward<A>(args)..., doc);
}

}  // namespace omni
