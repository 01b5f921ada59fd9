"""Quantized GEMMs in Triton. Launchers: ``w8a8_gemm_forward``, ``w4a16_gemm_forward``, ``fp8_block_gemm_forward``.

* W8A8: int8 x int8 ``tl.dot`` with an int32 accumulator (tensor cores on GPUs), fp32 epilogue.
* W4A16: int4 codes unpacked and dequantized in registers (``(code - zero) * scale``, one scale per BK slice
  since BK divides the group size), then ``tl.dot`` in x's dtype (fp32: IEEE, not TF32).
* FP8 block: BK = 128 = the scale block, so each K step is one ``tl.dot`` scaled by ``x_scale[m, kb] *
  w_scale[n // 128, kb]``. On GPUs with fp8 tensor cores (sm_89+) the dot takes the fp8 operands directly;
  elsewhere (older GPUs, the interpreter) the e4m3 bytes are decoded to fp32 in the kernel (bit arithmetic,
  exact for every finite value; the NaN patterns 0x7F/0xFF are not special-cased - quantizers never emit them).
* Fused linears (``w8a8_linear_forward``, ``fp8_block_linear_forward``): a per-token quantization kernel writes
  the codes and scales to scratch, then the GEMM kernel above runs on them. The quantizers reproduce the
  torch-op formulas bit for bit: IEEE division (``div_rn``), round half to even, e4m3 encoding by integer
  rounding (no reliance on the target's fp8 conversion, so the interpreter and every GPU agree).
Grids are persistent; tiles are visited m-tile-major so consecutive programs share activation rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniops.ops.quant_gemm import FP8_BLOCK_GEMM, FP8_BLOCK_LINEAR, W4A16, W8A8, W8A8_LINEAR
from omniops.triton._grid import persistent_grid


@triton.jit
def _w8a8_kernel(X, XS, W, WS, B, OUT, M, N, K, sxm, swn, som,
                 HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_n = tl.cdiv(N, BN)
    tiles = tl.cdiv(M, BM) * num_n
    for tile in range(pid, tiles, nprog):
        rm = (tile // num_n) * BM + tl.arange(0, BM)
        rn = (tile % num_n) * BN + tl.arange(0, BN)
        mm = rm < M
        mn = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            a = tl.load(X + rm[:, None].to(tl.int64) * sxm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0)
            b = tl.load(W + rn[None, :].to(tl.int64) * swn + rk[:, None], mask=mn[None, :] & mk[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        optr = OUT + rm[:, None].to(tl.int64) * som + rn[None, :]
        omask = mm[:, None] & mn[None, :]
        if OUT_INT32:
            tl.store(optr, acc, mask=omask)
        else:
            xs = tl.load(XS + rm, mask=mm, other=0.0)
            ws = tl.load(WS + rn, mask=mn, other=0.0)
            y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
            if HAS_BIAS:
                y += tl.load(B + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
            tl.store(optr, y.to(OUT.dtype.element_ty), mask=omask)


@triton.jit
def _w4a16_kernel(X, W, S, Z, B, OUT, M, N, K, sxm, som, G,
                  HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_n = tl.cdiv(N, BN)
    tiles = tl.cdiv(M, BM) * num_n
    ng = K // G
    half_k = K // 2
    for tile in range(pid, tiles, nprog):
        rm = (tile // num_n) * BM + tl.arange(0, BM)
        rn = (tile % num_n) * BN + tl.arange(0, BN)
        mm = rm < M
        mn = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):  # K % G == 0 and BK divides G: no K mask, one scale per slice
            rk = k0 + tl.arange(0, BK)
            a = tl.load(X + rm[:, None].to(tl.int64) * sxm + rk[None, :], mask=mm[:, None], other=0.0)
            byte = tl.load(W + rn[None, :].to(tl.int64) * half_k + (rk // 2)[:, None], mask=mn[None, :], other=0)
            code = (byte.to(tl.int32) >> ((rk % 2) * 4)[:, None]) & 15
            g = k0 // G
            s = tl.load(S + rn.to(tl.int64) * ng + g, mask=mn, other=0.0)
            if HAS_ZEROS:
                z = tl.load(Z + rn.to(tl.int64) * ng + g, mask=mn, other=0).to(tl.int32)
            else:
                z = tl.full((BN,), 8, dtype=tl.int32)
            w = (code - z[None, :]).to(tl.float32) * s[None, :]
            if DOT_F32:
                acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(a, w.to(a.dtype))
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rm[:, None].to(tl.int64) * som + rn[None, :], acc.to(OUT.dtype.element_ty),
                 mask=mm[:, None] & mn[None, :])


@triton.jit
def _e4m3_to_f32(b):
    """float8_e4m3fn bytes (any int type) -> fp32, exact for finite values."""
    b = b.to(tl.int32)
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((b & 128) != 0, -v, v)


@triton.jit
def _fp8_block_kernel(X, XS, W, WS, B, OUT, M, N, K, sxm, swn, som, KB,
                      HAS_BIAS: tl.constexpr, NATIVE_FP8: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_n = tl.cdiv(N, BN)
    tiles = tl.cdiv(M, BM) * num_n
    for tile in range(pid, tiles, nprog):
        rm = (tile // num_n) * BM + tl.arange(0, BM)
        rn = (tile % num_n) * BN + tl.arange(0, BN)
        mm = rm < M
        mn = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):  # BK == 128: one x scale per row and one w scale per column
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            a = tl.load(X + rm[:, None].to(tl.int64) * sxm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0)
            b = tl.load(W + rn[None, :].to(tl.int64) * swn + rk[:, None], mask=mn[None, :] & mk[:, None], other=0)
            if NATIVE_FP8:
                part = tl.dot(a, b)
            else:
                part = tl.dot(_e4m3_to_f32(a), _e4m3_to_f32(b), input_precision="ieee")
            kb = k0 // BK
            xs = tl.load(XS + rm.to(tl.int64) * KB + kb, mask=mm, other=0.0)
            ws = tl.load(WS + (rn // 128).to(tl.int64) * KB + kb, mask=mn, other=0.0)
            acc += part * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rm[:, None].to(tl.int64) * som + rn[None, :], acc.to(OUT.dtype.element_ty),
                 mask=mm[:, None] & mn[None, :])


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


def _bm(m: int) -> int:
    return max(16, min(64, triton.next_power_of_2(m)))


@W8A8.impl("triton")
def w8a8_gemm_forward(out: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                      w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out [M, N] (float or int32), x_q [M, K], w_q [N, K] int8 with unit inner stride; scales [M], [N]."""
    M, K = x_q.shape
    N = w_q.shape[0]
    bm, bn, bk = _bm(M), 64, 64
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    _w8a8_kernel[persistent_grid(tiles, out.device)](
        x_q, x_scale, w_q, w_scale, bias if bias is not None else x_scale, out, M, N, K,
        x_q.stride(0), w_q.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, OUT_INT32=out.dtype == torch.int32, BM=bm, BN=bn, BK=bk, num_warps=4)


@W4A16.impl("triton")
def w4a16_gemm_forward(out: torch.Tensor, x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, group_size: int, bias: torch.Tensor | None) -> None:
    M, K = x.shape
    N = w_packed.shape[0]
    bm, bn, bk = _bm(M), 64, min(group_size, 64)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    _w4a16_kernel[persistent_grid(tiles, out.device)](
        x, w_packed, scales, zeros if zeros is not None else w_packed, bias if bias is not None else x, out, M, N, K,
        x.stride(0), out.stride(0), group_size,
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, DOT_F32=x.dtype == torch.float32,
        BM=bm, BN=bn, BK=bk, num_warps=4)


def _native_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@FP8_BLOCK_GEMM.impl("triton")
def fp8_block_gemm_forward(out: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                           w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    M, K = x_q.shape
    N = w_q.shape[0]
    native = _native_fp8(out.device)
    bm, bn = _bm(M), 64
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    xa, wa = (x_q, w_q) if native else (x_q.view(torch.uint8), w_q.view(torch.uint8))
    _fp8_block_kernel[persistent_grid(tiles, out.device)](
        xa, x_scale, wa, w_scale, bias if bias is not None else x_scale, out, M, N, K,
        x_q.stride(0), w_q.stride(0), out.stride(0), x_scale.shape[1],
        HAS_BIAS=bias is not None, NATIVE_FP8=native, BM=bm, BN=bn, BK=128, num_warps=4)


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
