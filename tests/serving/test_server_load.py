"""omni-serve under load and its Prometheus metrics: 200 concurrent requests of mixed lengths (completions and
chat, streamed and not) each get exactly max_tokens tokens; afterwards nothing runs and the KV cache reads 0;
the /metrics names are exactly vLLM's under ``omni:`` and move by what the traffic did; prefix-cache hits."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import pytest

from tests.serving._server import OmniServer, metrics
from tests.serving.conftest import mixed_prompts

N = 200
NAMES = {  # family name -> type, as exposed (counters with their _total)
    "omni:num_requests_running": "gauge", "omni:num_requests_waiting": "gauge",
    "omni:kv_cache_usage_perc": "gauge", "omni:prompt_tokens_total": "counter",
    "omni:prompt_tokens_computed_total": "counter", "omni:generation_tokens_total": "counter",
    "omni:prefix_cache_queries_total": "counter", "omni:prefix_cache_hits_total": "counter",
    "omni:num_preemptions_total": "counter", "omni:request_success_total": "counter",
    "omni:time_to_first_token_seconds": "histogram", "omni:inter_token_latency_seconds": "histogram",
    "omni:e2e_request_latency_seconds": "histogram",
}


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    srv = OmniServer(checkpoint("llama"), tmp_path_factory.mktemp("serve-load") / "server.log",
                     "--served-model-name", "tiny", "--max-model-len", "256", "--kv-cache-memory", "0.05",
                     "--disable-uvicorn-access-log").start()
    yield srv
    srv.stop()


async def _one(c: httpx.AsyncClient, i: int, prompt: str, max_tokens: int) -> dict:
    common = {"model": "tiny", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "seed": i}
    if i % 4 == 0:  # streamed, usage in the last chunk
        body = {**common, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}}
        usage, text = None, ""
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    text += "".join(ch["text"] for ch in chunk["choices"])
        return usage
    if i % 4 == 1:
        body = {**common, "messages": [{"role": "user", "content": prompt}]}
        r = await c.post("/v1/chat/completions", json=body)
    else:
        r = await c.post("/v1/completions", json={**common, "prompt": prompt})
    assert r.status_code == 200, r.text
    return r.json()["usage"]


async def _burst(url: str, prompts: list[str], max_tokens: list[int]) -> tuple[list[dict], list[dict], float]:
    limits = httpx.Limits(max_connections=N + 10, max_keepalive_connections=N + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as c:
        samples: list[dict] = []
        done = asyncio.Event()

        async def sample_load():  # what a load balancer would see during the burst
            while not done.is_set():
                samples.append((await c.get("/load")).json())
                await asyncio.sleep(0.05)

        sampler = asyncio.ensure_future(sample_load())
        t0 = time.perf_counter()
        try:
            usages = await asyncio.wait_for(asyncio.gather(*(_one(c, i, p, m) for i, (p, m) in
                                                             enumerate(zip(prompts, max_tokens, strict=True)))), 150)
        finally:
            done.set()
            await sampler
        return usages, samples, time.perf_counter() - t0


def test_200_concurrent_requests(server):
    rnd = random.Random(0)
    prompts = mixed_prompts(N, seed=3)
    max_tokens = [rnd.randint(1, 24) for _ in range(N)]
    before = metrics(server.url)
    usages, samples, wall = asyncio.run(_burst(server.url, prompts, max_tokens))
    assert [u["completion_tokens"] for u in usages] == max_tokens
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    load = server.wait_idle(10)
    assert (load["running"], load["waiting"], load["kv_cache_usage"]) == (0, 0, 0.0), load
    assert max(s["running"] for s in samples) > 1 and max(s["kv_cache_usage"] for s in samples) > 0

    after = metrics(server.url)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert after["omni:num_requests_running"] == after["omni:num_requests_waiting"] == 0
    assert after["omni:kv_cache_usage_perc"] == 0
    assert delta["omni:generation_tokens_total"] == sum(max_tokens)
    assert delta["omni:prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert delta['omni:request_success_total{finished_reason="length"}'] == N
    assert delta["omni:e2e_request_latency_seconds_count"] == N
    assert delta["omni:time_to_first_token_seconds_count"] == N
    assert delta["omni:inter_token_latency_seconds_count"] == sum(m - 1 for m in max_tokens)
    e2e = delta["omni:e2e_request_latency_seconds_sum"] / N
    print(f"\n{N} concurrent requests: {wall:.2f} s, {sum(max_tokens) / wall:.0f} generated tok/s, "
          f"peak running {max(s['running'] for s in samples)}, mean e2e {e2e:.3f} s")


def test_metric_names_and_histograms(server):
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert types == NAMES
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert line.startswith("omni:") and 'model_name="tiny"' in line, line
    m = metrics(server.url)
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        buckets = [(k, v) for k, v in m.items() if k.startswith(f"omni:{h}_bucket")]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1][0].endswith('{le="+Inf"}')
        assert counts[-1] == m[f"omni:{h}_count"] and m[f"omni:{h}_sum"] >= 0


def test_prefix_cache_hits(server):
    prompt = " ".join(["the old river where children play and birds sing"] * 6)  # several full 16-token blocks
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "ignore_eos": True}
    before = metrics(server.url)
    first = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["usage"]
    second = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["usage"]
    after = metrics(server.url)
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0 or cached >= first["prompt_tokens_details"][
        "cached_tokens"]
    assert cached >= 16 * ((second["prompt_tokens"] - 1) // 16) - 16 and cached % 16 == 0 and cached > 0
    assert after["omni:prefix_cache_hits_total"] - before["omni:prefix_cache_hits_total"] >= cached
    assert after["omni:prefix_cache_queries_total"] - before["omni:prefix_cache_queries_total"] == \
        first["prompt_tokens"] + second["prompt_tokens"]
    computed = after["omni:prompt_tokens_computed_total"] - before["omni:prompt_tokens_computed_total"]
    assert computed == first["prompt_tokens"] + second["prompt_tokens"] - cached - \
        first["prompt_tokens_details"]["cached_tokens"]
    # the cached blocks outlive their requests but nobody holds them: they count as free
    assert after["omni:kv_cache_usage_perc"] == 0 and server.load()["kv_cache_usage"] == 0
