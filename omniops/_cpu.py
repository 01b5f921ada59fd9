"""What the CPU is and which kernel library (ISA level) serves the ``cpu`` backend."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from omniops import _ext


def cpu_info() -> dict[str, Any]:
    """CPU vendor/model, ISA features, the kernel libraries that can run here and the active one.

    ``isa`` is None when omniops._C is not built (then CPU tensors use the reference backend).
    """
    C = _ext.cpp()
    if C is None:
        return {"vendor": None, "model": None, "features": {}, "available_isas": [], "isa": None,
                "reason": _ext.unavailable_reason()}
    info = dict(C.cpu_info())
    info["isa"] = C.get_isa()
    return info


def available_isas() -> list[str]:
    C = _ext.cpp()
    return list(C.cpu_info()["available_isas"]) if C is not None else []


@contextlib.contextmanager
def force_isa(isa: str) -> Iterator[None]:
    """Run the ``cpu`` backend on one ISA level (e.g. the AVX2 path on an AVX-512 machine) inside the block."""
    C = _ext.cpp()
    if C is None:
        raise RuntimeError(f"omniops._C is not available ({_ext.unavailable_reason()})")
    before = C.get_isa()
    C.set_isa(isa)
    try:
        yield
    finally:
        C.set_isa(before)


def set_kernel_threads(threads: int) -> None:
    """Run the cpu kernels on omniops' cooperative pool of ``threads`` threads (the caller among them) instead of
    torch's OpenMP pool; ``threads <= 1`` goes back to torch's pool.

    The cooperative pool never waits for a thread that has not picked up work: a helper that another process
    has descheduled delays a kernel only by the block it already holds, where an OpenMP region waits for the
    whole team at its barrier (on a 2-core machine shared with an HTTP front end, 2 OpenMP threads made
    omni-serve several times slower than 1). Torch's own ops keep torch's thread setting."""
    from omniops._validation import check_int

    threads = check_int("threads", threads, lo=1, hi=1024)
    C = _ext.cpp()
    if C is None:
        raise RuntimeError(f"omniops._C is not available ({_ext.unavailable_reason()})")
    C.set_kernel_threads(threads)


def get_kernel_threads() -> int:
    """Threads of the cooperative kernel pool (1: the kernels run on torch's pool)."""
    C = _ext.cpp()
    return int(C.get_kernel_threads()) if C is not None else 1
