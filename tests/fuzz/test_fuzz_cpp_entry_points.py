"""Fuzzing omniops._C directly (issue 18): generated bad inputs for every entry point, on every ISA library this
CPU can run. Each case runs in a child process; a crash, a hang, an exception other than ValueError/TypeError, an
accepted invalid input, a write outside the tensors, a changed input or a result that differs from the same call
on contiguous copies fails the test of its baseline and ISA, naming the case."""

from __future__ import annotations

import pytest
from fuzz_harness import names_argument
from fuzz_runner import job_key
from fuzz_specs_cpp import BASELINES

from omniops import _cpu, _ext

ISAS = _cpu.available_isas() if _ext.cpp() is not None else []
FUZZ_JOBS = [{"suite": "cpp", "isa": isa} for isa in ISAS]
pytestmark = pytest.mark.skipif(_ext.cpp() is None, reason=f"omniops._C not built: {_ext.unavailable_reason()}")


def _records(fuzz_results, job):
    return fuzz_results[job_key(job)]


@pytest.mark.parametrize("job", FUZZ_JOBS, ids=[j["isa"] for j in FUZZ_JOBS])
@pytest.mark.parametrize("base", list(BASELINES))
def test_bad_inputs(fuzz_results, job, base: str) -> None:
    recs = {i: r for i, r in _records(fuzz_results, job).items() if i.split(":")[0] == base}
    assert recs, f"no fuzz cases ran for {base}"
    failed = {i: r for i, r in recs.items() if r["outcome"] == "fail"}
    assert not failed, f"{len(failed)} of {len(recs)} cases failed on {job['isa']}:\n" + "\n".join(
        f"  {i}: {r['why']}" + (f"\n{r['stderr'][-600:]}" if r.get("stderr") else "") for i, r in failed.items())


def test_rejections_name_the_argument(fuzz_results) -> None:
    """Issue 18's bar: >= 95% of the direct _C rejections name the argument (pybind's anonymous
    'incompatible function arguments' does not)."""
    rej = [r for job in FUZZ_JOBS for r in _records(fuzz_results, job).values() if r["outcome"] == "rejected"]
    named = sum(names_argument(r["msg"], r["names"]) for r in rej)
    share = named / max(len(rej), 1)
    print(f"\n_C rejections naming an argument: {named}/{len(rej)} = {share:.1%}")
    assert len(rej) > 1000 * len(FUZZ_JOBS)
    assert share >= 0.95


def test_every_entry_point_is_fuzzed() -> None:
    """A new entry point of omniops._C needs a baseline here."""
    C = _ext.cpp()
    skip = {"cpu_info", "get_isa", "families", "tile_layouts", "w8a8_tile_layouts", "quant_gemm_int8_path"}
    entry = {n for n in dir(C) if not n.startswith("_") and callable(getattr(C, n))} - skip
    fuzzed = {b().fn for b in BASELINES.values()}
    assert entry <= fuzzed, f"entry points without a fuzz baseline: {sorted(entry - fuzzed)}"
