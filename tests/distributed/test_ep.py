"""Expert parallelism with 2 and 4 processes (torch.multiprocessing + gloo on 127.0.0.1): EP output equals
single-process fused_moe on the same weights and tokens, including ranks with no tokens of their own, ranks
that receive no rows, redundant expert copies, DeepSeek-V3 routing and a shared expert."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import omniops
from omniops.distributed import EPMoE, ExpertPlacement, ep_combine, ep_dispatch
from omniops.testing import assert_close

E, H, INTER, K = 8, 16, 12, 2


def _init_method() -> str:
    """A file rendezvous in a fresh directory: no TCP port to race other processes for."""
    return f"file://{tempfile.mkdtemp(prefix='omni_ep_')}/rendezvous"


def _global_weights():
    g = torch.Generator().manual_seed(1234)
    gate = torch.randn(E, H, generator=g)
    w13 = torch.randn(E, 2 * INTER, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, INTER, generator=g) / INTER**0.5
    return gate, w13, w2


def _tokens(world: int, per_rank: list[int]):
    g = torch.Generator().manual_seed(99)
    x = torch.randn(sum(per_rank), H, generator=g)
    starts = [sum(per_rank[:r]) for r in range(world)]
    return x, starts


def _check_module(rank: int, world: int, placement: ExpertPlacement, per_rank: list[int], *,
                  route_kwargs: dict | None = None, shared: bool = False):
    gate, w13, w2 = _global_weights()
    shared_w = torch.randn(H, H, generator=torch.Generator().manual_seed(5)) / H**0.5
    shared_fn = (lambda x: x @ shared_w.t()) if shared else None
    m = EPMoE(H, INTER, E, K, placement, shared_expert=shared_fn, route_kwargs=route_kwargs)
    m.load_global_weights(gate, w13, w2)
    x_all, starts = _tokens(world, per_rank)
    x = x_all[starts[rank]:starts[rank] + per_rank[rank]]
    out = m(x)
    # Single process, full weights, same tokens.
    logits = x @ gate.t()
    w, ids = omniops.moe_route(logits, K, **(route_kwargs or {}))
    expected = omniops.fused_moe(x, w13, w2, w, ids)
    if shared:
        expected = expected + shared_fn(x)
    assert out.shape == x.shape
    assert_close(out, expected)
    # Load statistics: rows received per local expert add up over ranks to every routed pair.
    recv = torch.tensor([int(m.last_local_counts.sum())])
    dist.all_reduce(recv)
    assert int(recv) == sum(per_rank) * K
    logical = m.last_logical_counts.clone()
    dist.all_reduce(logical)
    assert int(logical.sum()) == sum(per_rank) * K


def _worker(rank: int, world: int, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        uniform = ExpertPlacement.uniform(E, world)
        # Tokens on every rank; then a rank without tokens of its own (the last).
        _check_module(rank, world, uniform, [3 + r for r in range(world)])
        _check_module(rank, world, uniform, [4] * (world - 1) + [0])
        # Only rank 0 has a token: every other rank sends nothing and most receive nothing.
        _check_module(rank, world, uniform, [1] + [0] * (world - 1))
        # Redundant copies: world extra slots replicating experts 0.. (E + world slots over world ranks).
        _check_module(rank, world, ExpertPlacement.uniform(E, world, num_redundant=world), [5] * world, shared=True)
        # DeepSeek-V3 style routing through EPMoE.
        _check_module(rank, world, uniform, [6] * world,
                      route_kwargs={"scoring": "sigmoid", "num_groups": 4, "topk_groups": 2,
                                    "correction_bias": torch.linspace(0, 0.1, E), "routed_scaling": 2.5})
        _check_replicas_spread(rank, world)
    finally:
        dist.destroy_process_group()


def _check_replicas_spread(rank: int, world: int) -> None:
    """Expert 0 has a copy on every rank: tokens all routed to it are spread over the copies, and results
    still equal the single-process block."""
    per = E // world + 1
    p2l = []
    others = iter(range(1, E))
    for _ in range(world):
        slots = [0] + [next(others, 1) for _ in range(per - 1)]
        p2l += slots
    placement = ExpertPlacement.from_phy2log(p2l, world, E)
    assert int(placement.replicas[0]) == world
    _, w13, w2 = _global_weights()
    T = 8
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(7 + rank))
    ids = torch.zeros(T, 1, dtype=torch.int32)
    w = torch.ones(T, 1)
    d = ep_dispatch(x, ids, w, placement)
    local = placement.local_logical(rank)
    y = omniops.fused_moe(d.hidden, w13[local], w2[local], torch.ones(d.hidden.shape[0], 1), d.local_ids.view(-1, 1))
    out = ep_combine(y, d.handle)
    assert_close(out, omniops.fused_moe(x, w13, w2, w, ids))
    recv = torch.tensor([d.hidden.shape[0]])
    gathered = [torch.zeros_like(recv) for _ in range(world)]
    dist.all_gather(gathered, recv)
    assert all(int(g) == T for g in gathered), "each rank's copy of expert 0 gets an equal share"


@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_single_process(world: int) -> None:
    mp.spawn(_worker, args=(world, _init_method()), nprocs=world, join=True)


def test_placement_maps() -> None:
    p = ExpertPlacement.from_phy2log([0, 1, 2, 0, 3, 1], world_size=2)
    assert p.experts_per_rank == 3 and p.num_logical == 4
    assert p.log2phy.tolist() == [[0, 3], [1, 5], [2, -1], [4, -1]]
    assert p.replicas.tolist() == [2, 2, 1, 1]
    phys = p.physical_of(torch.zeros(4, 1, dtype=torch.int32))
    assert phys.flatten().tolist() == [0, 3, 0, 3]
    with pytest.raises(ValueError, match="no physical copy"):
        ExpertPlacement.from_phy2log([0, 2], world_size=1)
    with pytest.raises(ValueError, match="split evenly"):
        ExpertPlacement.from_phy2log([0, 1, 2], world_size=2)


def test_single_process_dispatch_combine() -> None:
    """Without an initialised process group, dispatch/combine run locally (world size 1)."""
    _, w13, w2 = _global_weights()
    x = torch.randn(5, H)
    w, ids = omniops.moe_route(torch.randn(5, E), K)
    d = ep_dispatch(x, ids, w, ExpertPlacement.uniform(E, 1))
    y = omniops.fused_moe(d.hidden, w13, w2, torch.ones(d.hidden.shape[0], 1), d.local_ids.view(-1, 1))
    assert_close(ep_combine(y, d.handle), omniops.fused_moe(x, w13, w2, w, ids))
    assert d.handle.logical_counts.tolist() == torch.bincount(ids.flatten().long(), minlength=E).tolist()
    with pytest.raises(ValueError, match="world_size=2"):
        ep_dispatch(x, ids, w, ExpertPlacement.uniform(E, 2))
    with pytest.raises(ValueError, match="topk_ids: values"):
        ep_dispatch(x, ids + E, w, ExpertPlacement.uniform(E, 1))
