"""What the fuzz test modules assert over the runner's records: one baseline's cases, the named-argument share."""

from __future__ import annotations

from typing import Any

from fuzz_harness import names_argument
from fuzz_runner import job_key


def assert_baseline_passes(results: dict[str, dict[str, dict[str, Any]]], job: dict[str, Any], base: str,
                           where: str) -> None:
    """Every case of baseline ``base`` in ``job`` passed; the failures are listed by case otherwise."""
    recs = {i: r for i, r in results[job_key(job)].items() if i.split(":")[0] == base}
    assert recs, f"no fuzz cases ran for {base}"
    failed = {i: r for i, r in recs.items() if r["outcome"] == "fail"}
    assert not failed, f"{len(failed)} of {len(recs)} cases failed on {where}:\n" + "\n".join(
        f"  {i}: {r['why']}" + (f"\n{r['stderr'][-600:]}" if r.get("stderr") else "") for i, r in failed.items())


def named_share(results: dict[str, dict[str, dict[str, Any]]], jobs: list[dict[str, Any]]) -> tuple[int, int]:
    """(rejections whose message names an argument of the call, rejections) over ``jobs``."""
    rej = [r for job in jobs for r in results[job_key(job)].values() if r["outcome"] == "rejected"]
    return sum(names_argument(r["msg"], r["names"]) for r in rej), len(rej)
