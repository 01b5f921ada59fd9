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
