"""The KV hand-off between engines in one process (no HTTP): a prefill engine holds a finished prompt's blocks,
a decode engine pulls them over TCP and computes only the last prompt token. GQA (Llama) and DeepSeek's latent
MLA cache; greedy output equals a mixed engine's; ack and timeout free the held blocks; block-size and layout
mismatches; a dead prefill engine (recompute fallback); an abort while the pull runs."""

from __future__ import annotations

import random
import time

import pytest

from omniops.serving import EngineConfig, LLMEngine, SamplingParams
from omniops.serving.kv_transfer import KVConnector

KW = {"enforce_eager": True, "kv_cache_memory": 0.01, "max_model_len": 256, "dtype": "float32"}
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _engine(ckpt: str, role: str | None = None, **kw) -> LLMEngine:
    eng = LLMEngine(EngineConfig.from_kwargs(ckpt, **{**KW, **kw}))
    if role is not None:
        eng.kv_connector = KVConnector(eng, role, timeout=30.0)
    return eng


def run(eng: LLMEngine, reqs: list[tuple], timeout: float = 60.0) -> dict:
    """Add (rid, prompt, kv_transfer_params, params) requests and step until all finished; an engine whose only
    work is a KV pull in flight has no unfinished requests (its pull wakes it), so poll then."""
    for rid, prompt, kvp, sp in reqs:
        eng.add_request(rid, prompt, sp, kv_transfer_params=kvp)
    outs, t0 = {}, time.monotonic()
    while len(outs) < len(reqs):
        assert time.monotonic() - t0 < timeout, f"stuck: {len(outs)} of {len(reqs)} finished"
        if not eng.has_unfinished_requests():
            time.sleep(0.002)
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


def settle(eng: LLMEngine, timeout: float = 5.0) -> None:
    """Let the acks / timeouts that other threads reported reach the block pool, then check nothing is held."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        eng.step()
        if eng.kv.usage() == 0 and not eng.kv_connector.held:
            break
        time.sleep(0.01)
    eng.kv.check_all_free()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(5, 500) for _ in range(rnd.choice((1, 2, 15, 16, 17, 33, 70, 120)))] for _ in range(n)]


def prefill(p: LLMEngine, ps: list[list[int]], tag: str) -> dict:
    outs = run(p, [(f"{tag}{i}", x, {"do_remote_decode": True}, SamplingParams(max_tokens=1, temperature=0.0))
                   for i, x in enumerate(ps)])
    return {k: o.metrics["kv_transfer_params"] for k, o in outs.items()}


@pytest.fixture(scope="module", params=["llama", "deepseek_v3"])
def engines(request, checkpoint):
    ckpt = checkpoint(request.param)
    mixed, p, d = _engine(ckpt), _engine(ckpt, "prefill"), _engine(ckpt, "decode")
    yield request.param, mixed, p, d
    p.kv_connector.close()
    d.kv_connector.close()


def test_pull_equals_mixed_and_frees_both_sides(engines):
    arch, mixed, p, d = engines
    ps = prompts(10)
    ref = run(mixed, [(f"r{i}", x, None, GREEDY) for i, x in enumerate(ps)])
    params = prefill(p, ps, "r")
    assert p.kv_connector.server.num_held_blocks() == sum(-(-len(x) // 16) for x in ps)
    assert all(v["do_remote_prefill"] and v["remote_port"] == p.kv_connector.port for v in params.values())
    c0, r0 = d.counters.prompt_tokens_computed, d.kv_connector.stats.blocks["received"]
    outs = run(d, [(k, ps[int(k[1:])], params[k], GREEDY) for k in params])
    assert {k: o.outputs[0].token_ids for k, o in outs.items()} == {k: o.outputs[0].token_ids
                                                                     for k, o in ref.items()}, arch
    assert d.counters.prompt_tokens_computed - c0 == len(ps)  # the last prompt token each, nothing else
    assert d.kv_connector.stats.blocks["received"] - r0 == sum(-(-(len(x) - 1) // 16) for x in ps)
    settle(p)
    settle(d)
    assert p.kv_connector.stats.timeouts == 0 and d.kv_connector.stats.failures == 0

    # the same prompts again: the decode engine's own prefix cache serves the full blocks it already has
    params = prefill(p, ps, "s")
    r1 = d.kv_connector.stats.blocks["received"]
    outs = run(d, [(k, ps[int(k[1:])], params[k], GREEDY) for k in params])
    assert all(outs[f"s{i}"].outputs[0].token_ids == ref[f"r{i}"].outputs[0].token_ids for i in range(len(ps)))
    assert d.kv_connector.stats.blocks["received"] - r1 < r1 - r0
    settle(p)
    settle(d)


def test_no_ack_frees_after_timeout(engines):
    _, _, p, _ = engines
    conn = p.kv_connector
    conn.server.timeout = 0.3
    try:
        params = prefill(p, [[7] * 40], "t")
        assert p.kv.usage() > 0 and conn.server.num_held_blocks() == 3
        before = conn.stats.timeouts
        settle(p)  # nobody pulls: the sweeper frees them
        assert conn.stats.timeouts == before + 1
        assert params["t0"]["remote_request_id"] not in conn.server.holds
    finally:
        conn.server.timeout = 30.0


def test_dead_prefill_engine_falls_back_to_recompute(engines):
    _, mixed, p, d = engines
    ps = prompts(3, seed=1)
    ref = run(mixed, [(f"f{i}", x, None, GREEDY) for i, x in enumerate(ps)])
    bogus = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 1, "remote_request_id": "x",
             "remote_block_ids": [0]}
    f0 = d.kv_connector.stats.failures
    outs = run(d, [(f"f{i}", x, bogus, GREEDY) for i, x in enumerate(ps)])
    assert all(outs[k].outputs[0].token_ids == ref[k].outputs[0].token_ids for k in ref)
    assert d.kv_connector.stats.failures - f0 == 3
    settle(d)


def test_abort_during_pull_frees_everything(engines):
    _, _, p, d = engines
    params = prefill(p, [[9] * 100, [11] * 60], "a")
    d.add_request("a0", [9] * 100, GREEDY, kv_transfer_params=params["a0"])
    d.add_request("a1", [11] * 60, GREEDY, kv_transfer_params=params["a1"])
    d.step()  # allocates the blocks and starts both pulls
    assert d.abort_request("a0") and d.abort_request("a1")
    t0 = time.monotonic()
    while d.kv_connector.inflight and time.monotonic() - t0 < 10:
        d.step()
        time.sleep(0.005)
    settle(d)
    settle(p)  # the pulls acknowledged (or the abort before the pull released the hold)


def test_mismatches_are_named(checkpoint):
    ckpt = checkpoint("llama")
    d32 = _engine(ckpt, "decode", block_size=32)
    try:
        with pytest.raises(ValueError, match="block size mismatch.*16-token.*32"):
            d32.add_request("m", [1, 2, 3], GREEDY, kv_transfer_params={
                "do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 1, "remote_request_id": "x",
                "remote_block_size": 16})
        with pytest.raises(ValueError, match="remote_port is missing"):
            d32.add_request("m", [1, 2, 3], GREEDY, kv_transfer_params={"do_remote_prefill": True,
                                                                       "remote_host": "h", "remote_request_id": "x"})
        assert "m" not in d32.requests and not d32.kv_connector.pending
        # without remote_block_size in the params the layout check of the pull catches it; the prompt is
        # recomputed and the prefill engine is told to free its hold
        p = _engine(ckpt, "prefill")
        params = prefill(p, [[5] * 40], "m")
        del params["m0"]["remote_block_size"]
        out = run(d32, [("m0", [5] * 40, params["m0"], GREEDY)])
        assert len(out["m0"].outputs[0].token_ids) == 8 and d32.kv_connector.stats.failures == 1
        settle(p)
        p.kv_connector.close()
    finally:
        d32.kv_connector.close()
    with pytest.raises(ValueError, match="role"):
        KVConnector(d32, "mixed")
