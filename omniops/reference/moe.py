"""Mixture-of-Experts oracles: routing, dispatch, grouped GEMM, combine, and the fused block.

Numerics every backend follows (the "contract"):
  * routing scores in fp32; top-k sorted by descending selection score (ties: lower expert id first);
  * expert GEMMs accumulate in fp32; the gate/up product goes through silu(gate) * up in fp32 and is rounded
    once to the activation dtype (the intermediate is a ``[n, I]`` tensor of that dtype, as in HF/vLLM);
  * the down projection stays fp32 and the weighted sum over a token's k experts is fp32, rounded once to the
    output dtype. ``grouped_gemm`` / ``moe_combine`` (the unfused path) round the expert output to the dtype
    in between: one more rounding than ``fused_moe``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---- routing ---------------------------------------------------------------------------------------------
def moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    correction_bias: torch.Tensor | None = None,
    routed_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``fused_topk`` / ``grouped_topk`` semantics. Returns (weights fp32 [T,k], ids int32 [T,k])."""
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    sel = scores if correction_bias is None else scores + correction_bias.float()
    T, E = sel.shape
    if num_groups is not None and num_groups > 1:
        g = sel.view(T, num_groups, E // num_groups)
        # DeepSeek-V3 (bias present): a group scores the sum of its top-2; DeepSeek-V2 style: its max.
        gs = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1) if correction_bias is not None else g.max(-1).values
        keep = _topk_ids(gs, topk_groups)
        mask = torch.zeros(T, num_groups, dtype=torch.bool, device=sel.device)
        mask.scatter_(1, keep, True)
        sel = sel.masked_fill(~mask.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    ids = _topk_ids(sel, top_k)
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    w = w * routed_scaling
    return w, ids.to(torch.int32)


def _topk_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest per row, descending, ties to the lower index (a stable sort, unlike topk)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]


# ---- dispatch / grouped GEMM / combine ------------------------------------------------------------------
def moe_dispatch(
    hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counting sort of the T*k (token, slot) pairs by expert, stable in pair order t*k + j.

    Returns ``(x_sorted [M, H], sorted_token_ids int32 [M], expert_offsets int64 [E+1], expert_counts int32 [E],
    inverse_index int32 [T, k])`` with M = T*k, or, with ``block_size``, M = T*k + E*(block_size-1) and every
    expert's segment starting at a multiple of block_size (padding rows: zeros, token id -1).
    """
    T, k = topk_ids.shape
    H = hidden.shape[1]
    flat = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    bs = 1 if block_size is None else block_size
    padded = (counts + bs - 1) // bs * bs
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=hidden.device)
    offsets[1:] = torch.cumsum(padded, 0)
    M = T * k if block_size is None else T * k + num_experts * (bs - 1)
    order = torch.sort(flat, stable=True).indices  # pair ids grouped by expert
    starts = torch.zeros(num_experts, dtype=torch.int64, device=hidden.device)
    starts[1:] = torch.cumsum(counts, 0)[:-1]
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=hidden.device)
    rows = offsets[:-1][flat] + (rank - starts[flat])  # destination row of each pair
    x_sorted = hidden.new_zeros(M, H)
    tok = torch.full((M,), -1, dtype=torch.int32, device=hidden.device)
    pair_token = torch.arange(T, device=hidden.device).repeat_interleave(k)
    x_sorted[rows] = hidden[pair_token]
    tok[rows] = pair_token.to(torch.int32)
    return x_sorted, tok, offsets, counts.to(torch.int32), rows.view(T, k).to(torch.int32)


def grouped_gemm(x_sorted: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """``out[r] = x_sorted[r] @ w[e].T`` for rows r in [offsets[e], offsets[e+1]); other rows are 0. fp32
    accumulation, rounded once to the dtype."""
    M, N = x_sorted.shape[0], w.shape[1]
    out = torch.zeros(M, N, dtype=torch.float32, device=x_sorted.device)
    offs = expert_offsets.tolist()
    for e in range(w.shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            out[a:b] = x_sorted[a:b].float() @ w[e].float().t()
    return out.to(x_sorted.dtype)


def moe_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor, inverse_index: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * expert_out[inverse_index[t, j]]`` in fp32 (index -1: skipped)."""
    T, k = inverse_index.shape
    idx = inverse_index.long()
    valid = idx >= 0
    rows = expert_out.float()[idx.clamp(min=0).reshape(-1)].view(T, k, expert_out.shape[1])
    w = (topk_weights.float() * valid).unsqueeze(-1)
    return (rows * w).sum(1).to(expert_out.dtype)


# ---- the fused block: a per-expert loop (the oracle) -----------------------------------------------------
def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_j w[t,j] * W2[e] @ act(W13[e] @ x_t)`` over the token's experts e = ids[t, j] (after expert_map;
    experts mapped to -1 contribute nothing)."""
    T, H = hidden.shape
    inter = w2.shape[2]
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map.long()[ids]
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    weights = topk_weights.float()
    for e in range(w13.shape[0]):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        gu = hidden[tok].float() @ w13[e].float().t()
        act = (F.silu(gu[:, :inter]) * gu[:, inter:]).to(hidden.dtype)
        y = act.float() @ w2[e].float().t()
        out.index_add_(0, tok, y * weights[tok, slot].unsqueeze(1))
    return out.to(hidden.dtype)
