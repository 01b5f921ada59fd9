"""omni-serve's failure paths, each followed by a good request that succeeds: OpenAI-shaped 400 / 401 / 404 /
503 errors, client disconnects (streamed and not) that abort the request and free its KV blocks, and (in
process) an exception inside an engine step, which fails the requests it touched and leaves the engine thread
serving. Also: the engine thread does not spin when idle and a client that never reads does not stall it."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx
import pytest

from omniops.serving import EngineConfig, LLMEngine, SamplingParams
from omniops.serving.api import build_app
from omniops.serving.async_engine import AsyncEngine, EngineError
from tests.serving._server import OmniServer, metrics

openai = pytest.importorskip("openai")

KEY = "sekrit"
MAX_LEN = 2048
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"prompt": "the quick brown fox", "max_tokens": 1800, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    # one seat in the batch and one in the queue: the 503 path is reachable with three requests
    srv = OmniServer(checkpoint("llama"), tmp_path_factory.mktemp("serve-errors") / "server.log",
                     "--served-model-name", "tiny", "--max-model-len", str(MAX_LEN), "--kv-cache-memory", "0.05",
                     "--api-key", KEY, "--max-num-seqs", "1", "--max-queue", "1", "--enforce-eager").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def _error(r: httpx.Response, status: int, param: str | None = "-") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "-":
        assert err["param"] == param, err
    return err


def _good(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_api_key(server, http):
    url = f"{server.url}/v1/completions"
    body = {"prompt": "hi", "max_tokens": 2}
    assert _error(httpx.post(url, json=body, timeout=10), 401)["code"] == "invalid_api_key"
    _error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=10), 401)
    _error(httpx.post(url, content=b"{not json", headers={"Authorization": "Basic x"}, timeout=10), 401)
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", timeout=10, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
    for path in ("/health", "/metrics", "/load"):  # probes and scrapers need no key
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 200
    good = openai.OpenAI(base_url=server.base_url, api_key=KEY, timeout=30, max_retries=0)
    assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_malformed_json(http):
    for body in (b'{"prompt": "x",', b"", b"\xff\xfe"):
        assert "JSON" in _error(http.post("/v1/completions", content=body), 400)["message"]
    _error(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    _good(http)


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/completions", "temperature", "hot"), ("/v1/completions", "max_tokens", "5"),
    ("/v1/completions", "prompt", 5), ("/v1/completions", "stream", "yes"), ("/v1/completions", "logprobs", 1.5),
    ("/v1/chat/completions", "messages", "hi"), ("/v1/chat/completions", "top_logprobs", "2"),
])
def test_wrong_field_type(http, path, field, value):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    _error(http.post(path, json={**body, field: value}), 400, field)
    _good(http)


def test_bad_values(http):
    for body, param in (({"prompt": "x", "temperature": -1}, "temperature"), ({"prompt": "x", "n": 2}, "n"),
                        ({"prompt": [999999]}, "prompt_token_ids"), ({"prompt": []}, "prompt"),
                        ({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "echo": True}, "echo"),
                        ({"prompt": ["a", "b"]}, "prompt")):
        _error(http.post("/v1/completions", json=body), 400, param)
    chat = {"messages": [{"role": "user", "content": "x"}]}
    _error(http.post("/v1/chat/completions", json={**chat, "top_logprobs": 2}), 400, "top_logprobs")
    _error(http.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    _good(http)


def test_context_too_long(http):
    prompt_ids = list(range(5, 105))
    err = _error(http.post("/v1/completions", json={"prompt": prompt_ids, "max_tokens": 2000}), 400, "max_tokens")
    for n in (MAX_LEN, 100, 2000, 2100):  # the limit, both parts and their sum
        assert str(n) in err["message"], err
    _error(http.post("/v1/completions", json={"prompt": [7] * MAX_LEN}), 400, "prompt")
    _good(http)


def test_unknown_model_and_route(server, http):
    err = _error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, timeout=10, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    _error(http.get("/v1/nothing"), 404)
    _good(http)


def _open_stream(http: httpx.Client, **body):
    cm = http.stream("POST", "/v1/completions", json={**LONG, "stream": True, **body})
    r = cm.__enter__()
    assert r.status_code == 200, r.read()
    return cm, r.iter_lines()


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_disconnect_mid_stream_aborts(server, http):
    before = metrics(server.url).get('omni:request_success_total{finished_reason="abort"}', 0)
    cm, lines = _open_stream(http)
    got = list(itertools.islice((x for x in lines if x.startswith("data: ")), 3))
    assert len(got) == 3 and json.loads(got[0][6:])["choices"][0]["finish_reason"] is None
    cm.__exit__(None, None, None)  # closes the connection mid-stream
    load = server.wait_idle(5.0)
    assert (load["running"], load["waiting"], load["kv_cache_usage"]) == (0, 0, 0.0), load
    assert metrics(server.url)['omni:request_success_total{finished_reason="abort"}'] == before + 1
    _good(http)


def test_disconnect_before_response_aborts(server, http):
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        http.post("/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.5))
    load = server.wait_idle(5.0)
    assert (load["running"], load["waiting"], load["kv_cache_usage"]) == (0, 0, 0.0), load
    _good(http)


def test_queue_full_503(server, http):
    a, a_lines = _open_stream(http)
    next(x for x in a_lines if x.startswith("data: "))  # A holds the only seat
    b, _ = _open_stream(http)  # B is accepted and waits (max_queue=1)
    try:
        _wait(lambda: server.load()["waiting"] == 1)
        err = _error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 503)
        assert err["type"] == "server_error" and "max_queue=1" in err["message"]
    finally:
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
    load = server.wait_idle(5.0)
    assert (load["running"], load["waiting"], load["kv_cache_usage"]) == (0, 0, 0.0), load
    _good(http)


# ---- the engine thread, in process -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(checkpoint):
    return LLMEngine(EngineConfig.from_kwargs(checkpoint("llama"), dtype="float32", max_model_len=256,
                                              kv_cache_memory=0.05, enforce_eager=True))


async def _run(ae: AsyncEngine, rid: str, n: int) -> list[int]:
    stream = await ae.add(rid, [5, 6, 7, 8], SamplingParams(max_tokens=n, ignore_eos=True, temperature=0))
    last = None
    async for out in stream:
        last = out
    return last.outputs[0].token_ids


def _flaky(engine, fail_at: int):
    real_step, calls = engine.step, {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected kernel failure")
        return real_step()

    return real_step, flaky_step


def test_step_exception_fails_requests_and_keeps_serving(engine):
    real_step, flaky_step = _flaky(engine, 3)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            engine.step = flaky_step
            results = await asyncio.wait_for(asyncio.gather(_run(ae, "a", 20), _run(ae, "b", 20),
                                                            return_exceptions=True), 30)
            assert all(isinstance(r, EngineError) and "injected" in str(r) for r in results), results
            assert ae.alive and ae.snapshot["running"] == 0
            assert len(await asyncio.wait_for(_run(ae, "c", 5), 30)) == 5  # the thread still serves
        finally:
            engine.step = real_step
            ae.stop()

    asyncio.run(main())
    engine.kv.check_all_free()


def test_idle_thread_does_not_spin_and_slow_reader_does_not_stall(engine):
    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            stream = await ae.add("slow", [5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True))
            # never read: the engine runs the request to its end anyway, and keeps only the latest output
            await asyncio.wait_for(_until(lambda: ae.snapshot["finished"].get("length", 0) == 1), 30)
            await asyncio.sleep(0.05)  # the step outputs' callbacks, queued on this loop behind the snapshot
            outs = [o async for o in stream]
            assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == 40
            clock = time.pthread_getcpuclockid(ae.backend._thread.ident)
            t0 = time.clock_gettime(clock)
            await asyncio.sleep(0.5)
            assert time.clock_gettime(clock) - t0 < 0.05, "the idle engine thread burns CPU"
        finally:
            ae.stop()

    asyncio.run(main())
    engine.kv.check_all_free()


def test_step_exception_over_http(engine):
    """The HTTP side of a failed step (in process, through ASGI): a 500 in OpenAI's shape for a plain request,
    an error event then [DONE] for a stream; the next request succeeds."""
    app = build_app(engine, served_model_name="tiny")
    ae = app.state.engine
    body = {"prompt": [5, 6, 7], "max_tokens": 20, "ignore_eos": True}

    async def main():
        ae.start()  # the lifespan's job; httpx's ASGITransport does not run it
        real_step = engine.step
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         timeout=30) as c:
                engine.step = _flaky(engine, 3)[1]
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 500 and "injected" in r.json()["error"]["message"], r.text
                engine.step = _flaky(engine, 3)[1]
                r = await c.post("/v1/completions", json={**body, "stream": True})
                events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
                assert "injected" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
                engine.step = real_step
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
        finally:
            engine.step = real_step
            ae.stop()

    asyncio.run(main())
    engine.kv.check_all_free()


async def _until(cond) -> None:
    while not cond():
        await asyncio.sleep(0.01)
