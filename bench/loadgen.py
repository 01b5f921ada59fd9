"""An async streaming load generator for OpenAI-compatible servers (``/v1/completions``, ``stream: true``).

Plain asyncio streams, no HTTP library: the servers are on loopback, the client needs only HTTP/1.1 POST with a
chunked or length-delimited body, and each SSE event is timestamped the moment its bytes arrive (no client-side
buffering between the socket and the clock). One connection per request (``Connection: close``).

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


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"bad status line {status_line!r}")
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The response body as it arrives (de-chunked)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readline()  # the CRLF after each chunk
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def http_request(host: str, port: int, method: str, path: str, body: dict | None = None,
                       timeout: float = 10.0) -> tuple[int, bytes]:
    """One non-streaming request; returns (status, body)."""
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(_request_bytes(host, port, method, path, body))
            await writer.drain()
            status, headers = await _read_head(reader)
            return status, b"".join([c async for c in _body(reader, headers)])
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout)


def _request_bytes(host: str, port: int, method: str, path: str, body: dict | None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


async def stream_completion(host: str, port: int, payload: dict, timeout: float = 600.0) -> RequestResult:
    """POST a streaming completion; every content event is timestamped on arrival."""
    res = RequestResult(start=time.perf_counter())

    async def go() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(_request_bytes(host, port, "POST", "/v1/completions", payload))
            await writer.drain()
            status, headers = await _read_head(reader)
            if status != 200:
                body = b"".join([c async for c in _body(reader, headers)])
                res.error = f"HTTP {status}: {body[:300].decode(errors='replace')}"
                return
            sse = SSEParser()
            async for chunk in _body(reader, headers):
                now = time.perf_counter()
                for ev in sse.feed(chunk):
                    if not apply_event(res, ev, now):
                        return
        finally:
            writer.close()

    try:
        await asyncio.wait_for(go(), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
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

    async def one(p: str) -> RequestResult:
        async with sem:
            return await stream_completion(host, port, completion_payload(model, p, max_tokens))

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return list(results), time.perf_counter() - t0
