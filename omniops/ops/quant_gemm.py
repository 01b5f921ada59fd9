"""Quantized GEMMs: W8A8 int8 (per-channel x per-token), W4A16 int4 (group-wise), FP8 block-scaled (DeepSeek-V3).

Public API: ``w8a8_gemm``, ``w4a16_gemm``, ``fp8_block_gemm`` (``out = x @ dequant(w).T + bias``, weights in
nn.Linear layout [N, K]; layouts documented in ``omniops/quant/formats.py``). Custom ops: ``omni::w8a8_gemm``,
``omni::w4a16_gemm``, ``omni::fp8_block_gemm``. The fused linears (float activations quantized inside the call)
are ``omniops/ops/quant_linear.py``; they share the weight checks and ``run_gemm`` below.
Kernels: ``ascendc/kernels/quant_gemm/`` (cpu), ``omniops/triton/quant_gemm.py``; oracle
``omniops/reference/quant_gemm.py``.

Epilogue (every backend): ``y = float(acc) * x_scale[m] * w_scale[n] + bias[n]`` in fp32, rounded once to the
output dtype. ``w8a8_gemm(..., out_dtype=torch.int32)`` returns the raw int32 accumulators (exact; scales are
validated but not applied; no bias) - the debug path the exactness tests use.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from omniops import _ext
from omniops._family import OpFamily
from omniops._registry import call, omni_op
from omniops._validation import FLOAT_DTYPES, check_same, check_shape, check_tensor, check_values
from omniops.ops._layout import as_rows
from omniops.ops.prepack import i8_tiles
from omniops.quant.formats import FP8_BLOCK, INT4_GROUP_SIZES, INT8_MAX_K
from omniops.reference import quant_gemm as ref

W8A8_OUT_DTYPES = (*FLOAT_DTYPES, torch.int32)


# ---- families: the reference in the backends' form (out [M, N], x rows with unit inner stride) ----------------
def _w8a8_reference(out: Tensor, x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                    bias: Tensor | None) -> None:
    out.copy_(ref.w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, out.dtype))


def _w4a16_reference(out: Tensor, x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Tensor | None,
                     group_size: int, bias: Tensor | None) -> None:
    out.copy_(ref.w4a16_gemm(x, w_packed, scales, zeros, group_size, bias))


def _fp8_block_gemm_reference(out: Tensor, x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                              bias: Tensor | None) -> None:
    out.copy_(ref.fp8_block_gemm(x_q, x_scale, w_q, w_scale, bias, out.dtype))


W8A8 = OpFamily("w8a8_gemm", _w8a8_reference)
W4A16 = OpFamily("w4a16_gemm", _w4a16_reference)
FP8_BLOCK_GEMM = OpFamily("fp8_block_gemm", _fp8_block_gemm_reference)


@W8A8.impl("cpu")
def _w8a8_cpu(out: Tensor, x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> None:
    # amx library: AMX-INT8 on the weight's cached tile copy (packed on first use)
    _ext.cpp().w8a8_gemm(out, x_q, x_scale, w_q, w_scale, bias, i8_tiles(w_q))


# ---- validation (metadata only) ---------------------------------------------------------------------------
def check_bias(bias: Tensor | None, n: int, dtype: torch.dtype, ref_t: Tensor) -> None:
    """None, or ``bias [n]`` in the output dtype on the weight's device."""
    if bias is None:
        return
    check_tensor("bias", bias, dim=1)
    check_same("bias", bias, "w", ref_t, dtype=False)
    if bias.dtype != dtype:
        raise TypeError(f"bias: expected dtype {str(dtype).removeprefix('torch.')} (the output dtype), "
                        f"got {str(bias.dtype).removeprefix('torch.')}")
    check_shape("bias", bias, (n,), "N")


def _check_w(name: str, w: Tensor, dtype: torch.dtype, x: Tensor, k: int, what: str) -> int:
    check_tensor(name, w, dtypes=(dtype,), dim=2)
    check_same(name, w, "x", x, dtype=False)
    if w.shape[1] != k:
        raise ValueError(f"{name}: expected shape [N, {k}] ({what}), got {list(w.shape)}")
    return w.shape[0]


def check_int8_weight(w_q: Tensor, w_scale: Tensor, x: Tensor, k: int, x_name: str) -> int:
    """W8A8's weight operands: int8 ``w_q [N, K]`` and one fp32 scale per output channel. Returns N."""
    if k > INT8_MAX_K:
        raise ValueError(f"{x_name}: K={k} exceeds {INT8_MAX_K}, beyond which int32 accumulation can overflow")
    n = _check_w("w_q", w_q, torch.int8, x, k, f"K of {x_name}")
    check_tensor("w_scale", w_scale, dtypes=(torch.float32,))
    check_same("w_scale", w_scale, "w_q", w_q, dtype=False)
    if tuple(w_scale.shape) not in ((n,), (n, 1)):
        raise ValueError(f"w_scale: expected shape [{n}] (one scale per output channel), got {list(w_scale.shape)}")
    return n


def check_fp8_weight(w_q: Tensor, w_scale: Tensor, x: Tensor, k: int, x_name: str) -> int:
    """FP8 block's weight operands: e4m3 ``w_q [N, K]`` and fp32 scales per 128x128 block. Returns N."""
    n = _check_w("w_q", w_q, torch.float8_e4m3fn, x, k, f"K of {x_name}")
    check_tensor("w_scale", w_scale, dtypes=(torch.float32,), dim=2)
    check_same("w_scale", w_scale, "w_q", w_q, dtype=False)
    check_shape("w_scale", w_scale, (math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK)), "[ceil(N/128), ceil(K/128)]")
    return n


def check_float_out(out_dtype: torch.dtype) -> None:
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected float32, float16 or bfloat16, got {out_dtype}")


def _validate_w8a8(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                   out_dtype: torch.dtype) -> None:
    check_tensor("x_q", x_q, dtypes=(torch.int8,), min_dim=1)
    n = check_int8_weight(w_q, w_scale, x_q, x_q.shape[-1], "x_q")
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,))
    check_same("x_scale", x_scale, "x_q", x_q, dtype=False)
    lead = tuple(x_q.shape[:-1])
    if tuple(x_scale.shape) not in (lead, (*lead, 1)):
        raise ValueError(f"x_scale: expected shape {list(lead) + [1]} (one scale per token), got {list(x_scale.shape)}")
    if out_dtype not in W8A8_OUT_DTYPES:
        raise TypeError(f"out_dtype: expected float32, float16, bfloat16 or int32, got {out_dtype}")
    if out_dtype == torch.int32 and bias is not None:
        raise ValueError("bias: not supported with out_dtype=torch.int32 (the raw accumulators)")
    check_bias(bias, n, out_dtype, w_q)


def _validate_w4a16(x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                    bias: Tensor | None) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    k = x.shape[-1]
    if not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"x: K={k} must be a multiple of group_size={group_size}")
    check_tensor("w_packed", w_packed, dtypes=(torch.uint8,), dim=2)
    check_same("w_packed", w_packed, "x", x, dtype=False)
    if w_packed.shape[1] != k // 2:
        raise ValueError(f"w_packed: expected shape [N, {k // 2}] (two int4 values per byte, K={k}), "
                         f"got {list(w_packed.shape)}")
    n = w_packed.shape[0]
    check_tensor("scales", scales, dtypes=(torch.float32,), dim=2)
    check_same("scales", scales, "x", x, dtype=False)
    check_shape("scales", scales, (n, k // group_size), "[N, K // group_size]")
    if zeros is not None:
        check_tensor("zeros", zeros, dtypes=(torch.uint8,), dim=2)
        check_same("zeros", zeros, "x", x, dtype=False)
        check_shape("zeros", zeros, (n, k // group_size), "[N, K // group_size]")
    check_bias(bias, n, x.dtype, w_packed)


def _validate_fp8(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                  out_dtype: torch.dtype) -> None:
    check_tensor("x_q", x_q, dtypes=(torch.float8_e4m3fn,), min_dim=1)
    k = x_q.shape[-1]
    n = check_fp8_weight(w_q, w_scale, x_q, k, "x_q")
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,))
    check_same("x_scale", x_scale, "x_q", x_q, dtype=False)
    check_shape("x_scale", x_scale, (*x_q.shape[:-1], math.ceil(k / FP8_BLOCK)),
                "[..., ceil(K/128)]: per token per 128 of K")
    check_float_out(out_dtype)
    check_bias(bias, n, out_dtype, w_q)


def gemm_out(x: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """The output ``[..., n]`` of a GEMM on ``x [..., K]``."""
    return torch.empty(*x.shape[:-1], n, dtype=dtype, device=x.device)


def _finish_empty(out: Tensor, bias: Tensor | None) -> Tensor:
    """K == 0: the sum is empty."""
    out.zero_()
    if bias is not None:
        out += bias
    return out


def run_gemm(family: OpFamily, x: Tensor, n: int, out_dtype: torch.dtype, sel_dtype: torch.dtype, bias: Tensor | None,
         *operands: object) -> Tensor:
    """``out [..., n]`` = the selected backend of ``family`` on (out rows, x rows, *operands, bias), tensor
    operands made contiguous; the empty cases (no output, K == 0) without a kernel."""
    out = gemm_out(x, n, out_dtype)
    if out.numel() == 0:
        return out
    if x.shape[-1] == 0:
        return _finish_empty(out, bias)
    args = [out.view(-1, n), as_rows(x), *operands, bias]
    args[2:] = [a.contiguous() if isinstance(a, Tensor) else a for a in args[2:]]
    family.select(x.device, sel_dtype, *args)(*args)
    return out


# ---- custom ops -------------------------------------------------------------------------------------------
def _scaled_gemm_fake(validate: Callable[..., None]) -> Callable[..., Tensor]:
    """The fake of a GEMM on quantized operands ``(x_q, x_scale, w_q, w_scale, bias, out_dtype)`` that
    ``validate`` checks: the empty ``[..., N]`` output."""

    def fake(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
             out_dtype: torch.dtype) -> Tensor:
        validate(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        return gemm_out(x_q, w_q.shape[0], out_dtype)

    return fake


@omni_op("w8a8_gemm", fake=_scaled_gemm_fake(_validate_w8a8))
def _w8a8_op(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
             out_dtype: torch.dtype) -> Tensor:
    _validate_w8a8(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    sel_dtype = torch.float32 if out_dtype == torch.int32 else out_dtype
    return run_gemm(W8A8, x_q, w_q.shape[0], out_dtype, sel_dtype, bias, x_scale.reshape(-1), w_q, w_scale.reshape(-1))


def _fake_w4a16(x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                bias: Tensor | None) -> Tensor:
    _validate_w4a16(x, w_packed, scales, zeros, group_size, bias)
    return gemm_out(x, w_packed.shape[0], x.dtype)


@omni_op("w4a16_gemm", fake=_fake_w4a16)
def _w4a16_op(x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
              bias: Tensor | None) -> Tensor:
    _validate_w4a16(x, w_packed, scales, zeros, group_size, bias)
    if zeros is not None and W4A16.select(x.device, x.dtype) is not W4A16.cpu_impl():
        check_values("zeros", zeros, 0, 16)  # int4 zero-point codes (the C++ entry point checks them itself)
    return run_gemm(W4A16, x, w_packed.shape[0], x.dtype, x.dtype, bias, w_packed, scales, zeros,
                group_size)


@omni_op("fp8_block_gemm", fake=_scaled_gemm_fake(_validate_fp8))
def _fp8_op(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
            out_dtype: torch.dtype) -> Tensor:
    _validate_fp8(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    return run_gemm(FP8_BLOCK_GEMM, x_q, w_q.shape[0], out_dtype, out_dtype, bias,
                x_scale.reshape(-1, x_scale.shape[-1]), w_q, w_scale)


# ---- public API -------------------------------------------------------------------------------------------
def w8a8_gemm(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
              out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``(x_q @ w_q.T) * x_scale * w_scale.T + bias`` with exact int32 accumulation.

    Args:
        x_q: int8 ``[..., K]`` (K <= 131071), e.g. from ``quantize_activation_per_token_int8``.
        x_scale: float32 ``[..., 1]`` or ``[...]``, one scale per token.
        w_q: int8 ``[N, K]``; w_scale: float32 ``[N]`` or ``[N, 1]`` (``Int8ChannelWeight``).
        bias: optional ``[N]`` in ``out_dtype``.
        out_dtype: float32 / float16 / bfloat16, or int32 for the raw accumulators (no scaling, no bias).
    Returns ``[..., N]``.
    """
    return call(_w8a8_op, x_q, x_scale, w_q, w_scale, bias, out_dtype)


def w4a16_gemm(x: Tensor, w_packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
               bias: Tensor | None = None) -> Tensor:
    """``x @ dequant(w).T + bias`` with int4 group-quantized weights and floating-point activations.

    Args:
        x: float32/float16/bfloat16 ``[..., K]``; K a multiple of ``group_size`` (32, 64 or 128).
        w_packed: uint8 ``[N, K // 2]``, low nibble = even k (see ``omniops.quant.formats``).
        scales: float32 ``[N, K // group_size]``; zeros: uint8 codes ``[N, K // group_size]`` or None (symmetric,
            zero point 8).
        bias: optional ``[N]`` in x's dtype.
    Returns ``[..., N]`` in x's dtype (fp32 accumulation).
    """
    return call(_w4a16_op, x, w_packed, scales, zeros, group_size, bias)


def fp8_block_gemm(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                   out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """DeepSeek-V3 block-scaled FP8 GEMM: ``dequant(x) @ dequant(w).T + bias``, fp32 accumulation.

    Args:
        x_q: float8_e4m3fn ``[..., K]``; x_scale: float32 ``[..., ceil(K/128)]`` (``quantize_activation_fp8_group``).
        w_q: float8_e4m3fn ``[N, K]``; w_scale: float32 ``[ceil(N/128), ceil(K/128)]`` (``weight_scale_inv``).
        bias: optional ``[N]`` in ``out_dtype``.
    Returns ``[..., N]`` in ``out_dtype``.
    """
    return call(_fp8_op, x_q, x_scale, w_q, w_scale, bias, out_dtype)
