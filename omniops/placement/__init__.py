"""Expert placement for expert-parallel MoE serving: EPLB-compatible planner, live re-placement, load recorder.

Usage::

    from omniops.placement import LoadRecorder, incremental_rebalance, rebalance_experts

    rec = LoadRecorder(num_layers=58, num_experts=256, mode="window", window=32)
    rec.record(layer_idx, topk_ids)      # in the MoE layer, after routing (one scatter_add)
    rec.step()                           # once per forward step
    # a fresh plan (same call and meaning as DeepSeek's eplb.rebalance_experts)
    phy2log, log2phy, logcnt = rebalance_experts(rec.weight(), 288, num_groups=8, num_nodes=4, num_gpus=32)
    # later, as the load drifts: at most 28 slot changes per layer, group copies stay on their node
    phy2log = incremental_rebalance(rec.weight(), phy2log, num_gpus=32, max_moves=28, num_groups=8, num_nodes=4)

Live, in an expert-parallel model (``omniops.distributed.EPMoE``; collective calls, every rank the same)::

    moes = [EPMoE(hidden, inter, 256, 8, placement, recorder=rec, layer_idx=i) for i in range(58)]  # record
    rec.step()                                             # once per forward step
    load = moes[0].global_load()                           # rec.weight() summed over the EP ranks
    p2l = torch.stack([m.placement.phy2log for m in moes])  # [L, R] in service
    new = incremental_rebalance(load, p2l, num_gpus=world, max_moves=4)
    for m, row in zip(moes, new):
        m.apply_placement(row)                             # between steps: changed slots' weights move

``placement_imbalance(weight, phy2log, num_gpus)`` scores a placement (max / mean GPU load, mean over layers).
"""

from omniops.placement._common import (
    build_log2phy,
    gpu_loads,
    imbalance,
    logical_counts,
    phy2log_problem,
    placement_imbalance,
    slots_moved,
)
from omniops.placement.incremental import incremental_rebalance
from omniops.placement.rebalance import rebalance_experts
from omniops.placement.recorder import LoadRecorder

__all__ = [
    "LoadRecorder",
    "build_log2phy",
    "gpu_loads",
    "imbalance",
    "incremental_rebalance",
    "logical_counts",
    "phy2log_problem",
    "placement_imbalance",
    "rebalance_experts",
    "slots_moved",
]
