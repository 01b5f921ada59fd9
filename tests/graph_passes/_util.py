"""Shared helpers of the graph-pass tests: compiling with the omni backend and reading its report."""

from __future__ import annotations

from collections import Counter

import torch
from omniops.graph_passes import report, reset_report


def compile_omni(fn, *args, options: dict | None = None, **kwargs):
    """Compile ``fn`` with backend="omni", run it once on ``args``; returns (compiled fn, output, report)."""
    reset_report()
    cfn = torch.compile(fn, backend="omni", options=options, **kwargs)
    with torch.no_grad():
        out = cfn(*args)
    rep = report()
    return cfn, out, _copy(rep)


def _copy(rep):
    from omniops.graph_passes.report import PassReport

    c = PassReport()
    c.merge(rep)
    return c


def omni_ops(rep) -> Counter:
    return Counter(dict(rep.ops))
