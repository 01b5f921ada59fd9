"""Counting omni work in the torch profiler traces vLLM writes (``--profiler-config '{"profiler": "torch",
"torch_profiler_dir": DIR}'``, then ``POST /start_profile`` / ``/stop_profile`` or ``LLM.start_profile()``).

Compiled graphs call omni ops through the dispatcher, so they show as ``omni::<op>`` events; the eager
attention paths show as the plugin's ``omniops.vllm::<op>`` ranges (see ``omniops.vllm.attention``).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

PREFIXES = ("omni::", "omniops.vllm::")


def trace_files(trace_dir: str | Path) -> list[Path]:
    d = Path(trace_dir)
    if not d.is_dir():
        raise ValueError(f"trace_dir: {d} is not a directory")
    return sorted(p for p in d.rglob("*") if p.name.endswith((".pt.trace.json", ".pt.trace.json.gz")))


def count_omni_events(trace_dir: str | Path) -> Counter[str]:
    """Events per name whose name starts with one of ``PREFIXES``, over every trace under ``trace_dir``."""
    counts: Counter[str] = Counter()
    for path in trace_files(trace_dir):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        for ev in events:
            name = ev.get("name", "")
            if name.startswith(PREFIXES):
                counts[name] += 1
    return counts
