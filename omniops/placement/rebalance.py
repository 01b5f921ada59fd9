"""Static expert placement with the same call and meaning as DeepSeek's EPLB.

Pipeline (hierarchical when ``num_groups % num_nodes == 0``, else one flat "node"):

1. pack expert groups onto nodes, ``num_groups / num_nodes`` groups per node (group-limited routing needs a
   group's copies on one node);
2. inside each node, replicate: every extra slot goes to the expert with the highest load per copy (this greedy
   minimises the largest per-copy load exactly);
3. inside each node, pack the copies onto GPUs, exactly ``R / num_gpus`` per GPU: longest-processing-time
   greedy (EPLB's packing), then pairwise swaps out of the heaviest GPU while they lower the layer's maximum.
   Swaps only ever lower the maximum, so the result is never worse than the greedy packing.

Every loop runs over items or iterations; the layers (and nodes) are one vectorised numpy axis.
"""

from __future__ import annotations

import numpy as np
import torch

from omniops.placement._common import ArrayLike, build_log2phy, check_int, check_weight, logical_counts

# Cap on improving swaps per packing; each lowers the heaviest pack, few are needed past the greedy start.
_MAX_SWAP_ROUNDS = 256
# Exact improving operations after packing (see rebalance_phy2log, step 4).
_POLISH_MOVES = 16
# Stop improving a pack set once its max is this close (relative) to the lower bound.
_NEAR_BOUND = 1e-5


def replicate(weight: np.ndarray, num_slots: int) -> np.ndarray:
    """[X, n] loads -> [X, n] copies per expert (>= 1 each, summing to num_slots), minimising max load/copy."""
    rows, n = weight.shape
    cnt = np.ones((rows, n), dtype=np.int64)
    extra = num_slots - n
    if extra <= 0:
        return cnt
    ar = np.arange(rows)
    per_copy = weight.copy()
    for _ in range(extra):
        e = np.argmax(per_copy, axis=1)
        cnt[ar, e] += 1
        per_copy[ar, e] = weight[ar, e] / cnt[ar, e]
    return cnt


def lpt_pack(weight: np.ndarray, num_packs: int) -> np.ndarray:
    """[X, n] item loads -> [X, num_packs, n / num_packs] item ids: heaviest item to the lightest non-full pack."""
    rows, n = weight.shape
    per = n // num_packs
    members = np.empty((rows, num_packs, per), dtype=np.int64)
    if per == 1:  # one item per pack: every assignment is the same
        members[:, :, 0] = np.arange(n)
        return members
    order = np.argsort(-weight, axis=1, kind="stable")
    loads = np.zeros((rows, num_packs))
    fill = np.zeros((rows, num_packs), dtype=np.int64)
    ar = np.arange(rows)
    for i in range(n):
        item = order[:, i]
        p = np.argmin(np.where(fill < per, loads, np.inf), axis=1)
        members[ar, p, fill[ar, p]] = item
        loads[ar, p] += weight[ar, item]
        fill[ar, p] += 1
    return members


def improve_by_swaps(
    weight: np.ndarray,
    members: np.ndarray,
    target: np.ndarray | None = None,
    max_rounds: int = _MAX_SWAP_ROUNDS,
    partner_packs: int = 8,
) -> np.ndarray:
    """Swap an item of the heaviest pack with one of another pack while that lowers the max pack load.

    ``target`` [X]: a row is left alone once its max is at most this (e.g. a bound the caller cannot beat).
    """
    rows, m, per = members.shape
    n = m * per
    if m < 2 or rows == 0:
        return members
    members = members.copy()
    ar_all = np.arange(rows)
    pack_of = np.empty((rows, n), dtype=np.int64)
    pos_of = np.empty((rows, n), dtype=np.int64)
    flat = members.reshape(rows, n)
    pack_of[ar_all[:, None], flat] = np.repeat(np.arange(m), per)[None, :]
    pos_of[ar_all[:, None], flat] = np.tile(np.arange(per), m)[None, :]
    k = min(m - 1, partner_packs)
    all_loads = weight[ar_all[:, None, None], members].sum(-1)  # [rows, m], kept up to date below
    # A row is done once its max is within `_NEAR_BOUND` of a lower bound (mean pack load, largest item).
    bound = np.maximum(all_loads.mean(1), weight.max(1))
    if target is not None:
        bound = np.maximum(bound, target)
    bound = bound * (1 + _NEAR_BOUND)
    active = ar_all[all_loads.max(1) > bound]
    for _ in range(max_rounds):
        if active.size == 0:
            break
        w = weight[active]
        mem = members[active]
        loads = all_loads[active]
        order = np.argsort(-loads, axis=1)
        top = np.take_along_axis(loads, order[:, :3], axis=1)
        pstar = order[:, 0]
        lmax = top[:, 0]
        second_idx = order[:, 1]
        second = top[:, 1]
        third = top[:, 2] if m >= 3 else np.full(active.size, -np.inf)
        ar = np.arange(active.size)
        a_items = mem[ar, pstar]  # [A, per]
        wa = w[ar[:, None], a_items]
        # Partners come from the lightest packs only: they give the largest feasible cuts, and this keeps a
        # round O(per^2 * k) instead of O(per * n).
        light = order[:, -k:]  # [A, k], never p* since k <= m - 1
        b_items = mem[ar[:, None], light].reshape(active.size, k * per)  # [A, k*per]
        hb = np.repeat(light, per, axis=1)
        wb = w[ar[:, None], b_items]
        delta = wa[:, :, None] - wb[:, None, :]  # [A, per, k*per]
        rest = np.where(hb == second_idx[:, None], third[:, None], second[:, None])  # max excluding p* and h
        new_h = loads[ar[:, None], hb][:, None, :] + delta
        new_max = np.maximum(np.maximum(rest[:, None, :], lmax[:, None, None] - delta), new_h)
        tol = 1e-12 * np.maximum(lmax, 1e-300)
        valid = delta > tol[:, None, None]
        new_max = np.where(valid, new_max, np.inf).reshape(active.size, -1)
        best = np.argmin(new_max, axis=1)
        gain = lmax - new_max[ar, best]
        ok = gain > tol
        if not ok.any():
            break
        sel = ar[ok]
        rows_g = active[sel]
        ia, ib = np.divmod(best[sel], k * per)
        a = a_items[sel, ia]
        b = b_items[sel, ib]
        ha = pstar[sel]
        hb_sel = pack_of[rows_g, b]
        pb = pos_of[rows_g, b]
        members[rows_g, ha, ia] = b
        members[rows_g, hb_sel, pb] = a
        pack_of[rows_g, a], pack_of[rows_g, b] = hb_sel, ha
        pos_of[rows_g, a], pos_of[rows_g, b] = pb, ia
        d = weight[rows_g, a] - weight[rows_g, b]
        all_loads[rows_g, ha] -= d
        all_loads[rows_g, hb_sel] += d
        active = rows_g[all_loads[rows_g].max(1) > bound[rows_g]]
    return members


def balanced_pack(weight: np.ndarray, num_packs: int, target: np.ndarray | None = None) -> np.ndarray:
    """[X, n] -> [X, num_packs, n / num_packs] item ids, greedy then improved by swaps."""
    members = lpt_pack(weight, num_packs)
    if members.shape[2] > 1:
        members = improve_by_swaps(weight, members, target)
    return members


def _check_args(
    weight: ArrayLike, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, int, int, int, int]:
    w = check_weight(weight)
    num_experts = w.shape[1]
    num_replicas = check_int("num_replicas", num_replicas, minimum=1)
    num_groups = check_int("num_groups", num_groups, minimum=1)
    num_nodes = check_int("num_nodes", num_nodes, minimum=1)
    num_gpus = check_int("num_gpus", num_gpus, minimum=1)
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas: {num_replicas} slots cannot hold {num_experts} logical experts")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas: {num_replicas} is not a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus: {num_gpus} is not a multiple of num_nodes={num_nodes}")
    if num_groups % num_nodes == 0 and num_experts % num_groups:
        raise ValueError(f"num_groups: {num_experts} experts do not split into {num_groups} equal groups")
    return w, num_replicas, num_groups, num_nodes, num_gpus


def rebalance_phy2log(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> np.ndarray:
    """Core planner on validated numpy input: [L, E] -> phy2log [L, R]."""
    num_layers, num_experts = weight.shape
    if num_groups % num_nodes:  # global policy: one node, one group
        num_groups = num_nodes = 1
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes

    # 1. groups -> nodes
    rows = num_layers * num_nodes
    if num_nodes == 1:
        node_experts, wn = None, weight
    else:
        group_w = weight.reshape(num_layers, num_groups, group_size).sum(-1)
        node_groups = balanced_pack(group_w, num_nodes)  # [L, nodes, groups_per_node]
        node_experts = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(
            rows, experts_per_node
        )  # [L*nodes, experts on node]: global expert ids
        wn = weight[np.repeat(np.arange(num_layers), num_nodes)[:, None], node_experts]

    # 2. replicate inside each node
    cnt = replicate(wn, slots_per_node)
    copy_expert = np.repeat(np.tile(np.arange(experts_per_node), rows), cnt.ravel()).reshape(rows, slots_per_node)
    copy_w = np.take_along_axis(wn / cnt, copy_expert, axis=1)

    # 3. copies -> GPUs of the node, GPU-major slot order
    # The layer's max GPU load cannot drop below its heaviest node's bound, so balancing the other nodes
    # further than that buys nothing; it only costs planner time.
    node_bound = np.maximum(wn.sum(1) / gpus_per_node, copy_w.max(1)).reshape(num_layers, num_nodes)
    target = np.repeat(node_bound.max(1), num_nodes)
    members = balanced_pack(copy_w, gpus_per_node, target).reshape(rows, slots_per_node)
    local = np.take_along_axis(copy_expert, members, axis=1)
    p2l = local if node_experts is None else np.take_along_axis(node_experts, local, axis=1).reshape(
        num_layers, num_replicas
    )
    # 4. Polish: the greedy replication minimises the largest per-copy load, but which copies exist also decides
    # how well they pack (e.g. 9 big copies on 8 GPUs). A few exact retargets/swaps that strictly cut the max
    # GPU load fix such cases; they never make a layer worse.
    if _POLISH_MOVES and num_replicas // num_gpus > 1:
        from omniops.placement.incremental import incremental_rebalance  # circular at import time

        p2l = incremental_rebalance(
            weight, p2l, num_gpus, _POLISH_MOVES, num_groups=num_groups, num_nodes=num_nodes, min_gain=1e-9
        ).numpy()
    return p2l


def rebalance_experts(
    weight: ArrayLike, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan a placement of ``num_replicas`` physical expert slots over ``num_gpus`` GPUs.

    Same call and meaning as DeepSeek's ``eplb.rebalance_experts``.

    Args:
        weight: [L, E] load (tokens) per layer and logical expert; non-negative, finite.
        num_replicas: physical slots R (>= E, multiple of ``num_gpus``).
        num_groups: expert groups (group-limited routing). Hierarchical placement when divisible by
            ``num_nodes``: all copies of a group on one node. Otherwise global.
        num_nodes: nodes (fast intra-node links); ``num_gpus`` must be a multiple.
        num_gpus: GPUs (EP ranks). Slot ``j`` lives on GPU ``j // (R // num_gpus)``.

    Returns:
        phy2log [L, R] int64: logical expert of each slot;
        log2phy [L, E, R - E + 1] int64: slots of each expert (ascending), padded with -1;
        logcnt [L, E] int64: copies of each expert.
    """
    w, num_replicas, num_groups, num_nodes, num_gpus = _check_args(
        weight, num_replicas, num_groups, num_nodes, num_gpus
    )
    num_experts = w.shape[1]
    phy2log = rebalance_phy2log(w, num_replicas, num_groups, num_nodes, num_gpus)
    logcnt = logical_counts(phy2log, num_experts)
    log2phy = build_log2phy(phy2log, num_experts, num_replicas - num_experts + 1)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
