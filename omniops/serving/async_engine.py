"""``AsyncEngine``: omni-serve's front end of the engine, driven from asyncio.

The engine itself runs elsewhere, in one ``EngineLoop`` (``engine_loop``), behind a backend:

* ``EngineProcess`` (``engine_core``, what omni-serve uses): the engine core in its own process, so the HTTP
  event loop and the engine never share a GIL; commands and outputs cross a pipe.
* ``ThreadBackend`` (below, for an ``LLMEngine`` built in this process: tests, embedding): the loop on a thread
  named ``omni-engine``.

Either way the backend hands each loop iteration's ``Published`` (snapshot, answers, outputs, failures) to the
event loop in one callback. Outputs are cumulative (text, token ids and logprobs so far), so each request keeps
only its latest output in a mailbox, not a queue: a slow reader skips intermediate outputs and neither stalls a
step nor grows memory.

Counts that other code reads (``/load``, ``/metrics``, the ``max_queue`` check) come from ``snapshot``, replaced as
a whole on the event loop with each ``Published``; readers never touch the engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from prometheus_client.core import Metric

from omniops.serving.engine import LLMEngine
from omniops.serving.engine_loop import STOP, WAKE, Command, EngineError, EngineLoop, Published
from omniops.serving.outputs import RequestOutput
from omniops.serving.sampling_params import SamplingParams

log = logging.getLogger("omniops.serving.async_engine")

__all__ = ["AsyncEngine", "EngineError", "QueueFullError", "RequestStream", "ThreadBackend"]


class QueueFullError(RuntimeError):
    """More requests wait for a seat in the running batch than ``max_queue`` allows."""


class _Mailbox:
    __slots__ = ("accepted", "latest", "error", "event", "last_token_time")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.accepted: asyncio.Future = loop.create_future()
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.event = asyncio.Event()
        self.last_token_time: float | None = None


OutputHook = Callable[[RequestOutput, "float | None"], None]


class RequestStream:
    """The outputs of one request. Iterate it; ``close()`` (idempotent) aborts the request if it is not finished,
    freeing its KV blocks. The server closes it in a ``finally``, so any way a response ends releases the work."""

    def __init__(self, engine: AsyncEngine, request_id: str, box: _Mailbox):
        self.engine, self.request_id, self._box = engine, request_id, box
        self.finished = False
        self._closed = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[RequestOutput]:
        box = self._box
        while not self.finished:
            await box.event.wait()
            box.event.clear()
            if box.error is not None:
                self.close()
                raise box.error
            out = box.latest
            if out is None:  # an event without output: cannot happen, but never yield None
                continue
            self.finished = out.finished
            yield out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine._streams.pop(self.request_id, None)
        self.engine.backend.closed(self.request_id)
        if not self.finished:
            self.engine.backend.submit(("abort", self.request_id, None))


class ThreadBackend:
    """The ``EngineLoop`` of an in-process ``LLMEngine`` on its own thread (not thread-safe: that thread is the
    only one that calls it). Commands go through a queue; results reach the event loop by
    ``call_soon_threadsafe``, one per loop iteration."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.config = engine, engine.config
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, on_published: Callable[[Published], None],
              on_dead: Callable[[BaseException], None]) -> dict:
        def post(fn, *args) -> None:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop is closed (shutdown): nobody is left to tell
                pass

        engine_loop = EngineLoop(self.engine, self._recv, lambda pub: post(on_published, pub))
        conn = getattr(self.engine, "kv_connector", None)
        if conn is not None:  # KV pulls and acks end on other threads: they wake an idle engine thread
            conn.wake = lambda: self._cmds.put(WAKE)

        def run() -> None:
            try:
                engine_loop.run()
            except BaseException as e:  # a bug outside step(): keep /health honest and fail everyone
                log.exception("engine thread died")
                self.dead = e
                post(on_dead, EngineError(f"the engine thread died: {e!r}"))

        self._thread = threading.Thread(target=run, name="omni-engine", daemon=True)
        self._thread.start()
        return engine_loop.snapshot()

    def _recv(self, block: bool) -> list[Command]:
        cmds = [self._cmds.get()] if block else []
        while True:
            try:
                cmds.append(self._cmds.get_nowait())
            except queue.Empty:
                return cmds

    def submit(self, cmd: Command) -> None:
        self._cmds.put(cmd)

    def closed(self, request_id: str) -> None:
        pass

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._cmds.put(STOP)
            self._thread.join(timeout)

    async def metric_families(self, model_name: str) -> list[Metric]:
        conn = getattr(self.engine, "kv_connector", None)
        return list(conn.stats.families(model_name)) if conn is not None else []


class AsyncEngine:
    """``engine``: an ``LLMEngine`` built in this process (run on a thread) or a started ``EngineProcess``."""

    def __init__(self, engine, *, max_queue: int | None = None, on_output: OutputHook | None = None):
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {max_queue}")
        self.backend = ThreadBackend(engine) if isinstance(engine, LLMEngine) else engine
        self.max_queue = max_queue
        self.max_num_seqs = self.backend.config.max_num_seqs
        self.on_output = on_output  # called on the loop with (output, previous token time of that request)
        self.on_dead: list[Callable[[BaseException], None]] = []  # after the engine died and streams failed
        self._streams: dict[str, _Mailbox] = {}
        self._pending = 0  # adds submitted, not yet answered by the engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dead: BaseException | None = None
        self.snapshot: dict = {}

    # ---- lifecycle (event loop) ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine loop; call from the event loop that will read the outputs."""
        self._loop = asyncio.get_running_loop()
        self.snapshot = self.backend.attach(self._loop, self._published, self._died)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine after its current step; requests still open fail with EngineError."""
        self.backend.stop(timeout)
        self._fail(list(self._streams), EngineError("the server is shutting down"))

    def load(self) -> dict:
        """What a load balancer reads (GET /load): batch occupancy, KV usage, tokens still to compute."""
        s = self.snapshot
        return {"running": s["running"], "waiting": s["waiting"] + self._pending,
                "kv_cache_usage": s["kv_cache_usage"], "prefill_tokens_in_flight": s["prefill_tokens_in_flight"],
                "decode_tokens_in_flight": s["decode_tokens_in_flight"]}

    @property
    def alive(self) -> bool:
        return self.dead is None and self.backend.alive

    async def metric_families(self, model_name: str) -> list[Metric]:
        """The engine's own Prometheus families (KV transfer), fetched from wherever it runs."""
        return await self.backend.metric_families(model_name) if self.alive else []

    # ---- requests (event loop) -----------------------------------------------------------------------------
    def check_queue(self) -> None:
        """Raise QueueFullError if one more request would wait beyond ``max_queue``. Counted: requests ahead of
        it that hold no seat (waiting + not yet added) minus the seats still free in the batch (max_num_seqs)."""
        if self.max_queue is None:
            return
        s = self.snapshot
        free_seats = max(0, self.max_num_seqs - s["running"])
        queued = s["waiting"] + self._pending + 1 - free_seats
        if queued > self.max_queue:
            raise QueueFullError(f"the server is overloaded: {s['waiting'] + self._pending} requests are queued "
                                 f"(max_queue={self.max_queue}); retry later")

    async def add(self, request_id: str, prompt: list[int] | str, params: SamplingParams,
                  arrival: float | None = None, kv_transfer_params: dict | None = None) -> RequestStream:
        """Queue a request. Raises what ``LLMEngine.add_request`` raises (ValueError / TypeError naming the
        field), QueueFullError, or EngineError; nothing stays queued then."""
        if not self.alive:
            raise EngineError(f"the engine is not running ({self.dead})" if self.dead else "the engine is stopped")
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already running")
        self.check_queue()
        box = _Mailbox(self._loop)
        self._streams[request_id] = box
        stream = RequestStream(self, request_id, box)
        self._pending += 1
        self.backend.submit(("add", request_id, (prompt, params, time.monotonic() if arrival is None else arrival,
                                                 kv_transfer_params)))
        try:
            await box.accepted
        except BaseException:  # rejected, or the caller was cancelled while waiting: leave nothing behind
            stream.close()  # the abort it sends is a no-op for a request the engine rejected
            raise
        return stream

    # ---- backend callbacks (event loop) --------------------------------------------------------------------
    def _published(self, pub: Published) -> None:
        self.snapshot = pub.snapshot
        if pub.answers:
            self._answer(pub.answers)
        if pub.outputs:
            self._deliver(pub.outputs)
        if pub.failed:
            self._fail(pub.failed, EngineError(pub.error))

    def _died(self, err: BaseException) -> None:
        self.dead = err
        self._fail(None, err)
        for cb in self.on_dead:
            try:
                cb(err)
            except Exception:
                log.exception("on_dead callback failed")

    def _answer(self, answers: list[tuple[str, BaseException | None]]) -> None:
        for rid, err in answers:
            self._pending -= 1
            box = self._streams.get(rid)
            if box is None or box.accepted.done():
                continue
            if err is None:
                box.accepted.set_result(None)
            else:
                box.accepted.set_exception(err)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            box = self._streams.get(out.request_id)
            if box is None:  # closed by its client; the abort is on its way
                continue
            if self.on_output is not None:
                try:
                    self.on_output(out, box.last_token_time)
                except Exception:
                    log.exception("output hook failed")
            box.last_token_time = out.metrics.get("last_token")
            box.latest = out
            box.event.set()

    def _fail(self, rids: list[str] | None, err: BaseException) -> None:
        for rid in list(self._streams) if rids is None else rids:
            box = self._streams.get(rid)
            if box is None:
                continue
            if not box.accepted.done():
                box.accepted.set_exception(err)
            box.error = err
            box.event.set()
