"""The exact operations of the incremental planner: retargets (a slot becomes a copy of another expert) and
swaps (two copies trade GPUs), their candidates, exact gains and costs, and the copies-per-GPU table they keep.

Every candidate is scored by recomputing each GPU's load after it (no estimate), so an operation that is taken
never raises the layer's maximum. Layers are one vectorised axis.
"""

from __future__ import annotations

import numpy as np

SWAP_GPUS = 8  # swap partners: copies on this many of the lightest GPUs
RETARGET_SLOTS = 8  # candidate donor slots (copies of multi-copy experts on the coolest GPUs)
COLD_EXPERTS = 4  # candidate cold experts to take over a multi-copy slot on the busiest GPU

class Hosts:
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


def apply_retarget(
    p2l: np.ndarray, cnt: np.ndarray, hosts: Hosts, rows: np.ndarray, t: np.ndarray, a: np.ndarray
) -> None:
    """Slot t of each row in `rows` becomes a copy of expert a (updates counts and host table)."""
    if rows.size == 0:
        return
    c = p2l[rows, t]
    hosts.move(rows, t, c, a)
    np.subtract.at(cnt, (rows, c), 1)
    np.add.at(cnt, (rows, a), 1)
    p2l[rows, t] = a


def retarget_loads(
    w: np.ndarray, cnt: np.ndarray, p2l: np.ndarray, gl: np.ndarray, hosts: Hosts, rows: np.ndarray,
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


def best_operation(
    w: np.ndarray,
    p2l: np.ndarray,
    cnt: np.ndarray,
    hosts: Hosts,
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
    kg = min(SWAP_GPUS, num_gpus - 1)
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
    k = min(RETARGET_SLOTS, num_slots)
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
    kc = min(COLD_EXPERTS, w.shape[1])
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
    w: np.ndarray, p2l: np.ndarray, cnt: np.ndarray, hosts: Hosts, rows: np.ndarray, gl: np.ndarray,
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
