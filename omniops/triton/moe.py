"""MoE in Triton: routing, dispatch gather, grouped GEMM, combine, and the fused block.

Launchers: ``moe_route_forward``, ``moe_dispatch_forward``, ``grouped_gemm_forward``, ``moe_combine_forward``,
``fused_moe_forward``. The sort of (token, slot) pairs by expert is index math done with torch ops on the
device (bincount / stable sort / cumsum; no host sync); the GEMMs run over a persistent grid of
(expert M-tile, N-tile) work items whose schedule is sized by an upper bound (cdiv(rows, BM) + E tiles),
so empty tiles exit at once and nothing waits for the device.

fused_moe: kernel 1 gathers the tokens' hidden rows, computes gate and up tiles against W13 and writes
act = T(silu(gate) * up) per sorted row; kernel 2 (the grouped GEMM, scattering its rows) multiplies act by W2
into an fp32 buffer indexed by pair (t*k + j); kernel 3 (the combine) sums each token's k rows with its routing
weights. fp32 accumulation throughout (``input_precision="ieee"`` for fp32 inputs so fp32 is not silently TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniops.ops.moe import FUSED_MOE, GROUPED_GEMM, MOE_COMBINE, MOE_DISPATCH, MOE_ROUTE
from omniops.triton._grid import persistent_grid, row_block


# ---- routing ---------------------------------------------------------------------------------------------
@triton.jit
def _route_kernel(L, BIAS, W, IDS, l_stride, T, E, PER, scaling,
                  TOPK: tl.constexpr, TOPK_G: tl.constexpr, SOFTMAX: tl.constexpr, RENORM: tl.constexpr,
                  HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    g = tl.arange(0, BLOCK_G)[:, None]
    i = tl.arange(0, BLOCK_P)[None, :]
    eid = g * PER + i  # expert id of each slot of the [groups, per-group] tile
    valid = (i < PER) & (eid < E)
    big = E + BLOCK_G * BLOCK_P
    for t in range(pid, T, nprog):
        x = tl.load(L + t * l_stride + eid, mask=valid, other=float("-inf")).to(tl.float32)
        if SOFTMAX:
            m = tl.max(tl.max(x, 1), 0)
            p = tl.where(valid, tl.exp(x - m), 0.0)
            s = p / tl.sum(tl.sum(p, 1), 0)
        else:
            s = 1.0 / (1.0 + tl.exp(-x))
        sel = s
        if HAS_BIAS:
            sel = sel + tl.load(BIAS + eid, mask=valid, other=0.0)
        sel = tl.where(valid, sel, float("-inf"))
        if GROUPED:
            # group score: best (no bias) or sum of the two best (DeepSeek-V3, bias given)
            b1 = tl.max(sel, 1)
            if HAS_BIAS:
                first = tl.min(tl.where(sel == b1[:, None], i, BLOCK_P), 1)
                b2 = tl.max(tl.where(i == first[:, None], float("-inf"), sel), 1)
                gs = tl.where(PER >= 2, b1 + b2, b1)
            else:
                gs = b1
            gid = tl.arange(0, BLOCK_G)
            gs = tl.where(gid < E // PER, gs, float("-inf"))
            keep = gid < 0
            for _ in tl.static_range(TOPK_G):
                mg = tl.max(gs, 0)
                pick = tl.min(tl.where(gs == mg, gid, BLOCK_G), 0)
                keep = keep | (gid == pick)
                gs = tl.where(gid == pick, float("-inf"), gs)
            sel = tl.where(keep[:, None], sel, float("-inf"))
        total = 0.0
        for j in tl.static_range(TOPK):
            mx = tl.max(tl.max(sel, 1), 0)
            pick = tl.min(tl.min(tl.where((sel == mx) & valid, eid, big), 1), 0)
            wj = tl.sum(tl.sum(tl.where(eid == pick, s, 0.0), 1), 0)
            tl.store(IDS + t * TOPK + j, pick.to(tl.int32))
            tl.store(W + t * TOPK + j, wj)
            total += wj
            sel = tl.where(eid == pick, float("-inf"), sel)
        if RENORM:
            for j in tl.static_range(TOPK):
                wj = tl.load(W + t * TOPK + j)
                tl.store(W + t * TOPK + j, wj / total * scaling)
        else:
            for j in tl.static_range(TOPK):
                wj = tl.load(W + t * TOPK + j)
                tl.store(W + t * TOPK + j, wj * scaling)


@MOE_ROUTE.impl("triton")
def moe_route_forward(topk_weights: torch.Tensor, topk_ids: torch.Tensor, router_logits: torch.Tensor, top_k: int,
                      scoring: str, renormalize: bool, num_groups: int | None, topk_groups: int | None,
                      correction_bias: torch.Tensor | None, routed_scaling: float) -> None:
    T, E = router_logits.shape
    grouped = num_groups is not None and num_groups > 1
    G = num_groups if grouped else 1
    per = E // G
    has_bias = correction_bias is not None
    _route_kernel[persistent_grid(T, router_logits.device)](
        router_logits, correction_bias if has_bias else topk_weights, topk_weights, topk_ids,
        router_logits.stride(0), T, E, per, float(routed_scaling),
        TOPK=top_k, TOPK_G=topk_groups if grouped else 1, SOFTMAX=scoring == "softmax", RENORM=bool(renormalize),
        HAS_BIAS=has_bias, GROUPED=grouped, BLOCK_G=triton.next_power_of_2(G),
        BLOCK_P=triton.next_power_of_2(per),
    )


# ---- index math shared by dispatch / grouped GEMM / fused (device-side torch ops, no host sync) -----------
def _sort_pairs(expert_of_pair: torch.Tensor, num_experts: int, block_size: int = 1):
    """Stable counting sort of pairs by expert id (-1 = dropped). Returns (counts int64 [E], offsets int64
    [E+1] of block_size-padded segments, row of each pair int64 [P] (-1 if dropped))."""
    e = expert_of_pair.long()
    valid = e >= 0
    key = torch.where(valid, e, num_experts)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=e.device)
    offsets[1:] = torch.cumsum(padded, 0)
    order = torch.sort(key, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=e.device)
    starts = torch.zeros(num_experts + 1, dtype=torch.int64, device=e.device)
    starts[1:] = torch.cumsum(counts, 0)
    ks = key.clamp(max=num_experts - 1)
    rows = offsets[ks] + rank - starts[ks]
    return counts, offsets, torch.where(valid, rows, -1)


def _tile_schedule(offsets: torch.Tensor, num_experts: int, block_m: int, rows_bound: int):
    """M-tiles of every expert segment: (tile_expert int32 [n], tile_start int64 [n]) for n = an upper bound;
    unused tiles have expert -1."""
    n_tiles = triton.cdiv(max(rows_bound, 1), block_m) + num_experts
    seg = offsets[1:] - offsets[:-1]
    blocks = (seg + block_m - 1) // block_m
    cum = torch.cumsum(blocks, 0)
    idx = torch.arange(n_tiles, device=offsets.device)
    e = torch.searchsorted(cum, idx, right=True)
    valid = e < num_experts
    ec = e.clamp(max=num_experts - 1)
    first = cum[ec] - blocks[ec]
    start = offsets[ec] + (idx - first) * block_m
    return torch.where(valid, ec, -1).to(torch.int32), start, n_tiles


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- dispatch -------------------------------------------------------------------------------------------
@triton.jit
def _gather_rows_kernel(X, TOK, OUT, x_stride, rows, H, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_cb = tl.cdiv(H, BLOCK)
    for tile in range(pid, rows * n_cb, nprog):
        r, c = row_block(tile, n_cb, BLOCK)
        tok = tl.load(TOK + r)
        m = c < H
        # (the interpreter rejects a scalar & vector mask: broadcast the scalar first)
        v = tl.load(X + tok.to(tl.int64) * x_stride + c, mask=m & ((c * 0 + tok) >= 0), other=0.0)
        tl.store(OUT + r.to(tl.int64) * H + c, v, mask=m)


@MOE_DISPATCH.impl("triton")
def moe_dispatch_forward(x_sorted: torch.Tensor, sorted_token_ids: torch.Tensor, expert_offsets: torch.Tensor,
                         expert_counts: torch.Tensor, inverse_index: torch.Tensor, hidden: torch.Tensor,
                         topk_ids: torch.Tensor, num_experts: int, block_size: int | None) -> None:
    T, k = topk_ids.shape
    cnt, offsets, rows = _sort_pairs(topk_ids.reshape(-1), num_experts, block_size or 1)
    expert_counts.copy_(cnt)
    expert_offsets.copy_(offsets)
    inverse_index.copy_(rows.view(T, k))
    tok = sorted_token_ids
    tok.fill_(-1)
    tok[rows] = torch.arange(T, device=topk_ids.device, dtype=torch.int32).repeat_interleave(k)
    M, H = x_sorted.shape
    if M == 0 or H == 0:
        return
    block = min(triton.next_power_of_2(H), 1024)
    tiles = M * triton.cdiv(H, block)
    _gather_rows_kernel[persistent_grid(tiles, x_sorted.device)](hidden, tok, x_sorted, hidden.stride(0), M, H,
                                                                 BLOCK=block)


# ---- grouped GEMM ---------------------------------------------------------------------------------------
@triton.jit
def _expert_tile(TILE_E, TILE_S, OFFS, tile, N, BM: tl.constexpr, BN: tl.constexpr):
    """Work item ``tile`` = (expert M-tile, N-tile of the N output columns) of ``_tile_schedule``: its expert (-1: an
    unused tile), rows and columns with their masks (the rows inside the expert's segment, the columns < N)."""
    n_nt = tl.cdiv(N, BN)
    mt = tile // n_nt
    e = tl.load(TILE_E + mt)
    rows = tl.load(TILE_S + mt) + tl.arange(0, BM)
    end = tl.load(OFFS + tl.maximum(e, 0) + 1)
    cols = (tile % n_nt) * BN + tl.arange(0, BN)
    return e, rows, rows < end, cols, cols < N


@triton.jit
def _k_range(k0, K, BK: tl.constexpr):
    """The K indices [k0, k0 + BK) of a K step and the mask of those < K."""
    kk = k0 + tl.arange(0, BK)
    return kk, kk < K


@triton.jit
def _grouped_gemm_kernel(X, Wt, OUT, OUT_ROW, TILE_E, TILE_S, OFFS, x_stride, out_stride, N, K, n_mtiles,
                         SCATTER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         PREC: tl.constexpr):
    """out[r] = x[r] @ w[e].T for the rows r of each expert e; SCATTER: row r is written to out[OUT_ROW[r]]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for tile in range(pid, n_mtiles * tl.cdiv(N, BN), nprog):
        e, rows, rmask, cols, cmask = _expert_tile(TILE_E, TILE_S, OFFS, tile, N, BM, BN)
        if e >= 0:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            w_base = Wt + e.to(tl.int64) * N * K
            for k0 in range(0, K, BK):
                kk, kmask = _k_range(k0, K, BK)
                a = tl.load(X + rows[:, None] * x_stride + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(w_base + cols[None, :] * K + kk[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PREC)
            if SCATTER:
                out_rows = tl.load(OUT_ROW + rows, mask=rmask, other=0).to(tl.int64)
            else:
                out_rows = rows
            tl.store(OUT + out_rows[:, None] * out_stride + cols[None, :], acc.to(OUT.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])


def _gemm_blocks(n: int, k: int) -> tuple[int, int, int]:
    return 16, max(16, min(64, triton.next_power_of_2(n))), max(16, min(64, triton.next_power_of_2(k)))


@GROUPED_GEMM.impl("triton")
def grouped_gemm_forward(out: torch.Tensor, x_sorted: torch.Tensor, w: torch.Tensor,
                         expert_offsets: torch.Tensor) -> None:
    M, K = x_sorted.shape
    E, N, _ = w.shape
    out.zero_()  # rows of no expert
    if K == 0:
        return
    BM, BN, BK = _gemm_blocks(N, K)
    tile_e, tile_s, n_mtiles = _tile_schedule(expert_offsets, E, BM, M)
    tiles = n_mtiles * triton.cdiv(N, BN)
    _grouped_gemm_kernel[persistent_grid(tiles, x_sorted.device)](
        x_sorted, w, out, tile_e, tile_e, tile_s, expert_offsets, x_sorted.stride(0), out.stride(0), N, K, n_mtiles,
        SCATTER=False, BM=BM, BN=BN, BK=BK, PREC=_dot_precision(x_sorted.dtype))


# ---- combine --------------------------------------------------------------------------------------------
@triton.jit
def _combine_kernel(Y, W, INV, OUT, y_stride, out_stride, T, H, TOPK, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_cb = tl.cdiv(H, BLOCK)
    for tile in range(pid, T * n_cb, nprog):
        t, c = row_block(tile, n_cb, BLOCK)
        m = c < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(TOPK):
            r = tl.load(INV + t * TOPK + j)
            wj = tl.load(W + t * TOPK + j)
            y = tl.load(Y + r.to(tl.int64) * y_stride + c, mask=m & ((c * 0 + r) >= 0), other=0.0).to(tl.float32)
            acc += tl.where(r >= 0, wj, 0.0) * y
        tl.store(OUT + t.to(tl.int64) * out_stride + c, acc.to(OUT.dtype.element_ty), mask=m)


@MOE_COMBINE.impl("triton")
def moe_combine_forward(out: torch.Tensor, expert_out: torch.Tensor, topk_weights: torch.Tensor,
                        inverse_index: torch.Tensor) -> None:
    T, H = out.shape
    if T == 0 or H == 0:
        return
    block = min(triton.next_power_of_2(H), 1024)
    tiles = T * triton.cdiv(H, block)
    _combine_kernel[persistent_grid(tiles, out.device)](
        expert_out, topk_weights, inverse_index, out, expert_out.stride(0), out.stride(0), T, H,
        inverse_index.shape[1], BLOCK=block)


# ---- fused MoE ------------------------------------------------------------------------------------------
@triton.jit
def _moe_gate_up_kernel(X, W13, ACT, ROW_TOK, TILE_E, TILE_S, OFFS, x_stride, H, INTER, n_mtiles,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """act[r] = T(silu(gate) * up) of the token of sorted row r (gathered by ROW_TOK) against its expert's W13."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for tile in range(pid, n_mtiles * tl.cdiv(INTER, BN), nprog):
        e, rows, rmask, cols, cmask = _expert_tile(TILE_E, TILE_S, OFFS, tile, INTER, BM, BN)
        if e >= 0:
            tok = tl.load(ROW_TOK + rows, mask=rmask, other=0).to(tl.int64)
            acc_g = tl.zeros((BM, BN), dtype=tl.float32)
            acc_u = tl.zeros((BM, BN), dtype=tl.float32)
            w_base = W13 + e.to(tl.int64) * 2 * INTER * H
            for k0 in range(0, H, BK):
                kk, kmask = _k_range(k0, H, BK)
                a = tl.load(X + tok[:, None] * x_stride + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                bmask = cmask[None, :] & kmask[:, None]
                bg = tl.load(w_base + cols[None, :] * H + kk[:, None], mask=bmask, other=0.0)
                bu = tl.load(w_base + (INTER + cols[None, :]) * H + kk[:, None], mask=bmask, other=0.0)
                acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
                acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
            act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
            tl.store(ACT + rows[:, None].to(tl.int64) * INTER + cols[None, :], act.to(ACT.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])


@FUSED_MOE.impl("triton")
def fused_moe_forward(out: torch.Tensor, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str,
                      expert_map: torch.Tensor | None) -> None:
    T, H = hidden.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    k = topk_ids.shape[1]
    local = topk_ids.reshape(-1).long()
    if expert_map is not None:
        local = expert_map.long()[local]
    P = T * k
    _, offsets, pair_row = _sort_pairs(local, E)
    dev = hidden.device
    valid = pair_row >= 0
    row_tok = torch.zeros(max(P, 1), dtype=torch.int32, device=dev)
    row_pair = torch.zeros(max(P, 1), dtype=torch.int32, device=dev)
    safe = torch.where(valid, pair_row, P)  # dropped pairs write one scratch slot past the end
    scratch_tok = torch.zeros(P + 1, dtype=torch.int32, device=dev)
    scratch_pair = torch.zeros(P + 1, dtype=torch.int32, device=dev)
    pairs = torch.arange(P, device=dev, dtype=torch.int32)
    scratch_tok[safe] = pairs // k
    scratch_pair[safe] = pairs
    row_tok[:P] = scratch_tok[:P]
    row_pair[:P] = scratch_pair[:P]
    act = torch.empty(max(P, 1), inter, dtype=hidden.dtype, device=dev)
    y = torch.empty(max(P, 1), H, dtype=torch.float32, device=dev)
    prec = _dot_precision(hidden.dtype)

    BM, BN, BK = _gemm_blocks(inter, H)
    tile_e, tile_s, n_mtiles = _tile_schedule(offsets, E, BM, P)
    _moe_gate_up_kernel[persistent_grid(n_mtiles * triton.cdiv(inter, BN), dev)](
        hidden, w13, act, row_tok, tile_e, tile_s, offsets, hidden.stride(0), H, inter, n_mtiles,
        BM=BM, BN=BN, BK=BK, PREC=prec)
    BM2, BN2, BK2 = _gemm_blocks(H, inter)
    if (BM2, BN2) != (BM, BN):
        tile_e, tile_s, n_mtiles = _tile_schedule(offsets, E, BM2, P)
    # the down projection: the grouped GEMM on act, each row written to its pair's row of y
    _grouped_gemm_kernel[persistent_grid(n_mtiles * triton.cdiv(H, BN2), dev)](
        act, w2, y, row_pair, tile_e, tile_s, offsets, act.stride(0), y.stride(0), H, inter, n_mtiles,
        SCATTER=True, BM=BM2, BN=BN2, BK=BK2, PREC=prec)
    inv = torch.where(valid, torch.arange(P, device=dev), -1).to(torch.int32).view(T, k)
    moe_combine_forward(out, y, topk_weights, inv)
