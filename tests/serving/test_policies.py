"""omni-proxy's policies on synthetic loads: each formula, its tie-breaks, and the state it keeps (radix tree,
cost model, decayed history); the Selector's candidate filtering (health, retries, buckets)."""

from __future__ import annotations

import random

import pytest

from omniops.serving.proxy import policies as P
from omniops.serving.proxy.backends import Backend
from omniops.serving.proxy.radix import RadixTree
from omniops.serving.proxy.select import RequestInfo, Selector


def loads(*tokens: int, requests=None) -> list[P.EngineLoad]:
    requests = requests or [0] * len(tokens)
    return [P.EngineLoad(f"e{i}", r, t) for i, (t, r) in enumerate(zip(tokens, requests, strict=True))]


def test_round_robin_cycles():
    assert [P.round_robin(3, c) for c in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_outstanding_tokens_then_requests_then_index():
    assert P.least_outstanding(loads(50, 10, 30)) == 1
    assert P.least_outstanding(loads(10, 10, requests=[3, 2])) == 1
    assert P.least_outstanding(loads(10, 10, requests=[2, 2])) == 0


def test_power_of_two_picks_the_lighter_of_two_draws():
    rng = random.Random(0)
    ls = loads(100, 0, 50, 70)
    picks = [P.power_of_two(ls, rng) for _ in range(400)]
    # the heaviest engine never wins a pair; the lightest wins every pair it is drawn in (half the draws)
    assert 0 not in picks
    assert 0.4 < picks.count(1) / len(picks) < 0.6
    assert P.power_of_two(loads(5), rng) == 0


def test_radix_tree_match_insert_split_evict():
    t = RadixTree(max_chars_per_tenant=100)
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    assert t.prefix_match("hello world again") == (11, "a")
    assert t.prefix_match("hello there!") == (11, "b")
    assert t.prefix_match("hello")[0] == 5
    assert t.prefix_match("hello w", {"b"}) == (6, "b")  # "hello " is all b holds of it
    assert t.prefix_match("xyz") == (0, None)
    assert t.chars == {"a": 11, "b": 11}
    t.insert("hello world", "b")  # now both hold it; the most recent user wins ties
    assert t.prefix_match("hello world") == (11, "b")
    for i in range(20):  # b goes over its cap: its least recently used leaves go first
        t.insert(f"{i:02d} filler text", "b")
    assert t.chars["b"] <= 100
    assert t.prefix_match("19 filler text")[1] == "b"
    assert t.prefix_match("00 filler text") == (0, None)
    t.remove_tenant("b")
    assert "b" not in t.chars and t.prefix_match("hello world") == (11, "a")


def test_cache_aware_follows_long_matches_and_balances():
    tree = RadixTree()
    cfg = P.CacheAwareConfig(cache_threshold=0.5, balance_abs_threshold=4, balance_rel_threshold=1.5)
    sys_prompt = "You are a helpful assistant. " * 4
    ls = loads(0, 0)
    assert P.cache_aware(tree, ls, sys_prompt + "q1", cfg) == 0  # no match: least loaded (index tie-break)
    ls = loads(100, 0)  # engine 0 is busier in tokens, but holds the prefix: the match wins
    assert P.cache_aware(tree, ls, sys_prompt + "q2", cfg) == 0
    assert P.cache_aware(tree, ls, "something unrelated entirely", cfg) == 1  # short match: least loaded
    imbalanced = loads(0, 0, requests=[10, 1])  # 10 - 1 > 4 and 10 > 1.5: balance over the cache
    assert P.cache_aware(tree, imbalanced, sys_prompt + "q3", cfg) == 1
    assert tree.prefix_match(sys_prompt + "q3")[1] == "e1"  # and the tree learns it


def test_linear_cost_fit():
    c = P.LinearCost()
    assert c.predict(100) == pytest.approx(1e-4 * 100 + 5e-3)  # the prior
    for n in (16, 64, 256, 1024, 2048):
        c.observe(n, 0.002 * n + 0.05)
    assert (c.a, c.b) == (pytest.approx(0.002), pytest.approx(0.05))
    c2 = P.LinearCost(window=3)
    for n, s in ((10, 5.0), (20, 1.0), (30, 2.0), (40, 3.0)):
        c2.observe(n, s)
    assert len(c2.samples) == 3 and c2.a == pytest.approx(0.1) and c2.b == pytest.approx(0.0)
    c3 = P.LinearCost()
    c3.observe(10, 1.0)
    c3.observe(100, 0.1)  # longer but faster (noise): clamped, never negative
    assert c3.a == 0.0 and c3.b >= 0


def test_prefill_score_balance_formula():
    costs = [P.LinearCost(a=0.001, b=0.01), P.LinearCost(a=0.001, b=0.01)]
    ls = [P.EngineLoad("e0", requests=2, prefill_cost=0.5), P.EngineLoad("e1", requests=0, prefill_cost=0.0)]
    assert P.prefill_score_balance(ls, costs, 100) == 1
    # T + c(A+1): e0 = 0.1 + 0.11*2 = 0.32; e1 = 0.0 + (0.005*1000+0.01)*1 = 5.01 -> e0 despite its queue
    costs = [P.LinearCost(a=0.001, b=0.01), P.LinearCost(a=0.005, b=0.01)]
    ls = [P.EngineLoad("e0", requests=1, prefill_cost=0.1), P.EngineLoad("e1")]
    assert P.prefill_score_balance(ls, costs, 100) == 0
    assert P.prefill_score_balance(ls, costs, 1000) == 0
    ls = [P.EngineLoad("e0", requests=3, prefill_cost=3.0), P.EngineLoad("e1")]
    assert P.prefill_score_balance(ls, costs, 100) == 1


def test_pd_score_balance_simulates_longest_first():
    ls = [P.EngineLoad("d0", decode_tokens=0), P.EngineLoad("d1", decode_tokens=0)]
    # in prefill: 1000 and 900; this request 100. Longest first: 1000 -> d0, 900 -> d1, 100 -> d1 (900 < 1000)
    assert P.pd_score_balance(ls, [64, 64], [1000, 900], 100) == 1
    # this one is the longest: placed first, on the lighter engine
    ls = [P.EngineLoad("d0", decode_tokens=500), P.EngineLoad("d1", decode_tokens=0)]
    assert P.pd_score_balance(ls, [64, 64], [10, 20], 2000) == 1
    # the request limit: d1 is full, so d0 even though heavier
    ls = [P.EngineLoad("d0", requests=1, decode_tokens=5000), P.EngineLoad("d1", requests=4, decode_tokens=0)]
    assert P.pd_score_balance(ls, [8, 4], [], 10) == 0
    # everyone full: least loaded regardless
    assert P.pd_score_balance(ls, [1, 4], [], 10) == 1
    # equal lengths: the request is placed after the ones already in prefill
    ls = [P.EngineLoad("d0"), P.EngineLoad("d1")]
    assert P.pd_score_balance(ls, [64, 64], [50], 50) == 1


def test_length_balance_decayed_history():
    hist = [P.DecayedHistory(), P.DecayedHistory()]
    assert P.length_balance(hist, 1000, now=0.0) == 0
    assert P.length_balance(hist, 10, now=0.0) == 1  # e0 holds 1000 tokens
    assert P.length_balance(hist, 10, now=0.0) == 1  # 1000 + 1*m vs 20 + 2*m, m = 340: still e1
    c, s = hist[0].at(10.0, 10.0)  # one half-life later
    assert (c, s) == (pytest.approx(0.5), pytest.approx(500.0))
    # long after, both decayed to ~0: back to the index tie-break
    assert P.length_balance(hist, 10, now=1000.0) == 0


def test_length_bucket_and_members():
    assert [P.length_bucket(n, [512]) for n in (1, 511, 512, 4000)] == [0, 0, 1, 1]
    assert [P.length_bucket(n, [100, 1000]) for n in (99, 100, 999, 1000)] == [0, 1, 1, 2]
    assert P.bucket_members(4, 2, 0) == [0, 1] and P.bucket_members(4, 2, 1) == [2, 3]
    assert P.bucket_members(3, 2, 0) == [0, 1] and P.bucket_members(3, 2, 1) == [2]
    assert P.bucket_members(1, 2, 1) == [0]


def _pool(policy: str, n: int = 3, **kw) -> Selector:
    return Selector(policy, [Backend(f"http://e{i}", "mixed") for i in range(n)], **kw)


def test_selector_skips_unhealthy_and_tried():
    s = _pool("round_robin")
    info = RequestInfo("x", 10, 10)
    assert [s.pick(info).url for _ in range(3)] == ["http://e0", "http://e1", "http://e2"]
    s.backends[1].healthy = False
    assert {s.pick(info).url for _ in range(4)} == {"http://e0", "http://e2"}
    assert s.pick(info, tried={"http://e0"}).url == "http://e2"
    assert s.pick(info, tried={"http://e0", "http://e2"}).url in ("http://e0", "http://e2")  # all tried: any
    for b in s.backends:
        b.healthy = False
    assert s.pick(info) is None
    with pytest.raises(ValueError, match="policy"):
        _pool("fastest")


def test_selector_length_bucket_and_load_correction():
    s = _pool("length_bucket", 2, bucket_thresholds=(512,))
    s.backends[0].tokens, s.backends[0].requests = 10_000, 5  # busy short engine: short prompts still go there
    assert s.pick(RequestInfo("x", 20, 10)).url == "http://e0"
    assert s.pick(RequestInfo("x", 2000, 10)).url == "http://e1"
    s.backends[1].healthy = False
    assert s.pick(RequestInfo("x", 2000, 10)).url == "http://e0"  # a bucket with no engine left borrows
    b = Backend("http://x", "mixed", requests=2, tokens=200)
    b.reported, b.own_at_report = 6, 2  # 4 requests from elsewhere, counted at the proxy's mean of 100 tokens
    assert (b.load().requests, b.load().tokens) == (6, 600)


def test_selector_every_policy_routes():
    for name in P.POLICIES:
        s = _pool(name)
        picked = {s.pick(RequestInfo(f"prompt {i}", 10 * i + 1, 16), in_prefill=[5]).url for i in range(12)}
        assert picked <= {b.url for b in s.backends} and picked, name


def test_prefill_score_balance_counts_prefills_when_known():
    costs = [P.LinearCost(a=0.001, b=0.01)] * 2
    # e0: 10 requests decoding, none in prefill; e1: one prefill in flight, predicted 0.5 s
    ls = [P.EngineLoad("e0", requests=10, prefilling=0), P.EngineLoad("e1", requests=1, prefill_cost=0.5,
                                                                        prefilling=1)]
    assert P.prefill_score_balance(ls, costs, 100) == 0  # 0 + 0.11 vs 0.5 + 0.22
    ls[0].prefilling = None  # unknown (a prefill engine): every request counts, 0.11 * 11 = 1.21 vs 0.72
    assert P.prefill_score_balance(ls, costs, 100) == 1
