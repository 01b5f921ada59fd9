"""OMNI_VLLM_THREADS: parsing, and the pool's helpers started with a wider CPU mask than the caller's, whose own
binding (vLLM's) is restored. No vLLM needed; the pool test runs in a subprocess (the pool is per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from omniops import _ext
from omniops.vllm.threads import ENV, wanted_threads


def test_wanted_threads_parses_auto_counts_and_rejects_the_rest():
    assert wanted_threads(None, 2) == wanted_threads("auto", 2) == wanted_threads(" AUTO ", 2) == 2
    assert wanted_threads("auto", 0) == 1
    # vLLM already computes on every CPU: no pool beside its threads; on fewer, one thread per CPU
    assert wanted_threads("auto", 2, compute_threads=2) == 1 and wanted_threads("auto", 4, compute_threads=3) == 4
    assert wanted_threads("3", 2, compute_threads=2) == 3
    assert wanted_threads("1", 8) == 1 and wanted_threads("3", 2) == 3
    for bad in ("two", "0", "-1", "1.5"):
        with pytest.raises(ValueError, match=ENV):
            wanted_threads(bad, 2)


@pytest.mark.skipif(_ext.cpp() is None, reason="omniops._C is not built")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell the masks apart")
def test_helpers_get_every_cpu_and_the_caller_keeps_its_binding():
    code = textwrap.dedent("""
        import json, os, omniops
        from omniops.vllm.threads import start_kernel_threads
        first = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {first})  # as vLLM binds its compute thread
        n = start_kernel_threads()
        assert start_kernel_threads() == n  # once per process
        masks = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/status") as f:
                masks[int(tid)] = next(l.split(":")[1].strip() for l in f if l.startswith("Cpus_allowed_list"))
        print(json.dumps({"n": n, "pool": omniops.get_kernel_threads(), "mine": sorted(os.sched_getaffinity(0)),
                          "first": first, "wider": sum(m != masks[os.getpid()] for m in masks.values())}))
    """)
    env = dict(os.environ, **{ENV: "2"})
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == out["pool"] == 2
    assert out["mine"] == [out["first"]]  # the caller is back on its own CPU
    assert out["wider"] >= 1  # the helper thread runs with the wider mask
