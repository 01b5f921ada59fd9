"""Process groups of the expert-parallel engine and the per-step message from rank 0 to the other ranks.

Channels, all over the same ranks:

* the rendezvous ``TCPStore`` (hosted by rank 0) says "step n is coming": a worker waits there for as long as
  the server is idle (a gloo receive would time out, and gloo's sends wait for the receiver, so a hung worker
  would hang rank 0 forever on a group without a timeout); if rank 0 dies, the store's socket closes and the
  wait fails at once;
* ``cpu`` (gloo, ``ep_timeout``): the step's header and batch, the placement sync and plan;
* ``data`` (the same group on CPU; nccl / hccl when the model lives on a GPU / NPU): the MoE all-to-alls,
  all-gathers and the weight moves, also with ``ep_timeout``.

So a rank that dies fails the others' current step at once (its sockets close), and one that hangs (alive but
stuck) fails it after ``ep_timeout`` seconds; nothing waits forever except an idle worker on the store.

Ranks come either from a torchrun-style environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
ranks may sit on several hosts) or, without one, rank 0 spawns ``ep - 1`` local processes
(``torch.multiprocessing``, spawn) that meet it on a ``TCPStore`` bound to 127.0.0.1 on a free port.

Step message: a header of 8 int64 (command, tokens, sequences, block-table width, decodes, sync flag) and one
int64 payload holding input_ids, positions, slot_mapping, cu_seqlens, block_table and context_lens; the
metadata's host-side ints are derived from them on the receiving side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from omniops.serving.models import AttentionMetadata

STEP, STOP = 1, 2
IDLE_POLL = timedelta(days=1)  # an idle worker's store wait; it just waits again (each timeout logs one warning)


@dataclass
class EPGroup:
    rank: int
    world: int
    store: dist.Store
    cpu: dist.ProcessGroup
    data: dist.ProcessGroup
    launched: str  # "spawn" (local ranks started by rank 0) or "torchrun" (an external launcher)
    hosts: int = 1  # WORLD_SIZE / LOCAL_WORLD_SIZE under torchrun
    seq: int = 0  # messages sent / received so far


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world) from a torchrun-style environment with more than one rank, else None."""
    env = os.environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and int(env["WORLD_SIZE"]) > 1:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return None


def data_backend(device: torch.device) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")


def init_groups(rank: int, world: int, timeout_s: float, device: torch.device, *, store: dist.Store,
                launched: str) -> EPGroup:
    """Collective over all ranks: the default group (gloo = ``cpu``) and the ``data`` group."""
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout, store=store)
    backend = data_backend(device)
    data = dist.group.WORLD if backend == "gloo" else dist.new_group(backend=backend, timeout=timeout)
    hosts = 1
    if launched == "torchrun":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        hosts = max(1, world // max(local, 1))
    return EPGroup(rank, world, store, dist.group.WORLD, data, launched, hosts)


def _announce(group: EPGroup) -> None:
    group.seq += 1
    group.store.set(f"go/{group.seq}", "1")
    if group.seq > 2:  # every worker is past message seq - 1, so past the wait for seq - 2
        group.store.delete_key(f"go/{group.seq - 2}")


def _await(group: EPGroup) -> None:
    group.seq += 1
    while True:
        try:
            group.store.wait([f"go/{group.seq}"], IDLE_POLL)
            return
        except dist.DistStoreError as e:  # a timeout: still idle (a lost connection is a DistNetworkError)
            if "timeout" not in str(e).lower():
                raise


# ---- the step message ----------------------------------------------------------------------------------
def send_step(group: EPGroup, input_ids: Tensor, meta: AttentionMetadata, sync: bool) -> None:
    """Rank 0: broadcast this step's flat batch."""
    B, W = meta.block_table.shape
    header = torch.tensor([STEP, input_ids.shape[0], B, W, meta.num_decode, int(sync), 0, 0], dtype=torch.int64)
    payload = torch.cat([input_ids.long(), meta.positions.long(), meta.slot_mapping.long(), meta.cu_seqlens.long(),
                         meta.block_table.long().flatten(), meta.context_lens.long()])
    _announce(group)
    dist.broadcast(header, 0, group=group.cpu)
    dist.broadcast(payload, 0, group=group.cpu)


def send_stop(group: EPGroup) -> None:
    _announce(group)
    dist.broadcast(torch.tensor([STOP, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int64), 0, group=group.cpu)


def recv_step(group: EPGroup) -> tuple[int, Tensor | None, AttentionMetadata | None, bool]:
    """Other ranks: (command, input_ids, metadata, sync flag) of the next step."""
    _await(group)
    header = torch.empty(8, dtype=torch.int64)
    dist.broadcast(header, 0, group=group.cpu)
    cmd, T, B, W, nd, sync = header[:6].tolist()
    if cmd != STEP:
        return cmd, None, None, False
    payload = torch.empty(3 * T + (B + 1) + B * W + B, dtype=torch.int64)
    dist.broadcast(payload, 0, group=group.cpu)
    ids, pos, slots, cu, table, ctx = payload.split([T, T, T, B + 1, B * W, B])
    meta = AttentionMetadata(
        positions=pos.clone(), slot_mapping=slots.clone(), cu_seqlens=cu.to(torch.int32),
        block_table=table.view(B, W).to(torch.int32), context_lens=ctx.to(torch.int32), num_decode=nd,
        prefill_context=ctx[nd:].tolist(), prefill_query=(cu[nd + 1:] - cu[nd:-1]).tolist())
    return cmd, ids.clone(), meta, bool(sync)
