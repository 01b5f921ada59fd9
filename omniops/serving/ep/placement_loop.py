"""Load recording, placement planning and live re-placement for the expert-parallel engine (every rank runs
the same calls in the same order: the ranks step in lockstep under rank 0's commands).

After every forward each rank closes the step of two sliding-window recorders (window = the placement
interval): ``recorder`` [moe layers, E] holds the tokens per logical expert that this rank's slice routed,
``rank_recorder`` [moe layers, world] the (token, expert) rows this rank received. Every ``placement_interval``
steps rank 0 flags the step as a sync step; after it:

1. one all-reduce sums both windows over the ranks;
2. rank 0 computes ``omni:expert_load_imbalance{layer}`` (max / mean rows per rank over the window) and, by
   mode, a new placement: ``dynamic`` -> ``incremental_rebalance`` from the map in service (at most
   ``placement_max_moves`` slot changes per layer), ``static`` -> one fresh ``rebalance_experts`` (DeepSeek
   EPLB's call) at the first sync, i.e. from the warm-up window, then never again; ``off`` -> none;
3. rank 0 broadcasts the plan [L, slots] (or "no change"), and every rank applies it layer by layer: changed
   slots' weights copied rank to rank (``apply_expert_placement``), then that layer's map switched.

This happens between two steps on every rank, so no step ever runs with a half-moved expert, and the
scheduler's requests are untouched (nothing is dropped or recomputed). The per-rank window restarts after a
change, so the next imbalance reading describes the new placement only.

Hierarchical placement: ``placement_nodes`` > 1 with the model's expert groups (DeepSeek-V3's ``n_group``)
divisible by it keeps every group's copies on one node (EPLB's ``num_nodes`` / ``num_groups``); on one machine
a node is a block of consecutive ranks. Otherwise EPLB's global policy applies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from omniops.distributed import ExpertPlacement
from omniops.placement import LoadRecorder, gpu_loads, incremental_rebalance, rebalance_experts
from omniops.serving.ep.moe import EPMoELayer
from omniops.serving.ep.options import default_max_moves

log = logging.getLogger("omniops.serving.ep")

MIN_GAIN = 0.02  # dynamic: relative cut of a layer's max rank load that is worth moving weights for
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def initial_placement(num_experts: int, num_slots: int, world: int, num_groups: int, num_nodes: int
                      ) -> ExpertPlacement:
    """Expert e on rank e // (E / world) without redundancy (the natural split); with redundant slots or a
    hierarchy, EPLB's plan for a uniform load (every group on one node, copies spread)."""
    if num_slots == num_experts and not (num_nodes > 1 and num_groups % num_nodes == 0):
        return ExpertPlacement.uniform(num_experts, world)
    p2l = rebalance_experts(np.ones((1, num_experts)), num_slots, num_groups, num_nodes, world)[0][0]
    return ExpertPlacement.from_phy2log(p2l, world, num_experts)


@dataclass
class PlacementStats:
    """What rank 0 reports (the Prometheus metrics and the bench's timeline); replaced whole on each sync."""

    imbalance: dict[int, float] = field(default_factory=dict)  # decoder layer -> max / mean rows per rank
    updates: int = 0  # placements applied that changed at least one slot
    moved: int = 0  # slots whose expert changed, over all layers and updates
    seconds: list[float] = field(default_factory=list)  # plan + apply time of each update
    timeline: list[dict] = field(default_factory=list)  # per sync: step, imbalance, moved


class PlacementLoop:
    def __init__(self, layers: list[EPMoELayer], layer_ids: list[int], *, rank: int, world: int, mode: str,
                 interval: int, max_moves: int | None, num_groups: int, num_nodes: int,
                 cpu: dist.ProcessGroup | None,
                 recorder: LoadRecorder, rank_recorder: LoadRecorder):
        self.layers, self.layer_ids = layers, layer_ids
        self.rank, self.world, self.mode, self.interval = rank, world, mode, interval
        self.num_experts = layers[0].num_routed
        self.num_slots = layers[0].placement.num_physical
        self.max_moves = max_moves or default_max_moves(self.num_slots)
        self.num_groups, self.num_nodes = num_groups, num_nodes
        self.cpu = cpu  # gloo: the CPU tensors of the sync (the weight moves use each layer's data group)
        self.recorder, self.rank_recorder = recorder, rank_recorder
        self.steps = 0
        self.planned_static = False
        self.stats = PlacementStats()

    @staticmethod
    def recorders(num_layers: int, num_experts: int, world: int, interval: int) -> tuple[LoadRecorder, LoadRecorder]:
        return (LoadRecorder(num_layers, num_experts, mode="window", window=interval),
                LoadRecorder(num_layers, world, mode="window", window=interval))

    def sync_due(self) -> bool:
        """Rank 0: whether the step about to run ends an interval."""
        return (self.steps + 1) % self.interval == 0

    def phy2log(self) -> torch.Tensor:
        return torch.stack([m.placement.phy2log for m in self.layers])

    def after_step(self, sync: bool) -> None:
        """Every rank, after every forward (collective when ``sync``)."""
        self.recorder.step()
        self.rank_recorder.step()
        self.steps += 1
        if sync:
            self._sync()

    # ---- the sync step -----------------------------------------------------------------------------------
    def _sync(self) -> None:
        L = len(self.layers)
        load, per_rank = self.recorder.weight(), self.rank_recorder.weight()
        buf = torch.cat([load.flatten(), per_rank.flatten()])
        dist.all_reduce(buf, group=self.cpu)
        load = buf[:load.numel()].view_as(load)
        per_rank = buf[load.numel():].view_as(per_rank)
        t0 = time.perf_counter()
        plan = torch.zeros(1 + L * self.num_slots, dtype=torch.int64)
        if self.rank == 0:
            self._report(per_rank)
            new = self._plan(load)
            if new is not None:
                plan[0] = 1
                plan[1:] = new.flatten()
        dist.broadcast(plan, 0, group=self.cpu)
        if not int(plan[0]):
            return
        new = plan[1:].view(L, self.num_slots)
        moved = sum(m.apply_placement(row) for m, row in zip(self.layers, new, strict=True))
        self.rank_recorder.reset()  # the next imbalance reading is the new placement's alone
        if self.rank == 0 and moved:
            dt = time.perf_counter() - t0
            s = self.stats
            self.stats = PlacementStats(s.imbalance, s.updates + 1, s.moved + moved, [*s.seconds, dt],
                                        [*s.timeline[:-1], {**s.timeline[-1], "moved": moved}])
            log.info("placement: update %d at step %d moved %d expert slots in %.3f s", s.updates + 1,
                     self.steps, moved, dt)

    def _report(self, per_rank: torch.Tensor) -> None:
        mean = per_rank.mean(1)
        imb = torch.where(mean > 0, per_rank.max(1).values / mean.clamp_min(1e-12), torch.ones_like(mean))
        values = {lid: float(v) for lid, v in zip(self.layer_ids, imb.tolist(), strict=True)}
        s = self.stats
        point = {"step": self.steps, "imbalance": float(imb.mean()), "moved": 0}
        self.stats = PlacementStats(values, s.updates, s.moved, s.seconds, [*s.timeline, point])

    def _plan(self, load: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the new [L, slots] map, or None to keep the one in service."""
        if self.mode == "off" or load.sum() == 0:
            return None
        old = self.phy2log()
        if self.mode == "static":
            if self.planned_static:
                return None
            self.planned_static = True
            new = rebalance_experts(load, self.num_slots, self.num_groups, self.num_nodes, self.world)[0]
        else:
            new = incremental_rebalance(load, old, self.world, self.max_moves, num_groups=self.num_groups,
                                        num_nodes=self.num_nodes)
            # hysteresis: a layer keeps its map unless the new one cuts its busiest rank's load on the window by
            # MIN_GAIN; otherwise Poisson noise in the window alone would move a few experts every interval
            before = gpu_loads(load, old, self.world).max(1)
            after = gpu_loads(load, new, self.world).max(1)
            keep = torch.from_numpy(after > before * (1 - MIN_GAIN))
            new[keep] = old[keep]
        return None if torch.equal(new, old) else new
