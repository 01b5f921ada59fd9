"""RMSNorm and fused residual-add + RMSNorm.

Public API: ``rms_norm`` (functional, optional ``out=``) and ``rms_norm_`` (in place, vLLM's
``fused_add_rms_norm`` semantics). Custom ops: ``omni::rms_norm``, ``omni::fused_add_rms_norm``,
``omni::rms_norm_out``, ``omni::rms_norm_``, ``omni::fused_add_rms_norm_``.
Kernels: ``ascendc/kernels/norm/rms_norm.h`` (cpu), ``omniops/triton/norm.py``; oracle ``omniops/reference/norm.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from omniops._family import OpFamily
from omniops._registry import call, fast_cpu, omni_op
from omniops._validation import (
    FLOAT_DTYPES,
    check_float,
    check_no_overlap,
    check_same,
    check_shape,
    check_tensor,
    rows_view,
)
from omniops.ops._layout import as_rows
from omniops.reference import norm as ref


def _rms_norm_reference(out: Tensor, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None,
                        residual_out: Tensor | None) -> None:
    """The backends' form, on [rows, hidden] views; out and residual_out may be x and residual (in place)."""
    if residual is None:
        out.copy_(ref.rms_norm(x, weight, eps))
    else:
        y, s = ref.rms_norm(x, weight, eps, residual)
        residual_out.copy_(s)
        out.copy_(y)


RMS_NORM = OpFamily("rms_norm", _rms_norm_reference)


# ---- validation (metadata only: runs on fake tensors too) ---------------------------------------------------
def _validate(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor("weight", weight, dim=1)
    check_same("weight", weight, "x", x)
    hidden = x.shape[-1]
    check_shape("weight", weight, (hidden,), "the last dimension of x")
    if hidden == 0 and x.numel() == 0 and math.prod(x.shape[:-1]) > 0:
        raise ValueError("x: the hidden (last) dimension must be > 0")
    check_float("eps", eps, lo=0.0)
    if residual is not None:
        check_tensor("residual", residual)
        check_same("residual", residual, "x", x)
        check_shape("residual", residual, tuple(x.shape), "as x")


def _run(out: Tensor, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
         residual_out: Tensor | None = None) -> None:
    """Run the selected backend writing into ``out`` (and ``residual_out``), which may alias x/residual."""
    if x.numel() == 0:
        return
    impl = RMS_NORM.select(x.device, x.dtype)
    o2, ro2 = rows_view(out), (rows_view(residual_out) if residual_out is not None else None)
    if impl is not RMS_NORM.cpu_impl() or o2 is None or (residual_out is not None and ro2 is None):
        # The C++ entry point applies the overlap rule itself; other paths (and copies made here) apply it here.
        check_no_overlap((("out", out), ("residual_out", residual_out)),
                         (("x", x), ("weight", weight), ("residual", residual)),
                         (("out", "x"), ("residual_out", "residual")))
    if o2 is None or (residual_out is not None and ro2 is None):
        # Output layout the kernels cannot write (e.g. a transposed view): compute, then copy.
        tmp = torch.empty_like(x, memory_format=torch.contiguous_format)
        tmp_r = torch.empty_like(tmp) if residual_out is not None else None
        _run(tmp, x, weight, eps, residual, tmp_r)
        if tmp_r is not None:
            residual_out.copy_(tmp_r)
        out.copy_(tmp)
        return
    impl(o2, as_rows(x), weight.contiguous(), float(eps), as_rows(residual) if residual is not None else None, ro2)


# ---- custom ops -----------------------------------------------------------------------------------------------
def _fake_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _validate(x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@omni_op("rms_norm", fake=_fake_rms_norm)
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _validate(x, weight, eps)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _run(out, x, weight, eps)
    return out


def _fake_fused_add(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _validate(x, weight, eps, residual)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@omni_op("fused_add_rms_norm", fake=_fake_fused_add)
def _fused_add_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _validate(x, weight, eps, residual)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    new_res = torch.empty_like(out)
    _run(out, x, weight, eps, residual, new_res)
    return out, new_res


def _check_out(out: Tensor, x: Tensor) -> None:
    check_tensor("out", out)
    check_same("out", out, "x", x)
    check_shape("out", out, tuple(x.shape), "as x")


def _fake_rms_norm_out(out: Tensor, x: Tensor, weight: Tensor, eps: float) -> None:
    _validate(x, weight, eps)
    _check_out(out, x)


@omni_op("rms_norm_out", mutates_args=("out",), fake=_fake_rms_norm_out)
def _rms_norm_out_op(out: Tensor, x: Tensor, weight: Tensor, eps: float) -> None:
    _fake_rms_norm_out(out, x, weight, eps)
    _run(out, x, weight, eps)


def _fake_rms_norm_inplace(x: Tensor, weight: Tensor, eps: float) -> None:
    _validate(x, weight, eps)


@omni_op("rms_norm_", mutates_args=("x",), fake=_fake_rms_norm_inplace)
def _rms_norm_inplace_op(x: Tensor, weight: Tensor, eps: float) -> None:
    _validate(x, weight, eps)
    check_no_overlap((("x", x),), (("weight", weight),))  # in the public names (C++ would say out)
    _run(x, x, weight, eps)


def _fake_fused_add_inplace(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> None:
    _validate(x, weight, eps, residual)


@omni_op("fused_add_rms_norm_", mutates_args=("x", "residual"), fake=_fake_fused_add_inplace)
def _fused_add_inplace_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> None:
    _validate(x, weight, eps, residual)
    check_no_overlap((("x", x), ("residual", residual)), (("weight", weight),))  # (C++: out, residual_out)
    _run(x, x, weight, eps, residual, residual)


# ---- public API ---------------------------------------------------------------------------------------------
def rms_norm(
    x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None, *, out: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dimension, fp32 statistics: ``weight * T(x / rms(x))``.

    Args:
        x: ``[..., hidden]`` float32/float16/bfloat16, any leading shape, any strides.
        weight: ``[hidden]``, same dtype and device as x.
        eps: added to the mean square.
        residual: optional ``[..., hidden]``; then ``s = x + residual`` (in x's dtype) is normalised and
            ``(normed, s)`` is returned — the fused add + norm of pre-norm decoder layers.
        out: optional preallocated output for the normed tensor (no residual only).
    """
    C = fast_cpu(x, weight, residual, out)
    if C is not None and isinstance(x, Tensor) and x.dim() == 2:
        # The common eager call: straight to C++, which checks everything (see _registry.fast_cpu).
        try:
            if residual is None:
                o = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
                C.rms_norm(o, x, weight, eps, None, None)
                return o
            if out is None:
                o, s = torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
                    x, memory_format=torch.contiguous_format)
                C.rms_norm(o, x, weight, eps, residual, s)
                return o, s
        except (ValueError, TypeError, RuntimeError):
            pass  # the checked path below raises the error of this input (RuntimeError: an impossible output size)
    elif C is not None and isinstance(x, Tensor) and x.dim() > 2 and residual is None and out is None:
        # Qwen3's per-head q / k norms ([tokens, heads, head_dim], often a view into the fused qkv output): the
        # same kernel over the rows of a contiguous copy (the checked path copies too, after ~100 us of checks)
        try:
            xc = x.contiguous()
            o = torch.empty_like(xc)
            C.rms_norm(o.view(-1, x.shape[-1]), xc.view(-1, x.shape[-1]), weight, eps, None, None)
            return o
        except (ValueError, TypeError, RuntimeError):
            pass
    if residual is None:
        if out is None:
            return call(_rms_norm_op, x, weight, eps)
        call(_rms_norm_out_op, out, x, weight, eps)
        return out
    if out is not None:
        raise ValueError("out: not supported together with residual; use rms_norm_(x, weight, eps, residual)")
    return call(_fused_add_op, x, residual, weight, eps)


def rms_norm_(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None) -> Tensor:
    """In-place RMSNorm: ``x <- rms_norm(x)``; with ``residual``: ``residual <- x + residual`` and
    ``x <- rms_norm(x + residual)`` (vLLM's ``fused_add_rms_norm``). Returns x. Saves the allocation and
    the page faults of fresh outputs; at large sizes this is the fastest form."""
    C = fast_cpu(x, weight, residual)
    if C is not None and isinstance(x, Tensor) and x.dim() == 2:
        try:
            C.rms_norm(x, x, weight, eps, residual, residual)
            return x
        except (ValueError, TypeError):
            pass
    if residual is None:
        call(_rms_norm_inplace_op, x, weight, eps)
    else:
        call(_fused_add_inplace_op, x, residual, weight, eps)
    return x
