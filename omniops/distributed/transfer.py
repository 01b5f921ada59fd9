"""Moving expert weights to a new placement between forward steps (live re-placement), point to point.

``apply_expert_placement(weights, old, phy2log_new)``: every rank computes the same transfer plan from the two
maps, copies what it holds locally and exchanges the rest with ``batch_isend_irecv`` (one message per rank pair,
senders chosen to spread the traffic). The map is checked, and agreed on by every rank, before any weight moves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from omniops.distributed._group import global_rank, world_and_rank
from omniops.distributed.placement import ExpertPlacement, checked_phy2log


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
    world, rank = world_and_rank(group)
    if world != old.world_size:
        raise ValueError(f"placement: built for world_size={old.world_size}, the group has {world} ranks")
    new, err = checked_phy2log(phy2log_new, old.num_physical, old.num_logical)
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
        ops.append(dist.P2POp(dist.isend, packed, global_rank(group, peer), group))
        bufs.append(packed)
    recv_bufs = []
    for peer, experts in recvs.items():
        buf = weights[0].new_empty((len(experts), sum(sizes)))
        ops.append(dist.P2POp(dist.irecv, buf, global_rank(group, peer), group))
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
