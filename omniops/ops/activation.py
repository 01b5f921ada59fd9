"""SiLU-and-mul (SwiGLU gate): ``silu(x[..., :d]) * x[..., d:]``.

Public API: ``silu_and_mul(x, *, out=None)``. Custom ops: ``omni::silu_and_mul``, ``omni::silu_and_mul_out``.
Kernels: ``ascendc/kernels/activation/silu_and_mul.h`` (cpu), ``omniops/triton/activation.py``;
oracle ``omniops/reference/activation.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omniops._family import OpFamily
from omniops._registry import call, omni_op
from omniops._validation import FLOAT_DTYPES, check_no_overlap, check_same, check_shape, check_tensor, rows_view
from omniops.ops._layout import as_rows
from omniops.reference import activation as ref


def _silu_and_mul_reference(out: Tensor, x: Tensor) -> None:
    """x [rows, 2d] -> out [rows, d] (the backends' form: unit inner strides)."""
    out.copy_(ref.silu_and_mul(x))


SILU_AND_MUL = OpFamily("silu_and_mul", _silu_and_mul_reference)


def _validate(x: Tensor) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    if x.shape[-1] % 2:
        raise ValueError(f"x: the last dimension must be even (gate and up halves), got shape {list(x.shape)}")


def _out_shape(x: Tensor) -> list[int]:
    return [*x.shape[:-1], x.shape[-1] // 2]


def _run(out: Tensor, x: Tensor) -> None:
    if out.numel() == 0:
        return
    impl = SILU_AND_MUL.select(x.device, x.dtype)
    o2 = rows_view(out)
    if impl is not SILU_AND_MUL.cpu_impl() or o2 is None:  # the C++ entry point applies the overlap rule itself
        check_no_overlap((("out", out),), (("x", x),))
    if o2 is None:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        _run(tmp, x)
        out.copy_(tmp)
        return
    impl(o2, as_rows(x))


def _fake(x: Tensor) -> Tensor:
    _validate(x)
    return x.new_empty(_out_shape(x))


@omni_op("silu_and_mul", fake=_fake)
def _silu_and_mul_op(x: Tensor) -> Tensor:
    _validate(x)
    out = x.new_empty(_out_shape(x))
    _run(out, x)
    return out


def _fake_out(out: Tensor, x: Tensor) -> None:
    _validate(x)
    check_tensor("out", out)
    check_same("out", out, "x", x)
    check_shape("out", out, _out_shape(x), "x's shape with the last dimension halved")


@omni_op("silu_and_mul_out", mutates_args=("out",), fake=_fake_out)
def _silu_and_mul_out_op(out: Tensor, x: Tensor) -> None:
    _fake_out(out, x)
    _run(out, x)


def silu_and_mul(x: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]`` (fp32 math, one rounding). Returns ``[..., d]``.

    ``out``: optional preallocated ``[..., d]`` output (must not overlap x).
    """
    if out is None:
        return call(_silu_and_mul_op, x)
    call(_silu_and_mul_out_op, out, x)
    return out
