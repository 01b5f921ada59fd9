"""The layouts the kernels take, and the views (or copies) that give them: one place for every op family."""

from __future__ import annotations

import torch
from torch import Tensor

from omniops._validation import rows_view


def as_rows(t: Tensor) -> Tensor:
    """``t [..., K]`` as ``[rows, K]`` with a unit inner stride: a view when the layout allows, else a copy."""
    v = rows_view(t)
    return v if v is not None else t.reshape(-1, t.shape[-1]).contiguous()


def inner_contiguous(t: Tensor) -> Tensor:
    """``t`` with a unit stride in its last dim (all the attention kernels need): itself or a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def as_int32(t: Tensor) -> Tensor:
    """An index tensor as contiguous int32 (what the kernels index with; int64 ids are accepted everywhere)."""
    return t.to(torch.int32).contiguous()
