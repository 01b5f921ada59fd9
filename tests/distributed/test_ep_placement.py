"""Live expert re-placement with 2 and 4 processes (the harness of test_ep.py): EPMoE records its load, the
planners pick a new placement, ``apply_placement`` moves the weights between ranks, and the outputs before and
after equal single-process fused_moe on the same tokens. Bad maps raise ValueError on every rank, no hang.
All multi-process checks share one spawned run per world size (process start-up dominates the test time)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import omniops
from omniops.distributed import EPMoE, ExpertPlacement
from omniops.placement import LoadRecorder, incremental_rebalance, rebalance_experts
from omniops.testing import assert_close
from tests.distributed.test_ep import INTER, E, H, K, _global_weights, _init_method

LAYERS, LAYER = 2, 1  # the module is layer 1 of a 2-layer recorder


def _skewed_tokens(world: int, per_rank: int = 6) -> torch.Tensor:
    """Every rank's tokens (rank r owns rows r*per_rank...), pushed towards expert 3 so the load is uneven."""
    gate, _, _ = _global_weights()
    g = torch.Generator().manual_seed(42)
    return torch.randn(world * per_rank, H, generator=g) + 0.8 * gate[3] / gate[3].norm()


class _Case:
    """One EPMoE with a recorder, this rank's tokens and the single-process reference output."""

    def __init__(self, rank: int, world: int, num_redundant: int) -> None:
        self.gate, self.w13, self.w2 = _global_weights()
        self.rank, self.world = rank, world
        self.rec = LoadRecorder(LAYERS, E, mode="window", window=4)
        placement = ExpertPlacement.uniform(E, world, num_redundant=num_redundant)
        self.m = EPMoE(H, INTER, E, K, placement, recorder=self.rec, layer_idx=LAYER)
        self.m.load_global_weights(self.gate, self.w13, self.w2)
        self.x_all = _skewed_tokens(world)
        n = self.x_all.shape[0] // world
        self.x = self.x_all[rank * n:(rank + 1) * n]
        w, ids = omniops.moe_route(self.x @ self.gate.t(), K)
        self.expected = omniops.fused_moe(self.x, self.w13, self.w2, w, ids)

    def check(self) -> None:
        """Forward equals the reference, and every local slot holds exactly its logical expert's weights."""
        assert_close(self.m(self.x), self.expected)
        local = self.m.placement.local_logical(self.rank)
        assert torch.equal(self.m.w13, self.w13[local]) and torch.equal(self.m.w2, self.w2[local])

    def apply(self, phy2log: torch.Tensor | list[int]) -> int:
        """apply_placement + check; returns the number of slots that changed."""
        before = self.m.placement.phy2log.clone()
        self.m.apply_placement(phy2log)
        assert self.m.placement.phy2log.tolist() == torch.as_tensor(phy2log).tolist()
        self.check()
        return int((before != self.m.placement.phy2log).sum())


def _check_live_replacement(rank: int, world: int) -> None:
    c = _Case(rank, world, num_redundant=world)
    R = E + world
    c.check()  # one forward: recorded as layer LAYER
    c.rec.step()
    load = c.m.global_load()
    # The recorder summed over ranks == the routing of every rank's tokens; the other layer stays empty.
    _, ids_all = omniops.moe_route(c.x_all @ c.gate.t(), K)
    assert load[LAYER].tolist() == torch.bincount(ids_all.flatten().long(), minlength=E).double().tolist()
    assert int(load[1 - LAYER].sum()) == 0
    # Incremental plan from the recorded load: it must change something for the test to mean anything.
    p_inc = incremental_rebalance(load[LAYER:LAYER + 1], c.m.placement.phy2log[None], num_gpus=world,
                                  max_moves=R)[0]
    assert c.apply(p_inc) >= 1
    # A fresh plan (DeepSeek EPLB call).
    p_fresh = rebalance_experts(load[LAYER:LAYER + 1], R, 1, 1, world)[0][0]
    c.apply(p_fresh)
    # Every slot changes: relabel each slot's expert e -> e + 1 (a permutation keeps every expert present).
    p_all = (c.m.placement.phy2log + 1) % E
    assert c.apply(p_all) == R
    # Several slots of the last rank want the same remote expert: it is received once, copied into each.
    last = set(c.m.placement.local_logical(world - 1).tolist())
    remote = next(e for e in range(E) if e not in last)
    c.apply(list(range(E)) + [remote] * world)
    # Back to uniform, then no-op: nothing moves, nothing breaks.
    uniform = ExpertPlacement.uniform(E, world, num_redundant=world).phy2log
    c.apply(uniform)
    assert c.apply(uniform.tolist()) == 0
    # The recorder keeps recording after re-placements (logical counts do not depend on the placement).
    # Window: step 1 (one forward) + step 2 (the six forwards of the checks above).
    c.rec.step()
    assert c.m.global_load()[LAYER].tolist() == (7 * load[LAYER]).tolist()


def _check_bad_maps(rank: int, world: int) -> None:
    """Every rank raises ValueError naming phy2log_new, the placement and weights stay, and the next
    collective still works (no rank hangs or is left behind)."""
    c = _Case(rank, world, num_redundant=0)
    good = c.m.placement.phy2log.tolist()
    bad_maps = [  # (map, what the message says)
        (good[:-1], "expected shape"),
        ([E] + good[1:], "must lie in"),
        ([good[1]] + good[1:], "no physical copy"),
        ([float(e) for e in good], "integer"),
        ([good], "expected shape"),
    ]
    for bad, why in bad_maps:
        with pytest.raises(ValueError, match=f"phy2log_new: .*{why}"):
            c.m.apply_placement(bad)
    # Only one rank's map is bad: the others raise too instead of waiting for it.
    mine = [E] + good[1:] if rank == world - 1 else list(reversed(good))
    with pytest.raises(ValueError, match="phy2log_new: (invalid on another rank|logical ids)"):
        c.m.apply_placement(mine)
    # Valid maps that differ between ranks.
    mine = good if rank == 0 else list(reversed(good))
    with pytest.raises(ValueError, match="phy2log_new: ranks passed different maps"):
        c.m.apply_placement(mine)
    assert c.m.placement.phy2log.tolist() == good
    c.check()


def _worker(rank: int, world: int, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        _check_live_replacement(rank, world)
        _check_bad_maps(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_live_replacement_matches_single_process(world: int) -> None:
    mp.spawn(_worker, args=(world, _init_method()), nprocs=world, join=True)


def test_single_process_apply_placement_and_recorder() -> None:
    """Without a process group (world size 1): local copies only; the recorder hook; argument checks."""
    gate, w13, w2 = _global_weights()
    rec = LoadRecorder(1, E)
    m = EPMoE(H, INTER, E, K, ExpertPlacement.uniform(E, 1, num_redundant=2), recorder=rec)
    m.load_global_weights(gate, w13, w2)
    x = _skewed_tokens(1)
    w, ids = omniops.moe_route(x @ gate.t(), K)
    expected = omniops.fused_moe(x, w13, w2, w, ids)
    assert_close(m(x), expected)
    rec.step()
    assert m.global_load()[0].tolist() == torch.bincount(ids.flatten().long(), minlength=E).double().tolist()
    p = rebalance_experts(m.global_load(), E + 2, 1, 1, 1)[0][0]
    m.apply_placement(p)
    assert_close(m(x), expected)
    assert torch.equal(m.w13, w13[p]) and torch.equal(m.w2, w2[p])
    with pytest.raises(ValueError, match=r"phy2log_new: logical experts \[0, 2, .*\] have no physical copy"):
        m.apply_placement([1] * (E + 2))
    # Without a recorder: nothing recorded, global_load says why.
    m.attach_recorder(None)
    m(x)
    rec.step()
    assert int(rec.weight().sum()) == 2 * ids.numel()  # the two forwards before detaching
    with pytest.raises(ValueError, match="recorder"):
        m.global_load()
    with pytest.raises(ValueError, match="layer_idx"):
        m.attach_recorder(rec, 1)
    with pytest.raises(ValueError, match="recorder"):
        m.attach_recorder(LoadRecorder(1, E + 1))
    # The hook's recorder entry point checks its input like record().
    with pytest.raises(ValueError, match="counts: expected a tensor of shape"):
        rec.record_counts(0, torch.zeros(E + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="counts: expected an integer"):
        rec.record_counts(0, torch.zeros(E))
    with pytest.raises(ValueError, match="layer"):
        rec.record_counts(1, torch.zeros(E, dtype=torch.int64))
