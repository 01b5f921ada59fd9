"""Startup calibration: decide 'omni kernel or torch' by measuring both on this CPU, not by a rule carried
over from another machine.

The linear pass moves dense linears to ``omni::grouped_gemm`` where that is faster. Which side wins depends on
the CPU and the kernel library (AMD EPYC AVX2: torch's bf16 GEMM is 3-7x slower than the omni kernel at every
size; Intel Xeon with AMX: oneDNN's AMX GEMM is fast at prefill sizes), so the first question per (kernel
library, dtype) times one representative weight (2048 x 2048) at a few row counts, once per process
(~0.1-0.5 s), and answers from that table. ``OMNI_CALIBRATION=off`` skips the measurement and returns None
(callers then use their static rule).
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F

ROWS = (1, 16, 64, 256, 2048)  # 2048: a prefill chunk (max_num_batched_tokens)
_N = _K = 2048
# omni must be this much faster to be chosen: the measurement is short and the machine may be shared.
_MARGIN = 1.1


def _best(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def _linear_table(isa: str, dtype: torch.dtype, threads: tuple[int, int]) -> dict[int, bool]:
    """threads: (torch's, the kernel pool's): each side's speed depends on its own thread count."""
    import omniops

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(_N, _K, generator=g) / _K**0.5).to(dtype)
    w3 = w.unsqueeze(0)
    table = {}
    with torch.no_grad():
        for rows in ROWS:
            x = torch.randn(rows, _K, generator=g).to(dtype)
            offs = torch.tensor([0, rows])
            t_torch = _best(lambda x=x: F.linear(x, w))
            t_omni = _best(lambda x=x, o=offs: omniops.grouped_gemm(x, w3, o))
            table[rows] = t_omni * _MARGIN < t_torch
    return table


def linear_table(dtype: torch.dtype) -> dict[int, bool] | None:
    """{rows: omni grouped_gemm beats torch's linear} for the active kernel library, or None when calibration
    is off or omniops._C is missing."""
    from omniops import _ext

    C = _ext.cpp()
    if C is None or os.environ.get("OMNI_CALIBRATION", "on") == "off":
        return None
    return _linear_table(C.get_isa(), dtype, (torch.get_num_threads(), int(C.get_kernel_threads())))


def omni_linear_wins(dtype: torch.dtype, rows: int) -> bool | None:
    """Whether the omni GEMM is the faster dense linear at `rows` rows (the nearest measured row count at or
    above; the largest beyond it), or None without a measurement."""
    table = linear_table(dtype)
    if table is None:
        return None
    for r in ROWS:
        if rows <= r:
            return table[r]
    return table[ROWS[-1]]
