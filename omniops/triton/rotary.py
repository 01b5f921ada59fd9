"""Rotary embedding in Triton. Launcher: ``rotary_embedding_forward``.

One program per token (persistent loop), all heads of that token as one [HEADS, ROT/2] tile, so the cos/sin
row is loaded once per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniops.ops.rotary import ROTARY
from omniops.triton._grid import persistent_grid


@triton.jit
def _rotate_heads(
    SRC, DST, cos, sin, t, n_heads, src_ts, src_hs, dst_ts, dst_hs, half, head_size,
    IS_NEOX: tl.constexpr, COPY_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    for h0 in range(0, n_heads, BLOCK_H):
        hh = h0 + heads
        hmask = hh < n_heads
        m = hmask[:, None] & (r[None, :] < half)
        src = SRC + t * src_ts + hh[:, None] * src_hs
        dst = DST + t * dst_ts + hh[:, None] * dst_hs
        if IS_NEOX:
            i1 = r[None, :]
            i2 = r[None, :] + half
        else:
            i1 = 2 * r[None, :]
            i2 = 2 * r[None, :] + 1
        x1 = tl.load(src + i1, mask=m, other=0.0)
        x2 = tl.load(src + i2, mask=m, other=0.0)
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        o1 = x1f * cos[None, :] - x2f * sin[None, :]
        o2 = x2f * cos[None, :] + x1f * sin[None, :]
        tl.store(dst + i1, o1.to(x1.dtype), mask=m)
        tl.store(dst + i2, o2.to(x1.dtype), mask=m)
        if COPY_TAIL:
            d = 2 * half + tl.arange(0, BLOCK_D)
            tm = hmask[:, None] & (d[None, :] < head_size)
            tail = tl.load(src + d[None, :], mask=tm, other=0.0)
            tl.store(dst + d[None, :], tail, mask=tm)


@triton.jit
def _rotary_fwd_kernel(
    POS, Q, K, QO, KO, CACHE,
    q_ts, q_hs, k_ts, k_hs, qo_ts, qo_hs, ko_ts, ko_hs,
    n_tokens, q_heads, k_heads, head_size, half,
    IS_NEOX: tl.constexpr, COPY_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.arange(0, BLOCK_R)
    rmask = r < half
    for t in range(pid, n_tokens, nprog):
        pos = tl.load(POS + t)
        cos = tl.load(CACHE + pos * 2 * half + r, mask=rmask, other=0.0).to(tl.float32)
        sin = tl.load(CACHE + pos * 2 * half + half + r, mask=rmask, other=0.0).to(tl.float32)
        _rotate_heads(Q, QO, cos, sin, t, q_heads, q_ts, q_hs, qo_ts, qo_hs, half, head_size,
                      IS_NEOX, COPY_TAIL, BLOCK_H, BLOCK_R, BLOCK_D)
        _rotate_heads(K, KO, cos, sin, t, k_heads, k_ts, k_hs, ko_ts, ko_hs, half, head_size,
                      IS_NEOX, COPY_TAIL, BLOCK_H, BLOCK_R, BLOCK_D)


@ROTARY.impl("triton")
def rotary_embedding_forward(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                             rotary_dim: int, is_neox: bool, q_out: torch.Tensor, k_out: torch.Tensor) -> None:
    """positions int64 [T]; q, k, q_out, k_out [T, heads, head_size] (unit inner stride); cache contiguous."""
    tokens, q_heads, head_size = q.shape
    k_heads = k.shape[1]
    if tokens == 0:
        return
    half = rotary_dim // 2
    copy_tail = rotary_dim < head_size and not (
        q_out.data_ptr() == q.data_ptr() and (k_heads == 0 or k_out.data_ptr() == k.data_ptr())
    )
    block_r = triton.next_power_of_2(half)
    tail = head_size - rotary_dim
    block_d = triton.next_power_of_2(tail) if tail > 0 else 1
    block_h = max(1, min(triton.next_power_of_2(max(q_heads, k_heads, 1)), max(1, 4096 // block_r)))
    _rotary_fwd_kernel[persistent_grid(tokens, q.device)](
        positions, q, k, q_out, k_out, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        tokens, q_heads, k_heads, head_size, half,
        IS_NEOX=is_neox, COPY_TAIL=copy_tail, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )
