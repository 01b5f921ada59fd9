"""incremental_rebalance on EP32 hierarchical placements planned for an older load (traces.shifted_load: drifting
hot set, re-ranked Zipf, drifting group totals): hierarchy and budget kept, quality against fresh plans computed
here, the node-pairing floor a 10% budget cannot cross, and the group re-pair a larger budget may buy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omniops.placement import gpu_loads, incremental_rebalance, rebalance_experts, slots_moved
from omniops.placement._common import imbalance
from omniops.placement.traces import SHIFTS, shifted_load, zipf_weights

ARGS = (288, 8, 4, 32)  # DeepSeek-V3 at EP32: 288 slots, 8 groups, 4 nodes, 32 GPUs
HIER = dict(num_groups=8, num_nodes=4)
SKEWS = {"mild": (0.1, 0.5), "strong": (0.6, 1.5)}


def _case(kind: str, skew: str, seed: int, num_layers: int = 4):
    rng = np.random.default_rng(seed)
    w_old = zipf_weights(num_layers, 256, rng.uniform(*SKEWS[skew], num_layers), rng)
    w = shifted_load(w_old, kind, rng)
    return w, rebalance_experts(w_old, *ARGS)[0].numpy()


def _score(w, p) -> np.ndarray:
    return imbalance(gpu_loads(w, p, 32))


def _node_floor(w, p) -> np.ndarray:
    """[L] max/mean no edit inside the nodes can beat: the heaviest node's load over its 8 GPUs."""
    nodes = gpu_loads(w, p, 32).reshape(len(w), 4, 8).sum(-1)
    return nodes.max(1) / 8 / (w.sum(1) / 32)


def _groups_on_one_node(p) -> bool:
    node = np.arange(p.shape[1]) // 72
    return all(len(set(node[p[layer] // 32 == g])) == 1 for layer in range(len(p)) for g in range(8))


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(SHIFTS), skew=st.sampled_from(sorted(SKEWS)), seed=st.integers(0, 2**16),
       max_moves=st.sampled_from([7, 28, 72, 96]))
def test_hierarchy_budget_and_never_worse(kind, skew, seed, max_moves):
    w, p_old = _case(kind, skew, seed, num_layers=2)
    p = incremental_rebalance(w, p_old, 32, max_moves, **HIER).numpy()
    assert (slots_moved(p_old, p) <= max_moves).all()
    assert _groups_on_one_node(p)
    assert all((np.bincount(row, minlength=256) >= 1).all() for row in p)
    assert (gpu_loads(w, p, 32).max(1) <= gpu_loads(w, p_old, 32).max(1) * (1 + 1e-9)).all()


@pytest.mark.parametrize("kind", SHIFTS)
def test_mild_shift_at_10pct_budget(kind):
    """Mildly skewed loads (Zipf s in 0.1..0.5), a 10% budget (28 slots): every layer within 2% of the better of
    our fresh plan (EPLB-compatible) and the in-service pairing's node floor, >= 5x fewer slot changes; where the
    group totals did not move (drift, re-ranking) that is within 5% of the fresh plan."""
    w, p_old = _case(kind, "mild", seed=1)
    p = incremental_rebalance(w, p_old, 32, 28, **HIER).numpy()
    fresh = rebalance_experts(w, *ARGS)[0].numpy()
    assert (_score(w, p) <= np.maximum(_node_floor(w, p_old), _score(w, fresh)) * 1.02).all()
    assert slots_moved(p_old, p).mean() * 5 <= slots_moved(p_old, fresh).mean()
    if not kind.startswith("groups"):
        assert _score(w, p).mean() <= 1.05 * _score(w, fresh).mean()


def test_family_within_5pct_of_fresh_at_quarter_budget():
    """The whole family (4 shifts x mild / strong skew) with a quarter of the slots as budget (72, room for one
    group swap): mean max/mean within 5% of fresh plans, >= 5x fewer slot changes on average."""
    inc, fresh, m_inc, m_fresh = [], [], [], []
    for kind in SHIFTS:
        for skew in sorted(SKEWS):
            w, p_old = _case(kind, skew, seed=0)
            p = incremental_rebalance(w, p_old, 32, 72, **HIER).numpy()
            f = rebalance_experts(w, *ARGS)[0].numpy()
            inc.append(_score(w, p).mean())
            fresh.append(_score(w, f).mean())
            m_inc.append(slots_moved(p_old, p).mean())
            m_fresh.append(slots_moved(p_old, f).mean())
    assert np.mean(inc) <= 1.05 * np.mean(fresh), (inc, fresh)
    assert np.mean(m_inc) * 5 <= np.mean(m_fresh), (m_inc, m_fresh)


def test_node_floor_holds_without_a_group_budget():
    """Below two groups' worth of slot changes (64 at 32 experts per group) no group changes node, so no layer
    goes below the in-service pairing's node floor, however the load moved."""
    w, p_old = _case("groups", "mild", seed=2)
    p = incremental_rebalance(w, p_old, 32, 56, **HIER).numpy()
    assert (_score(w, p) >= _node_floor(w, p_old) * (1 - 1e-9)).all()


@pytest.mark.parametrize("kind", ["groups", "groups+drift", "drift"])
def test_group_repair_beats_the_floor_with_budget(kind):
    """With a third of the slots as budget, layers whose node pairing went stale swap a group between nodes: they
    end below the old pairing's floor, hierarchical, still >= 3x fewer moves than a fresh plan, and the family
    gets within 2% of fresh plans."""
    w, p_old = _case(kind, "mild", seed=3)
    p = incremental_rebalance(w, p_old, 32, 96, **HIER).numpy()
    fresh = rebalance_experts(w, *ARGS)[0].numpy()
    floor = _node_floor(w, p_old)
    assert (_node_floor(w, p) < floor * 0.99).any()  # some layer re-paired
    assert (_score(w, p) < floor * 0.99).any()
    assert _groups_on_one_node(p)
    assert _score(w, p).mean() <= 1.02 * _score(w, fresh).mean()
    assert slots_moved(p_old, p).mean() * 3 <= slots_moved(p_old, fresh).mean()


def test_repair_needs_clear_gain():
    """A placement freshly planned for this very load never re-pairs, even with budget for it."""
    w, _ = _case("drift", "mild", seed=4)
    p_fresh = rebalance_experts(w, *ARGS)[0].numpy()
    p = incremental_rebalance(w, p_fresh, 32, 96, **HIER).numpy()
    assert np.array_equal(_node_floor(w, p), _node_floor(w, p_fresh))
