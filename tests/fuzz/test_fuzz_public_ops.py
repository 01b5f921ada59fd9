"""Fuzzing the public ops (omniops.<op>) the same way: on the default selection (the cpu kernels, the reference
where they cannot serve a call) and on the reference backend, which must refuse the same invalid inputs."""

from __future__ import annotations

import pytest
from fuzz_report import assert_baseline_passes, named_share
from fuzz_specs_public import BASELINES

import omniops

FUZZ_JOBS = [{"suite": "public", "backend": b} for b in ("default", "reference")]


@pytest.mark.parametrize("job", FUZZ_JOBS, ids=[j["backend"] for j in FUZZ_JOBS])
@pytest.mark.parametrize("base", list(BASELINES))
def test_bad_inputs(fuzz_results, job, base: str) -> None:
    assert_baseline_passes(fuzz_results, job, base, f"the {job['backend']} backend")


def test_rejections_name_the_argument(fuzz_results) -> None:
    named, n = named_share(fuzz_results, FUZZ_JOBS)
    print(f"\npublic-op rejections naming an argument: {named}/{n} = {named / max(n, 1):.1%}")
    assert n > 1000 and named / n >= 0.95


def test_every_public_op_is_fuzzed() -> None:
    helpers = {"cpu_info", "use_backend", "available_backends", "prepack_linear_weight", "prepack_moe_weights",
               "quantize_model", "quantize_weight", "dequantize_weight", "quantize_activation_fp8_group",
               # runtime settings, not ops: tests/ops/test_kernel_threads.py checks their rejections
               "get_kernel_threads", "set_kernel_threads"}
    ops = {n for n in omniops.__all__ if callable(getattr(omniops, n)) and n[0].islower()} - helpers
    fuzzed = {b().fn for b in BASELINES.values()}
    assert ops <= fuzzed, f"public ops without a fuzz baseline: {sorted(ops - fuzzed)}"
