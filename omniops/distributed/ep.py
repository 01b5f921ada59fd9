"""Expert parallelism over ``torch.distributed``: dispatch tokens to the ranks that hold their experts,
compute there, send the results back and combine.

* ``ExpertPlacement`` (``omniops/distributed/placement.py``): the logical -> physical expert map, with redundant
  copies; dispatch/combine take whatever map they are given.
* ``ep_dispatch``: picks a replica per (token, slot) — ``(token index + rank) % replicas``, which spreads a
  hot expert's tokens evenly over its copies —, sorts the pairs by destination rank, exchanges the counts,
  then the hidden rows and local expert ids with ``all_to_all_single`` (variable splits; whatever backend the
  process group has: gloo, nccl, hccl). Returns the received rows and an ``EPHandle`` for the way back, with
  per-expert token counts (bincounts, nearly free) for the load balancer.
* ``ep_combine``: the reverse all-to-all, then ``moe_combine`` with the routing weights on the source rank.
* ``EPMoE``: a module owning this rank's physical experts (plus an optional shared expert); routes
  globally, computes locally with ``fused_moe``, combines. With a ``LoadRecorder`` attached it records each
  dispatch's per-expert counts; ``global_load()`` sums them over the ranks for the planners and
  ``apply_placement(phy2log)`` moves expert weights between ranks (point-to-point) to a new placement between
  steps, outputs unchanged (``omniops/distributed/transfer.py``'s ``apply_expert_placement``, which the serving
  engine's expert-parallel MoE layers use for their own per-slot weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from omniops.distributed._group import world_and_rank
from omniops.distributed.placement import ExpertPlacement
from omniops.distributed.transfer import apply_expert_placement
from omniops.ops.moe import fused_moe, moe_combine, moe_route

if TYPE_CHECKING:
    from omniops.placement import LoadRecorder

# ---- dispatch / combine -------------------------------------------------------------------------------


@dataclass
class EPHandle:
    """What ``ep_combine`` needs to send results home, plus load statistics of this dispatch."""

    send_counts: list[int]  # rows sent to each rank
    recv_counts: list[int]  # rows received from each rank
    inverse_index: Tensor  # int32 [T, k]: row of pair (t, j) in the send order
    topk_weights: Tensor  # [T, k]
    group: dist.ProcessGroup | None
    logical_counts: Tensor  # int64 [E]: this rank's tokens per logical expert (what LoadRecorder records)
    local_expert_counts: Tensor  # int64 [experts_per_rank]: rows received per local physical expert


@dataclass
class EPDispatch:
    hidden: Tensor  # [R, H] rows received for this rank's experts
    local_ids: Tensor  # int32 [R]: local physical expert of each row
    handle: EPHandle


def _all_to_all(x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def ep_dispatch(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, placement: ExpertPlacement,
                group: dist.ProcessGroup | None = None) -> EPDispatch:
    """Send every (token, slot) pair's hidden row to the rank holding the chosen copy of its expert.

    ``hidden [T, H]``, ``topk_ids [T, k]`` logical ids in ``[0, E)``, ``topk_weights [T, k]`` (kept here for
    the combine). T may be 0 on any rank. Collective: every rank of ``group`` must call it.
    """
    world, rank = world_and_rank(group)
    if world != placement.world_size:
        raise ValueError(f"placement: built for world_size={placement.world_size}, the group has {world} ranks")
    if hidden.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"hidden [T, H] and topk_ids [T, k] expected, got {list(hidden.shape)} and "
                         f"{list(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights: expected shape {list(topk_ids.shape)}, got {list(topk_weights.shape)}")
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= placement.num_logical):
        raise ValueError(f"topk_ids: values must lie in [0, {placement.num_logical})")
    T, k = topk_ids.shape
    per = placement.experts_per_rank
    phys = placement.physical_of(topk_ids, rank).reshape(-1)
    dest = phys // per
    order = torch.sort(dest, stable=True).indices  # pairs grouped by destination rank
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    send_counts = torch.bincount(dest, minlength=world)
    tok = order // k
    send_x = hidden[tok]
    send_ids = (phys[order] % per).to(torch.int32)
    if world > 1:
        recv_counts_t = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts_t, send_counts, group=group)
        send_l, recv_l = send_counts.tolist(), recv_counts_t.tolist()
        recv_x = _all_to_all(send_x, send_l, recv_l, group)
        recv_ids = _all_to_all(send_ids, send_l, recv_l, group)
    else:
        send_l = recv_l = send_counts.tolist()
        recv_x, recv_ids = send_x, send_ids
    handle = EPHandle(
        send_counts=send_l, recv_counts=recv_l, inverse_index=inverse.view(T, k).to(torch.int32),
        topk_weights=topk_weights, group=group,
        logical_counts=torch.bincount(topk_ids.reshape(-1).long(), minlength=placement.num_logical),
        local_expert_counts=torch.bincount(recv_ids.long(), minlength=per),
    )
    return EPDispatch(recv_x, recv_ids, handle)


def ep_combine(expert_out: Tensor, handle: EPHandle, extra: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Return ``expert_out [R, H]`` (one row per received row, unweighted) to the source ranks and sum each
    token's k rows with its routing weights: ``[T, H]``. Collective.

    ``extra = (rows [T, m, H], weights [T, m])``: m more rows per token computed here (e.g. shared experts),
    summed in the same fp32 combine after the k routed rows: the same order and single rounding as one
    ``fused_moe`` over routed + shared experts."""
    if expert_out.shape[0] != sum(handle.recv_counts):
        raise ValueError(f"expert_out: expected {sum(handle.recv_counts)} rows (received by ep_dispatch), "
                         f"got {expert_out.shape[0]}")
    if len(handle.send_counts) > 1:
        back = _all_to_all(expert_out, handle.recv_counts, handle.send_counts, handle.group)
    else:
        back = expert_out
    weights, inverse = handle.topk_weights, handle.inverse_index
    if extra is not None:
        rows, w = extra
        T, m = w.shape
        if rows.shape[:2] != (T, m) or T != weights.shape[0]:
            raise ValueError(f"extra: expected rows [{weights.shape[0]}, m, H] and weights [{weights.shape[0]}, m], "
                             f"got {list(rows.shape)} and {list(w.shape)}")
        idx = back.shape[0] + torch.arange(T * m, device=back.device, dtype=inverse.dtype).view(T, m)
        back = torch.cat([back, rows.reshape(T * m, rows.shape[-1]).to(back.dtype)])
        weights = torch.cat([weights, w.to(weights.dtype)], dim=1)
        inverse = torch.cat([inverse, idx], dim=1)
    return moe_combine(back, weights, inverse)


# ---- module -------------------------------------------------------------------------------------------


class EPMoE(torch.nn.Module):
    """An expert-parallel MoE block: this rank holds ``placement.experts_per_rank`` physical experts.

    ``forward(x [T, H])``: router logits ``x @ gate.T`` (gate replicated on every rank), ``moe_route``,
    ``ep_dispatch``, ``fused_moe`` on the received rows, ``ep_combine``, plus ``shared_expert(x)`` if given.
    ``route_kwargs`` go to ``moe_route`` (e.g. DeepSeek-V3's scoring/groups/bias/scaling).
    ``last_logical_counts`` / ``last_local_counts`` hold the latest dispatch's load statistics.

    ``recorder`` (optional, a ``LoadRecorder`` shared by all MoE layers) gets this rank's per-expert counts of
    every forward as layer ``layer_idx``; ``global_load()`` sums the recorder over the ranks, and
    ``apply_placement(phy2log)`` switches to a new placement between steps (collective).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 placement: ExpertPlacement | None = None, group: dist.ProcessGroup | None = None, *,
                 shared_expert: Callable[[Tensor], Tensor] | None = None, dtype: torch.dtype = torch.float32,
                 route_kwargs: dict | None = None, recorder: LoadRecorder | None = None,
                 layer_idx: int = 0) -> None:
        super().__init__()
        world, rank = world_and_rank(group)
        self.placement = placement or ExpertPlacement.uniform(num_experts, world)
        if self.placement.num_logical != num_experts:
            raise ValueError(f"placement: has {self.placement.num_logical} logical experts, expected {num_experts}")
        self.group, self.rank, self.top_k = group, rank, top_k
        per = self.placement.experts_per_rank
        self.gate = torch.nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=dtype), requires_grad=False)
        self.w13 = torch.nn.Parameter(torch.zeros(per, 2 * intermediate_size, hidden_size, dtype=dtype),
                                      requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.zeros(per, hidden_size, intermediate_size, dtype=dtype),
                                     requires_grad=False)
        self.shared_expert = shared_expert
        self.route_kwargs = dict(route_kwargs or {})
        self.last_logical_counts: Tensor | None = None
        self.last_local_counts: Tensor | None = None
        self.recorder: LoadRecorder | None = None
        self.layer_idx = 0
        if recorder is not None:
            self.attach_recorder(recorder, layer_idx)

    def attach_recorder(self, recorder: LoadRecorder | None, layer_idx: int = 0) -> None:
        """Record every forward's per-expert counts into ``recorder`` as layer ``layer_idx`` (None detaches)."""
        if recorder is not None:
            if recorder.num_experts != self.placement.num_logical:
                raise ValueError(f"recorder: counts {recorder.num_experts} experts, the module has "
                                 f"{self.placement.num_logical}")
            if not 0 <= layer_idx < recorder.num_layers:
                raise ValueError(f"layer_idx: expected 0 <= layer_idx < {recorder.num_layers}, got {layer_idx}")
        self.recorder, self.layer_idx = recorder, layer_idx

    def global_load(self) -> Tensor:
        """The recorder's ``weight()`` summed over the group's ranks (each records only its own tokens):
        [L, E] float64 on the CPU, the same on every rank, so every rank plans the same map. Collective."""
        if self.recorder is None:
            raise ValueError("recorder: no LoadRecorder attached (EPMoE(..., recorder=...) or attach_recorder)")
        w = self.recorder.weight()
        if world_and_rank(self.group)[0] > 1:
            # On the weights' device: the group's backend serves it (gloo: CPU, nccl/hccl: the accelerator).
            w = w.to(self.w13.device)
            dist.all_reduce(w, group=self.group)
        return w.cpu()

    @torch.no_grad()
    def load_global_weights(self, gate: Tensor, w13: Tensor, w2: Tensor) -> None:
        """Copy the router and this rank's physical experts out of full ``[E, ...]`` weights."""
        idx = self.placement.local_logical(self.rank).to(w13.device)
        self.gate.copy_(gate)
        self.w13.copy_(w13[idx])
        self.w2.copy_(w2[idx])

    def forward(self, x: Tensor) -> Tensor:
        logits = x @ self.gate.t()
        weights, ids = moe_route(logits, self.top_k, **self.route_kwargs)
        d = ep_dispatch(x, ids, weights, self.placement, self.group)
        if self.recorder is not None:
            self.recorder.record_counts(self.layer_idx, d.handle.logical_counts)
        self.last_logical_counts = d.handle.logical_counts
        self.last_local_counts = d.handle.local_expert_counts
        ones = torch.ones(d.hidden.shape[0], 1, dtype=torch.float32, device=x.device)
        y = fused_moe(d.hidden, self.w13, self.w2, ones, d.local_ids.view(-1, 1))
        out = ep_combine(y, d.handle)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out

    @torch.no_grad()
    def apply_placement(self, phy2log_new: Tensor | list[int]) -> None:
        """Switch to the placement ``phy2log_new [R]`` (logical expert of every physical slot; slot j on rank
        ``j // (R // world)``, R unchanged), e.g. one layer's row of ``incremental_rebalance``'s result.

        Collective, between forward steps: every rank of the group calls it with the same map (see
        ``apply_expert_placement``: a bad map raises ValueError on every rank before any weight moves)."""
        self.placement = apply_expert_placement([self.w13, self.w2], self.placement, phy2log_new, self.group)
