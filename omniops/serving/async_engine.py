"""``AsyncEngine``: the synchronous ``LLMEngine`` on its own thread, driven from asyncio.

The engine is not thread-safe, so exactly one thread (``omni-engine``) ever calls it. That thread loops:
drain the command queue (add / abort), run ``step()`` while any request is unfinished, hand the step's outputs
to the event loop in ONE ``call_soon_threadsafe`` per step, and block on the queue when there is no work (no
busy spin: idle connections cost the engine nothing).

Outputs are cumulative (text, token ids and logprobs so far), so each request keeps only its latest output in
a mailbox, not a queue: a slow reader skips intermediate outputs and neither stalls a step nor grows memory.

Counts that other code reads (``/load``, ``/metrics``, the ``max_queue`` check) come from ``snapshot``, a dict
the engine thread replaces as a whole after each command batch and each step; readers never touch the engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

import torch

from omniops.serving.engine import LLMEngine
from omniops.serving.outputs import RequestOutput
from omniops.serving.sampling_params import SamplingParams

log = logging.getLogger("omniops.serving.async_engine")

_STOP = ("stop", "", None)
# engine counters reported by the snapshot (minus their value at start(): the warmup request is not traffic)
_COUNTERS = ("prompt_tokens", "prompt_tokens_computed", "generation_tokens")
_STATS = ("num_preemptions", "prefix_cache_queries", "prefix_cache_hits")


class EngineError(RuntimeError):
    """The request failed inside the engine (a step raised), or the engine thread is not running."""


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
        if not self.finished:
            self.engine._cmds.put(("abort", self.request_id, None))


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_queue: int | None = None, on_output: OutputHook | None = None):
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.max_num_seqs = engine.config.max_num_seqs
        self.on_output = on_output  # called on the loop with (output, previous token time of that request)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Mailbox] = {}  # loop side
        self._pending = 0  # adds submitted by the loop, not yet answered by the engine thread
        self._live: set[str] = set()  # engine-thread side: ids queued in the engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._base: dict[str, int] = {}
        self.dead: BaseException | None = None
        self.snapshot: dict = {}

    # ---- lifecycle (event loop) ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the outputs."""
        self._loop = asyncio.get_running_loop()
        c = self.engine.counters
        self._base = {k: getattr(c, k) for k in _COUNTERS}
        self._base.update({k: v for k, v in self.engine.stats().items() if k in _STATS})
        self._base.update({f"finished_{r}": n for r, n in c.finished.items()})
        self._publish()
        conn = getattr(self.engine, "kv_connector", None)
        if conn is not None:  # KV pulls and acks end on other threads: they wake an idle engine thread
            conn.wake = lambda: self._cmds.put(("wake", None, None))
        self._thread = threading.Thread(target=self._run, name="omni-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; requests still open fail with EngineError."""
        if self._thread is not None and self._thread.is_alive():
            self._cmds.put(_STOP)
            self._thread.join(timeout)
        self._fail(list(self._streams), EngineError("the server is shutting down"))

    def load(self) -> dict:
        """What a load balancer reads (GET /load): batch occupancy, KV usage, tokens still to compute."""
        s = self.snapshot
        return {"running": s["running"], "waiting": s["waiting"] + self._pending,
                "kv_cache_usage": s["kv_cache_usage"], "prefill_tokens_in_flight": s["prefill_tokens_in_flight"],
                "decode_tokens_in_flight": s["decode_tokens_in_flight"]}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

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
            raise EngineError(f"the engine is not running ({self.dead!r})" if self.dead else "the engine is stopped")
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already running")
        self.check_queue()
        box = _Mailbox(self._loop)
        self._streams[request_id] = box
        stream = RequestStream(self, request_id, box)
        self._pending += 1
        self._cmds.put(("add", request_id, (prompt, params, time.monotonic() if arrival is None else arrival,
                                            kv_transfer_params)))
        try:
            await box.accepted
        except BaseException:  # rejected, or the caller was cancelled while waiting: leave nothing behind
            stream.close()  # the abort it sends is a no-op for a request the engine rejected
            raise
        return stream

    # ---- engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._serve()
        except BaseException as e:  # a bug outside step(): keep /health honest and fail everyone
            log.exception("engine thread died")
            self.dead = e
            self._post(self._fail, None, EngineError(f"the engine thread died: {e!r}"))

    def _serve(self) -> None:
        eng = self.engine
        while True:
            cmds = [] if eng.has_unfinished_requests() else [self._cmds.get()]  # idle: block, no spin
            while True:
                try:
                    cmds.append(self._cmds.get_nowait())
                except queue.Empty:
                    break
            answers = []
            for kind, rid, payload in cmds:
                if kind == "stop":
                    return
                if kind == "wake":
                    continue
                if kind == "add":
                    prompt, params, arrival, kvp = payload
                    try:
                        eng.add_request(rid, prompt, params, arrival=arrival, kv_transfer_params=kvp)
                        self._live.add(rid)
                        answers.append((rid, None))
                    except Exception as e:  # ValueError / TypeError from validation: the client's 400
                        answers.append((rid, e))
                elif rid in self._live:
                    self._live.discard(rid)
                    eng.abort_request(rid)
            if cmds:
                self._publish()  # before answering, so an accepted request is already in the counts
            if answers:
                self._post(self._answer, answers)
            if not eng.has_unfinished_requests():
                continue
            try:
                outs = eng.step()
            except Exception as e:
                self._step_failed(e)
                continue
            for o in outs:
                if o.finished:
                    self._live.discard(o.request_id)
            self._publish()
            if outs:
                self._post(self._deliver, outs)

    def _step_failed(self, e: Exception) -> None:
        # Which requests the failed batch held is not reported by the engine, and a half-done step leaves their
        # state unknown: abort every live request (their KV blocks are freed) and fail them with the error.
        log.exception("engine step failed; failing %d live requests", len(self._live))
        failed = list(self._live)
        for rid in failed:
            try:
                self.engine.abort_request(rid)
            except Exception:
                log.exception("abort of %s after a failed step failed too", rid)
        self._live.clear()
        self._publish()
        self._post(self._fail, failed, EngineError(f"the engine failed while running this request: {e!r}"))

    def _publish(self) -> None:
        eng, b = self.engine, self._base
        s = eng.stats()
        c = eng.counters
        snap = {k: s[k] for k in ("running", "waiting", "kv_cache_usage", "prefill_tokens_in_flight",
                                  "decode_tokens_in_flight")}
        snap.update({k: s[k] - b.get(k, 0) for k in _STATS})
        snap.update({k: getattr(c, k) - b.get(k, 0) for k in _COUNTERS})
        snap["finished"] = {r: n - b.get(f"finished_{r}", 0) for r, n in c.finished.items()}
        self.snapshot = snap  # one reference swap: readers on the loop see a whole snapshot

    def _post(self, fn: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed (shutdown): nobody is left to tell
            pass

    # ---- event loop callbacks ------------------------------------------------------------------------------
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
