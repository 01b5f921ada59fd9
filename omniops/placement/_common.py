"""Shared pieces of the placement planners: argument checks, conversions, load metrics.

Planners work in numpy float64 on the host: weights are a few hundred KB and the algorithms are loops of small
vectorised steps over layers, where numpy's per-call overhead is lower than torch's.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

# Cap on improving swaps per packing; each lowers the heaviest pack, few are needed past the greedy start.
_MAX_SWAP_ROUNDS = 256
# Stop improving a pack set once its max is this close (relative) to the lower bound.
_NEAR_BOUND = 1e-5


def as_numpy(name: str, x: object) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: expected a tensor or array, got {type(x).__name__}") from exc


def check_weight(weight: object, name: str = "weight") -> np.ndarray:
    """[L, E] non-negative finite loads -> float64 array."""
    w = as_numpy(name, weight)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [layers, experts] array, got shape {list(w.shape)}")
    if w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one layer and one expert, got shape {list(w.shape)}")
    if w.dtype == np.bool_ or not (np.issubdtype(w.dtype, np.number)):
        raise ValueError(f"{name}: expected a numeric array, got dtype {w.dtype}")
    w = w.astype(np.float64, copy=False)
    if not np.isfinite(w).all():
        raise ValueError(f"{name}: loads must be finite (found NaN or inf)")
    if (w < 0).any():
        raise ValueError(f"{name}: loads must be non-negative")
    return w


def check_int(name: str, v: object, *, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name}: expected an int, got {type(v).__name__}")
    v = int(v)
    if v < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {v}")
    return v


def check_phy2log(phy2log: object, num_layers: int, num_experts: int, name: str = "phy2log") -> np.ndarray:
    """[L, R] logical id per physical slot, every expert present in every layer -> int64 array."""
    p = as_numpy(name, phy2log)
    if p.ndim != 2 or p.shape[0] != num_layers:
        raise ValueError(f"{name}: expected shape [{num_layers}, num_replicas], got {list(p.shape)}")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"{name}: expected an integer array, got dtype {p.dtype}")
    p = p.astype(np.int64, copy=False)
    problem = phy2log_problem(p, num_experts, name)
    if problem is not None:
        raise ValueError(problem)
    return p


def phy2log_problem(p: np.ndarray, num_experts: int, name: str = "phy2log") -> str | None:
    """Why the int64 map ``p [L, R]`` is not a placement of ``num_experts`` logical experts (ids in range, every
    expert with a copy in every layer, so also at least as many slots as experts), or None: the one check of a
    placement's ids."""
    lo, hi = int(p.min()), int(p.max())
    if lo < 0 or hi >= num_experts:
        return f"{name}: logical ids must lie in [0, {num_experts}), got [{lo}, {hi}]"
    missing = np.argwhere(logical_counts(p, num_experts) == 0)
    if len(missing):
        layer = int(missing[0, 0])
        experts = missing[missing[:, 0] == layer, 1].tolist()
        where = f" in layer {layer}" if p.shape[0] > 1 else ""
        return f"{name}: logical experts {experts} have no physical copy{where}"
    return None


def expert_nodes(p2l: np.ndarray, num_experts: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """[L, E] node of each expert's group in a hierarchical placement, checking that every group sits on one node
    (ValueError naming phy2log otherwise)."""
    num_layers, num_slots = p2l.shape
    if num_experts % num_groups:
        raise ValueError(f"num_groups: {num_experts} experts do not split into {num_groups} equal groups")
    slot_node = np.arange(num_slots) // (num_slots // num_nodes)
    group = p2l // (num_experts // num_groups)
    lo = np.full((num_layers, num_groups), num_nodes)
    hi = np.full((num_layers, num_groups), -1)
    rows = np.broadcast_to(np.arange(num_layers)[:, None], p2l.shape)
    np.minimum.at(lo, (rows, group), np.broadcast_to(slot_node, p2l.shape))
    np.maximum.at(hi, (rows, group), np.broadcast_to(slot_node, p2l.shape))
    bad = np.argwhere(lo != hi)
    if len(bad):
        layer, g = bad[0]
        raise ValueError(f"phy2log: group {g} of layer {layer} spans several nodes; not a hierarchical placement")
    return np.repeat(lo, num_experts // num_groups, axis=1)


def logical_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] number of physical copies of each logical expert."""
    num_layers = phy2log.shape[0]
    flat = phy2log + (np.arange(num_layers, dtype=np.int64) * num_experts)[:, None]
    return np.bincount(flat.ravel(), minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def build_log2phy(phy2log: np.ndarray, num_experts: int, max_copies: int) -> np.ndarray:
    """[L, E, max_copies] physical slots of each expert in ascending slot order, padded with -1."""
    num_layers, num_slots = phy2log.shape
    # Unique keys (expert, slot): an unstable sort gives the stable order, and is faster.
    order = np.argsort(phy2log * num_slots + np.arange(num_slots), axis=1)
    experts_sorted = np.take_along_axis(phy2log, order, axis=1)
    cnt = logical_counts(phy2log, num_experts)
    first = np.cumsum(cnt, axis=1) - cnt  # position of each expert's first slot in `order`
    rank = np.arange(num_slots)[None, :] - np.take_along_axis(first, experts_sorted, axis=1)
    flat = ((np.arange(num_layers)[:, None] * num_experts + experts_sorted) * max_copies + rank).ravel()
    out = np.full(num_layers * num_experts * max_copies, -1, dtype=np.int64)
    out[flat] = order.ravel()
    return out.reshape(num_layers, num_experts, max_copies)


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


def gpu_loads(weight: ArrayLike, phy2log: ArrayLike, num_gpus: int) -> np.ndarray:
    """[L, G] load of each GPU: an expert's tokens are spread evenly over its copies."""
    w = np.asarray(as_numpy("weight", weight), dtype=np.float64)
    p = np.asarray(as_numpy("phy2log", phy2log), dtype=np.int64)
    cnt = logical_counts(p, w.shape[1])
    per_copy = w / np.maximum(cnt, 1)
    slot = np.take_along_axis(per_copy, p, axis=1)
    return slot.reshape(p.shape[0], num_gpus, -1).sum(-1)


def imbalance(loads: np.ndarray) -> np.ndarray:
    """[L] max/mean of GPU loads per layer (1.0 for an idle layer)."""
    mean = loads.mean(-1)
    return np.where(mean > 0, loads.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)


def placement_imbalance(weight: ArrayLike, phy2log: ArrayLike, num_gpus: int) -> float:
    """Imbalance (max GPU load / mean GPU load) averaged over layers."""
    return float(imbalance(gpu_loads(weight, phy2log, num_gpus)).mean())


def slots_moved(old: ArrayLike, new: ArrayLike) -> np.ndarray:
    """[L] slots whose logical expert changed (each one is an expert's weights copied to that slot)."""
    return (np.asarray(as_numpy("old", old)) != np.asarray(as_numpy("new", new))).sum(-1)
