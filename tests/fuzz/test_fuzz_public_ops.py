"""Fuzzing the public ops (omniops.<op>) the same way: on the default selection (the cpu kernels, the reference
where they cannot serve a call) and on the reference backend, which must refuse the same invalid inputs."""

from __future__ import annotations

import pytest
from fuzz_harness import names_argument
from fuzz_runner import job_key
from fuzz_specs_public import BASELINES

import omniops

FUZZ_JOBS = [{"suite": "public", "backend": b} for b in ("default", "reference")]


def _records(fuzz_results, job):
    return fuzz_results[job_key(job)]


@pytest.mark.parametrize("job", FUZZ_JOBS, ids=[j["backend"] for j in FUZZ_JOBS])
@pytest.mark.parametrize("base", list(BASELINES))
def test_bad_inputs(fuzz_results, job, base: str) -> None:
    recs = {i: r for i, r in _records(fuzz_results, job).items() if i.split(":")[0] == base}
    assert recs, f"no fuzz cases ran for {base}"
    failed = {i: r for i, r in recs.items() if r["outcome"] == "fail"}
    assert not failed, f"{len(failed)} of {len(recs)} cases failed on {job['backend']}:\n" + "\n".join(
        f"  {i}: {r['why']}" + (f"\n{r['stderr'][-600:]}" if r.get("stderr") else "") for i, r in failed.items())


def test_rejections_name_the_argument(fuzz_results) -> None:
    rej = [r for job in FUZZ_JOBS for r in _records(fuzz_results, job).values() if r["outcome"] == "rejected"]
    named = sum(names_argument(r["msg"], r["names"]) for r in rej)
    print(f"\npublic-op rejections naming an argument: {named}/{len(rej)} = {named / max(len(rej), 1):.1%}")
    assert len(rej) > 1000 and named / len(rej) >= 0.95


def test_every_public_op_is_fuzzed() -> None:
    helpers = {"cpu_info", "use_backend", "prepack_linear_weight", "prepack_moe_weights", "quantize_model",
               "quantize_weight", "dequantize_weight", "quantize_activation_fp8_group"}
    ops = {n for n in omniops.__all__ if callable(getattr(omniops, n)) and n[0].islower()} - helpers
    fuzzed = {b().fn for b in BASELINES.values()}
    assert ops <= fuzzed, f"public ops without a fuzz baseline: {sorted(ops - fuzzed)}"
