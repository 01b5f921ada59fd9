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

from omniops.placement._common import (
    ArrayLike,
    balanced_pack,
    build_log2phy,
    check_int,
    check_weight,
    logical_counts,
    replicate,
)
from omniops.placement.incremental import incremental_rebalance

# Exact improving operations after packing (see rebalance_phy2log, step 4).
_POLISH_MOVES = 16


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
