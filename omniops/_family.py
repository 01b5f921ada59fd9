"""Op families: one op's implementations on every backend, behind the signature of its reference.

A family is declared once, in ``omniops/ops/<module>.py``, with its reference: pure torch in the "out form" the
kernels share (outputs are arguments written in place, in the order of the C++ entry point). The reference's
parameter names are the family's contract, and every implementation is checked against them:

* ``cpu``: the ``omniops._C`` entry point named by ``cpu=`` (default: the family's name), checked on first use.
  ``None`` for an optional number becomes that entry point's own default (``soft_cap = 0.0``: the C ABI spells
  "off" as a number, Python as None), or the value ``cpu_none`` gives where the entry point declares none. An op
  that passes cpu-only extras (the AMX tile copies of its weights) registers ``@FAMILY.impl("cpu")`` instead.
* ``triton``: ``omniops/triton/<module>.py`` registers its launcher with ``@FAMILY.impl("triton")``. That module
  is imported on the first call that may run on Triton (importing triton takes seconds and needs it installed).

``supports[backend](*args)`` (same arguments as the implementation) says why that backend cannot serve a call
(a head dim over a kernel's limit, a mask the Triton kernel does not take), or None. ``select`` picks the
implementation of a call: the request (``use_backend`` / ``OMNI_BACKEND``) or the device's default order.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from omniops import _backends, _ext

Impl = Callable[..., object]
Supports = Callable[..., "str | None"]

FAMILIES: dict[str, OpFamily] = {}  # name -> family, every family declared so far (what the tests check)


class OpFamily:
    """The implementations of the op ``omni::<name>`` on each backend (see the module docstring)."""

    def __init__(self, name: str, reference: Impl, *, cpu: str | None = None,
                 cpu_none: Mapping[str, object] | None = None, supports: Mapping[str, Supports] | None = None,
                 ) -> None:
        self.name = name
        self.reference = reference
        sig = inspect.signature(reference)
        self.params: tuple[str, ...] = tuple(sig.parameters)
        self._annotations = {n: str(p.annotation) for n, p in sig.parameters.items()}
        self.cpu_entry = cpu or name
        self._cpu_none = dict(cpu_none or {})
        self.impls: dict[str, Impl] = {"reference": reference}
        self.supports: dict[str, Supports] = dict(supports or {})
        # omniops/ops/<module>.py declares the family; omniops/triton/<module>.py implements it (namedtuple's way
        # of knowing the caller's module)
        self.triton_module = "omniops.triton." + sys._getframe(1).f_globals["__name__"].rsplit(".", 1)[-1]
        self._triton_loaded = False
        # (request, device type, dtype, TRITON_INTERPRET) -> impl, for selections that do not depend on args
        self._cache: dict[tuple, Impl] = {}
        FAMILIES[name] = self

    # ---- registration ----------------------------------------------------------------------------------------
    def impl(self, backend: str, *, supports: Supports | None = None) -> Callable[[Impl], Impl]:
        """Decorator: ``fn`` implements this family on ``backend`` (same parameters as the reference; extra
        trailing ones need defaults). ``supports``: why it cannot serve given arguments, or None."""
        if backend not in _backends.BACKENDS or backend == "reference":
            raise ValueError(f"omni::{self.name}: cannot register an implementation for backend {backend!r}")

        def deco(fn: Impl) -> Impl:
            params = inspect.signature(fn).parameters.values()
            self._check(backend, [p.name for p in params],
                        {p.name for p in params if p.default is not inspect.Parameter.empty})
            self.impls[backend] = fn
            if supports is not None:
                self.supports[backend] = supports
            self._cache.clear()
            return fn

        return deco

    def _check(self, backend: str, names: Sequence[str], with_default: set[str]) -> None:
        n = len(self.params)
        if tuple(names[:n]) != self.params or any(x not in with_default for x in names[n:]):
            raise TypeError(f"omni::{self.name}: the {backend} implementation takes ({', '.join(names)}); the "
                            f"reference's parameters are ({', '.join(self.params)})")

    def cpu_impl(self) -> Impl | None:
        """The cpu implementation (None without omniops._C); the ``_C`` entry point is checked here, once."""
        fn = self.impls.get("cpu")
        if fn is not None:
            return fn
        C = _ext.cpp()
        if C is None:
            return None
        entry, params = self._checked_entry(C)
        fills = self._none_fills(dict(params))
        if fills:
            def fn(*args: Any) -> object:
                args = list(args)
                for i, value in fills:
                    if args[i] is None:
                        args[i] = value
                return entry(*args)
        else:
            fn = entry
        self.impls["cpu"] = fn
        return fn

    def _checked_entry(self, C: Any) -> tuple[Any, list[tuple[str, str | None]]]:
        entry = getattr(C, self.cpu_entry, None)
        if entry is None:
            raise TypeError(f"omni::{self.name}: omniops._C has no entry point {self.cpu_entry!r}")
        params = pybind_params(entry)
        self._check("cpu", [p for p, _ in params], {p for p, d in params if d is not None})
        return entry, params

    def _none_fills(self, defaults: dict[str, str | None]) -> list[tuple[int, object]]:
        """(position, value) for every optional number of the reference: what the entry point takes for None."""
        fills = []
        for i, name in enumerate(self.params):
            ann = self._annotations[name]
            if "None" not in ann or "Tensor" in ann:
                continue
            if name in self._cpu_none:
                fills.append((i, self._cpu_none[name]))
                continue
            default = defaults.get(name)
            if default is None or default == "None":
                raise TypeError(f"omni::{self.name}: omniops._C.{self.cpu_entry} has no default for the optional "
                                f"{name!r}: say what None means there with cpu_none=")
            fills.append((i, ast.literal_eval(default)))
        return fills

    def check(self) -> None:
        """Check every implementation that can load here against the reference (the cpu entry point too when an
        explicit cpu function wraps it). Raises TypeError naming the mismatch."""
        C = _ext.cpp()
        if C is not None:
            self._checked_entry(C)
            if "cpu" not in self.impls:
                self.cpu_impl()
        if _backends.triton_import_error() is None:
            self._load_triton()

    def _load_triton(self) -> Impl | None:
        if not self._triton_loaded:
            importlib.import_module(self.triton_module)  # registers @FAMILY.impl("triton")
            self._triton_loaded = True
        return self.impls.get("triton")

    def _impl(self, backend: str) -> Impl | None:
        if backend == "cpu":
            return self.cpu_impl()
        if backend == "triton":
            return self._load_triton()
        return self.impls.get(backend)

    # ---- selection -------------------------------------------------------------------------------------------
    def select(self, device: torch.device, dtype: torch.dtype, *args: object) -> Impl:
        """The implementation for a call on ``device`` / ``dtype``; ``args`` go to the ``supports`` checks."""
        req = _backends.requested()
        key = (req, device.type, dtype, _backends.env("TRITON_INTERPRET"))
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
                return self.reference
            raise _backends.BackendError(f"omni::{self.name}: backend '{backend}' cannot run this call: {reason}")
        for backend in _backends.default_order(device):
            if self._reason(backend, device, dtype, args) is None:
                return self.impls[backend]
        return self.reference

    def backend_for(self, device: torch.device, dtype: torch.dtype, *args: object) -> str:
        impl = self.select(device, dtype, *args)
        return next(name for name, fn in self.impls.items() if fn is impl)

    def _reason(self, backend: str, device: torch.device, dtype: torch.dtype, args: tuple) -> str | None:
        reason = _backends.generic_reason(backend, device, dtype)
        if reason is not None:
            return reason
        if self._impl(backend) is None:
            return "not implemented for this op"
        check = self.supports.get(backend)
        return check(*args) if check is not None and args else None


def pybind_params(fn: Any) -> list[tuple[str, str | None]]:
    """(name, default or None) of every parameter of a pybind11 function, from its signature line."""
    line = (fn.__doc__ or "").split("\n", 1)[0]
    start, end = line.find("("), line.rfind(") ->")
    if start < 0 or end < start:
        raise TypeError(f"{line!r}: not a pybind11 signature line")
    out = []
    for part in _split_top_level(line[start + 1:end]):
        name, _, rest = part.partition(":")
        _, eq, default = rest.partition(" = ")
        out.append((name.strip(), default.strip() if eq else None))
    return out


def _split_top_level(s: str) -> list[str]:
    """``s`` split at the commas outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in s:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts
