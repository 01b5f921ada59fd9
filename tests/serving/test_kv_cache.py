"""Block pool and scheduler invariants, driven directly (no model)."""

from __future__ import annotations

import pytest

from omniops.serving.kv_cache import BlockPool, KVCacheManager, block_hash
from omniops.serving.request import Request, Status
from omniops.serving.sampling_params import SamplingParams
from omniops.serving.scheduler import Scheduler


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_pool_lru_and_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.register(a[0], b"h0")
    pool.release(a)
    assert pool.num_free() == 4 and pool.cached == {b"h0": a[0]}
    pool.touch([a[0]])  # a prefix hit revives the cached block
    assert pool.num_free() == 3 and pool.ref_cnt[a[0]] == 1
    pool.release([a[0]])
    got = pool.allocate(4)  # the cached block is evicted last (it was freed last) and loses its hash
    assert got[-1] == a[0] and pool.cached == {}
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.release(got)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([got[0]])


def test_chained_hashes_identify_whole_prefixes():
    h1 = block_hash(b"root", [1, 2])
    assert block_hash(b"root", [1, 2]) == h1
    assert block_hash(h1, [3, 4]) != block_hash(block_hash(b"root", [9, 9]), [3, 4])
    assert block_hash(b"root", [1, 2]) != block_hash(b"root", [2, 1])


def test_prefix_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(8, 4)
    a = _req("a", list(range(8)))
    assert kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    b = _req("b", list(range(8)))  # the same 8 tokens: only the first block may come from the cache
    prefix = kv.find_cached_prefix(b)
    assert prefix == a.block_ids[:1]
    c = _req("c", list(range(9)))
    assert kv.find_cached_prefix(c) == a.block_ids
    assert kv.allocate(c, 1, kv.find_cached_prefix(c))
    assert c.num_computed_tokens == 8 and c.block_ids[:2] == a.block_ids and kv.pool.ref_cnt[a.block_ids[0]] == 2
    kv.free(a)
    kv.free(c)
    kv.check_all_free()


def test_disabled_prefix_cache_never_hits():
    kv = KVCacheManager(8, 4, enable_prefix_caching=False)
    a = _req("a", list(range(9)))
    kv.allocate(a, 9)
    a.num_computed_tokens = 9
    kv.cache_computed_blocks(a)
    assert kv.find_cached_prefix(_req("b", list(range(9)))) == []


def _step(s: Scheduler) -> dict[str, int]:
    batch = s.schedule()
    for r, n in zip(batch.requests, batch.num_new_tokens, strict=True):
        r.num_computed_tokens += n
        if r.num_computed_tokens == r.num_tokens:
            r.append_token(7)
    return {r.request_id: n for r, n in zip(batch.requests, batch.num_new_tokens, strict=True)}


def test_scheduler_budget_chunks_and_fcfs():
    s = Scheduler(KVCacheManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10, max_model_len=64)
    s.add(_req("a", list(range(25))))
    s.add(_req("b", list(range(3))))
    assert _step(s) == {"a": 10}
    assert _step(s) == {"a": 10}
    assert _step(s) == {"a": 5, "b": 3}  # a finishes its prompt, b is admitted in the leftover budget
    assert _step(s) == {"a": 1, "b": 1}  # both decoding


def test_scheduler_max_num_seqs():
    s = Scheduler(KVCacheManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100, max_model_len=64)
    for i in range(3):
        s.add(_req(str(i), [1, 2, 3]))
    assert set(_step(s)) == {"0", "1"} and len(s.waiting) == 1


def test_scheduler_preempts_newest_and_recomputes():
    kv = KVCacheManager(4, 4)  # 16 token slots
    s = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=16)
    a, b = _req("a", list(range(8))), _req("b", list(range(8)))
    s.add(a)
    s.add(b)
    _step(s)  # each holds 2 full blocks (all 4), both have 9 tokens now
    assert _step(s) == {"a": 1}  # a needs a third block: b (newest) is preempted
    assert b.status is Status.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert s.waiting[0] is b and s.num_preemptions == 1
    s.finish(a)
    assert _step(s) == {"b": 9}  # recomputed: prompt and its generated token
    s.finish(b)
    kv.check_all_free()
