"""The fuzz suites run once per session, in child processes two at a time (fuzz_runner), and only as far as the
selected tests need: each fuzz test module lists its jobs in FUZZ_JOBS ({"suite": ..., "isa" / "backend": ...});
a test parametrized by ``job`` (and ``base``, a baseline name) needs just that job's (baseline's) cases.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fuzz_runner  # noqa: E402
import fuzz_suites  # noqa: E402
from fuzz_runner import job_key  # noqa: E402


def _wanted(items: list[pytest.Item]) -> dict[str, set[str] | None]:
    """job key -> the baselines its selected tests need (None: all)."""
    want: dict[str, set[str] | None] = {}

    def add(job: dict[str, Any], base: str | None) -> None:
        k = job_key(job)
        if base is None or want.get(k, set()) is None:
            want[k] = None
        else:
            want.setdefault(k, set()).add(base)

    for item in items:
        jobs = getattr(item.module, "FUZZ_JOBS", None)
        if jobs is None:
            continue
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        if "job" in params:
            if isinstance(params["job"], dict):  # (not the placeholder of an empty parameter list)
                add(params["job"], params.get("base"))
        else:
            for job in jobs:
                add(job, None)
    return want


@pytest.fixture(scope="session")
def fuzz_results(request: pytest.FixtureRequest) -> dict[str, dict[str, dict[str, Any]]]:
    """{job key: {case id: record}} for every job the selected fuzz tests need."""
    jobs = []
    for key, bases in _wanted(request.session.items).items():
        job = json.loads(key)
        ids = list(fuzz_suites.SUITES[job["suite"]].cases())
        if bases is not None:
            ids = [i for i in ids if i.split(":")[0] in bases]
        jobs.append((job, ids))
    t0 = time.monotonic()
    results = fuzz_runner.run(jobs)
    n = sum(len(r) for r in results.values())
    print(f"\nfuzz: {n} cases in {len(jobs)} jobs, {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return results
