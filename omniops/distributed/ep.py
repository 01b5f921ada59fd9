"""Expert parallelism over ``torch.distributed``: dispatch tokens to the ranks that hold their experts,
compute there, send the results back and combine.

* ``ExpertPlacement``: the logical -> physical expert map. Physical slot p lives on rank
  ``p // experts_per_rank`` as that rank's local expert ``p % experts_per_rank``; ``phy2log [P]`` names the
  logical expert in every slot and ``log2phy [E, max_replicas]`` (-1 padded) lists every logical expert's
  copies, so one logical expert can have several physical replicas (redundant experts). A load balancer only
  changes this map and the weights in the slots; dispatch/combine take whatever map they are given.
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
  steps, outputs unchanged. ``apply_expert_placement`` is the same move for any per-slot weight tensors
  (the serving engine's expert-parallel MoE layers use it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from omniops.ops.moe import fused_moe, moe_combine, moe_route

if TYPE_CHECKING:
    from omniops.placement import LoadRecorder

# ---- placement -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertPlacement:
    """Where the physical copies of every logical expert live. Build with ``from_phy2log`` or ``uniform``."""

    phy2log: Tensor  # int64 [num_physical]: the logical expert held by each physical slot
    log2phy: Tensor  # int64 [num_logical, max_replicas]: physical slots of each logical expert, -1 padded
    replicas: Tensor  # int64 [num_logical]: number of copies of each logical expert (>= 1)
    world_size: int

    @property
    def num_logical(self) -> int:
        return self.log2phy.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[0]

    @property
    def experts_per_rank(self) -> int:
        return self.num_physical // self.world_size

    def local_logical(self, rank: int) -> Tensor:
        """The logical expert of each of ``rank``'s local physical slots (to load its weights)."""
        per = self.experts_per_rank
        return self.phy2log[rank * per:(rank + 1) * per]

    @classmethod
    def from_phy2log(cls, phy2log: Tensor | list[int], world_size: int, num_logical: int | None = None
                     ) -> ExpertPlacement:
        """From the logical expert of every physical slot; slots split evenly over ``world_size`` ranks."""
        p2l = torch.as_tensor(phy2log, dtype=torch.int64).flatten().cpu()
        if world_size < 1 or p2l.numel() == 0 or p2l.numel() % world_size:
            raise ValueError(f"phy2log: {p2l.numel()} physical slots do not split evenly over world_size={world_size}")
        E = int(p2l.max()) + 1 if num_logical is None else num_logical
        if int(p2l.min()) < 0 or int(p2l.max()) >= E:
            raise ValueError(f"phy2log: logical ids must lie in [0, {E})")
        replicas = torch.bincount(p2l, minlength=E)
        if bool((replicas == 0).any()):
            missing = torch.nonzero(replicas == 0).flatten().tolist()
            raise ValueError(f"phy2log: logical experts {missing} have no physical copy")
        log2phy = torch.full((E, int(replicas.max())), -1, dtype=torch.int64)
        fill = torch.zeros(E, dtype=torch.int64)
        for p, e in enumerate(p2l.tolist()):
            log2phy[e, fill[e]] = p
            fill[e] += 1
        return cls(p2l, log2phy, replicas, world_size)

    @classmethod
    def uniform(cls, num_experts: int, world_size: int, num_redundant: int = 0) -> ExpertPlacement:
        """Logical expert e in slot e; ``num_redundant`` extra slots copy experts 0, 1, ... (a placeholder
        until a balancer picks the hot ones). E + num_redundant must be a multiple of world_size."""
        p2l = list(range(num_experts)) + [i % num_experts for i in range(num_redundant)]
        return cls.from_phy2log(p2l, world_size, num_experts)

    def physical_of(self, topk_ids: Tensor, rank: int = 0) -> Tensor:
        """A physical slot for every (token, slot) pair: copy ``(t + rank) % replicas[e]`` of expert e."""
        ids = topk_ids.long()
        log2phy = self.log2phy.to(ids.device)
        reps = self.replicas.to(ids.device)[ids]
        t = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
        choice = (t + rank) % reps
        return log2phy[ids, choice]


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


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


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
    world, rank = _world(group)
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
        world, rank = _world(group)
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
        if _world(self.group)[0] > 1:
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


@torch.no_grad()
def apply_expert_placement(weights: list[Tensor], old: ExpertPlacement, phy2log_new: Tensor | list[int],
                           group: dist.ProcessGroup | None = None, *, agree: bool = True) -> ExpertPlacement:
    """Move this rank's expert weights from placement ``old`` to ``phy2log_new`` and return the new placement.

    ``weights``: tensors of shape ``[experts_per_rank, ...]`` (e.g. w13 and w2), one row per local physical
    slot, updated in place. Collective, between forward steps: every rank of ``group`` calls it with the same
    map. Slots whose expert changes get its rows from a local copy when this rank holds one, else from a rank
    holding one (point-to-point, one message per rank pair; senders chosen to spread the traffic). The map is
    checked first; with ``agree`` one small all-reduce makes every rank agree that all ranks' maps are valid
    and identical, so a bad map raises ValueError on every rank (before any weight moves) instead of hanging
    some of them (a caller that broadcast the map from one rank may skip it).
    """
    world, rank = _world(group)
    if world != old.world_size:
        raise ValueError(f"placement: built for world_size={old.world_size}, the group has {world} ranks")
    new, err = _check_new_phy2log(phy2log_new, old.num_physical, old.num_logical)
    if world > 1 and agree:
        err = _agree_on_map(new, err, old.num_physical, weights[0].device, group)
    if err is not None:
        raise ValueError(err)
    assert new is not None
    per = old.experts_per_rank
    sends, recvs, local = _transfer_plan(old.phy2log.tolist(), new.tolist(), per, world, rank)
    old_local = old.local_logical(rank).tolist()
    slot_of = {e: old_local.index(e) for e in set(old_local)}  # a local slot holding each logical expert
    device = weights[0].device
    sizes = [w[0].numel() for w in weights]
    # Everything read from the old weights is copied out (gather / pack) before any slot is overwritten.
    rows: dict[int, list[Tensor]] = {}
    if local:
        idx = torch.tensor([slot_of[e] for e in local], device=device)
        copies = [w[idx] for w in weights]
        rows.update({e: [c[i] for c in copies] for i, e in enumerate(local)})
    ops, bufs = [], []  # bufs keeps the packed send buffers alive until the waits below
    for peer, experts in sends.items():
        idx = torch.tensor([slot_of[e] for e in experts], device=device)
        packed = torch.cat([w[idx].flatten(1) for w in weights], dim=1)
        ops.append(dist.P2POp(dist.isend, packed, _global_rank(group, peer), group))
        bufs.append(packed)
    recv_bufs = []
    for peer, experts in recvs.items():
        buf = weights[0].new_empty((len(experts), sum(sizes)))
        ops.append(dist.P2POp(dist.irecv, buf, _global_rank(group, peer), group))
        recv_bufs.append((experts, buf))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for experts, buf in recv_bufs:
        for i, e in enumerate(experts):
            parts = buf[i].split(sizes)
            rows[e] = [p.view_as(w[0]) for p, w in zip(parts, weights, strict=True)]
    old_p2l = old.phy2log
    for j in range(rank * per, (rank + 1) * per):
        e = int(new[j])
        if e != int(old_p2l[j]):
            for w, r in zip(weights, rows[e], strict=True):
                w[j - rank * per].copy_(r)
    return ExpertPlacement.from_phy2log(new, old.world_size, old.num_logical)


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _check_new_phy2log(p: object, num_physical: int, num_logical: int) -> tuple[Tensor | None, str | None]:
    """(map as int64 CPU [R], None) or (None, why it is not a valid placement for this module)."""
    try:
        t = torch.as_tensor(p)
    except (TypeError, ValueError, RuntimeError):
        return None, f"phy2log_new: expected a 1-D integer tensor or list, got {type(p).__name__}"
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        return None, f"phy2log_new: expected integer logical expert ids, got dtype {t.dtype}"
    if t.dim() != 1 or t.numel() != num_physical:
        return None, f"phy2log_new: expected shape [{num_physical}] (one id per physical slot), got {list(t.shape)}"
    t = t.to("cpu", torch.int64)
    if int(t.min()) < 0 or int(t.max()) >= num_logical:
        return None, f"phy2log_new: logical ids must lie in [0, {num_logical}), got [{int(t.min())}, {int(t.max())}]"
    missing = torch.nonzero(torch.bincount(t, minlength=num_logical) == 0).flatten().tolist()
    if missing:
        return None, f"phy2log_new: logical experts {missing} have no physical copy"
    return t, None


def _agree_on_map(new: Tensor | None, err: str | None, num_physical: int, device: torch.device,
                  group: dist.ProcessGroup | None) -> str | None:
    """One MAX all-reduce of [invalid flag, map, -map]: every rank learns whether some rank's map is invalid,
    and max(map) == -max(-map) (= min) element-wise iff every rank passed the same map."""
    buf = torch.zeros(1 + 2 * num_physical, dtype=torch.int64)
    if new is None:
        buf[0] = 1
    else:
        buf[1:1 + num_physical] = new
        buf[1 + num_physical:] = -new
    buf = buf.to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    buf = buf.cpu()
    if err is not None:
        return err
    if int(buf[0]):
        return "phy2log_new: invalid on another rank (every rank must pass the same valid map)"
    if not torch.equal(buf[1:1 + num_physical], -buf[1 + num_physical:]):
        return "phy2log_new: ranks passed different maps (collective: every rank must pass the same map)"
    return None


def _transfer_plan(old: list[int], new: list[int], per: int, world: int, rank: int
                   ) -> tuple[dict[int, list[int]], dict[int, list[int]], list[int]]:
    """Which logical experts this rank sends to / receives from each peer, and which it copies locally.

    Computed identically on every rank from the two maps (so sender and receiver agree without messages): a
    rank needs expert e for a changed slot; it copies it locally when it holds e, else receives it once
    (even for several slots) from the holder with the fewest sends so far, ties to the next rank after it.
    """
    holders: dict[int, list[int]] = {}
    for j, e in enumerate(old):
        r = j // per
        if r not in holders.setdefault(e, []):
            holders[e].append(r)
    load = [0] * world
    sends: dict[int, list[int]] = {}
    recvs: dict[int, list[int]] = {}
    local: list[int] = []
    for dst in range(world):
        held = set(old[dst * per:(dst + 1) * per])
        wanted: list[int] = []
        for j in range(dst * per, (dst + 1) * per):
            e = new[j]
            if e != old[j] and e not in wanted:
                wanted.append(e)
        for e in wanted:
            if e in held:
                if dst == rank:
                    local.append(e)
                continue
            src = min(holders[e], key=lambda r: (load[r], (r - dst) % world))
            load[src] += 1
            if src == rank:
                sends.setdefault(dst, []).append(e)
            if dst == rank:
                recvs.setdefault(src, []).append(e)
    return sends, recvs, local
