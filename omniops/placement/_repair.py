"""Node re-pairing for hierarchical incremental plans: swap one expert group of the heaviest node with a group of
another node when the node pairing is what limits the layer and the move budget pays for it.

In a hierarchical placement every node holds exactly ``num_groups / num_nodes`` whole groups, so a node's load is
the sum of its groups' loads whatever happens inside it: no slot edit inside the nodes can bring a layer's max
GPU load below ``heaviest node / GPUs per node``. A plan made for an older load keeps that load's pairing; when
group totals drift, that bound is the gap to a fresh plan (which re-pairs). Moving a group means rewriting every
slot of it on its old node and as many on its new one (``>= 2 * group size`` slot changes; at DeepSeek-V3's 32
experts per group, 64 or more), so it only happens when the budget allows it and the bound drops clearly.

The swapped-in group's copies are laid out greedily (largest copy to the GPU with the lowest load among those
with a freed slot); the slots changed here are free to rework for the incremental planner afterwards.
"""

from __future__ import annotations

import numpy as np

from omniops.placement._common import gpu_loads, replicate

# A re-pair is worth its >= 64 slot copies only when it lowers the heaviest node's bound by at least this much
# (relative): below it, the node bound is within what drift and token noise move between two plans anyway.
_REPAIR_MIN_GAIN = 0.01


def repair_nodes(
    w: np.ndarray, p2l: np.ndarray, exp_node: np.ndarray, budget: int, num_groups: int, num_nodes: int,
    num_gpus: int, min_gain: float = _REPAIR_MIN_GAIN,
) -> np.ndarray:
    """Layers' best group swaps, applied in place on ``p2l`` [L, R]; returns [L] bool: layers that swapped.

    A swap is taken when its slot changes fit ``budget``, it lowers the heaviest node's load by ``min_gain``
    (relative) and the layer's max GPU load is above the new node bound by as much. The swapped-in copies can
    only use the outgoing group's slots, which may sit unevenly on the node's GPUs, so a swapped layer's max GPU
    load may be above the old one until the planner reworks it: the caller keeps it only if it ends better.
    """
    num_layers, num_slots = p2l.shape
    num_experts = w.shape[1]
    gsz = num_experts // num_groups
    per = num_slots // num_gpus
    gpn = num_gpus // num_nodes
    grp_w = w.reshape(num_layers, num_groups, gsz).sum(-1)
    grp_node = exp_node[:, ::gsz]  # [L, groups]
    grp_slots = np.zeros((num_layers, num_groups), dtype=np.int64)
    np.add.at(grp_slots, (np.broadcast_to(np.arange(num_layers)[:, None], p2l.shape), p2l // gsz), 1)
    node_w = np.zeros((num_layers, num_nodes))
    np.add.at(node_w, (np.arange(num_layers)[:, None], grp_node), grp_w)
    heavy = node_w.argmax(1)
    cur = node_w.max(1)
    # every (a, c): a on the heaviest node, c elsewhere; the two nodes' loads after the swap
    delta = grp_w[:, None, :] - grp_w[:, :, None]  # [L, a, c]: load the heavy node gains
    na = np.take_along_axis(node_w, grp_node, axis=1)  # load of each group's node
    ok = (grp_node == heavy[:, None])[:, :, None] & (grp_node != heavy[:, None])[:, None, :]
    ok &= (grp_slots[:, :, None] + grp_slots[:, None, :]) <= budget
    x_new = cur[:, None, None] + delta
    y_new = na[:, None, :] - delta
    # the largest node load not involved in the swap
    others = np.where(
        (np.arange(num_nodes)[None, None, None, :] == heavy[:, None, None, None])
        | (np.arange(num_nodes)[None, None, None, :] == grp_node[:, None, :, None]),
        -np.inf, node_w[:, None, None, :]).max(-1)
    new_max = np.where(ok, np.maximum(np.maximum(x_new, y_new), others), np.inf).reshape(num_layers, -1)
    best = new_max.argmin(1)
    best_max = new_max[np.arange(num_layers), best]
    lmax = gpu_loads(w, p2l, num_gpus).max(1)
    take = np.isfinite(best_max) & (best_max < cur * (1 - min_gain)) & (lmax > best_max / gpn * (1 + min_gain))
    swapped = np.zeros(num_layers, dtype=bool)
    for layer in np.flatnonzero(take):
        a, c = divmod(int(best[layer]), num_groups)
        row = p2l[layer]
        grp = row // gsz
        for out_g, in_g in ((a, c), (c, a)):
            _fill(w[layer], row, np.flatnonzero(grp == out_g), in_g, gsz, per, num_experts)
        swapped[layer] = True
    return swapped


def _fill(w: np.ndarray, row: np.ndarray, slots: np.ndarray, group: int, gsz: int, per: int, num_experts: int
          ) -> None:
    """Slots ``slots`` of one layer's ``row`` (the outgoing group's, all on one node) take the copies of
    ``group``: replicated over that many slots, largest copy first to the coolest GPU with a free slot."""
    experts = np.arange(group * gsz, (group + 1) * gsz)
    cnt = replicate(w[experts][None], len(slots))[0]
    copies = np.repeat(experts, cnt)
    copy_w = np.repeat(w[experts] / cnt, cnt)
    keep = np.ones(len(row), dtype=bool)
    keep[slots] = False
    counts = np.bincount(row[keep], minlength=num_experts)
    slot_w = np.where(keep, w[row] / np.maximum(counts[row], 1), 0.0)
    gpus = slots // per
    load = {int(g): float(slot_w[g * per:(g + 1) * per].sum()) for g in np.unique(gpus)}
    free = {g: list(slots[gpus == g]) for g in load}
    for i in np.argsort(-copy_w, kind="stable"):
        g = min((g for g in free if free[g]), key=lambda g: load[g])
        row[free[g].pop()] = copies[i]
        load[g] += copy_w[i]
