"""Loads the C++ extension omniops._C once; warns (once) when it is missing."""

from __future__ import annotations

import os
import warnings
from types import ModuleType

_C: ModuleType | None = None
_IMPORT_ERROR: str | None = None


def _load() -> None:
    global _C, _IMPORT_ERROR
    if os.environ.get("OMNI_USE_CPP", "1") == "0":
        _IMPORT_ERROR = "disabled by OMNI_USE_CPP=0"
        return
    try:
        from omniops import _C as mod  # type: ignore[attr-defined]
    except ImportError as e:  # pragma: no cover - depends on the install
        _IMPORT_ERROR = str(e)
        warnings.warn(
            f"omniops._C is not available ({e}); the 'cpu' backend is off and CPU tensors use the pure-torch "
            "reference. Rebuild with `pip install --no-build-isolation -e .` (needs g++ and CMake).",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    _C = mod


_load()


def cpp() -> ModuleType | None:
    """The extension module, or None when it is not built."""
    return _C


def unavailable_reason() -> str | None:
    return _IMPORT_ERROR
