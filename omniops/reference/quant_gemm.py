"""Quantized GEMM oracles: dequantize, then multiply (int8: exact int64 accumulation).

All take 2-D operands ``x [M, K]`` and weights in nn.Linear layout ``[N, K]``; ``out = x @ w.T + bias``.
The float epilogue order (``acc * x_scale * w_scale + bias`` in fp32, one rounding to the output dtype)
is the one every backend follows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omniops.quant.formats import (
    dequantize_activation_fp8_group,
    dequantize_fp8_block,
    dequantize_int4_group,
    quantize_activation_fp8_group,
    quantize_per_token_int8_torch,
)


def w8a8_accumulate(x_q: Tensor, w_q: Tensor) -> Tensor:
    """Exact integer dot products: int64 [M, N]."""
    return x_q.to(torch.int64) @ w_q.to(torch.int64).t()


def w8a8_gemm(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
              out_dtype: torch.dtype) -> Tensor:
    """x_scale [M] or [M, 1], w_scale [N]; out_dtype int32 returns the raw accumulators (scales ignored)."""
    acc = w8a8_accumulate(x_q, w_q)
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    y = acc.float() * x_scale.reshape(-1, 1).float() * w_scale.reshape(1, -1).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def w4a16_gemm(x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
               bias: Tensor | None) -> Tensor:
    w = dequantize_int4_group(w_packed, scales, zeros, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_block_gemm(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                   out_dtype: torch.dtype) -> Tensor:
    x = dequantize_activation_fp8_group(x_q, x_scale)
    w = dequantize_fp8_block(w_q, w_scale)
    y = x @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---- fused linears: quantize the float activation, then the GEMM above (the two-step arithmetic, one call) ----
def w8a8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """x float [M, K]: per-token int8 quantization (amax / 127, round half to even), then ``w8a8_gemm``."""
    x_q, x_scale = quantize_per_token_int8_torch(x)
    return w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def fp8_block_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                     out_dtype: torch.dtype) -> Tensor:
    """x float [M, K]: per-token per-128 fp8 quantization, then ``fp8_block_gemm``."""
    x_q, x_scale = quantize_activation_fp8_group(x)
    return fp8_block_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
