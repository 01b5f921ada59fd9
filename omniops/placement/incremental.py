"""Incremental (live) re-placement: a few slot changes per layer instead of a fresh plan.

A fresh plan reshuffles most slots (every changed slot is an expert's weights copied over the network). Here the
placement in service is edited greedily, one operation at a time, always the one that lowers the layer's
maximum GPU load most per slot changed:

* retarget (1 slot): a copy of an expert that has >= 2 copies becomes a copy of another expert: a hot expert
  on the busiest GPU gains a replica somewhere cooler, or a slot on the busiest GPU is handed to a cold expert;
* swap (2 slots): a copy on the busiest GPU trades places with a lighter copy on another GPU.

Both are evaluated exactly (every GPU's new load). No operation removes an expert's last copy, so every expert
keeps a copy after every operation. Before them, phase A (up to half the budget) moves surplus copies to the
hottest experts short of a fresh plan's copy counts where that keeps the max: on the recorded window it buys
little, but it is what keeps the next steps' heating experts from overloading one GPU.

The budget counts slots that end up different from the placement in service (what is copied), not operations:
reworking a slot that already changed is free and putting one back refunds it, so the greedy does not stall
with budget left over a slot it touched twice. With ``num_groups``/``num_nodes`` (hierarchical placements) copies never
leave their group's node. Layers are one vectorised axis; the loop is over operations.
"""

from __future__ import annotations

import numpy as np
import torch

from omniops.placement._common import (
    ArrayLike,
    check_int,
    check_phy2log,
    check_weight,
    expert_nodes,
    gpu_loads,
    logical_counts,
    replicate,
)
from omniops.placement._operations import Hosts, apply_retarget, best_operation, retarget_loads
from omniops.placement._repair import repair_nodes

_PHASE_A_TRIES = 8  # short experts tried per replication step, hottest first
# Budget share that phase A (replication towards a fresh plan's copy counts) may spend. Those moves keep the max
# on the recorded window but protect the next steps (a heating expert's copies); the rest is for phase B's
# exact cuts of the max. Measured on drift and re-ranked Zipf traces (EP32/EP64 hierarchical): 0.25-0.5 best,
# 1.0 starves phase B on large load changes.
_PHASE_A_SHARE = 0.5
# A re-paired layer (a group swapped between nodes, >= 64 slot copies at DeepSeek-V3's sizes) is kept only when
# its final max GPU load is at least this much (relative) below the plain plan's.
_REPAIR_KEEP = 0.01


def incremental_rebalance(
    weight: ArrayLike,
    phy2log: ArrayLike,
    num_gpus: int,
    max_moves: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    min_gain: float = 1e-3,
) -> torch.Tensor:
    """Improve the placement in service with at most ``max_moves`` changed slots per layer.

    Args:
        weight: [L, E] recent load per logical expert (e.g. ``LoadRecorder.weight()``).
        phy2log: [L, R] placement in service; every expert must have a slot; slot ``j`` on GPU ``j // (R/G)``.
        num_gpus: GPUs G (R must be a multiple).
        max_moves: slots per layer whose logical expert may change (each is one expert's weights copied).
        num_groups, num_nodes: when ``num_nodes > 1`` and ``num_groups % num_nodes == 0`` the placement is
            hierarchical (each group's copies on one node) and stays so.
        min_gain: a layer stops improving once its max GPU load is within this fraction of its lower bound
            (mean GPU load; hierarchical: the heaviest node's load over its GPUs): moving weights for less is
            not worth it. The static planner's polish passes 1e-9.

    Returns:
        phy2log [L, R] int64; the layer's max GPU load never increases, and every expert keeps >= 1 copy.
    """
    w = check_weight(weight)
    num_layers, num_experts = w.shape
    p2l = check_phy2log(phy2log, num_layers, num_experts).copy()
    num_gpus = check_int("num_gpus", num_gpus, minimum=1)
    max_moves = check_int("max_moves", max_moves, minimum=0)
    num_groups = check_int("num_groups", num_groups, minimum=1)
    num_nodes = check_int("num_nodes", num_nodes, minimum=1)
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 1:
        raise ValueError(f"min_gain: expected a fraction in [0, 1), got {min_gain!r}")
    num_slots = p2l.shape[1]
    if num_slots % num_gpus:
        raise ValueError(f"num_gpus: {num_slots} slots do not split evenly over {num_gpus} GPUs")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus: {num_gpus} is not a multiple of num_nodes={num_nodes}")
    hier = num_nodes > 1 and num_groups % num_nodes == 0
    exp_node = expert_nodes(p2l, num_experts, num_groups, num_nodes, num_gpus) if hier else None
    if max_moves == 0:
        return torch.from_numpy(p2l)

    out = _plan(w, p2l.copy(), num_gpus, max_moves, exp_node, num_nodes, min_gain)
    if hier and max_moves >= 2 * (num_experts // num_groups):
        # The node pairing itself may be what limits a layer (no edit inside the nodes beats the heaviest node's
        # load over its GPUs), and only a budget of two groups' slots can change it. A re-pair spends most of
        # the budget at once, so it is planned on the side and kept only for the layers where it ends clearly
        # better than the plain plan.
        rep = p2l.copy()
        rows = np.flatnonzero(repair_nodes(w, rep, exp_node, max_moves, num_groups, num_nodes, num_gpus))
        if rows.size:
            nodes = expert_nodes(rep[rows], num_experts, num_groups, num_nodes, num_gpus)
            alt = _plan(w[rows], rep[rows], num_gpus, max_moves, nodes, num_nodes, min_gain, orig=p2l[rows])
            better = gpu_loads(w[rows], alt, num_gpus).max(1) < gpu_loads(w[rows], out[rows], num_gpus).max(1) * (
                1 - _REPAIR_KEEP)
            out[rows[better]] = alt[better]
    return torch.from_numpy(out)


def _plan(
    w: np.ndarray, p2l: np.ndarray, num_gpus: int, max_moves: int, exp_node: np.ndarray | None, num_nodes: int,
    min_gain: float, orig: np.ndarray | None = None,
) -> np.ndarray:
    """Phases A and B on validated input; ``p2l`` is edited in place and returned. ``orig``: the placement in
    service when ``p2l`` already differs from it (a re-paired layer), else ``p2l`` itself."""
    num_layers, num_experts = w.shape
    num_slots = p2l.shape[1]
    per = num_slots // num_gpus
    gpu_node = np.arange(num_gpus) // (num_gpus // num_nodes)
    slot_gpu = np.arange(num_slots) // per
    orig = p2l.copy() if orig is None else orig
    cnt = logical_counts(p2l, num_experts)
    hosts = Hosts(p2l, num_experts, per)
    # The budget counts slots that differ from the placement in service (what a caller copies), not operations:
    # an operation on a slot that already changed is free, one that puts a slot back refunds it.
    used = (p2l != orig).sum(1)
    ar = np.arange(num_layers)
    rounds = 2 * max_moves + 16  # free operations do not consume budget; each one still cuts or keeps the max

    # Phase A: move copies from experts that hold more than a fresh replication would give them to the
    # hottest experts short of copies, while the layer's max GPU load does not rise. When the hottest short
    # expert's copy fits nowhere, the next hottest ones are tried (a layer stops only when none fits).
    cstar = _target_counts(w, num_slots, exp_node, num_nodes)
    cap_a = max(1, int(round(max_moves * _PHASE_A_SHARE)))
    active = ar
    for _ in range(rounds):
        if active.size == 0:
            break
        aa = np.arange(active.size)
        wl, cl, pl = w[active], cnt[active], p2l[active]
        pc = wl / cl
        short = cl < cstar[active]
        over = np.take_along_axis(cl > cstar[active], pl, axis=1)  # slots of experts with too many copies
        sl = np.take_along_axis(pc, pl, axis=1)
        gl = sl.reshape(active.size, num_gpus, per).sum(-1)
        room = gl[:, slot_gpu] - sl  # load left on the slot's GPU without it
        hottest = np.argsort(-np.where(short, pc, -np.inf), axis=1)[:, :_PHASE_A_TRIES]
        ok = np.zeros(active.size, dtype=bool)
        a = np.zeros(active.size, dtype=np.int64)
        t = np.zeros(active.size, dtype=np.int64)
        for j in range(hottest.shape[1]):
            aj = hottest[:, j]
            spare = over if exp_node is None else over & (gpu_node[slot_gpu][None, :] == exp_node[active, aj][:, None])
            score = np.where(spare, room, np.inf)
            tj = np.argmin(score, axis=1)
            new = retarget_loads(wl, cl, pl, gl, hosts, active, aj, tj, per)
            ot = orig[active, tj]
            cost_j = (aj != ot).astype(np.int64) - (pl[aa, tj] != ot)
            fits = short[aa, aj] & np.isfinite(score[aa, tj]) & (new.max(1) <= gl.max(1) * (1 + 1e-12))
            fits &= ~ok & (used[active] + cost_j <= cap_a)
            a, t, ok = np.where(fits, aj, a), np.where(fits, tj, t), ok | fits
            if ok.all():
                break
        ot = orig[active, t]
        cost = (a != ot).astype(np.int64) - (pl[aa, t] != ot)
        rows, a, t = active[ok], a[ok], t[ok]
        apply_retarget(p2l, cnt, hosts, rows, t, a)
        used[rows] += cost[ok]
        active = rows[used[rows] < cap_a]

    # Phase B: exact greedy on swaps and retargets, each strictly cutting the max GPU load. A layer is done once
    # its max is within min_gain of what no placement of this layer can beat: the mean GPU load, or with a
    # hierarchy the heaviest node's (its groups stay there) spread over the node's GPUs.
    bound = w.sum(1) / num_gpus
    if exp_node is not None:
        node_load = np.zeros((num_layers, num_nodes))
        np.add.at(node_load, (np.broadcast_to(ar[:, None], exp_node.shape), exp_node), w)
        bound = node_load.max(1) / (num_gpus // num_nodes)
    bound = bound * (1 + min_gain)
    active = ar[used < max_moves]
    for _ in range(rounds):
        if active.size == 0:
            break
        kind, s, t, a, cost = best_operation(
            w[active], p2l[active], cnt[active], hosts, active, orig[active], max_moves - used[active], per,
            slot_gpu, gpu_node, None if exp_node is None else exp_node[active],
        )
        ok = kind > 0
        rows = active[ok]
        kind, s, t, a = kind[ok], s[ok], t[ok], a[ok]
        sw = kind == 2
        r_sw, s_sw, t_sw = rows[sw], s[sw], t[sw]
        e_s, e_t = p2l[r_sw, s_sw], p2l[r_sw, t_sw]
        apply_retarget(p2l, cnt, hosts, r_sw, s_sw, e_t)
        apply_retarget(p2l, cnt, hosts, r_sw, t_sw, e_s)
        rt = kind == 1
        apply_retarget(p2l, cnt, hosts, rows[rt], t[rt], a[rt])
        used[rows] += cost[ok]
        active = rows[used[rows] < max_moves]
        if active.size:
            lmax = np.take_along_axis(w[active] / cnt[active], p2l[active], axis=1).reshape(
                active.size, num_gpus, per).sum(-1).max(1)
            active = active[lmax > bound[active]]
    return p2l


def _target_counts(w: np.ndarray, num_slots: int, exp_node: np.ndarray | None, num_nodes: int) -> np.ndarray:
    """[L, E] copies a fresh replication would give (per node when hierarchical)."""
    if exp_node is None:
        return replicate(w, num_slots)
    num_layers, num_experts = w.shape
    per_node = num_slots // num_nodes
    out = np.zeros((num_layers, num_experts), dtype=np.int64)
    ar = np.arange(num_layers)
    for n in range(num_nodes):
        on = exp_node == n
        cnt = on.astype(np.int64)
        pc = np.where(on, w, -np.inf)
        extra = per_node - cnt.sum(1)
        for i in range(int(extra.max(initial=0))):
            need = ar[extra > i]
            e = np.argmax(pc[need], axis=1)
            cnt[need, e] += 1
            pc[need, e] = w[need, e] / cnt[need, e]
        out += cnt
    return out
