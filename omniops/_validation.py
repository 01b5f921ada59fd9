"""Argument checks shared by every op: one place, clear messages naming the argument.

Checks here look only at metadata (dtype, device, shape, strides), so they also run on FakeTensors at trace
time. Checks that read values (positions, block tables) live with their op and are skipped on fake tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    dim: int | Sequence[int] | None = None,
    min_dim: int | None = None,
) -> torch.Tensor:
    # Called on every op call: the success path does no allocation; messages are built only on failure.
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    if dim is not None:
        ndim = t.dim()
        if ndim != dim if isinstance(dim, int) else ndim not in dim:
            dims = (dim,) if isinstance(dim, int) else tuple(dim)
            raise ValueError(f"{name}: expected a {' or '.join(map(str, dims))}-D tensor, got shape {list(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {list(t.shape)}")
    return t


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(
            f"{name}: expected dtype {str(ref.dtype).removeprefix('torch.')} (as {ref_name}), "
            f"got {str(t.dtype).removeprefix('torch.')}"
        )


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {list(expected)}{hint}, got {list(t.shape)}")


def is_fake(t: torch.Tensor) -> bool:
    """True for FakeTensors / meta tensors, whose values cannot be read."""
    return t.device.type == "meta" or type(t) is not torch.Tensor


def rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a [rows, last] view with unit inner stride (no copy), or None if its layout does not allow it."""
    if t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1):
        return t
    if t.dim() == 0:
        return None
    if t.is_contiguous():  # the common case, without the stride walk below
        return t.view(-1, t.shape[-1]) if t.numel() else t.reshape(-1, t.shape[-1])
    last = t.shape[-1]
    if t.dim() == 1:
        return t.unsqueeze(0) if (last <= 1 or t.stride(-1) == 1) else None
    if last > 1 and t.stride(-1) != 1:
        return None
    # Leading dims must collapse into one with a single row stride.
    row_stride = None
    expected = None
    for size, stride in reversed(list(zip(t.shape[:-1], t.stride()[:-1], strict=True))):
        if size == 1:
            continue
        if expected is None:
            row_stride = stride
            expected = stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    rows = math.prod(t.shape[:-1])
    return t.as_strided((rows, last), (row_stride if row_stride is not None else last, 1))
