"""The concrete inputs of issue 18 (four crashes, silent aliasing, unchecked scalars, anonymous messages), each a
named test; they run in a child process, so the crashes they were fail here instead of killing the run."""

from __future__ import annotations

import pytest
from fuzz_regressions import REGRESSIONS
from fuzz_runner import job_key

from omniops import _ext

FUZZ_JOBS = [{"suite": "regress"}]
pytestmark = pytest.mark.skipif(_ext.cpp() is None, reason=f"omniops._C not built: {_ext.unavailable_reason()}")


@pytest.mark.parametrize("job", FUZZ_JOBS, ids=["child"])
@pytest.mark.parametrize("base", list(REGRESSIONS))
def test_issue18_case(fuzz_results, job, base: str) -> None:
    rec = fuzz_results[job_key(job)][base]
    assert rec["outcome"] == "passed", f"{rec.get('why')}\n{rec.get('stderr', '')}"
