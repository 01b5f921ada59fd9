"""Which backend serves an op call: reference | cpu | triton.

Selection order: the innermost ``use_backend(...)`` context, else the ``OMNI_BACKEND`` environment variable,
else the fastest backend available for the tensors' device (CPU: ``cpu`` then ``reference``; CUDA: ``triton``
then ``reference``). An explicitly requested backend that cannot serve a call raises ``BackendError`` naming
the op, the backend and the reason, unless the request allowed fallback to the reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from omniops import _ext

BACKENDS = ("reference", "cpu", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendError(RuntimeError):
    """A backend was asked for a call it cannot serve."""


# os.environ.get costs ~1 us (it encodes the key); the mapping behind it is kept in sync by os.environ itself.
_ENV_DATA = getattr(os.environ, "_data", None)


def _env(name: str) -> str | None:
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
    env = _env("OMNI_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"OMNI_BACKEND: expected one of {BACKENDS}, got {env!r}")
        return env, False
    return None


@functools.cache
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def triton_interpreted() -> bool:
    return _env("TRITON_INTERPRET") == "1"


def _generic_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
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


Impl = Callable[..., object]
Supports = Callable[..., "str | None"]


@dataclass
class OpFamily:
    """The implementations of one op on each backend.

    Every impl has the same signature (the op's "out" form: outputs first, then inputs). ``supports`` maps a
    backend to an optional check of the call's arguments returning why it cannot serve them, or None.
    """

    name: str
    impls: dict[str, Impl]
    supports: dict[str, Supports] = field(default_factory=dict)
    # (request, device type, dtype, TRITON_INTERPRET) -> impl, for selections that do not depend on args
    _cache: dict[tuple, Impl] = field(default_factory=dict, repr=False)

    def select(self, device: torch.device, dtype: torch.dtype, *args: object) -> Impl:
        req = requested()
        key = (req, device.type, dtype, _env("TRITON_INTERPRET"))
        impl = self._cache.get(key)
        if impl is not None:
            return impl
        impl = self._select(req, device, dtype, args)
        if not self.supports:
            self._cache[key] = impl
        return impl

    def _select(self, req: tuple[str, bool] | None, device: torch.device, dtype: torch.dtype, args: tuple) -> Impl:
        if req is not None:
            backend, fallback = req
            reason = self._reason(backend, device, dtype, args)
            if reason is None:
                return self.impls[backend]
            if fallback:
                return self.impls["reference"]
            raise BackendError(f"omni::{self.name}: backend '{backend}' cannot run this call: {reason}")
        for backend in default_order(device):
            if self._reason(backend, device, dtype, args) is None:
                return self.impls[backend]
        return self.impls["reference"]

    def backend_for(self, device: torch.device, dtype: torch.dtype, *args: object) -> str:
        impl = self.select(device, dtype, *args)
        return next(name for name, fn in self.impls.items() if fn is impl)

    def _reason(self, backend: str, device: torch.device, dtype: torch.dtype, args: tuple) -> str | None:
        if backend not in self.impls:
            return "not implemented for this op"
        reason = _generic_reason(backend, device, dtype)
        if reason is None and backend in self.supports:
            reason = self.supports[backend](*args)
        return reason
