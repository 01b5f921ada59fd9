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
    logical_counts,
    replicate,
)

_SWAP_GPUS = 8  # swap partners: copies on this many of the lightest GPUs
_RETARGET_SLOTS = 8  # candidate donor slots (copies of multi-copy experts on the coolest GPUs)
_COLD_EXPERTS = 4  # candidate cold experts to take over a multi-copy slot on the busiest GPU
_PHASE_A_TRIES = 8  # short experts tried per replication step, hottest first
# Budget share that phase A (replication towards a fresh plan's copy counts) may spend. Those moves keep the max
# on the recorded window but protect the next steps (a heating expert's copies); the rest is for phase B's
# exact cuts of the max. Measured on drift and re-ranked Zipf traces (EP32/EP64 hierarchical): 0.25-0.5 best,
# 1.0 starves phase B on large load changes.
_PHASE_A_SHARE = 0.5


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
    per = num_slots // num_gpus
    hier = num_nodes > 1 and num_groups % num_nodes == 0
    gpu_node = np.arange(num_gpus) // (num_gpus // num_nodes)
    exp_node = expert_nodes(p2l, num_experts, num_groups, num_nodes, num_gpus) if hier else None
    slot_gpu = np.arange(num_slots) // per
    if max_moves == 0:
        return torch.from_numpy(p2l)

    cnt = logical_counts(p2l, num_experts)
    hosts = _Hosts(p2l, num_experts, per)
    orig = p2l.copy()
    # The budget counts slots that differ from the placement in service (what a caller copies), not operations:
    # an operation on a slot that already changed is free, one that puts a slot back refunds it.
    used = np.zeros(num_layers, dtype=np.int64)
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
            new = _retarget_loads(wl, cl, pl, gl, hosts, active, aj, tj, per)
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
        _apply_retarget(p2l, cnt, hosts, rows, t, a)
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
        kind, s, t, a, cost = _best_operation(
            w[active], p2l[active], cnt[active], hosts, active, orig[active], max_moves - used[active], per,
            slot_gpu, gpu_node, None if exp_node is None else exp_node[active],
        )
        ok = kind > 0
        rows = active[ok]
        kind, s, t, a = kind[ok], s[ok], t[ok], a[ok]
        sw = kind == 2
        r_sw, s_sw, t_sw = rows[sw], s[sw], t[sw]
        e_s, e_t = p2l[r_sw, s_sw], p2l[r_sw, t_sw]
        _apply_retarget(p2l, cnt, hosts, r_sw, s_sw, e_t)
        _apply_retarget(p2l, cnt, hosts, r_sw, t_sw, e_s)
        rt = kind == 1
        _apply_retarget(p2l, cnt, hosts, rows[rt], t[rt], a[rt])
        used[rows] += cost[ok]
        active = rows[used[rows] < max_moves]
        if active.size:
            lmax = np.take_along_axis(w[active] / cnt[active], p2l[active], axis=1).reshape(
                active.size, num_gpus, per).sum(-1).max(1)
            active = active[lmax > bound[active]]
    return torch.from_numpy(p2l)


class _Hosts:
    """Copies of each expert on each GPU, [L, E, G], kept current as slots change.

    With one slot per GPU this is just ``phy2log == expert`` and no table is kept (it would be E*G per layer).
    """

    def __init__(self, p2l: np.ndarray, num_experts: int, per: int) -> None:
        self.per = per
        self.table = None
        if per > 1:
            num_layers, num_slots = p2l.shape
            g = num_slots // per
            flat = ((np.arange(num_layers)[:, None] * num_experts + p2l) * g + np.arange(num_slots) // per).ravel()
            self.table = np.bincount(flat, minlength=num_layers * num_experts * g).reshape(num_layers, num_experts, g)

    def of(self, p2l_rows: np.ndarray, rows: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """[A, X] expert ids for layers `rows` -> [A, X, G]."""
        if self.table is None:
            return (p2l_rows[:, None, :] == experts[:, :, None]).astype(np.float64)
        return self.table[rows[:, None], experts]

    def move(self, rows: np.ndarray, t: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        if self.table is not None:
            np.subtract.at(self.table, (rows, old, t // self.per), 1)
            np.add.at(self.table, (rows, new, t // self.per), 1)


def _apply_retarget(
    p2l: np.ndarray, cnt: np.ndarray, hosts: _Hosts, rows: np.ndarray, t: np.ndarray, a: np.ndarray
) -> None:
    """Slot t of each row in `rows` becomes a copy of expert a (updates counts and host table)."""
    if rows.size == 0:
        return
    c = p2l[rows, t]
    hosts.move(rows, t, c, a)
    np.subtract.at(cnt, (rows, c), 1)
    np.add.at(cnt, (rows, a), 1)
    p2l[rows, t] = a


def _retarget_loads(
    w: np.ndarray, cnt: np.ndarray, p2l: np.ndarray, gl: np.ndarray, hosts: _Hosts, rows: np.ndarray,
    a: np.ndarray, t: np.ndarray, per: int,
) -> np.ndarray:
    """[A, G] GPU loads after slot t becomes a copy of a (one candidate per row)."""
    ar = np.arange(p2l.shape[0])
    c = p2l[ar, t]
    wa, ca, wc, cc = w[ar, a], cnt[ar, a], w[ar, c], cnt[ar, c]
    pa_new, pc_new = wa / (ca + 1), wc / np.maximum(cc - 1, 1)
    h = hosts.of(p2l, rows, np.stack([a, c], axis=1))
    new = gl + h[:, 0] * (pa_new - wa / ca)[:, None] + h[:, 1] * (pc_new - wc / cc)[:, None]
    new[ar, t // per] += pa_new - pc_new
    return new


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


def _best_operation(
    w: np.ndarray,
    p2l: np.ndarray,
    cnt: np.ndarray,
    hosts: _Hosts,
    rows: np.ndarray,
    orig: np.ndarray,
    budget: np.ndarray,
    per: int,
    slot_gpu: np.ndarray,
    gpu_node: np.ndarray,
    exp_node: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: (kind 0 none / 1 retarget / 2 swap, slot s on the busiest GPU, slot t, new expert for t, cost).

    ``orig`` [A, R] is the placement in service and ``budget`` [A] the slot changes still allowed; an operation's
    cost is how many more slots differ from ``orig`` after it (-2..2). Among strictly improving affordable
    operations the one with the best cut of the max GPU load per slot of cost wins (free ones count double);
    among swaps of equal cut, the one leaving its two GPUs most even (more room for the next operations)."""
    n_layers, num_slots = p2l.shape
    num_gpus = num_slots // per
    ar = np.arange(n_layers)
    pc = w / cnt  # load per copy
    sl = np.take_along_axis(pc, p2l, axis=1)  # [A, R] slot loads
    gl = sl.reshape(n_layers, num_gpus, per).sum(-1)  # [A, G]
    order = np.argsort(-gl, axis=1)
    gstar = order[:, 0]
    lmax = gl[ar, gstar]
    tol = 1e-9 * np.maximum(lmax, 1e-300)
    star_slots = gstar[:, None] * per + np.arange(per)  # [A, S]
    node_ok = (
        np.ones((n_layers, num_gpus), dtype=bool) if exp_node is None else gpu_node[None, :] == gpu_node[gstar][:, None]
    )  # GPUs whose node may receive the busiest GPU's experts

    # --- swaps: exact, only the two GPUs change; partners on the lightest allowed GPUs (largest feasible cuts)
    kg = min(_SWAP_GPUS, num_gpus - 1)
    if kg > 0:
        second_idx = order[:, 1]
        second = gl[ar, second_idx]
        third = gl[ar, order[:, 2]] if num_gpus > 2 else np.full(n_layers, -np.inf)
        allowed = node_ok.copy()
        allowed[ar, gstar] = False
        light_score = np.where(allowed, gl, np.inf)
        light = np.argpartition(light_score, kg - 1, axis=1)[:, :kg] if kg < num_gpus else np.argsort(light_score, 1)
        light_ok = np.take_along_axis(light_score, light, axis=1) < np.inf
        t_gpu = np.repeat(light, per, axis=1)  # [A, kg*S]
        cand = (light[:, :, None] * per + np.arange(per)).reshape(n_layers, -1)
        rest = np.where(t_gpu == second_idx[:, None], third[:, None], second[:, None])  # max excl. g* and h
        delta = sl[ar[:, None], star_slots][:, :, None] - np.take_along_axis(sl, cand, axis=1)[:, None, :]
        new_max = np.maximum(np.maximum(rest[:, None, :], lmax[:, None, None] - delta),
                             gl[ar[:, None], t_gpu][:, None, :] + delta)
        valid = (delta > tol[:, None, None]) & np.repeat(light_ok, per, axis=1)[:, None, :]
        cur_s, orig_s = p2l[ar[:, None], star_slots], orig[ar[:, None], star_slots]  # [A, S]
        cur_t, orig_t = np.take_along_axis(p2l, cand, axis=1), np.take_along_axis(orig, cand, axis=1)  # [A, C]
        cost_sw = ((cur_t[:, None, :] != orig_s[:, :, None]).astype(np.int64)
                   + (cur_s[:, :, None] != orig_t[:, None, :])
                   - (cur_s != orig_s)[:, :, None] - (cur_t != orig_t)[:, None, :])
        valid &= cost_sw <= budget[:, None, None]
        gain = np.where(valid, lmax[:, None, None] - new_max, -np.inf)
        valid &= gain > tol[:, None, None]
        eff = np.where(valid, gain / np.maximum(cost_sw, 0.5), -np.inf).reshape(n_layers, -1)
        best_eff = eff.max(1)
        # among the swaps of (nearly) the best efficiency: the one leaving g* and h most even
        pair = np.maximum(lmax[:, None, None] - delta, gl[ar[:, None], t_gpu][:, None, :] + delta).reshape(n_layers, -1)
        near = eff >= best_eff[:, None] - 1e-9 * np.abs(best_eff[:, None])
        best_sw = np.argmin(np.where(near & np.isfinite(eff), pair, np.inf), axis=1)
        eff_sw = eff[ar, best_sw]
        cost_sw = cost_sw.reshape(n_layers, -1)[ar, best_sw]
        sw_s = star_slots[ar, best_sw // cand.shape[1]]
        sw_t = cand[ar, best_sw % cand.shape[1]]
    else:
        eff_sw = np.full(n_layers, -np.inf)
        cost_sw = np.zeros(n_layers, dtype=np.int64)
        sw_s = sw_t = np.zeros(n_layers, dtype=np.int64)

    # --- retargets: a slot t holding a multi-copy expert c becomes a copy of expert a
    multi = np.take_along_axis(cnt, p2l, axis=1) >= 2  # [A, R] slots that may be given away
    t_node_ok = np.take_along_axis(node_ok, np.broadcast_to(slot_gpu, (n_layers, num_slots)), axis=1)
    # (1) a = an expert on the busiest GPU, t = a donor slot on a cool GPU of the same node
    # donor quality: load left on its GPU plus the rise of the donor expert's other copies
    bump = np.take_along_axis(w / np.maximum(cnt - 1, 1) - pc, p2l, axis=1)
    room = gl[:, slot_gpu] - sl + bump
    k = min(_RETARGET_SLOTS, num_slots)
    donor_score = np.where(multi & t_node_ok, room, np.inf)
    t1 = np.argpartition(donor_score, k - 1, axis=1)[:, :k] if k < num_slots else np.argsort(donor_score, axis=1)
    t1_ok = np.take_along_axis(donor_score, t1, axis=1) < np.inf
    a1 = p2l[ar[:, None], star_slots]  # [A, S]
    g1, v1 = _retarget_gain(w, p2l, cnt, hosts, rows, gl, a1[:, :, None], t1[:, None, :], per)
    v1 &= t1_ok[:, None, :]
    # (2) t = a multi-copy slot on the busiest GPU, a = one of the coldest experts (per copy after the move)
    after = w / (cnt + 1)
    if exp_node is not None:
        after = np.where(exp_node == gpu_node[gstar][:, None], after, np.inf)
    kc = min(_COLD_EXPERTS, w.shape[1])
    a2 = np.argpartition(after, kc - 1, axis=1)[:, :kc]
    a2_ok = np.take_along_axis(after, a2, axis=1) < np.inf
    g2, v2 = _retarget_gain(w, p2l, cnt, hosts, rows, gl, a2[:, :, None], star_slots[:, None, :], per)
    v2 &= a2_ok[:, :, None] & multi[ar[:, None], star_slots][:, None, :]

    # slot t's cost: it differs from the service placement after (a != orig) minus before
    o1 = np.take_along_axis(orig, t1, axis=1)
    c1 = (a1[:, :, None] != o1[:, None, :]).astype(np.int64) - (np.take_along_axis(p2l, t1, axis=1) != o1)[:, None, :]
    o2 = orig[ar[:, None], star_slots]
    c2 = (a2[:, :, None] != o2[:, None, :]).astype(np.int64) - (p2l[ar[:, None], star_slots] != o2)[:, None, :]
    v1 &= (g1 > tol[:, None, None]) & (c1 <= budget[:, None, None])
    v2 &= (g2 > tol[:, None, None]) & (c2 <= budget[:, None, None])
    effs = np.concatenate([np.where(v1, g1 / np.maximum(c1, 0.5), -np.inf).reshape(n_layers, -1),
                           np.where(v2, g2 / np.maximum(c2, 0.5), -np.inf).reshape(n_layers, -1)], axis=1)
    costs = np.concatenate([c1.reshape(n_layers, -1), c2.reshape(n_layers, -1)], axis=1)
    best_rt = np.argmax(effs, axis=1)
    eff_rt = effs[ar, best_rt]
    cost_rt = costs[ar, best_rt]
    n1 = a1.shape[1] * t1.shape[1]
    in1 = best_rt < n1
    i1a, i1t = np.divmod(np.minimum(best_rt, n1 - 1), t1.shape[1])
    i2a, i2t = np.divmod(np.maximum(best_rt - n1, 0), per)
    rt_t = np.where(in1, t1[ar, i1t], star_slots[ar, i2t])
    rt_a = np.where(in1, a1[ar, i1a], a2[ar, i2a])

    # Cut of the max load per slot of cost decides (a fresh swap costs two).
    use_sw = eff_sw > eff_rt
    eff = np.where(use_sw, eff_sw, eff_rt)
    kind = np.where(np.isfinite(eff), np.where(use_sw, 2, 1), 0)
    s = np.where(use_sw, sw_s, 0)
    t = np.where(use_sw, sw_t, rt_t)
    cost = np.where(kind > 0, np.where(use_sw, cost_sw, cost_rt), 0)
    return kind, s, t, rt_a, cost


def _retarget_gain(
    w: np.ndarray, p2l: np.ndarray, cnt: np.ndarray, hosts: _Hosts, rows: np.ndarray, gl: np.ndarray,
    a: np.ndarray, t: np.ndarray, per: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact max-load cut of making slot t a copy of expert a; a [A, X, 1], t [A, 1, Y] -> gain, valid [A, X, Y]."""
    n_layers, num_slots = p2l.shape
    num_gpus = num_slots // per
    ar = np.arange(n_layers)[:, None, None]
    c = p2l[ar, t]  # [A, 1, Y] expert given away
    wa, ca = w[ar, a], cnt[ar, a]
    wc, cc = w[ar, c], cnt[ar, c]
    d_a = wa / (ca + 1) - wa / ca  # per-copy change of a (<= 0)
    d_c = wc / np.maximum(cc - 1, 1) - wc / cc  # per-copy change of c (>= 0)
    host_a = hosts.of(p2l, rows, a[:, :, 0])  # [A, X, G]
    host_c = hosts.of(p2l, rows, c[:, 0, :])  # [A, Y, G]
    new = (gl[:, None, None, :] + host_a[:, :, None, :] * d_a[..., None] + host_c[:, None, :, :] * d_c[..., None])
    # slot t itself: its copy of c (now counted at c's new per-copy load) becomes a copy of a
    delta_t = wa / (ca + 1) - (wc / np.maximum(cc - 1, 1))
    new += np.where((t // per)[..., None] == np.arange(num_gpus), delta_t[..., None], 0.0)
    gain = gl.max(1)[:, None, None] - new.max(-1)
    valid = (a != c) & (cc >= 2)
    return gain, np.broadcast_to(valid, gain.shape).copy()
