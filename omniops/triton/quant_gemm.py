"""Quantized GEMMs in Triton. Launchers: ``w8a8_gemm_forward``, ``w4a16_gemm_forward``, ``fp8_block_gemm_forward``.

* W8A8: int8 x int8 ``tl.dot`` with an int32 accumulator (tensor cores on GPUs), fp32 epilogue.
* W4A16: int4 codes unpacked and dequantized in registers (``(code - zero) * scale``, one scale per BK slice
  since BK divides the group size), then ``tl.dot`` in x's dtype (fp32: IEEE, not TF32).
* FP8 block: BK = 128 = the scale block, so each K step is one ``tl.dot`` scaled by ``x_scale[m, kb] *
  w_scale[n // 128, kb]``. On GPUs with fp8 tensor cores (sm_89+) the dot takes the fp8 operands directly;
  elsewhere (older GPUs, the interpreter) the e4m3 bytes are decoded to fp32 in the kernel (bit arithmetic,
  exact for every finite value; the NaN patterns 0x7F/0xFF are not special-cased - quantizers never emit them).
* The fused linears on these GEMMs: ``omniops/triton/quant_linear.py``.
Grids are persistent; tiles are visited m-tile-major so consecutive programs share activation rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniops.ops.quant_gemm import FP8_BLOCK_GEMM, W4A16, W8A8
from omniops.triton._grid import persistent_grid


@triton.jit
def _out_tile(tile, num_n, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """Rows and columns of output tile ``tile`` (m-tile-major order) and their in-bounds masks."""
    rm = (tile // num_n) * BM + tl.arange(0, BM)
    rn = (tile % num_n) * BN + tl.arange(0, BN)
    return rm, rn, rm < M, rn < N


@triton.jit
def _k_slice(X, W, rm, rn, mm, mn, k0, K, sxm, swn, BK: tl.constexpr):
    """The [BM, BK] slice of x and the [BK, BN] slice of w^T (w in nn.Linear layout [N, K]) at k0 (0 outside)."""
    rk = k0 + tl.arange(0, BK)
    mk = rk < K
    a = tl.load(X + rm[:, None].to(tl.int64) * sxm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0)
    b = tl.load(W + rn[None, :].to(tl.int64) * swn + rk[:, None], mask=mn[None, :] & mk[:, None], other=0)
    return a, b


@triton.jit
def _store_tile(OUT, acc, B, rm, rn, mm, mn, som, HAS_BIAS: tl.constexpr):
    """acc [+ bias] rounded once to OUT's dtype."""
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm[:, None].to(tl.int64) * som + rn[None, :], acc.to(OUT.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _w8a8_kernel(X, XS, W, WS, B, OUT, M, N, K, sxm, swn, som,
                 HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_n = tl.cdiv(N, BN)
    tiles = tl.cdiv(M, BM) * num_n
    for tile in range(pid, tiles, nprog):
        rm, rn, mm, mn = _out_tile(tile, num_n, M, N, BM, BN)
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            a, b = _k_slice(X, W, rm, rn, mm, mn, k0, K, sxm, swn, BK)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if OUT_INT32:
            tl.store(OUT + rm[:, None].to(tl.int64) * som + rn[None, :], acc, mask=mm[:, None] & mn[None, :])
        else:
            xs = tl.load(XS + rm, mask=mm, other=0.0)
            ws = tl.load(WS + rn, mask=mn, other=0.0)
            _store_tile(OUT, acc.to(tl.float32) * xs[:, None] * ws[None, :], B, rm, rn, mm, mn, som, HAS_BIAS)


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
        rm, rn, mm, mn = _out_tile(tile, num_n, M, N, BM, BN)
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
        _store_tile(OUT, acc, B, rm, rn, mm, mn, som, HAS_BIAS)


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
        rm, rn, mm, mn = _out_tile(tile, num_n, M, N, BM, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):  # BK == 128: one x scale per row and one w scale per column
            a, b = _k_slice(X, W, rm, rn, mm, mn, k0, K, sxm, swn, BK)
            if NATIVE_FP8:
                part = tl.dot(a, b)
            else:
                part = tl.dot(_e4m3_to_f32(a), _e4m3_to_f32(b), input_precision="ieee")
            kb = k0 // BK
            xs = tl.load(XS + rm.to(tl.int64) * KB + kb, mask=mm, other=0.0)
            ws = tl.load(WS + (rn // 128).to(tl.int64) * KB + kb, mask=mn, other=0.0)
            acc += part * xs[:, None] * ws[None, :]
        _store_tile(OUT, acc, B, rm, rn, mm, mn, som, HAS_BIAS)


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
