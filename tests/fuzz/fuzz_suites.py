"""The fuzz suites: which cases exist (deterministically, so parent and child agree) and how one runs.

* ``cpp``: every omniops._C entry point, its baselines mutated (fuzz_mutations), on one ISA library per child;
* ``public``: the public ops (omniops.<op>) the same way, on one backend per child;
* ``regress``: the concrete cases of issue 18, each a named function (fuzz_regressions).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import fuzz_harness
import fuzz_regressions
import fuzz_specs_cpp
import fuzz_specs_public
import fuzz_tensors
import torch
from fuzz_mutations import Case, mutations

import omniops
from omniops import _ext


@functools.cache
def _cases(specs: tuple[tuple[str, Callable[[], Any]], ...]) -> dict[str, Case]:
    out: dict[str, Case] = {}
    for base, build in specs:
        fuzz_tensors.reset()
        for case in mutations(base, build()):
            out[case.id] = case
    fuzz_tensors.reset()
    return out


class MutationError(Exception):
    """The mutation itself failed (a bug of the suite, reported as a failing case)."""


def _prepare(case: Case, build: Callable[[], Any]) -> Any:
    fuzz_tensors.reset()
    torch.random.default_generator.manual_seed(0)  # (torch.manual_seed also seeds CUDA lazily: slow)
    call = build()
    try:
        case.mutate(call)
    except Exception as e:
        raise MutationError(f"{type(e).__name__}: {e}") from e
    placed: dict[int, Any] = {}
    for k, v in call.args.items():  # fresh tensors (new dtypes, layouts) into padded buffers too
        if isinstance(v, torch.Tensor):
            if id(v) not in placed:
                placed[id(v)] = fuzz_tensors.place(v)
            call.args[k] = placed[id(v)]
    return call


@dataclasses.dataclass
class Suite:
    cases: Callable[[], dict[str, Case]]
    setup: Callable[[dict[str, Any]], Any]
    run: Callable[[Case, Any], dict[str, Any]]


# ---- cpp ------------------------------------------------------------------------------------------------------
def cpp_cases() -> dict[str, Case]:
    return _cases(tuple(fuzz_specs_cpp.BASELINES.items()))


def _cpp_setup(req: dict[str, Any]) -> str:
    _ext.cpp().set_isa(req["isa"])
    return req["isa"]


def _cpp_run(case: Case, isa: str) -> dict[str, Any]:
    C = _ext.cpp()
    try:
        call = _prepare(case, fuzz_specs_cpp.BASELINES[case.base])
        fn = getattr(C, call.fn)
        return fuzz_harness.judge(lambda a: fn(**a), call.args, call.outputs, case.expect) | {
            "names": list(call.args)}
    except MutationError as e:
        return {"outcome": "fail", "why": f"the mutation failed: {e}"}
    finally:
        if C.get_isa() != isa:
            C.set_isa(isa)


# ---- public ---------------------------------------------------------------------------------------------------
def public_cases() -> dict[str, Case]:
    return _cases(tuple(fuzz_specs_public.BASELINES.items()))


def _public_setup(req: dict[str, Any]) -> str:
    return req["backend"]


def _public_run(case: Case, backend: str) -> dict[str, Any]:
    if backend == "reference" and case.id.split(":")[-1].startswith("huge"):
        # The pure-torch reference materialises what a stride-0 view only claims: run it on the kernels only.
        return {"outcome": "skipped"}
    try:
        call = _prepare(case, fuzz_specs_public.BASELINES[case.base])
    except MutationError as e:
        return {"outcome": "fail", "why": f"the mutation failed: {e}"}
    fn = getattr(omniops, call.fn)

    def invoke(a: dict[str, Any]) -> Any:
        if backend == "default":  # what a user gets: the cpu kernels, the reference where they cannot serve
            return fn(**a)
        with omniops.use_backend(backend):
            return fn(**a)

    return fuzz_harness.judge(invoke, call.args, call.outputs, case.expect, fuzz_harness.close) | {
        "names": list(call.args)}


# ---- regressions ------------------------------------------------------------------------------------------------
def regress_cases() -> dict[str, Case]:
    return {name: Case(name, name, "", lambda c: None, "reject") for name in fuzz_regressions.REGRESSIONS}


def _regress_run(case: Case, _ctx: Any) -> dict[str, Any]:
    try:
        fuzz_regressions.REGRESSIONS[case.id]()
    except AssertionError as e:
        return {"outcome": "fail", "why": str(e)[:500]}
    except Exception as e:  # noqa: BLE001
        return {"outcome": "fail", "why": f"raised {type(e).__name__}: {str(e)[:300]}"}
    return {"outcome": "passed"}


# ---- self-test: synthetic failures the machinery must catch ---------------------------------------------------
def selftest_cases() -> dict[str, Case]:
    import fuzz_selftest

    return {name: Case(name, name, "", lambda c: None, "any") for name in fuzz_selftest.CASES}


def _selftest_run(case: Case, _ctx: Any) -> dict[str, Any]:
    import fuzz_selftest

    return fuzz_selftest.CASES[case.id][0]()


SUITES = {
    "cpp": Suite(cpp_cases, _cpp_setup, _cpp_run),
    "public": Suite(public_cases, _public_setup, _public_run),
    "regress": Suite(regress_cases, lambda req: None, _regress_run),
    "selftest": Suite(selftest_cases, lambda req: None, _selftest_run),
}
