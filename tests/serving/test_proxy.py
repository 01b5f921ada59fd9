"""omni-proxy as a request-level load balancer (``--backend``): OpenAI pass-through equal to the engine's own
answers (completions and chat, streamed or not), /v1/models, /health, /metrics, a 4xx passed through; and the
fault paths against scripted fake engines: 5xx and a stream broken before its first token are retried
elsewhere, a stream broken after it ends with an error event, dead and hung engines leave the rotation and come
back, no engine at all is an explicit 503, P/D without a prefill engine falls back to the decode engine."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.serving._proxy import ProxyServer, start_engines
from tests.serving.test_pd import burst


# ---- scripted fake engines -----------------------------------------------------------------------------------
class FakeEngine:
    """An OpenAI-ish engine whose behaviour the test sets: mode "ok" | "500" | "hang" | "die_before" |
    "die_after" (a stream that breaks before / after its first token) | "error_first" (an error event first);
    ``down`` makes /health answer 503.
    Answers say who answered: the text is the engine's name."""

    def __init__(self, name: str):
        self.name, self.mode, self.down, self.hits, self.bodies = name, "ok", False, 0, []
        app = Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                                Route("/v1/chat/completions", self.completions, methods=["POST"]),
                                Route("/v1/models", self.models), Route("/health", self.health)])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off",
                                                   timeout_graceful_shutdown=0.2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)

    async def health(self, _: Request) -> Response:
        if self.mode == "hang":
            await asyncio.sleep(3600)
        return Response(status_code=503 if self.down else 200)

    async def models(self, _: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": self.name}]})

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.hits += 1
        self.bodies.append(body)
        mode = self.mode
        if mode == "500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        if mode == "hang":
            await asyncio.sleep(3600)
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if not body.get("stream"):
            return JSONResponse({"id": "x", "object": "text_completion", "model": "tiny", "usage": usage,
                                 "choices": [{"index": 0, "text": self.name, "finish_reason": "length"}]})

        def ev(text: str, finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": "x", "object": "text_completion", "model": "tiny", "choices": [
                {"index": 0, "text": text, "finish_reason": finish}]}) + "\n\n"

        async def gen():
            yield ev("")  # carries no token (as the chat role chunk)
            if mode == "error_first":  # a failed engine step: omni-serve's error event, then [DONE]
                yield 'data: {"error":{"message":"step failed","type":"server_error"}}\n\n'
                yield "data: [DONE]\n\n"
                return
            if mode == "die_before":
                raise RuntimeError("engine died")
            yield ev(self.name)
            await asyncio.sleep(0.05)
            if mode == "die_after":
                raise RuntimeError("engine died")
            yield ev("!", "length")
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")


@pytest.fixture
def fakes():
    made: list[FakeEngine] = []

    def make(*names: str) -> list[FakeEngine]:
        new = [FakeEngine(n) for n in names]
        made.extend(new)
        return new

    yield make
    for f in made:
        f.stop()


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}"


def post(url: str, stream: bool = False, timeout: float = 20.0) -> tuple[int, str]:
    """A completion through the proxy: (status, text) — a stream's events concatenated, or the JSON body."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2, "stream": stream}
    with httpx.Client(timeout=timeout) as c:
        if not stream:
            r = c.post(f"{url}/v1/completions", json=body)
            return r.status_code, r.text
        with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            return r.status_code, r.read().decode()


def stream_text(sse: str) -> tuple[str, list[str], bool]:
    """(text, error messages, ended with [DONE])."""
    text, errors = "", []
    events = [e[6:] for e in sse.split("\n\n") if e.startswith("data: ")]
    for e in events:
        if e == "[DONE]":
            continue
        obj = json.loads(e)
        if "error" in obj:
            errors.append(obj["error"]["message"])
        else:
            text += "".join(ch["text"] for ch in obj["choices"])
    return text, errors, bool(events) and events[-1] == "[DONE]"


# ---- real engines --------------------------------------------------------------------------------------------
def test_balancer_passthrough_equals_engine(checkpoint, tmp_path):
    engines = start_engines(checkpoint("llama"), tmp_path, {"e0": (), "e1": ()})
    proxy = ProxyServer(tmp_path / "proxy.log", "--backend", engines["e0"].url, engines["e1"].url,
                        "--policy", "round_robin").start()
    try:
        from tests.serving.conftest import mixed_prompts

        prompts, mt = mixed_prompts(12, seed=3), [3 + i % 7 for i in range(12)]
        ref = asyncio.run(burst(engines["e0"].url, prompts, mt))
        assert asyncio.run(burst(proxy.url, prompts, mt)) == ref
        load = proxy.load()
        assert sorted(b["requests_total"] for b in load["backends"]) == [6, 6]  # round robin over both
        models = httpx.get(f"{proxy.url}/v1/models").json()
        assert models["data"][0]["id"] == "tiny"
        h = httpx.get(f"{proxy.url}/health")
        assert h.status_code == 200 and all(b["healthy"] for b in h.json()["backends"])
        r = httpx.post(f"{proxy.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 10**6})
        assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
        r = httpx.post(f"{proxy.url}/v1/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        text = httpx.get(f"{proxy.url}/metrics").text
        for name in ("omni:proxy_backend_in_flight_requests", "omni:proxy_backend_in_flight_tokens",
                     "omni:proxy_backend_requests_total", "omni:proxy_backend_errors_total",
                     "omni:proxy_retries_total", 'omni:proxy_requests_total{outcome="ok"} 12.0',
                     'omni:proxy_requests_total{outcome="client_error"} 2.0'):
            assert name in text, name
        assert load["stats"]["retries"] == 0
    finally:
        proxy.stop()
        for s in engines.values():
            s.stop()


# ---- faults --------------------------------------------------------------------------------------------------
def test_5xx_and_break_before_first_token_are_retried(fakes, tmp_path):
    bad, good = fakes("bad", "good")
    proxy = ProxyServer(tmp_path / "proxy.log", "--backend", bad.url, good.url, "--policy", "round_robin").start()
    try:
        bad.mode = "500"
        for _ in range(4):
            status, body = post(proxy.url)
            assert status == 200 and json.loads(body)["choices"][0]["text"] == "good"
        bad.mode = "die_before"
        for _ in range(4):
            status, sse = post(proxy.url, stream=True)
            assert status == 200 and stream_text(sse) == ("good!", [], True)
        bad.mode = "error_first"
        for _ in range(4):
            status, sse = post(proxy.url, stream=True)
            assert status == 200 and stream_text(sse) == ("good!", [], True)
        stats = proxy.load()["stats"]
        assert stats["retries"] >= 5 and stats["ok"] == 12 and stats["errors"] == 0
        assert bad.hits >= 3
    finally:
        proxy.stop()


def test_stream_broken_after_first_token_ends_with_error_event(fakes, tmp_path):
    (dying,) = fakes("dying")
    proxy = ProxyServer(tmp_path / "proxy.log", "--backend", dying.url).start()
    try:
        dying.mode = "die_after"
        t0 = time.monotonic()
        status, sse = post(proxy.url, stream=True)
        text, errors, done = stream_text(sse)
        assert status == 200 and text == "dying" and done and time.monotonic() - t0 < 10
        assert len(errors) == 1 and "failed while streaming" in errors[0]
        assert proxy.load()["stats"]["stream_errors"] == 1
    finally:
        proxy.stop()


def test_dead_and_hung_engines_leave_rotation_and_come_back(fakes, tmp_path):
    hung, good = fakes("hung", "good")
    dead = _dead_url()
    proxy = ProxyServer(tmp_path / "proxy.log", "--backend", dead, hung.url, good.url, "--policy", "round_robin",
                        "--health-timeout", "0.5").start()
    try:
        hung.mode = "hang"
        t0 = time.monotonic()
        for stream in (False, True, False, True, False, True):  # the hung engine's requests are retried
            status, body = post(proxy.url, stream=stream)
            assert status == 200 and "good" in body
        assert time.monotonic() - t0 < 15
        healthy = {b["url"]: b["healthy"] for b in proxy.load()["backends"]}
        assert healthy == {dead: False, hung.url: False, good.url: True}
        hung.mode = "ok"  # it recovers: back in rotation after a passing check
        deadline = time.monotonic() + 10
        while not {b["url"]: b["healthy"] for b in proxy.load()["backends"]}[hung.url]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        answered = {json.loads(post(proxy.url)[1])["choices"][0]["text"] for _ in range(4)}
        assert answered == {"hung", "good"}
        good.down = True  # a /health of 503 takes it out after two failed checks
        deadline = time.monotonic() + 10
        while {b["url"]: b["healthy"] for b in proxy.load()["backends"]}[good.url]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert {json.loads(post(proxy.url)[1])["choices"][0]["text"] for _ in range(3)} == {"hung"}
    finally:
        proxy.stop()


def test_no_engine_is_an_explicit_503(tmp_path):
    proxy = ProxyServer(tmp_path / "proxy.log", "--backend", _dead_url()).start(require_healthy=False)
    try:
        for stream in (False, True, False):
            status, body = post(proxy.url, stream=stream)
            err = json.loads(body)["error"]
            assert status in (502, 503) and err["type"] == "server_error", body
        assert proxy.load()["stats"]["errors"] == 3
        assert httpx.get(f"{proxy.url}/health").status_code == 503
    finally:
        proxy.stop()


def test_pd_without_prefill_engine_falls_back_to_decode(fakes, tmp_path):
    (dec,) = fakes("decode")
    proxy = ProxyServer(tmp_path / "proxy.log", "--prefill", _dead_url(), "--decode", dec.url).start()
    try:
        for _ in range(3):
            status, body = post(proxy.url)
            assert status == 200 and json.loads(body)["choices"][0]["text"] == "decode"
        assert all("kv_transfer_params" not in b for b in dec.bodies)  # the plain request: it computes the prompt
        stats = proxy.load()["stats"]
        assert stats["ok"] == 3 and stats["fallbacks"] >= 1
    finally:
        proxy.stop()


def test_client_disconnect_releases_the_request(fakes, tmp_path):
    (slow,) = fakes("slow")
    proxy = ProxyServer(tmp_path / "proxy.log", "--backend", slow.url, "--health-interval", "30").start()
    try:
        slow.mode = "hang"  # answers nothing; its /health hangs too, but no check runs during the test
        for stream in (False, True):
            with pytest.raises(httpx.ReadTimeout):
                post(proxy.url, stream=stream, timeout=0.5)
        deadline = time.monotonic() + 5
        while proxy.load()["backends"][0]["requests"]:  # the proxy gave the request up with its client
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proxy.stop()


def test_stream_taken_down_before_its_pump_starts_fails_instead_of_hanging():
    """Regression (CI, kill -9 of a decode engine mid-load): the health check took the engine down between the
    creation of a streamed attempt and its pump task's first step; the cancelled task never ran its body, so
    nothing reached the queue and the request waited for ever instead of being retried."""
    from omniops.serving.proxy.backends import Backend
    from omniops.serving.proxy.forward import BackendFailed, Stream

    async def run() -> None:
        b = Backend(_dead_url(), "decode")
        async with httpx.AsyncClient() as client:
            s = Stream(client, b, "/v1/completions", {}, {}, httpx.Timeout(5.0))
            b.mark_down("test: before the pump ran")  # no await in between: the pump has not started
            with pytest.raises(BackendFailed, match="taken out of rotation"):
                await asyncio.wait_for(s.open(), 5)
            assert not b.attempts

    asyncio.run(run())
