"""The one timer and the machine's measured limits, shared by every bench routine."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    reps: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, device: torch.device | str = "cpu", reps: int | None = None,
            warmup: int = 3, min_time_s: float = 0.2, max_reps: int = 200) -> Timing:
    """Median wall time of ``fn()``. Without ``reps``, repeats until ``min_time_s`` has passed (at least 5,
    at most ``max_reps`` runs). GPU work is synchronised around every run."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        n = len(times)
        if reps is not None:
            if n >= reps:
                break
        elif n >= max_reps or (n >= 5 and time.perf_counter() - start >= min_time_s):
            break
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), q[0], q[-1], len(times))


@functools.cache
def memory_bandwidth(device_type: str = "cpu") -> dict[str, float]:
    """Measured streaming bandwidth in GB/s: ``read`` (torch.sum over 512 MiB) and ``copy`` (bytes read plus
    written by a 256 MiB copy). ``peak`` is the larger: the figure "% of bandwidth" is taken against."""
    device = torch.device(device_type)
    n = (512 << 20) // 4
    a = torch.ones(n, device=device)
    t_read = measure(lambda: a.sum(), device=device, min_time_s=0.5).median_s
    src = a[: n // 2]
    dst = torch.empty_like(src)
    t_copy = measure(lambda: dst.copy_(src), device=device, min_time_s=0.5).median_s
    read = a.numel() * 4 / t_read / 1e9
    copy = 2 * src.numel() * 4 / t_copy / 1e9
    return {"read": read, "copy": copy, "peak": max(read, copy)}
