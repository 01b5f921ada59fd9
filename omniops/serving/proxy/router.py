"""Routing one OpenAI request: a plain request-level balancer over mixed engines, or prefill/decode
disaggregation (vLLM's protocol: the prefill engine answers ``kv_transfer_params`` that the decode engine pulls
the KV with).

Retries: an attempt that fails before anything reached the client (a non-streamed request sends nothing until
it ends; a stream is held back until its first token) is retried, up to ``max_attempts`` in all, on engines
the request has not tried yet; in P/D mode a retry prefills again. Without a healthy prefill engine the decode
engine gets the plain request and computes the prompt itself (counted as a fallback). A 4xx answer is the
client's and passed through. Nothing is dropped silently: the client gets the answer, the engine's 4xx, or an
OpenAI-shaped 502/503 naming the last failure; a stream broken after its first token ends with an error event.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from omniops.serving.proxy.backends import Backend
from omniops.serving.proxy.forward import DONE, BackendFailed, ClientError, Stream, error_body, error_event, post_json
from omniops.serving.proxy.select import RequestInfo, Selector

log = logging.getLogger("omniops.serving.proxy")
DEFAULT_MAX_TOKENS = 256  # a request without max_tokens is counted at this many output tokens


class Slot:
    """One request's share of a backend's in-flight counts, given back exactly once."""

    def __init__(self, b: Backend, tokens: int, cost: float = 0.0, decode_tokens: int = 0,
                 prefilling: bool = False):
        self.b, self.tokens, self.cost, self.dec, self.prefilling = b, tokens, cost, decode_tokens, prefilling
        # nothing else was prefilling there: this request's time to first token is its prefill time alone, a
        # clean sample for the engine's cost model (queueing behind others would inflate a and b)
        self.alone = b.prefill_cost <= 1e-12
        b.requests += 1
        b.requests_total += 1
        b.tokens += tokens
        b.prefill_cost += cost
        b.decode_tokens += decode_tokens
        b.prefilling += prefilling
        self.live = True

    def prefilled(self, prompt_tokens: int) -> None:
        """The first token arrived: the prompt's work (tokens and predicted prefill cost) is done."""
        self.consume(prompt_tokens)
        self.b.prefill_cost -= self.cost
        self.b.prefilling -= self.prefilling
        self.cost, self.prefilling = 0.0, False

    def consume(self, n: int) -> None:
        """n output tokens were produced: that much less work in flight."""
        n = min(n, self.tokens)
        self.tokens -= n
        self.b.tokens -= n

    def release(self) -> None:
        if self.live:
            self.live = False
            b = self.b
            b.requests -= 1
            b.tokens -= self.tokens
            b.prefill_cost -= self.cost
            b.decode_tokens -= self.dec
            b.prefilling -= self.prefilling


@dataclass
class RouterStats:
    retries: int = 0
    fallbacks: int = 0  # P/D requests decoded without a prefill engine (none healthy)
    ok: int = 0
    client_errors: int = 0
    errors: int = 0  # answered 502/503: no engine could serve it
    stream_errors: int = 0  # streams broken after their first token (ended with an error event)


def prompt_text(path: str, payload: dict) -> tuple[str, int | None]:
    """The prompt as text, and its exact length when it was given as token ids."""
    if path.endswith("chat/completions"):
        parts = []
        for m in payload.get("messages") or []:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, list):
                c = "\n".join(p.get("text") or "" for p in c if isinstance(p, dict))
            parts.append(f"{m.get('role', '') if isinstance(m, dict) else ''}: {c or ''}")
        return "\n".join(parts), None
    p = payload.get("prompt", "")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, list) and all(isinstance(t, int) for t in p):
        return " ".join(map(str, p)), len(p)
    return (p if isinstance(p, str) else str(p)), None


def prefill_payload(payload: dict) -> dict:
    """The prefill engine's copy: one token, not streamed, asking it to keep the KV for a remote decode."""
    out = {k: v for k, v in payload.items() if k not in ("stream_options", "max_completion_tokens", "min_tokens")}
    out.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False})
    return out


class Router:
    def __init__(self, client: httpx.AsyncClient, *, mixed: Selector | None = None, prefill: Selector | None = None,
                 decode: Selector | None = None, max_attempts: int = 3, timeout: httpx.Timeout | None = None,
                 tokenizer=None):
        if mixed is None and decode is None:
            raise ValueError("backends: give --backend URL... (mixed engines) or --decode URL... (P/D)")
        self.client, self.mixed, self.prefill, self.decode = client, mixed, prefill, decode
        self.pd = decode is not None
        self.max_attempts = max_attempts
        self.timeout = timeout or httpx.Timeout(600.0, connect=5.0)
        self.tokenizer = tokenizer
        self.stats = RouterStats()
        self.in_prefill: dict[int, int] = {}  # attempt -> prompt tokens, while its prefill runs (pd_score_balance)
        self._ids = itertools.count()

    @property
    def backends(self) -> list[Backend]:
        return [b for s in (self.mixed, self.prefill, self.decode) if s is not None for b in s.backends]

    def info(self, path: str, payload: dict) -> RequestInfo:
        text, n = prompt_text(path, payload)
        if n is None:
            n = len(self.tokenizer.encode(text)) if self.tokenizer is not None else max(1, len(text.encode()) // 4)
        mt = payload.get("max_completion_tokens") or payload.get("max_tokens")
        return RequestInfo(text, n, mt if isinstance(mt, int) and mt > 0 else DEFAULT_MAX_TOKENS)

    def _fail(self, status: int, message: str) -> Response:
        self.stats.errors += 1
        return Response(error_body(message, code="no_backend" if status == 503 else "upstream_error"), status,
                        media_type="application/json")

    async def handle(self, path: str, payload: dict, headers: dict) -> Response:
        info = self.info(path, payload)
        tried_p: set[str] = set()
        tried_d: set[str] = set()
        last: BackendFailed | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                self.stats.retries += 1
            try:
                body = await self._prefill(path, payload, headers, info, tried_p) if self.pd else payload
                pool = self.decode if self.pd else self.mixed
                b = pool.pick(info, tried_d, list(self.in_prefill.values()))
                if b is None:
                    break
                tried_d.add(b.url)
                if payload.get("stream"):
                    return await self._stream(b, path, body, headers, info)
                return await self._unary(b, path, body, headers, info)
            except BackendFailed as e:
                last = e
                log.warning("proxy: attempt %d of %s failed: %s", attempt + 1, path, e)
            except ClientError as e:
                self.stats.client_errors += 1
                return Response(e.body, e.status, media_type=e.content_type)
        if last is None:
            return self._fail(503, f"no healthy {'decode ' if self.pd else ''}engine to serve the request")
        return self._fail(502, f"the request failed on every engine tried ({self.max_attempts} attempts); "
                               f"last: {last}")

    async def _prefill(self, path: str, payload: dict, headers: dict, info: RequestInfo, tried: set[str]) -> dict:
        b = self.prefill.pick(info, tried) if self.prefill is not None else None
        if b is None:  # no prefill engine: the decode engine computes the prompt itself
            self.stats.fallbacks += 1
            return payload
        tried.add(b.url)
        key = next(self._ids)
        self.in_prefill[key] = info.num_tokens
        slot = Slot(b, info.num_tokens, b.cost.predict(info.num_tokens), prefilling=True)
        t0 = time.monotonic()
        try:
            ans = await post_json(self.client, b, path, prefill_payload(payload), headers, self.timeout)
        finally:
            slot.release()
            del self.in_prefill[key]
        if slot.alone:
            b.cost.observe(info.num_tokens, time.monotonic() - t0)
        self._usage(b, ans)
        kvp = ans.get("kv_transfer_params")
        # no params (an engine without a KV connector): the decode engine computes the prompt
        return {**payload, "kv_transfer_params": kvp} if kvp else payload

    def _slot(self, b: Backend, info: RequestInfo) -> Slot:
        size = info.num_tokens + info.max_tokens
        if self.pd:  # a decode engine: the request's context grows there until it ends
            return Slot(b, size, decode_tokens=size)
        # a mixed engine prefills it too: its predicted prefill cost counts until the first token
        return Slot(b, size, cost=b.cost.predict(info.num_tokens), prefilling=True)

    def _usage(self, b: Backend, ans: dict) -> None:
        u = ans.get("usage") or {}
        b.prompt_tokens_total += int(u.get("prompt_tokens") or 0)
        b.completion_tokens_total += int(u.get("completion_tokens") or 0)

    async def _unary(self, b: Backend, path: str, body: dict, headers: dict, info: RequestInfo) -> Response:
        slot = self._slot(b, info)
        try:
            ans = await post_json(self.client, b, path, body, headers, self.timeout)
        finally:
            slot.release()
        self._usage(b, ans)
        self.stats.ok += 1
        return JSONResponse(ans)

    async def _stream(self, b: Backend, path: str, body: dict, headers: dict, info: RequestInfo) -> Response:
        slot = self._slot(b, info)
        t0 = time.monotonic()
        s = Stream(self.client, b, path, body, headers, self.timeout)
        try:
            await s.open()
            held = await s.first_token()
        except BaseException:
            s.close()
            slot.release()
            raise
        if not self.pd:
            if slot.alone:
                b.cost.observe(info.num_tokens, time.monotonic() - t0)
            slot.prefilled(info.num_tokens)

        async def relay():
            ok = False
            try:
                for ev in held:
                    yield ev
                async for ev in s.events():
                    slot.consume(1)
                    b.completion_tokens_total += 1
                    yield ev
                if not s.done_seen:
                    raise BackendFailed(b, "the stream ended without [DONE]")
                ok = True
            except BackendFailed as e:
                b.errors_total += 1
                self.stats.stream_errors += 1
                log.warning("proxy: stream broken after its first token: %s", e)
                yield error_event(f"the engine failed while streaming: {e}")
                yield DONE
            finally:
                s.close()
                slot.release()
                if ok:
                    self.stats.ok += 1

        return StreamingResponse(relay(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
