"""Registering omni ops with torch.library, and calling them.

``omni_op`` defines ``omni::<name>`` (schema inferred from the function's type hints, as ``custom_op`` does)
with the function as its kernel for every device and a fake impl, so Dynamo traces it as one node and
``torch.library.opcheck`` can test it. The function picks its backend itself (``omniops._family.OpFamily``).

Why ``Library.define`` + a ``CompositeExplicitAutograd`` kernel rather than ``torch.library.custom_op``: the
ops are for inference, and custom_op's autograd / version-counter wrapper costs 15-40 us per call through the
dispatcher on this CPU (measured with 3 tensor arguments), against ~2 us for a plain kernel registration —
and compiled graphs call every omni op through the dispatcher. There is no autograd formula: through the
public functions a forward on inputs that require grad runs and its backward raises (as with ``custom_op``);
``torch.ops.omni.<name>`` itself refuses such inputs.

``call`` is how the public functions invoke an op: in plain eager mode (no tracing, no torch dispatch or
function modes, plain tensors) it runs the implementation directly; under torch.compile, FakeTensor or any
mode it goes through ``torch.ops.omni.<name>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

_TENSOR = torch.Tensor
_DIRECT: dict[int, Callable[..., Any]] = {}  # id(op overload) -> its Python implementation
_LIB = torch.library.Library("omni", "DEF")


def omni_op(name: str, *, mutates_args: Sequence[str] = (), fake: Callable[..., Any] | None = None):
    """Decorator: define ``omni::<name>`` with ``fn`` as its kernel. Returns the op (an OpOverload)."""

    def deco(fn: Callable[..., Any]):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=tuple(mutates_args)))

        def kernel(*args: Any, **kwargs: Any) -> Any:
            # Without an autograd formula the dispatcher would return outputs whose backward gives no gradient
            # (a warning, not an error): refuse instead.
            if _needs_grad(args):
                raise RuntimeError(f"omni::{name} is an inference op without an autograd formula: call it under "
                                   "torch.no_grad() / torch.inference_mode(), on detached tensors, or through "
                                   f"omniops.{name.rstrip('_')} (whose backward raises)")
            return fn(*args, **kwargs)

        _LIB.impl(name, kernel, "CompositeExplicitAutograd")
        if fake is not None:
            torch.library.register_fake(f"omni::{name}", fake, lib=_LIB)
        op = getattr(torch.ops.omni, name).default
        _DIRECT[id(op)] = fn
        return op

    return deco


def _plain(args: tuple) -> bool:
    for a in args:
        if isinstance(a, _TENSOR) and (type(a) is not _TENSOR or a.requires_grad):
            return False
    return True


def eager_direct(args: tuple) -> bool:
    """True when calling the implementation directly is indistinguishable from the custom op."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and _plain(args)
    )


class _NoBackward(torch.autograd.Function):
    """An omni op on inputs that require grad: the forward runs (grad is off inside), a backward raises — what
    ``custom_op`` without ``register_autograd`` does."""

    @staticmethod
    def forward(ctx: Any, op: Any, *args: Any) -> Any:
        ctx.name = str(op)
        return op(*args)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(f"{ctx.name}: omni ops are inference ops without an autograd formula")


def _needs_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, _TENSOR) and a.requires_grad for a in args)


def fast_cpu(*tensors: Any) -> Any:
    """omniops._C when a public function may call its C++ entry point straight away: plain eager mode, every
    tensor argument (None allowed) a plain CPU tensor without grad, and no backend other than ``cpu`` requested.
    The C++ entry points check every shape, dtype, stride and index themselves, so callers skip the Python
    validation and backend selection (~10-20 us of a decode-sized call) and, when the C++ checks raise, fall back
    to the checked path, which raises its own error for the same input. None otherwise."""
    from omniops import _backends, _ext

    C = _ext.cpp()
    if (C is None or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return None
    for t in tensors:
        if t is not None and (type(t) is not _TENSOR or t.requires_grad or not t.is_cpu):
            return None
    req = _backends.requested()
    if req is not None and req[0] != "cpu":
        return None
    return C


def call(op: Any, *args: Any) -> Any:
    """Run op ``op`` on ``args``: its Python implementation directly in plain eager mode, else through the
    dispatcher (``torch.ops.omni.<name>``)."""
    if eager_direct(args):
        return _DIRECT[id(op)](*args)
    if _needs_grad(args) and not torch.compiler.is_compiling() and not op._schema.is_mutable:
        return _NoBackward.apply(op, *args)
    return op(*args)
