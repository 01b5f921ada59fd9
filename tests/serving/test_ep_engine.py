"""Expert-parallel serving (gloo, one machine): --ep 2 / 4 give the greedy tokens of --ep 1 on a DeepSeek-V3 and
a Qwen3-MoE checkpoint, with and without redundant experts; a skewed workload with dynamic placement gets
placement updates, its imbalance falls and its outputs stay equal; static plans once; a killed rank fails the
engine at once with an error; bad options are refused before any process starts."""

from __future__ import annotations

import os
import signal
import time

import pytest

from omniops.serving import LLM, SamplingParams
from omniops.serving.ep import EPRankError
from omniops.serving.ep.placement_loop import initial_placement
from omniops.serving.ep.workload import hot_tokens, skewed_prompts
from tests.serving.conftest import mixed_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# small KV, chunked prefill at 32 tokens and prefix caching: the batch metadata of every kind crosses the ranks
BASE = dict(dtype="float32", max_model_len=256, enforce_eager=True, kv_cache_memory=0.02, max_num_batched_tokens=32)
ARCHS = ("qwen3_moe", "deepseek_v3")
E = 8  # routed experts of the tiny checkpoints


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _generate(path: str, prompts, params=GREEDY, **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, **BASE, **kw)
    try:
        return _tokens(llm.generate(prompts, params)), llm
    finally:
        if llm.engine.ep is not None:
            llm.engine.ep.shutdown()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """--ep 1 greedy tokens per architecture on mixed prompts (prefix-sharing pair included)."""
    prompts = mixed_prompts(5, seed=3, max_words=30)
    prompts.append(prompts[0] + " and more words after the shared prefix")
    out = {}
    for arch in ARCHS:
        path = checkpoint(arch)
        out[arch] = (path, prompts, _generate(path, prompts)[0])
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ep,redundant", [(2, 0), (2, 2), (4, 0), (4, 4)])
def test_ep_equals_ep1(reference, arch, ep, redundant):
    path, prompts, ref = reference[arch]
    # with redundant copies also re-place live (every 3 steps) while generating
    kw = dict(placement="dynamic", placement_interval=3) if redundant else {}
    tokens, llm = _generate(path, prompts, ep=ep, redundant_experts=redundant, **kw)
    assert tokens == ref
    loop = llm.engine.ep.loop
    assert loop.num_slots == E + redundant and len(loop.layers) == 2  # both tiny models have 2 MoE layers
    assert all(m.w13.shape[0] == (E + redundant) // ep for m in loop.layers)  # a rank holds only its slots


def _skewed(path: str, ep: int, redundant: int, groups: int, nodes: int) -> list[list[int]]:
    """Prompts routing most pairs to experts that the initial placement gives the first rank of each node alone
    (the node loads stay even: a hierarchical placement cannot move load between nodes, only within them)."""
    start = initial_placement(E, E + redundant, ep, groups, nodes)
    firsts = range(0, ep, ep // nodes)
    hot = [e for r in firsts for e in start.local_logical(r).tolist() if int(start.replicas[e]) == 1][:3]
    tokens, share = hot_tokens(path, hot, 24, exclude=set(range(8)))  # not the tokenizer's special ids
    assert share > 0.6  # vs 3/8 for a uniform router
    return skewed_prompts(tokens, 8, seed=1)


@pytest.mark.parametrize("arch,ep,redundant,nodes", [("qwen3_moe", 2, 2, 1), ("deepseek_v3", 4, 4, 2)])
def test_skewed_dynamic_placement(checkpoint, arch, ep, redundant, nodes):
    """Hot experts all start on rank 0: updates move copies / experts off it, the measured imbalance falls, the
    outputs equal --ep 1 across the updates. DeepSeek runs hierarchical (4 expert groups on 2 nodes of 2 ranks)."""
    path = checkpoint(arch)
    groups = 4 if arch == "deepseek_v3" else 1
    prompts = _skewed(path, ep, redundant, groups, nodes)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref, _ = _generate(path, prompts, params)
    tokens, llm = _generate(path, prompts, params, ep=ep, redundant_experts=redundant, placement="dynamic",
                            placement_interval=4, placement_nodes=nodes)
    assert tokens == ref
    s = llm.engine.ep.stats
    before, after = s.timeline[0]["imbalance"], min(p["imbalance"] for p in s.timeline[1:])
    print(f"{arch} ep={ep} R={redundant}: imbalance {before:.3f} -> {after:.3f}, {s.updates} updates, "
          f"{s.moved} slots moved")
    assert s.updates >= 1 and s.moved >= 1 and len(s.seconds) == s.updates
    assert before > 1.25 and after < before - 0.15
    if nodes > 1:  # every expert group's copies stayed on one node
        per_node = (E + redundant) // nodes
        for m in llm.engine.ep.loop.layers:
            p2l = m.placement.phy2log.tolist()
            for g in range(groups):
                assert len({j // per_node for j, e in enumerate(p2l) if e // (E // groups) == g}) == 1


def test_static_placement_plans_once_and_metrics(checkpoint):
    from prometheus_client import CollectorRegistry, generate_latest

    from omniops.serving.ep.metrics import register

    path = checkpoint("qwen3_moe")
    prompts = _skewed(path, 2, 2, 1, 1)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref, _ = _generate(path, prompts, params)
    llm = LLM(path, **BASE, ep=2, redundant_experts=2, placement="static", placement_interval=4)
    try:
        assert _tokens(llm.generate(prompts, params)) == ref
        s = llm.engine.ep.stats
        assert s.updates == 1 and len(s.timeline) >= 3  # planned at the first sync only
        assert s.timeline[-1]["imbalance"] < s.timeline[0]["imbalance"]
        reg = CollectorRegistry(auto_describe=False)
        register(reg, llm.engine.ep, "tiny")
        text = generate_latest(reg).decode()
        for line in ('omni:expert_load_imbalance{layer="0",model_name="tiny"}', "omni:placement_updates_total",
                     "omni:placement_moved_experts_total", "omni:placement_seconds_count"):
            assert line in text
        assert 'omni:placement_updates_total{model_name="tiny"} 1.0' in text
    finally:
        llm.engine.ep.shutdown()


def test_dead_rank_fails_the_engine(checkpoint):
    llm = LLM(checkpoint("qwen3_moe"), **BASE, ep=2, ep_timeout=20)
    ep = llm.engine.ep
    assert llm.generate("hello there", GREEDY)[0].outputs[0].token_ids
    os.kill(ep.procs[0].pid, signal.SIGKILL)  # our child, by pid
    t0 = time.monotonic()
    with pytest.raises(EPRankError, match=r"rank 1 \(exit code -9\) exited"):
        llm.generate("hello again", GREEDY)
    assert time.monotonic() - t0 < 10  # a closed socket, not the timeout
    with pytest.raises(EPRankError):  # down for good, at once
        llm.generate("and again", GREEDY)
    assert all(p.poll() is not None for p in ep.procs)
    ep.shutdown()  # idempotent after a failure


def test_bad_options_refused(checkpoint):
    path = checkpoint("qwen3_moe")
    for kw, match in [(dict(redundant_experts=2), "need ep > 1"), (dict(ep=2, placement="best"), "placement"),
                      (dict(ep=2, placement_interval=0), "placement_interval"),
                      (dict(ep=4, placement_nodes=3), "placement_nodes")]:
        with pytest.raises(ValueError, match=match):
            LLM(path, **BASE, **kw)
    with pytest.raises(ValueError, match="do not split evenly"):  # 8 + 1 slots over 2 ranks: before any spawn
        LLM(path, **BASE, ep=2, redundant_experts=1)
