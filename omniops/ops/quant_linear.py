"""Fused quantize-activation + GEMM: ``w8a8_linear`` (int8 per token) and ``fp8_block_linear`` (fp8 per token per 128).

Public API: ``w8a8_linear``, ``fp8_block_linear``; custom ops ``omni::w8a8_linear``, ``omni::fp8_block_linear``.
They take the float activation and quantize it inside the same call, with exactly the arithmetic of the two-step
``quantize_activation_*`` + GEMM path of ``omniops/ops/quant_gemm.py`` (same codes, same scales, same GEMM, whose
weight checks and epilogue they share). Kernels: ``ascendc/kernels/quant_gemm/`` (cpu),
``omniops/triton/quant_linear.py``; oracle ``omniops/reference/quant_gemm.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from omniops import _ext
from omniops._family import OpFamily
from omniops._registry import call, omni_op
from omniops._validation import FLOAT_DTYPES, check_tensor
from omniops.ops.prepack import i8_tiles
from omniops.ops.quant_gemm import (
    check_bias,
    check_float_out,
    check_fp8_weight,
    check_int8_weight,
    gemm_out,
    run_gemm,
)
from omniops.reference import quant_gemm as ref


# ---- families: the reference in the backends' form (out [M, N], x rows with unit inner stride) ----------------
def _w8a8_linear_reference(out: Tensor, x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> None:
    out.copy_(ref.w8a8_linear(x, w_q, w_scale, bias, out.dtype))


def _fp8_block_linear_reference(out: Tensor, x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> None:
    out.copy_(ref.fp8_block_linear(x, w_q, w_scale, bias, out.dtype))


W8A8_LINEAR = OpFamily("w8a8_linear", _w8a8_linear_reference)
FP8_BLOCK_LINEAR = OpFamily("fp8_block_linear", _fp8_block_linear_reference)


@W8A8_LINEAR.impl("cpu")
def _w8a8_linear_cpu(out: Tensor, x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> None:
    # amx library: AMX-INT8 on the weight's cached tile copy (packed on first use)
    _ext.cpp().w8a8_linear(out, x, w_q, w_scale, bias, i8_tiles(w_q))


# ---- validation (metadata only) and custom ops ---------------------------------------------------------------
def _validate_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
                     fp8: bool) -> None:
    """The fused linears: float x [..., K]; the weight operands and bias as in the two-step GEMM."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    n = (check_fp8_weight if fp8 else check_int8_weight)(w_q, w_scale, x, x.shape[-1], "x")
    check_float_out(out_dtype)
    check_bias(bias, n, out_dtype, w_q)


def _linear_fake(fp8: bool) -> Callable[..., Tensor]:
    """The fake of the fused linear (fp8 or int8 weights): the empty ``[..., N]`` output."""

    def fake(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
        _validate_linear(x, w_q, w_scale, bias, out_dtype, fp8)
        return gemm_out(x, w_q.shape[0], out_dtype)

    return fake


@omni_op("w8a8_linear", fake=_linear_fake(fp8=False))
def _w8a8_linear_op(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    _validate_linear(x, w_q, w_scale, bias, out_dtype, fp8=False)
    return run_gemm(W8A8_LINEAR, x, w_q.shape[0], out_dtype, x.dtype, bias, w_q, w_scale.reshape(-1))


@omni_op("fp8_block_linear", fake=_linear_fake(fp8=True))
def _fp8_linear_op(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    _validate_linear(x, w_q, w_scale, bias, out_dtype, fp8=True)
    return run_gemm(FP8_BLOCK_LINEAR, x, w_q.shape[0], out_dtype, x.dtype, bias, w_q, w_scale)


# ---- public API -------------------------------------------------------------------------------------------
def _out_dtype(x: Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    return x.dtype


def w8a8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> Tensor:
    """``w8a8_gemm(*quantize_activation_per_token_int8(x), w_q, w_scale, bias, out_dtype)`` in one call.

    Args:
        x: float32/float16/bfloat16 ``[..., K]`` (K <= 131071), quantized per token inside the op (symmetric
            int8, ``scale = amax / 127``, round half to even) - the same codes and scales as the helper.
        w_q: int8 ``[N, K]``; w_scale: float32 ``[N]`` or ``[N, 1]`` (``Int8ChannelWeight``).
        bias: optional ``[N]`` in ``out_dtype``.
        out_dtype: float32 / float16 / bfloat16; None (default): x's dtype (what ``QuantLinear`` returns).
    Returns ``[..., N]``, equal to the two-step path on the same backend.
    """
    return call(_w8a8_linear_op, x, w_q, w_scale, bias, _out_dtype(x, out_dtype))


def fp8_block_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> Tensor:
    """``fp8_block_gemm(*quantize_activation_fp8_group(x), w_q, w_scale, bias, out_dtype)`` in one call.

    Args:
        x: float32/float16/bfloat16 ``[..., K]``, quantized per token per 128 of K inside the op
            (``scale = amax / 448``, e4m3 round to nearest even) - the same codes and scales as the helper.
        w_q: float8_e4m3fn ``[N, K]``; w_scale: float32 ``[ceil(N/128), ceil(K/128)]`` (``weight_scale_inv``).
        bias: optional ``[N]`` in ``out_dtype``.
        out_dtype: float32 / float16 / bfloat16; None (default): x's dtype.
    Returns ``[..., N]``, equal to the two-step path on the same backend.
    """
    return call(_fp8_linear_op, x, w_q, w_scale, bias, _out_dtype(x, out_dtype))
