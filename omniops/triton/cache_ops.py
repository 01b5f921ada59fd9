"""The paged-cache writers in Triton: ``reshape_and_cache_forward`` (GQA keys / values) and ``mla_cache_forward``
(MLA latent rows). One program per token (persistent loop); slot -1 writes nothing. Key / value / latent rows
come with a unit inner stride (the op makes them so); the caches must have one.
"""

from __future__ import annotations

import triton
import triton.language as tl

from omniops.ops.cache_ops import MLA_CACHE, RESHAPE_AND_CACHE
from omniops.triton._grid import persistent_grid, pow2


@triton.jit
def _reshape_and_cache_kernel(
    KEY, VALUE, KC, VC, SLOTS, key_ts, key_hs, val_ts, val_hs, kc_bs, kc_ts, kc_hs, vc_bs, vc_ts, vc_hs,
    n_tokens, heads, head_dim, v_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    for t in range(pid, n_tokens, nprog):
        slot = tl.load(SLOTS + t).to(tl.int64)
        ok = slot >= 0
        blk = tl.where(ok, slot // block_size, 0)
        off = tl.where(ok, slot % block_size, 0)
        n_heads = tl.where(ok, heads, 0)  # slot -1: nothing to write (a scalar bool mask trips the interpreter)
        for h0 in range(0, heads, BLOCK_H):
            hh = h0 + h
            km = (hh[:, None] < n_heads) & (d[None, :] < head_dim)
            x = tl.load(KEY + t * key_ts + hh[:, None] * key_hs + d[None, :], mask=km, other=0.0)
            tl.store(KC + blk * kc_bs + off * kc_ts + hh[:, None] * kc_hs + d[None, :], x, mask=km)
            vm = (hh[:, None] < n_heads) & (dv[None, :] < v_dim)
            y = tl.load(VALUE + t * val_ts + hh[:, None] * val_hs + dv[None, :], mask=vm, other=0.0)
            tl.store(VC + blk * vc_bs + off * vc_ts + hh[:, None] * vc_hs + dv[None, :], y, mask=vm)


@RESHAPE_AND_CACHE.impl("triton")
def reshape_and_cache_forward(key, value, k_cache, v_cache, slot_mapping) -> None:
    T, H, d = key.shape
    dv = value.shape[-1]
    if T == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache, v_cache: the triton kernel needs a unit inner stride")
    bd, bdv = pow2(d), pow2(dv)
    block_h = max(1, min(pow2(H), 4096 // max(bd, bdv)))
    _reshape_and_cache_kernel[persistent_grid(T, key.device)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), T, H, d, dv, k_cache.shape[1],
        BLOCK_H=block_h, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=4,
    )


@triton.jit
def _mla_cache_kernel(KVC, KPE, CACHE, SLOTS, c_ts, p_ts, bs_stride, ts_stride, n_tokens, rank, rope, block_size,
                      BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    for t in range(pid, n_tokens, nprog):
        slot = tl.load(SLOTS + t).to(tl.int64)
        ok = slot >= 0
        dst = CACHE + tl.where(ok, slot // block_size, 0) * bs_stride + tl.where(ok, slot % block_size, 0) * ts_stride
        n_r = tl.where(ok, rank, 0)
        n_p = tl.where(ok, rope, 0)
        x = tl.load(KVC + t * c_ts + r, mask=r < n_r, other=0.0)
        tl.store(dst + r, x, mask=r < n_r)
        y = tl.load(KPE + t * p_ts + p, mask=p < n_p, other=0.0)
        tl.store(dst + rank + p, y, mask=p < n_p)


@MLA_CACHE.impl("triton")
def mla_cache_forward(kv_c, k_pe, kv_cache, slot_mapping) -> None:
    T, rank = kv_c.shape
    rope = k_pe.shape[1]
    if T == 0:
        return
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache: the triton kernel needs a unit inner stride")
    _mla_cache_kernel[persistent_grid(T, kv_c.device)](
        kv_c, k_pe, kv_cache, slot_mapping, kv_c.stride(0), k_pe.stride(0), kv_cache.stride(0), kv_cache.stride(1),
        T, rank, rope, kv_cache.shape[1], BLOCK_R=pow2(rank), BLOCK_P=pow2(rope), num_warps=4,
    )
