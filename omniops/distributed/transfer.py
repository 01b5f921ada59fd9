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

    ``weights``: tensors of shape ``[experts_per_rank, ...]`` (e.g. w13 and w2, or a quantized expert's weights
    and scales: dtypes may differ), one contiguous row per local physical slot, updated in place. Collective,
    between forward steps: every rank of ``group`` calls it with the same map. Slots whose expert changes get
    its rows from a local copy when this rank holds one, else from a rank holding one (point-to-point, one
    message per rank pair; senders chosen to spread the traffic). The map is checked first; with ``agree`` one
    small all-reduce makes every rank agree that all ranks' maps are valid and identical, so a bad map raises
    ValueError on every rank (before any weight moves) instead of hanging some of them (a caller that broadcast
    the map from one rank may skip it).
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
    # Rows travel as raw bytes: the tensors of one slot may differ in dtype (a quantized expert's int8 / fp8 /
    # packed int4 weights with their fp32 scales) and go in one message, bit for bit.
    sizes = [w[0].numel() * w.element_size() for w in weights]
    # Everything read from the old weights is copied out (gather / pack) before any slot is overwritten.
    rows: dict[int, Tensor] = {}
    if local:
        idx = torch.tensor([slot_of[e] for e in local], device=device)
        packed = _pack_rows(weights, idx)
        rows.update({e: packed[i] for i, e in enumerate(local)})
    ops, bufs = [], []  # bufs keeps the packed send buffers alive until the waits below
    for peer, experts in sends.items():
        idx = torch.tensor([slot_of[e] for e in experts], device=device)
        packed = _pack_rows(weights, idx)
        ops.append(dist.P2POp(dist.isend, packed, global_rank(group, peer), group))
        bufs.append(packed)
    recv_bufs = []
    for peer, experts in recvs.items():
        buf = torch.empty((len(experts), sum(sizes)), dtype=torch.uint8, device=device)
        ops.append(dist.P2POp(dist.irecv, buf, global_rank(group, peer), group))
        recv_bufs.append((experts, buf))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for experts, buf in recv_bufs:
        rows.update({e: buf[i] for i, e in enumerate(experts)})
    old_p2l = old.phy2log
    for j in range(rank * per, (rank + 1) * per):
        e = int(new[j])
        if e != int(old_p2l[j]):
            for w, part in zip(weights, rows[e].split(sizes), strict=True):
                # back to the weight's dtype (a clone: a byte offset may not be aligned to it) and copied as
                # such: that write moves the weight's version counter, which invalidates prepacked tiles
                # (a write through a uint8 view under inference_mode would not)
                dst = w[j - rank * per]
                dst.copy_(part.clone().view(w.dtype).view(dst.shape))
    return ExpertPlacement.from_phy2log(new, old.world_size, old.num_logical)


def _pack_rows(weights: list[Tensor], idx: Tensor) -> Tensor:
    """Rows ``idx`` of every weight, side by side as bytes: ``[len(idx), sum of one row's bytes]`` uint8."""
    return torch.cat([w[idx].reshape(len(idx), -1).view(torch.uint8) for w in weights], dim=1)


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
