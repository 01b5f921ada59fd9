"""Paged attention in Triton: GQA decode and MLA decode (split-KV flash-decoding + a combine kernel) and varlen
prefill with an optional paged prefix.

Launchers: ``gqa_decode_forward``, ``mla_decode_forward``, ``gqa_prefill_forward``. Every grid is persistent
(``persistent_grid``); softmax and accumulation are fp32; fp32 dots use IEEE precision (no TF32). Loads of key
positions outside a sequence's range are masked, so foreign cache blocks are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniops.ops.attention import GQA_DECODE, GQA_PREFILL, MLA_DECODE
from omniops.triton._grid import persistent_grid, pow2


def _dot_min() -> int:
    # tl.dot needs every dimension >= 16 on GPUs; the interpreter takes any size, so keep CI tiles tiny.
    return 1 if not torch.cuda.is_available() else 16


@triton.jit
def _scores(q, k, IEEE: tl.constexpr):
    """q [R, D] @ k [N, D]^T, fp32 (IEEE for fp32 inputs: not TF32)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s


@triton.jit
def _paged_slots(TABLE, b, table_s, pos, pmask, block_size):
    """Where key positions ``pos`` of sequence b live in the paged cache: (block, offset), block 0 where masked."""
    blk = tl.load(TABLE + b * table_s + pos // block_size, mask=pmask, other=0).to(tl.int64)
    return blk, pos % block_size


@triton.jit
def _cache_rows(C, blk, off, block_stride, token_stride, base, cols, ncols, pmask):
    """Cache rows at (block, offset), from element ``base`` of a row (a head's offset) on, columns ``cols < ncols``;
    0 where masked."""
    return tl.load(C + blk[:, None] * block_stride + off[:, None] * token_stride + base + cols[None, :],
                   mask=pmask[:, None] & (cols[None, :] < ncols), other=0.0)


@triton.jit
def _softmax_update(s, valid, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One online-softmax step over a score tile s [R, N] (``valid``: the scores that count) and its value rows
    v [N, Dv]: returns the new running max, sum and fp32 accumulator."""
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_new = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_new, acc * alpha[:, None] + pv


@triton.jit
def _gqa_decode_kernel(
    Q, KC, VC, TABLE, LENS, WO, WM, WL,
    q_ts, q_hs, k_bs, k_ts, k_hs, v_bs, v_ts, v_hs, table_s,
    n_items, kv_heads, G, q_heads, head_dim, v_dim, block_size, num_splits, split_len, window, scale, soft_cap,
    HAS_CAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    n = tl.arange(0, BLOCK_N)
    gmask = g < G
    for item in range(pid, n_items, nprog):
        s_idx = item % num_splits
        kvh = (item // num_splits) % kv_heads
        b = item // (num_splits * kv_heads)
        seq_len = tl.load(LENS + b)
        lo = s_idx * split_len
        if window > 0:
            lo = tl.maximum(lo, seq_len - window)
        hi = tl.minimum(seq_len, (s_idx + 1) * split_len)
        heads = kvh * G + g
        q = tl.load(Q + b * q_ts + heads[:, None] * q_hs + d[None, :], mask=gmask[:, None] & (d[None, :] < head_dim),
                    other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + n
            pmask = pos < hi
            blk, off = _paged_slots(TABLE, b, table_s, pos, pmask, block_size)
            k = _cache_rows(KC, blk, off, k_bs, k_ts, kvh * k_hs, d, head_dim, pmask)
            v = _cache_rows(VC, blk, off, v_bs, v_ts, kvh * v_hs, dv, v_dim, pmask)
            s = _scores(q, k, IEEE) * scale
            if HAS_CAP:
                s = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * s / soft_cap) + 1.0))
            m_i, l_i, acc = _softmax_update(s, gmask[:, None] & pmask[None, :], v, m_i, l_i, acc, IEEE)
        row = (b * num_splits + s_idx) * q_heads + heads
        tl.store(WO + row[:, None] * v_dim + dv[None, :], acc, mask=gmask[:, None] & (dv[None, :] < v_dim))
        tl.store(WM + row, m_i, mask=gmask)
        tl.store(WL + row, l_i, mask=gmask)


@triton.jit
def _mla_decode_kernel(
    Q, KV, TABLE, LENS, WO, WM, WL,
    q_ts, q_hs, kv_bs, kv_ts, table_s,
    n_items, heads_total, n_hblocks, v_dim, rope_dim, block_size, num_splits, split_len, scale,
    IEEE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_DR: tl.constexpr,
):
    """q [B, H, v_dim + rope_dim]; the latent rows are K (all dims) and V (first v_dim dims), shared by every head:
    each tile of rows is loaded once per (sequence, head block, split)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    h = tl.arange(0, BLOCK_H)
    dv = tl.arange(0, BLOCK_DV)
    dr = tl.arange(0, BLOCK_DR)
    n = tl.arange(0, BLOCK_N)
    for item in range(pid, n_items, nprog):
        s_idx = item % num_splits
        hb = (item // num_splits) % n_hblocks
        b = item // (num_splits * n_hblocks)
        seq_len = tl.load(LENS + b)
        lo = s_idx * split_len
        hi = tl.minimum(seq_len, (s_idx + 1) * split_len)
        heads = hb * BLOCK_H + h
        hmask = heads < heads_total
        qb = Q + b * q_ts + heads[:, None] * q_hs
        q_nope = tl.load(qb + dv[None, :], mask=hmask[:, None] & (dv[None, :] < v_dim), other=0.0)
        q_pe = tl.load(qb + v_dim + dr[None, :], mask=hmask[:, None] & (dr[None, :] < rope_dim), other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + n
            pmask = pos < hi
            blk, off = _paged_slots(TABLE, b, table_s, pos, pmask, block_size)
            kn = _cache_rows(KV, blk, off, kv_bs, kv_ts, 0, dv, v_dim, pmask)
            kp = _cache_rows(KV, blk, off, kv_bs, kv_ts, v_dim, dr, rope_dim, pmask)
            s = _scores(q_nope, kn, IEEE) + _scores(q_pe, kp, IEEE)
            m_i, l_i, acc = _softmax_update(s * scale, hmask[:, None] & pmask[None, :], kn, m_i, l_i, acc, IEEE)
        row = (b * num_splits + s_idx) * heads_total + heads
        tl.store(WO + row[:, None] * v_dim + dv[None, :], acc, mask=hmask[:, None] & (dv[None, :] < v_dim))
        tl.store(WM + row, m_i, mask=hmask)
        tl.store(WL + row, l_i, mask=hmask)


@triton.jit
def _combine_kernel(WO, WM, WL, OUT, out_ts, out_hs, n_rows, q_heads, num_splits, v_dim,
                    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out[b, h] = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s over the splits (0 where no key)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    smask = s < num_splits
    for r in range(pid, n_rows, nprog):
        b = r // q_heads
        h = r % q_heads
        w = (b * num_splits + s) * q_heads + h
        l_s = tl.load(WL + w, mask=smask, other=0.0)
        has = smask & (l_s > 0)
        m_s = tl.load(WM + w, mask=has, other=float("-inf"))
        m_s = tl.where(has, m_s, float("-inf"))
        M = tl.max(m_s, 0)
        M_safe = tl.where(M == float("-inf"), 0.0, M)
        f = tl.where(has, tl.exp(m_s - M_safe), 0.0)
        L = tl.sum(f * l_s, 0)
        o = tl.load(WO + w[:, None] * v_dim + dv[None, :], mask=has[:, None] & (dv[None, :] < v_dim), other=0.0)
        acc = tl.sum(o * f[:, None], 0)
        inv = tl.where(L > 0, 1.0 / tl.where(L > 0, L, 1.0), 0.0)
        tl.store(OUT + b * out_ts + h * out_hs + dv, (acc * inv).to(OUT.dtype.element_ty), mask=dv < v_dim)


def _splits(items: int, max_ctx: int, device: torch.device) -> tuple[int, int]:
    """Key splits per item so every core/SM has work, at least 256 keys each. Uses the table's capacity
    (max_blocks * block_size) as the length bound, so no device sync is needed."""
    cores = persistent_grid(1 << 30, device, programs_per_core=1)[0]
    s = max(1, min(-(-2 * cores // max(items, 1)), -(-max_ctx // 256)))
    split_len = -(-max(max_ctx, 1) // s)
    return s, split_len


def _combine(out: torch.Tensor, wo, wm, wl, num_splits: int) -> None:
    B, H, dv = out.shape
    _combine_kernel[persistent_grid(B * H, out.device)](
        wo, wm, wl, out, out.stride(0), out.stride(1), B * H, H, num_splits, dv,
        BLOCK_S=pow2(num_splits), BLOCK_DV=pow2(dv), num_warps=4,
    )


def _workspace(B: int, S: int, H: int, dv: int, device: torch.device):
    wo = torch.empty(B * S * H * dv, dtype=torch.float32, device=device)
    wm = torch.empty(B * S * H, dtype=torch.float32, device=device)
    wl = torch.empty(B * S * H, dtype=torch.float32, device=device)
    return wo, wm, wl


@GQA_DECODE.impl("triton")
def gqa_decode_forward(out, q, k_cache, v_cache, block_table, seq_lens, scale: float, soft_cap: float | None,
                       window: int | None) -> None:
    """out [B, Hq, Dv] (contiguous); q [B, Hq, D]; caches [nb, bs, Hkv, *]; int32 block_table/seq_lens."""
    B, hq, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    dv = v_cache.shape[-1]
    G = hq // hkv
    block_n = max(16, min(64, pow2(bs)))
    S, split_len = _splits(B * hkv, block_table.shape[1] * bs, q.device)
    split_len = -(-split_len // block_n) * block_n
    wo, wm, wl = _workspace(B, S, hq, dv, q.device)
    items = B * hkv * S
    has_cap = soft_cap is not None and soft_cap > 0
    _gqa_decode_kernel[persistent_grid(items, q.device)](
        q, k_cache, v_cache, block_table, seq_lens, wo, wm, wl,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        items, hkv, G, hq, d, dv, bs, S, split_len, window or 0, scale, soft_cap if has_cap else 1.0,
        HAS_CAP=has_cap, IEEE=q.dtype == torch.float32, BLOCK_G=pow2(G, _dot_min()), BLOCK_N=block_n,
        BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), num_warps=4,
    )
    _combine(out, wo, wm, wl, S)


@MLA_DECODE.impl("triton")
def mla_decode_forward(out, q, kv_cache, block_table, seq_lens, scale: float, v_dim: int) -> None:
    """out [B, H, v_dim]; q [B, H, L]; kv_cache [nb, bs, L] (unit inner stride)."""
    B, H, L = q.shape
    bs = kv_cache.shape[1]
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache: the triton kernel needs a unit inner stride")
    # GPU: 16 heads x 512 dims of q and of the fp32 accumulator per program keep registers from spilling.
    block_h = min(pow2(H, _dot_min()), 16 if torch.cuda.is_available() else 64)
    n_hb = -(-H // block_h)
    block_n = 16 if not torch.cuda.is_available() else 32
    S, split_len = _splits(B * n_hb, block_table.shape[1] * bs, q.device)
    split_len = -(-split_len // block_n) * block_n
    wo, wm, wl = _workspace(B, S, H, v_dim, q.device)
    items = B * n_hb * S
    rope = L - v_dim
    _mla_decode_kernel[persistent_grid(items, q.device)](
        q, kv_cache, block_table, seq_lens, wo, wm, wl,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        items, H, n_hb, v_dim, rope, bs, S, split_len, scale,
        IEEE=q.dtype == torch.float32, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DV=pow2(v_dim),
        BLOCK_DR=pow2(rope, _dot_min()), num_warps=8,
    )
    _combine(out, wo, wm, wl, S)


@triton.jit
def _prefill_kernel(
    Q, K, V, OUT, CU, KC, VC, TABLE, CTX,
    q_ts, q_hs, k_ts, k_hs, v_ts, v_hs, o_ts, o_hs, kc_bs, kc_ts, kc_hs, vc_bs, vc_ts, vc_hs, table_s,
    n_items, n_tiles, q_heads, G, head_dim, v_dim, block_size, scale,
    CAUSAL: tl.constexpr, HAS_CACHE: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One item = (sequence, tile of BLOCK_M query tokens, query head). Keys: the paged prefix (positions
    [0, ctx)), then the sequence's new tokens (positions ctx + j)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    i = tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    dmask = d < head_dim
    dvmask = dv < v_dim
    for item in range(pid, n_items, nprog):
        h = item % q_heads
        m_tile = (item // q_heads) % n_tiles
        b = item // (q_heads * n_tiles)
        t0 = tl.load(CU + b)
        seq_len = tl.load(CU + b + 1) - t0
        if m_tile * BLOCK_M < seq_len:
            kvh = h // G
            j = m_tile * BLOCK_M + i  # new-token index within the sequence
            jmask = j < seq_len
            q = tl.load(Q + (t0 + j)[:, None] * q_ts + h * q_hs + d[None, :], mask=jmask[:, None] & dmask[None, :],
                        other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
            if HAS_CACHE:
                ctx = tl.load(CTX + b)
                for start in range(0, ctx, BLOCK_N):
                    pos = start + n
                    pmask = pos < ctx
                    blk, off = _paged_slots(TABLE, b, table_s, pos, pmask, block_size)
                    k = _cache_rows(KC, blk, off, kc_bs, kc_ts, kvh * kc_hs, d, head_dim, pmask)
                    v = _cache_rows(VC, blk, off, vc_bs, vc_ts, kvh * vc_hs, dv, v_dim, pmask)
                    s = _scores(q, k, IEEE) * scale
                    m_i, l_i, acc = _softmax_update(s, jmask[:, None] & pmask[None, :], v, m_i, l_i, acc, IEEE)
            hi = seq_len
            if CAUSAL:
                hi = tl.minimum(seq_len, (m_tile + 1) * BLOCK_M)
            for start in range(0, hi, BLOCK_N):
                jn = start + n
                nmask = jn < hi
                k = tl.load(K + (t0 + jn)[:, None] * k_ts + kvh * k_hs + d[None, :],
                            mask=nmask[:, None] & dmask[None, :], other=0.0)
                v = tl.load(V + (t0 + jn)[:, None] * v_ts + kvh * v_hs + dv[None, :],
                            mask=nmask[:, None] & dvmask[None, :], other=0.0)
                valid = jmask[:, None] & nmask[None, :]
                if CAUSAL:
                    valid = valid & (jn[None, :] <= j[:, None])
                m_i, l_i, acc = _softmax_update(_scores(q, k, IEEE) * scale, valid, v, m_i, l_i, acc, IEEE)
            inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
            o = acc * inv[:, None]
            tl.store(OUT + (t0 + j)[:, None] * o_ts + h * o_hs + dv[None, :], o.to(OUT.dtype.element_ty),
                     mask=jmask[:, None] & dvmask[None, :])


@GQA_PREFILL.impl("triton")
def gqa_prefill_forward(out, q, k, v, cu_seqlens, causal: bool, scale: float, k_cache, v_cache, block_table,
                        context_lens) -> None:
    """out [T, Hq, Dv]; q/k/v [T, H, *]; cu_seqlens int32 [B+1]; optional paged prefix. Reads the longest
    sequence length from cu_seqlens (one device sync) to size the grid."""
    T, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    B = cu_seqlens.shape[0] - 1
    if B <= 0 or T == 0:
        return
    gpu = torch.cuda.is_available()
    block_m = 64 if gpu else 16
    block_n = 64 if gpu else 16
    max_len = int(cu_seqlens.diff().max())
    n_tiles = max(1, -(-max_len // block_m))
    items = B * n_tiles * hq
    has_cache = k_cache is not None
    kc = k_cache if has_cache else k
    vc = v_cache if has_cache else v
    bt = block_table if has_cache else cu_seqlens
    ctx = context_lens if has_cache else cu_seqlens
    _prefill_kernel[persistent_grid(items, q.device)](
        q, k, v, out, cu_seqlens, kc, vc, bt, ctx,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        kc.stride(0) if has_cache else 0, kc.stride(1) if has_cache else 0, kc.stride(2) if has_cache else 0,
        vc.stride(0) if has_cache else 0, vc.stride(1) if has_cache else 0, vc.stride(2) if has_cache else 0,
        bt.stride(0) if has_cache else 0,
        items, n_tiles, hq, hq // hkv, d, dv, kc.shape[1] if has_cache else 1, scale,
        CAUSAL=causal, HAS_CACHE=has_cache, IEEE=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), num_warps=4,
    )
