"""The fuzz machinery itself: each synthetic rule-breaker of fuzz_selftest (an out-of-bounds write, a changed
input, a stride-dependent result, an accepted invalid input, a segfault, an abort, a hang) must be reported, and
the cases after a crash or a hang must still run."""

from __future__ import annotations

import pytest
from fuzz_runner import job_key
from fuzz_selftest import CASES

FUZZ_JOBS = [{"suite": "selftest", "stall": 10}]


@pytest.mark.parametrize("job", FUZZ_JOBS, ids=["child"])
@pytest.mark.parametrize("base", list(CASES))
def test_verdict(fuzz_results, job, base: str) -> None:
    rec = fuzz_results[job_key(job)][base]
    _, outcome, why = CASES[base]
    assert rec["outcome"] == outcome, rec
    assert why in rec.get("why", ""), rec
