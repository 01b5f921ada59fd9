"""The serving load generator's statistics and stream parsing, on synthetic timestamps and bytes (no server)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from omniops.bench.loadgen import (
    RequestResult,
    SSEParser,
    apply_event,
    make_prompts,
    percentile,
    summarize,
)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_matches_numpy_linear(xs, q):
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-9, abs=1e-6)


def test_percentile_edges():
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 100) == 4
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_ttft_itl_latency_from_event_times():
    r = RequestResult(start=10.0, events=[10.5, 10.6, 10.8, 11.1], output_tokens=4)
    assert r.ttft == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.1, 0.2, 0.3])
    assert r.latency == pytest.approx(1.1)
    assert r.ok
    assert RequestResult(start=0.0).ttft is None and RequestResult(start=0.0).itl == []


def test_summarize_pools_itl_over_requests_and_skips_failures():
    a = RequestResult(start=0.0, events=[1.0, 1.1, 1.2], output_tokens=3)
    b = RequestResult(start=0.0, events=[2.0, 2.4], output_tokens=2)
    bad = RequestResult(start=0.0, error="HTTP 500: boom")
    s = summarize([a, b, bad], duration=2.5)
    assert (s["requests"], s["completed"], s["errors"], s["output_tokens"]) == (3, 2, 1, 5)
    assert s["output_tok_s"] == pytest.approx(2.0) and s["req_s"] == pytest.approx(0.8)
    assert s["ttft_p50_ms"] == pytest.approx(1500.0)  # TTFTs 1.0 and 2.0 s
    assert s["itl_p50_ms"] == pytest.approx(100.0)  # ITLs 0.1, 0.1, 0.4 s pooled
    assert s["itl_p99_ms"] == pytest.approx(float(np.percentile([100, 100, 400], 99)))
    assert s["first_error"] == "HTTP 500: boom"


def _chunk(text, finish=None):
    return json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def test_sse_events_split_anywhere_and_crlf():
    body = (f"data: {_chunk('a')}\r\n\r\ndata: {_chunk('b')}\n\n: comment\n\ndata: [DONE]\n\n").encode()
    for cut in range(1, len(body)):
        p = SSEParser()
        got = p.feed(body[:cut]) + p.feed(body[cut:])
        assert got == [_chunk("a"), _chunk("b"), "[DONE]"]


def test_apply_event_counts_tokens_and_prefers_usage():
    r = RequestResult(start=0.0)
    assert apply_event(r, _chunk("x"), 1.0)
    assert apply_event(r, _chunk(""), 1.1)  # a token the detokenizer held back still arrived
    assert apply_event(r, _chunk("y", "length"), 1.2)
    assert apply_event(r, _chunk("", "length"), 1.3)  # finish-only chunk: no token
    assert r.events == [1.0, 1.1, 1.2] and r.output_tokens == 3
    assert apply_event(r, json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 64}}), 1.4)
    assert (r.output_tokens, r.prompt_tokens) == (64, 7)
    assert not apply_event(r, "[DONE]", 1.5)
    e = RequestResult(start=0.0)
    assert not apply_event(e, json.dumps({"error": {"message": "bad"}}), 1.0) and "bad" in e.error


def test_prompts_are_deterministic_and_distinct():
    a, b = make_prompts(8, words=100, seed=3), make_prompts(8, words=100, seed=3)
    assert a == b and len(set(a)) == 8
    assert all(len(p.split()) == 101 for p in a)  # "i:" + 100 words
    assert make_prompts(8, seed=4) != a


def test_run_load_against_a_streaming_server():
    """run_load end to end over loopback: an aiohttp SSE server streams max_tokens chunks, then usage and
    [DONE]; a prompt it rejects comes back as that request's error, and at most `concurrency` run at once."""
    import asyncio

    from aiohttp import web
    from omniops.bench.loadgen import run_load

    live = {"now": 0, "peak": 0}

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["prompt"] == "bad":
            return web.json_response({"error": {"message": "rejected"}}, status=400)
        live["now"] += 1
        live["peak"] = max(live["peak"], live["now"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(body["max_tokens"]):
            await resp.write(f"data: {_chunk('t')}\n\n".encode())
            await asyncio.sleep(0.002)
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": body["max_tokens"]}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        live["now"] -= 1
        return resp

    async def run():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await asyncio.wait_for(run_load("127.0.0.1", port, "m", ["a", "b", "bad", "c"], 5, 2), 30)
        finally:
            await runner.cleanup()

    results, duration = asyncio.run(run())
    ok = [r for i, r in enumerate(results) if i != 2]
    assert all(r.ok and r.output_tokens == 5 and len(r.events) == 5 and r.prompt_tokens == 3 for r in ok)
    assert results[2].error.startswith("HTTP 400") and "rejected" in results[2].error
    assert live["peak"] <= 2 and duration > 0
