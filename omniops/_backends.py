"""Which backend serves an op call: reference | cpu | triton.

Selection order: the innermost ``use_backend(...)`` context, else the ``OMNI_BACKEND`` environment variable,
else the fastest backend available for the tensors' device (CPU: ``cpu`` then ``reference``; CUDA: ``triton``
then ``reference``). An explicitly requested backend that cannot serve a call raises ``BackendError`` naming
the op, the backend and the reason, unless the request allowed fallback to the reference. Each op's
implementations and their selection: ``omniops._family.OpFamily``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch

from omniops import _ext

BACKENDS = ("reference", "cpu", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendError(RuntimeError):
    """A backend was asked for a call it cannot serve."""


# os.environ.get costs ~1 us (it encodes the key); the mapping behind it is kept in sync by os.environ itself.
_ENV_DATA = getattr(os.environ, "_data", None)


def env(name: str) -> str | None:
    if _ENV_DATA is None:  # pragma: no cover - non-CPython
        return os.environ.get(name)
    v = _ENV_DATA.get(name.encode())
    return v.decode() if v is not None else None


_REQUEST: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar("omni_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str, *, fallback: bool = False) -> Iterator[None]:
    """Run omni ops inside the block on backend ``name``.

    With ``fallback=True`` a call the backend cannot serve runs on the reference instead of raising.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    token = _REQUEST.set((name, fallback))
    try:
        yield
    finally:
        _REQUEST.reset(token)


def requested() -> tuple[str, bool] | None:
    req = _REQUEST.get()
    if req is not None:
        return req
    name = env("OMNI_BACKEND")
    if name:
        if name not in BACKENDS:
            raise ValueError(f"OMNI_BACKEND: expected one of {BACKENDS}, got {name!r}")
        return name, False
    return None


@functools.cache
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def triton_interpreted() -> bool:
    return env("TRITON_INTERPRET") == "1"


def generic_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run on this device/dtype at all, or None."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors only, got a {device.type} tensor"
        if _ext.cpp() is None:
            return f"omniops._C is not available ({_ext.unavailable_reason()})"
        if dtype not in FLOAT_DTYPES:
            return f"dtype {dtype} is not supported (float32, float16, bfloat16)"
        return None
    if backend == "triton":
        err = triton_import_error()
        if err:
            return err
        if device.type == "cpu" and not triton_interpreted():
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
        if device.type not in ("cpu", "cuda", "xpu", "npu"):
            return f"no Triton target for {device.type} tensors"
        return None
    return f"unknown backend {backend!r}"


def default_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cpu":
        return ("cpu", "reference")
    if device.type in ("cuda", "xpu", "npu"):
        return ("triton", "reference")
    return ("reference",)


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    """The backends that can run ops on ``device`` / ``dtype`` here, fastest first (the reference last).

    A backend listed may still refuse a particular call (a head dim over a kernel's limit): that raises
    ``BackendError`` when it was requested, or falls through to the next backend by default."""
    dev = torch.device(device)
    order = [*(b for b in default_order(dev) if b != "reference"), "triton", "reference"]
    return tuple(dict.fromkeys(b for b in order if generic_reason(b, dev, dtype) is None))
