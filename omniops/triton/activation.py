"""SiLU-and-mul in Triton. Launcher: ``silu_and_mul_forward``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniops.ops.activation import SILU_AND_MUL
from omniops.triton._grid import persistent_grid, row_block


@triton.jit
def _silu_and_mul_fwd_kernel(X, Y, x_stride, y_stride, n_rows, d, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_col_blocks = tl.cdiv(d, BLOCK)
    for tile in range(pid, n_rows * n_col_blocks, nprog):
        row, c = row_block(tile, n_col_blocks, BLOCK)
        mask = c < d
        g = tl.load(X + row * x_stride + c, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + row * x_stride + d + c, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(Y + row * y_stride + c, y.to(Y.dtype.element_ty), mask=mask)


@SILU_AND_MUL.impl("triton")
def silu_and_mul_forward(out: torch.Tensor, x: torch.Tensor) -> None:
    """x: [rows, 2d], out: [rows, d], unit inner strides."""
    rows, d = out.shape
    if rows == 0 or d == 0:
        return
    block = min(triton.next_power_of_2(d), 2048)
    tiles = rows * triton.cdiv(d, block)
    _silu_and_mul_fwd_kernel[persistent_grid(tiles, x.device)](
        x, out, x.stride(0), out.stride(0), rows, d, BLOCK=block, num_warps=4
    )
