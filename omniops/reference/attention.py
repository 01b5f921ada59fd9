"""Attention oracles over a paged KV cache: gather each sequence's pages, then plain softmax attention in fp32.

Cache layouts (vLLM's): ``k_cache [num_blocks, block_size, kv_heads, head_dim]`` (v_cache likewise with its own
head dim), MLA ``kv_cache [num_blocks, block_size, kv_lora_rank + rope_dim]``. Token ``i`` of sequence ``b`` lives
in block ``block_table[b, i // block_size]`` at offset ``i % block_size``; ``slot = block * block_size + offset``.
Only the first ``ceil(seq_len / block_size)`` entries of a table row are read. A sequence of length 0 yields zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gather(cache: Tensor, table_row: Tensor, n: int) -> Tensor:
    """The first ``n`` token rows of one sequence: ``[n, *cache.shape[2:]]``."""
    bs = cache.shape[1]
    nblk = (n + bs - 1) // bs
    rows = cache[table_row[:nblk].long()]
    return rows.reshape(nblk * bs, *cache.shape[2:])[:n]


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None,
            soft_cap: float | None = None) -> Tensor:
    """q [M, H, D], k [N, H, D], v [N, H, Dv] (heads already expanded), fp32; mask [M, N] True = attend."""
    s = torch.einsum("mhd,nhd->hmn", q, k) * scale
    if soft_cap:
        s = soft_cap * torch.tanh(s / soft_cap)
    if mask is not None:
        s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    # Rows with no key at all (empty window / length 0) give zeros, not NaN.
    p = torch.nan_to_num(p, nan=0.0)
    return torch.einsum("hmn,nhd->mhd", p, v)


def reshape_and_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write ``key/value [T, kv_heads, D]`` into the caches at ``slot_mapping [T]``; slot -1 skips the token."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = k_cache.shape[1]
    k_cache[slots // bs, slots % bs] = key[keep].to(k_cache.dtype)
    v_cache[slots // bs, slots % bs] = value[keep].to(v_cache.dtype)


def mla_cache(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """``kv_cache[slot] = cat(kv_c, k_pe)`` for every token whose slot is not -1."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = kv_cache.shape[1]
    kv_cache[slots // bs, slots % bs] = torch.cat((kv_c[keep], k_pe[keep]), dim=-1).to(kv_cache.dtype)


def gqa_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float,
               soft_cap: float | None = None, window: int | None = None) -> Tensor:
    """One query token per sequence at position ``seq_len - 1``: ``q [B, Hq, D]`` -> ``[B, Hq, Dv]``.

    ``window=W`` attends only to the last W keys; ``soft_cap=c`` maps scores to ``c * tanh(s / c)``.
    """
    B, Hq, _ = q.shape
    hkv = k_cache.shape[2]
    out = q.new_zeros(B, Hq, v_cache.shape[-1])
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        lo = max(0, n - window) if window else 0
        k = _gather(k_cache, block_table[b], n)[lo:].float().repeat_interleave(Hq // hkv, dim=1)
        v = _gather(v_cache, block_table[b], n)[lo:].float().repeat_interleave(Hq // hkv, dim=1)
        out[b] = _attend(q[b : b + 1].float(), k, v, scale, None, soft_cap)[0].to(q.dtype)
    return out


def gqa_prefill(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool, scale: float,
                k_cache: Tensor | None = None, v_cache: Tensor | None = None, block_table: Tensor | None = None,
                context_lens: Tensor | None = None) -> Tensor:
    """Packed varlen prefill: sequence ``b`` has tokens ``cu_seqlens[b]:cu_seqlens[b+1]`` of q/k/v and (with the
    cache) ``context_lens[b]`` earlier tokens in the paged cache, so its new token ``j`` is at position
    ``context_lens[b] + j``. Causal: a query attends to keys at positions <= its own."""
    T, Hq, _ = q.shape
    hkv = k.shape[1]
    out = q.new_zeros(T, Hq, v.shape[-1])
    for b in range(cu_seqlens.numel() - 1):
        t0, t1 = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        if t1 == t0:
            continue
        kb, vb = k[t0:t1].float(), v[t0:t1].float()
        ctx = 0
        if k_cache is not None:
            ctx = int(context_lens[b])
            kb = torch.cat((_gather(k_cache, block_table[b], ctx).float(), kb))
            vb = torch.cat((_gather(v_cache, block_table[b], ctx).float(), vb))
        mask = None
        if causal:
            qpos = ctx + torch.arange(t1 - t0, device=q.device)
            mask = torch.arange(kb.shape[0], device=q.device)[None, :] <= qpos[:, None]
        g = Hq // hkv
        out[t0:t1] = _attend(q[t0:t1].float(), kb.repeat_interleave(g, dim=1), vb.repeat_interleave(g, dim=1),
                             scale, mask).to(q.dtype)
    return out


def mla_decode(q: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float,
               v_dim: int = 512) -> Tensor:
    """Weight-absorbed MLA decode: keys are the latent rows ``[L]``, values their first ``v_dim`` dims,
    shared by all H heads. ``q [B, H, L]`` -> ``[B, H, v_dim]``."""
    B, H, _ = q.shape
    out = q.new_zeros(B, H, v_dim)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        rows = _gather(kv_cache, block_table[b], n).float()  # [n, L]
        s = (q[b].float() @ rows.T) * scale
        out[b] = (torch.softmax(s, dim=-1) @ rows[:, :v_dim]).to(q.dtype)
    return out


def gqa_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    """Contiguous K/V in SDPA layout: q [B, Hq, S, D], k [B, Hk, L, D], v [B, Hk, L, Dv] -> [B, Hq, S, Dv] in q's
    dtype (computed in fp32).

    ``causal``: bottom-right aligned (query s sees keys <= L - S + s). ``attn_mask`` broadcastable to
    [B, Hq, S, L]: bool (True = attend) or added to the scaled scores. Rows with no visible key give zeros."""
    B, hq, S, _ = q.shape
    hk, L = k.shape[1], k.shape[2]
    g = hq // hk if hk else 1
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("bhsd,bhld->bhsl", q.float(), kf) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    if causal:
        vis = torch.arange(L, device=q.device)[None, :] <= (L - S + torch.arange(S, device=q.device))[:, None]
        s = s.masked_fill(~vis, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.einsum("bhsl,bhld->bhsd", p, vf).to(q.dtype)
