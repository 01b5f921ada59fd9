"""xPyD through omni-proxy with real processes on loopback: 1P1D, 2P1D and 1P2D (Llama's GQA cache) and 1P1D
(DeepSeek's MLA cache) give, for a burst of concurrent mixed-length greedy requests (completions and chat,
streamed or not), exactly a single mixed engine's outputs; the decode engines computed one prompt token per
request (the KV was transferred, not recomputed); afterwards every engine's KV usage is back to 0. Then a
decode engine is killed with SIGKILL in the middle of a 64-request load: every request completes or ends with
an explicit error (counted), and later requests go to the survivor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from tests.serving._proxy import ProxyServer, start_engines
from tests.serving._server import metrics
from tests.serving.conftest import mixed_prompts

PREFILL = ("--role", "prefill", "--kv-timeout", "6")
DECODE = ("--role", "decode")


async def one(c: httpx.AsyncClient, i: int, prompt: str, max_tokens: int) -> dict:
    """One greedy request, shaped by i: completions or chat, streamed or not. Returns {"text", "tokens"} or
    {"error": message} (an HTTP error status or an error event in the stream)."""
    common = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    chat = i % 2 == 1
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {**common, **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
    if i % 4 >= 2:
        body.update(stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async with c.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return {"error": f"{r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                usage = chunk.get("usage") or usage
                for ch in chunk["choices"]:
                    text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
        return {"text": text, "tokens": usage["completion_tokens"]}
    r = await c.post(path, json=body)
    if r.status_code != 200:
        return {"error": f"{r.status_code}: {r.text[:200]}"}
    out = r.json()
    ch = out["choices"][0]
    return {"text": ch["text"] if not chat else ch["message"]["content"], "tokens": out["usage"]["completion_tokens"]}


async def burst(url: str, prompts: list[str], max_tokens: list[int], start: int = 0) -> list[dict]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as c:
        return await asyncio.gather(*(one(c, start + i, p, m) for i, (p, m) in
                                      enumerate(zip(prompts, max_tokens, strict=True))))


def wait_kv_free(servers, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    for s in servers:
        while True:
            m = metrics(s.url)
            if (m["omni:kv_cache_usage_perc"], m["omni:num_requests_running"], m["omni:num_requests_waiting"]) \
                    == (0, 0, 0):
                break
            assert time.monotonic() < deadline, f"{s.url} still holds KV: {m['omni:kv_cache_usage_perc']}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def llama(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pd-llama")
    engines = start_engines(checkpoint("llama"), tmp, {"mixed": (), "p0": PREFILL, "p1": PREFILL, "d0": DECODE,
                                                        "d1": DECODE, "d2": DECODE})
    yield tmp, engines
    for s in engines.values():
        s.stop()


@pytest.fixture(scope="module")
def deepseek(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pd-deepseek")
    engines = start_engines(checkpoint("deepseek_v3"), tmp, {"mixed": (), "p0": PREFILL, "d0": DECODE})
    yield tmp, engines
    for s in engines.values():
        s.stop()


def _check_equal(tmp, engines, prefill: list[str], decode: list[str], n: int = 24, seed: int = 0) -> None:
    proxy = ProxyServer(tmp / f"proxy-{len(prefill)}p{len(decode)}d.log",
                        "--prefill", *(engines[k].url for k in prefill),
                        "--decode", *(engines[k].url for k in decode)).start()
    try:
        prompts = mixed_prompts(n, seed=seed, max_words=60)
        max_tokens = [4 + (i * 5) % 13 for i in range(n)]
        before = {k: metrics(engines[k].url) for k in prefill + decode}
        ref = asyncio.run(burst(engines["mixed"].url, prompts, max_tokens))
        got = asyncio.run(burst(proxy.url, prompts, max_tokens))
        assert not [r for r in ref if "error" in r]
        assert got == ref  # token for token (same text, same counts), every request
        after = {k: metrics(engines[k].url) for k in prefill + decode}
        d = {k: after[k][key] - before[k][key] for k in after for key in ("omni:prompt_tokens_computed_total",)
             if key in after[k]}
        # the decode engines computed exactly the last prompt token of each request: the KV was transferred
        assert sum(d[k] for k in decode) == n
        sent = sum(after[k]['omni:kv_transfer_blocks_total{direction="sent"}']
                   - before[k]['omni:kv_transfer_blocks_total{direction="sent"}'] for k in prefill)
        received = sum(after[k]['omni:kv_transfer_blocks_total{direction="received"}']
                       - before[k]['omni:kv_transfer_blocks_total{direction="received"}'] for k in decode)
        assert sent == received > 0
        stats = proxy.load()["stats"]
        assert (stats["ok"], stats["retries"], stats["fallbacks"], stats["errors"]) == (n, 0, 0, 0)
        wait_kv_free([engines[k] for k in prefill + decode])
        for k in prefill:
            assert metrics(engines[k].url)["omni:kv_transfer_timeouts_total"] == 0  # freed by acks
    finally:
        proxy.stop()


@pytest.mark.parametrize("topology", ["1P1D", "2P1D", "1P2D"])
def test_pd_equals_mixed_gqa(llama, topology):
    tmp, engines = llama
    prefill = {"1P1D": ["p0"], "2P1D": ["p0", "p1"], "1P2D": ["p0"]}[topology]
    decode = {"1P1D": ["d0"], "2P1D": ["d0"], "1P2D": ["d0", "d1"]}[topology]
    _check_equal(tmp, engines, prefill, decode, seed=["1P1D", "2P1D", "1P2D"].index(topology))


def test_pd_equals_mixed_mla(deepseek):
    tmp, engines = deepseek
    _check_equal(tmp, engines, ["p0"], ["d0"], n=16)


def test_kill_a_decode_engine_mid_load(llama):
    tmp, engines = llama
    p0, d0, d2 = engines["p0"], engines["d0"], engines["d2"]
    proxy = ProxyServer(tmp / "proxy-kill.log", "--prefill", p0.url, "--decode", d0.url, d2.url,
                        "--decode-policy", "round_robin").start()
    try:
        n = 64
        prompts = mixed_prompts(n, seed=5, max_words=50)
        max_tokens = [24 + i % 17 for i in range(n)]

        async def load_and_kill() -> list[dict]:
            task = asyncio.ensure_future(burst(proxy.url, prompts, max_tokens))
            async with httpx.AsyncClient(timeout=5) as c:  # kill once d2 is busy with a share of the load
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    stats = (await c.get(f"{proxy.url}/load")).json()
                    b = next(x for x in stats["backends"] if x["url"] == d2.url)
                    if b["requests_total"] >= 8 and b["requests"] >= 2:
                        break
                    await asyncio.sleep(0.02)
            os.kill(d2.proc.pid, signal.SIGKILL)
            return await asyncio.wait_for(task, 120)

        results = asyncio.run(load_and_kill())
        ok = [r for r in results if "error" not in r]
        errors = [r for r in results if "error" in r]
        assert len(ok) + len(errors) == n  # nothing lost, nothing hung
        assert all(r["tokens"] == m for r, m in zip(results, max_tokens, strict=True) if "error" not in r)
        assert len(ok) >= n // 2, errors
        # only streams that had sent a token may fail; they say so
        assert all("failed while streaming" in r["error"] for r in errors), errors
        stats = proxy.load()
        print(f"\nkill -9 mid-load: {len(ok)} completed ({stats['stats']['retries']} retried), {len(errors)} "
              f"explicit errors of {n}")
        d2_before = next(x for x in stats["backends"] if x["url"] == d2.url)
        assert not d2_before["healthy"]
        later = asyncio.run(burst(proxy.url, prompts[:8], [8] * 8))
        assert all("error" not in r for r in later)
        stats = proxy.load()
        d2_after = next(x for x in stats["backends"] if x["url"] == d2.url)
        assert d2_after["requests_total"] == d2_before["requests_total"]  # all went to the survivor
        wait_kv_free([p0, d0], timeout=20)  # the dead engine's unpulled blocks time out on the prefill side
    finally:
        proxy.stop()
