"""Fused quantize-activation + GEMM in Triton. Launchers: ``w8a8_linear_forward``, ``fp8_block_linear_forward``.

A per-token quantization kernel writes the codes and scales to scratch, then the GEMM kernel of
``omniops/triton/quant_gemm.py`` runs on them. The quantizers reproduce the torch-op formulas bit for bit: IEEE
division (``div_rn``), round half to even, e4m3 encoding by integer rounding (no reliance on the target's fp8
conversion, so the interpreter and every GPU agree).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniops.ops.quant_linear import FP8_BLOCK_LINEAR, W8A8_LINEAR
from omniops.triton._grid import persistent_grid
from omniops.triton.quant_gemm import fp8_block_gemm_forward, w8a8_gemm_forward

_RNE_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to the nearest integer, ties to even


@triton.jit
def _quant_i8_kernel(X, Q, S, M, K, sxm, BK: tl.constexpr):
    """Per row: scale = amax(|x|) / 127, q = clamp(round_half_even(x / scale), -127, 127) (scale 0 -> divide by 1)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for m in range(pid, M, nprog):
        m64 = tl.cast(m, tl.int64)
        row = X + m64 * sxm
        amax = tl.zeros((BK,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            v = tl.load(row + rk, mask=rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        a = tl.max(amax, axis=0)
        s = tl.math.div_rn(a, 127.0)
        d = tl.where(s == 0.0, 1.0, s)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            v = tl.load(row + rk, mask=mk, other=0.0).to(tl.float32)
            q = (tl.math.div_rn(v, d) + _RNE_MAGIC) - _RNE_MAGIC
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)
            tl.store(Q + m64 * K + rk, q.to(tl.int8), mask=mk)
        tl.store(S + m, s)


@triton.jit
def _f32_to_e4m3(v):
    """fp32 in [-448, 448] -> float8_e4m3fn bits (int32), round to nearest even (= torch's .to(float8_e4m3fn))."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 128
    a = tl.abs(v)
    ab = a.to(tl.int32, bitcast=True)
    # normals (a >= 2**-6): keep 3 mantissa bits with round-half-even at bit 20, rebias the exponent 127 -> 7
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - (120 << 3)
    # subnormals: multiples of 2**-9 (code 8 = 2**-6, the smallest normal, follows on)
    sub = ((a * 512.0 + _RNE_MAGIC) - _RNE_MAGIC).to(tl.int32)
    return tl.where(a < 0.015625, sub, normal) | sign


@triton.jit
def _quant_fp8_kernel(X, Q, S, M, K, sxm, KB):
    """Per row and 128-wide group: scale = amax / 448, q = e4m3(clamp(x / scale, -448, 448))."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for t in range(pid, M * KB, nprog):
        m = tl.cast(t // KB, tl.int64)
        kb = t % KB
        rk = kb * 128 + tl.arange(0, 128)
        mk = rk < K
        v = tl.load(X + m * sxm + rk, mask=mk, other=0.0).to(tl.float32)
        s = tl.math.div_rn(tl.max(tl.abs(v), axis=0), 448.0)
        d = tl.where(s == 0.0, 1.0, s)
        q = tl.minimum(tl.maximum(tl.math.div_rn(v, d), -448.0), 448.0)
        tl.store(Q + m * K + rk, _f32_to_e4m3(q).to(tl.uint8), mask=mk)
        tl.store(S + m * KB + kb, s)


@W8A8_LINEAR.impl("triton")
def w8a8_linear_forward(out: torch.Tensor, x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
    """out [M, N] float = w8a8 GEMM of x [M, K] float (unit inner stride) quantized per token."""
    M, K = x.shape
    x_q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    x_s = torch.empty(M, dtype=torch.float32, device=x.device)
    _quant_i8_kernel[persistent_grid(M, x.device)](x, x_q, x_s, M, K, x.stride(0),
                                                    BK=min(1024, triton.next_power_of_2(K)), num_warps=4)
    w8a8_gemm_forward(out, x_q, x_s, w_q, w_scale, bias)


@FP8_BLOCK_LINEAR.impl("triton")
def fp8_block_linear_forward(out: torch.Tensor, x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                             bias: torch.Tensor | None) -> None:
    """out [M, N] float = FP8 block GEMM of x [M, K] float quantized per token per 128 of K."""
    M, K = x.shape
    kb = triton.cdiv(K, 128)
    x_q = torch.empty(M, K, dtype=torch.uint8, device=x.device)
    x_s = torch.empty(M, kb, dtype=torch.float32, device=x.device)
    _quant_fp8_kernel[persistent_grid(M * kb, x.device)](x, x_q, x_s, M, K, x.stride(0), kb, num_warps=4)
    fp8_block_gemm_forward(out, x_q.view(torch.float8_e4m3fn), x_s, w_q, w_scale, bias)
