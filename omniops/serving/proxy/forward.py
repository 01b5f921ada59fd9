"""One attempt of a request on one engine, and the server-sent-event plumbing of streamed answers.

Every attempt's upstream I/O runs in a task of its own registered on its backend, so that taking the backend
out of rotation (health check, broken connection) can cancel it; the attempt turns that cancel into
``BackendFailed``, which the router retries elsewhere while nothing has reached the client.

A stream is committed to the client only once an event carrying a token (text, content, a finish reason, an
error, or the end) arrived: events before it (the chat role chunk) are held back, so an engine dying before
the first token is a retry the client never sees. After that the stream is passed through as it comes; if it
breaks, the client gets an error event and ``[DONE]`` (never a hang, never a silent truncation).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from omniops.serving.proxy.backends import Backend

DONE = b"data: [DONE]\n\n"


class BackendFailed(Exception):
    """The engine failed this attempt (connection, 5xx, taken out of rotation); another engine may succeed."""

    def __init__(self, backend: Backend, why: str, status: int | None = None):
        super().__init__(f"{backend.role} engine {backend.url}: {why}")
        self.backend, self.status = backend, status


class ClientError(Exception):
    """The engine rejected the request itself (4xx): passed to the client as is, never retried."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json"):
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


def error_body(message: str, type: str = "server_error", code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


def error_event(message: str) -> bytes:
    return b"data: " + error_body(message, code="upstream_error") + b"\n\n"


def _outer_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _guard(b: Backend, coro):
    """Await upstream work as a task on ``b``; a cancel of that task alone (the backend went down) and a
    transport error become BackendFailed, and a broken connection takes the backend out of rotation."""
    task = asyncio.ensure_future(coro)
    b.attempts.add(task)
    try:
        return await task
    except asyncio.CancelledError:
        if _outer_cancelled():
            raise
        raise BackendFailed(b, "taken out of rotation") from None
    except httpx.TransportError as e:
        if not isinstance(e, httpx.ReadTimeout):  # a slow answer is this request's problem, not proof of death
            b.mark_down(f"{type(e).__name__}: {e}")
        raise BackendFailed(b, f"{type(e).__name__}: {e}") from e
    finally:
        b.attempts.discard(task)
        if not task.done():
            task.cancel()


def _check_status(b: Backend, status: int, body: bytes, content_type: str) -> None:
    if status >= 500:
        b.errors_total += 1
        raise BackendFailed(b, f"answered {status}: {body[:300].decode(errors='replace')}", status)
    if status != 200:
        raise ClientError(status, body, content_type or "application/json")


async def post_json(client: httpx.AsyncClient, b: Backend, path: str, payload: dict, headers: dict,
                    timeout: httpx.Timeout) -> dict:
    """A non-streamed request: the parsed JSON answer. Raises BackendFailed / ClientError."""
    r = await _guard(b, client.post(f"{b.url}{path}", json=payload, headers=headers, timeout=timeout))
    _check_status(b, r.status_code, r.content, r.headers.get("content-type", ""))
    try:
        return r.json()
    except ValueError:
        b.errors_total += 1
        raise BackendFailed(b, "answered 200 with a body that is not JSON") from None


def carries_token(event: bytes) -> bool:
    data = event.removeprefix(b"data: ").strip()
    if data == b"[DONE]":
        return True
    try:
        obj = json.loads(data)
    except ValueError:
        return True  # not ours to judge: pass it on
    if not isinstance(obj, dict) or "error" in obj or not obj.get("choices"):
        return True  # an error event, or the usage chunk
    for ch in obj["choices"]:
        if ch.get("text") or (ch.get("delta") or {}).get("content") or ch.get("finish_reason"):
            return True
    return False


class Stream:
    """A streamed attempt: a pump task reads the upstream response into a queue; ``events()`` yields whole
    SSE events (``data: ...\\n\\n``)."""

    def __init__(self, client: httpx.AsyncClient, b: Backend, path: str, payload: dict, headers: dict,
                 timeout: httpx.Timeout):
        self.b = b
        self.q: asyncio.Queue = asyncio.Queue()
        self.done_seen = False
        self._buf = b""
        self.task = asyncio.ensure_future(self._pump(client, f"{b.url}{path}", payload, headers, timeout))
        self.task.add_done_callback(self._pump_ended)
        b.attempts.add(self.task)

    async def _pump(self, client, url, payload, headers, timeout) -> None:
        try:
            async with client.stream("POST", url, json=payload, headers=headers, timeout=timeout) as r:
                if r.status_code != 200:
                    self.q.put_nowait(("status", r.status_code, await r.aread(), r.headers.get("content-type")))
                    return
                self.q.put_nowait(("status", 200, b"", None))
                async for chunk in r.aiter_raw():
                    self.q.put_nowait(("data", chunk))
            self.q.put_nowait(("end",))
        except httpx.HTTPError as e:
            if isinstance(e, httpx.TransportError) and not isinstance(e, httpx.ReadTimeout):
                self.b.mark_down(f"{type(e).__name__}: {e}")
            self.q.put_nowait(("error", BackendFailed(self.b, f"{type(e).__name__}: {e}")))

    def _pump_ended(self, task: asyncio.Task) -> None:
        # A done callback, not an except clause in _pump: a task cancelled before its first step (the backend
        # taken down right after this attempt was created) never runs its body, and the reader would wait on
        # the queue for ever. Items after the first error / end are never read.
        self.b.attempts.discard(task)
        if task.cancelled():
            self.q.put_nowait(("error", BackendFailed(self.b, "taken out of rotation")))
        elif task.exception() is not None:
            self.q.put_nowait(("error", BackendFailed(self.b, f"{type(task.exception()).__name__}: "
                                                               f"{task.exception()}")))

    async def open(self) -> None:
        """Wait for the status line. Raises BackendFailed / ClientError."""
        item = await self.q.get()
        if item[0] == "error":
            raise item[1]
        _, status, body, ctype = item
        _check_status(self.b, status, body, ctype)

    async def events(self) -> AsyncIterator[bytes]:
        """Whole events until the upstream ends. Raises BackendFailed if it breaks."""
        while True:
            while b"\n\n" in self._buf:
                ev, self._buf = self._buf.split(b"\n\n", 1)
                ev += b"\n\n"
                if ev.strip() == DONE.strip():
                    self.done_seen = True
                yield ev
            item = await self.q.get()
            if item[0] == "data":
                self._buf += item[1].replace(b"\r\n", b"\n")
            elif item[0] == "end":
                return
            else:
                raise item[1]

    async def first_token(self) -> list[bytes]:
        """The events up to and including the first that carries a token (all of them if the stream ended
        first). Raises BackendFailed if the stream breaks or ends without [DONE] before that."""
        held: list[bytes] = []
        async for ev in self.events():
            if ev.startswith(b'data: {"error"'):
                # the engine failed the request before any token (a failed step): another engine may not
                self.b.errors_total += 1
                raise BackendFailed(self.b, f"error event before the first token: {ev[6:300].decode(errors='replace')}")
            held.append(ev)
            if carries_token(ev):
                return held
        if not self.done_seen:
            self.b.errors_total += 1
            raise BackendFailed(self.b, "the stream ended before its first token")
        return held

    def close(self) -> None:
        self.task.cancel()
        self.b.attempts.discard(self.task)
