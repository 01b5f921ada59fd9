"""An async streaming load generator for OpenAI-compatible servers (``/v1/completions``, ``stream: true``).

Streams go through aiohttp (as vLLM's own serving benchmark does), one session per load run: httpx's async
stack cost ~0.5 ms of CPU per streamed event, i.e. a quarter of a core at 450 tok/s, taken from the server
under test on a 2-core machine. Each SSE event is timestamped the moment its bytes arrive (raw chunks parsed
here, no client-side line buffering between the socket and the clock). httpx for the one-off requests.

Statistics: TTFT = first content event - request start; inter-token latency (ITL) = the gaps between
consecutive content events of one request; output tokens from the final ``usage`` event (``stream_options``)
when the server sends one, else one per content event.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import httpx

# common English words: prompts are deterministic word salad (~2.5 tokens per word with the tiny tokenizer)
_WORDS = (
    "the of and to in is was for on that with as by at from his her an which it be are were this had not but or "
    "have they their one all there been has who more when also its first after new two years would other some "
    "time into only made over then than most may such between city river world water music school people house"
).split()


def make_prompts(n: int, words: int = 100, seed: int = 0) -> list[str]:
    """``n`` distinct prompts of ``words`` words each; the same (n, words, seed) always gives the same list."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) for i in range(n)]


@dataclass
class RequestResult:
    start: float  # perf_counter() when the request was sent
    events: list[float] = field(default_factory=list)  # arrival time of each content-bearing SSE event
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.events)

    @property
    def ttft(self) -> float | None:
        return self.events[0] - self.start if self.events else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.events, self.events[1:], strict=False)]

    @property
    def latency(self) -> float | None:
        return self.events[-1] - self.start if self.events else None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    if not 0 <= q <= 100:
        raise ValueError(f"q: expected 0..100, got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: Sequence[RequestResult], duration: float) -> dict:
    """Throughput and latency of one run: tokens/s and requests/s over ``duration`` (s), latencies in ms."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [g for r in ok for g in r.itl]
    out_tokens = sum(r.output_tokens for r in ok)
    ms = 1e3
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "duration_s": duration, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / duration if duration > 0 else float("nan"),
        "req_s": len(ok) / duration if duration > 0 else float("nan"),
        "ttft_p50_ms": percentile(ttfts, 50) * ms, "ttft_p99_ms": percentile(ttfts, 99) * ms,
        "itl_p50_ms": percentile(itls, 50) * ms, "itl_p99_ms": percentile(itls, 99) * ms,
        "first_error": next((r.error for r in results if r.error), None),
    }


class SSEParser:
    """Feed response-body bytes; yields each event's ``data`` payloads (one string per ``data:`` line group)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        self._buf = (self._buf + data).replace(b"\r\n", b"\n")  # on the whole buffer: a CRLF may be split
        out = []
        while b"\n\n" in self._buf:
            raw, self._buf = self._buf.split(b"\n\n", 1)
            lines = [ln[5:].lstrip(b" ") for ln in raw.split(b"\n") if ln.startswith(b"data:")]
            if lines:
                out.append(b"\n".join(lines).decode())
        return out


def apply_event(res: RequestResult, payload: str, now: float) -> bool:
    """Record one SSE ``data`` payload on ``res``; returns False at ``[DONE]``."""
    if payload.strip() == "[DONE]":
        return False
    msg = json.loads(payload)
    if "error" in msg and not msg.get("choices"):
        res.error = str(msg["error"])
        return False
    choices = msg.get("choices") or []
    if choices and any(c.get("text") or c.get("finish_reason") is None for c in choices):
        res.events.append(now)
        res.output_tokens += 1
    usage = msg.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        res.output_tokens = int(usage["completion_tokens"])
        res.prompt_tokens = usage.get("prompt_tokens")
    return True


async def http_request(host: str, port: int, method: str, path: str, body: dict | None = None,
                       timeout: float = 10.0) -> tuple[int, bytes]:
    """One non-streaming request; returns (status, body)."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        r = await client.request(method, f"http://{host}:{port}{path}", json=body)
        return r.status_code, r.content


async def stream_completion(host: str, port: int, payload: dict, timeout: float = 600.0,
                            session: aiohttp.ClientSession | None = None) -> RequestResult:
    """POST a streaming completion (on ``session``, else a session of its own); every content event is
    timestamped as its bytes arrive (raw chunks, no client-side line buffering between the socket and the
    clock)."""
    if session is None:
        async with aiohttp.ClientSession() as own:
            return await stream_completion(host, port, payload, timeout, own)
    res = RequestResult(start=time.perf_counter())
    url = f"http://{host}:{port}/v1/completions"
    try:
        async with session.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                body = await r.read()
                res.error = f"HTTP {r.status}: {body[:300].decode(errors='replace')}"
            else:
                sse = SSEParser()
                async for chunk in r.content.iter_any():
                    now = time.perf_counter()
                    if not all(apply_event(res, ev, now) for ev in sse.feed(chunk)):
                        break
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    if res.error is None and not res.events:
        res.error = "no content events"
    return res


def completion_payload(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def run_load(host: str, port: int, model: str, prompts: Sequence[str], max_tokens: int,
                   concurrency: int) -> tuple[list[RequestResult], float]:
    """Send every prompt, at most ``concurrency`` in flight; returns the results (prompts' order) and the wall
    time of the whole run (s)."""
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(p: str) -> RequestResult:
            async with sem:
                return await stream_completion(host, port, completion_payload(model, p, max_tokens),
                                               session=session)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return list(results), time.perf_counter() - t0
