"""RMSNorm / fused add + RMSNorm in Triton. Launcher: ``rms_norm_forward`` (the backend's "out" form)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniops.ops.norm import RMS_NORM
from omniops.triton._grid import persistent_grid

_MAX_BLOCK = 8192  # one row in registers up to this size; longer rows take two passes


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, RO,
    x_stride, r_stride, y_stride, ro_stride,
    n_rows, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    for row in range(pid, n_rows, nprog):
        x_row = X + row * x_stride
        y_row = Y + row * y_stride
        if SINGLE_PASS:
            mask = cols < hidden
            x = tl.load(x_row + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(R + row * r_stride + cols, mask=mask, other=0.0)
                s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # residual stream stays in x's dtype
                tl.store(RO + row * ro_stride + cols, s, mask=mask)
                xf = s.to(tl.float32)
            else:
                xf = x.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
            w = tl.load(W + cols, mask=mask, other=0.0)
            y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for c0 in range(0, hidden, BLOCK):
                mask = c0 + cols < hidden
                x = tl.load(x_row + c0 + cols, mask=mask, other=0.0)
                if HAS_RESIDUAL:
                    r = tl.load(R + row * r_stride + c0 + cols, mask=mask, other=0.0)
                    s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
                    tl.store(RO + row * ro_stride + c0 + cols, s, mask=mask)
                    xf = s.to(tl.float32)
                else:
                    xf = x.to(tl.float32)
                acc += xf * xf
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / hidden + eps)
            for c0 in range(0, hidden, BLOCK):
                mask = c0 + cols < hidden
                if HAS_RESIDUAL:
                    x = tl.load(RO + row * ro_stride + c0 + cols, mask=mask, other=0.0)
                else:
                    x = tl.load(x_row + c0 + cols, mask=mask, other=0.0)
                w = tl.load(W + c0 + cols, mask=mask, other=0.0)
                y = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
                tl.store(y_row + c0 + cols, y.to(Y.dtype.element_ty), mask=mask)


@RMS_NORM.impl("triton")
def rms_norm_forward(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None, residual_out: torch.Tensor | None) -> None:
    """x, residual, out, residual_out: [rows, hidden] with unit inner stride; out may be x (in place)."""
    rows, hidden = x.shape
    if rows == 0:
        return
    block = min(triton.next_power_of_2(hidden), _MAX_BLOCK)
    has_res = residual is not None
    r = residual if has_res else x
    ro = residual_out if has_res else out
    _rms_norm_fwd_kernel[persistent_grid(rows, x.device)](
        x, r, weight, out, ro,
        x.stride(0), r.stride(0), out.stride(0), ro.stride(0),
        rows, hidden, eps,
        HAS_RESIDUAL=has_res, BLOCK=block, SINGLE_PASS=block >= hidden,
        num_warps=4 if block <= 2048 else 8,
    )
