"""Fuzzing omniops._C directly (issue 18): generated bad inputs for every entry point, on every ISA library this
CPU can run. Each case runs in a child process; a crash, a hang, an exception other than ValueError/TypeError, an
accepted invalid input, a write outside the tensors, a changed input or a result that differs from the same call
on contiguous copies fails the test of its baseline and ISA, naming the case."""

from __future__ import annotations

import pytest
from fuzz_report import assert_baseline_passes, named_share
from fuzz_specs_cpp import BASELINES

from omniops import _cpu, _ext

ISAS = _cpu.available_isas() if _ext.cpp() is not None else []
FUZZ_JOBS = [{"suite": "cpp", "isa": isa} for isa in ISAS]
pytestmark = pytest.mark.skipif(_ext.cpp() is None, reason=f"omniops._C not built: {_ext.unavailable_reason()}")


@pytest.mark.parametrize("job", FUZZ_JOBS, ids=[j["isa"] for j in FUZZ_JOBS])
@pytest.mark.parametrize("base", list(BASELINES))
def test_bad_inputs(fuzz_results, job, base: str) -> None:
    assert_baseline_passes(fuzz_results, job, base, f"the {job['isa']} library")


def test_rejections_name_the_argument(fuzz_results) -> None:
    """Issue 18's bar: >= 95% of the direct _C rejections name the argument (pybind's anonymous
    'incompatible function arguments' does not)."""
    named, n = named_share(fuzz_results, FUZZ_JOBS)
    print(f"\n_C rejections naming an argument: {named}/{n} = {named / max(n, 1):.1%}")
    assert n > 1000 * len(FUZZ_JOBS)
    assert named / n >= 0.95


def test_every_entry_point_is_fuzzed() -> None:
    """A new entry point of omniops._C needs a baseline here."""
    C = _ext.cpp()
    skip = {"cpu_info", "get_isa", "families", "tile_layouts", "w8a8_tile_layouts", "quant_gemm_int8_path",
            # runtime settings, not kernels: tests/ops/test_kernel_threads.py checks set_kernel_threads' rejections
            "get_kernel_threads", "set_kernel_threads"}
    entry = {n for n in dir(C) if not n.startswith("_") and callable(getattr(C, n))} - skip
    fuzzed = {b().fn for b in BASELINES.values()}
    assert entry <= fuzzed, f"entry points without a fuzz baseline: {sorted(entry - fuzzed)}"
