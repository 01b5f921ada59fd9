"""Registering omni ops with torch.library, and calling them.

``omni_op`` registers a Python function as the custom op ``omni::<name>`` (schema inferred from its type
hints) with a fake impl, so Dynamo traces it as one node and ``torch.library.opcheck`` can test it.

``call`` is how the public functions invoke an op. A custom-op call costs ~20-30 us of dispatcher and
Python overhead on CPU; in plain eager mode (no tracing, no torch dispatch or function modes, plain tensors)
``call`` runs the same implementation directly, so small decode-sized calls are not dominated by overhead.
Under torch.compile, FakeTensor or any mode it goes through ``torch.ops.omni.<name>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

_TENSOR = torch.Tensor
_DIRECT: dict[int, Callable[..., Any]] = {}  # id(custom op) -> its Python implementation


def omni_op(name: str, *, mutates_args: Sequence[str] = (), fake: Callable[..., Any] | None = None):
    """Decorator: register ``fn`` as ``omni::<name>``. Returns the CustomOpDef."""

    def deco(fn: Callable[..., Any]):
        op = torch.library.custom_op(f"omni::{name}", mutates_args=tuple(mutates_args))(fn)
        if fake is not None:
            op.register_fake(fake)
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


def call(op: Any, *args: Any) -> Any:
    """Run custom op ``op`` on ``args``: its Python implementation directly in plain eager mode, else
    through the dispatcher (``torch.ops.omni.<name>``)."""
    if eager_direct(args):
        return _DIRECT[id(op)](*args)
    return op(*args)
