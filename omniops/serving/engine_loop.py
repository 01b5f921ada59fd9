"""The engine side of omni-serve: the one loop that owns an ``LLMEngine`` (which is not thread-safe).

It drains the commands (add / abort / stop / wake), runs ``step()`` while any request is unfinished, and hands
everything a step produced to the front end in ONE ``publish`` call: the snapshot of the counts, the answers to
new requests, the step's outputs, the requests a failed step took down. When there is no work it blocks in
``recv`` (no busy spin: idle connections cost the engine nothing).

The transport is the caller's: ``AsyncEngine``'s thread mode passes a queue and ``call_soon_threadsafe``;
omni-serve's engine-core process (``engine_core``) passes its pipe to the HTTP process. Outputs are cumulative
``RequestOutput``s here; the process transport sends only what changed (``OutputEncoder``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from omniops.serving.outputs import CompletionOutput, RequestOutput

log = logging.getLogger("omniops.serving.engine_loop")

# engine counters reported by the snapshot (minus their value when the loop starts: the warmup is not traffic)
_COUNTERS = ("prompt_tokens", "prompt_tokens_computed", "generation_tokens")
_STATS = ("num_preemptions", "prefix_cache_queries", "prefix_cache_hits")
_LOAD = ("running", "waiting", "kv_cache_usage", "prefill_tokens_in_flight", "decode_tokens_in_flight")

Command = tuple[str, "str | None", object]  # (kind, request id, payload)


class EngineError(RuntimeError):
    """The request failed inside the engine (a step raised), or the engine is not running."""


STOP: Command = ("stop", None, None)
WAKE: Command = ("wake", None, None)


@dataclass
class Published:
    """What one loop iteration hands to the front end."""

    snapshot: dict
    answers: list[tuple[str, BaseException | None]] = field(default_factory=list)  # add -> None or its error
    outputs: list[RequestOutput] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # requests a failed step aborted ...
    error: str | None = None  # ... and why


class EngineLoop:
    """``recv(block)`` returns the pending commands (blocking for at least one when ``block``); ``publish``
    delivers a ``Published``; ``on_command`` gets the kinds this loop does not know (the process transport's
    metrics requests)."""

    def __init__(self, engine, recv: Callable[[bool], list[Command]], publish: Callable[[Published], None],
                 on_command: Callable[[Command], None] | None = None, on_forget: Callable[[str], None] | None = None):
        self.engine, self.recv, self.publish = engine, recv, publish
        self.on_command, self.on_forget = on_command, on_forget
        self.live: set[str] = set()  # ids queued in the engine by this loop
        c = engine.counters
        self.base = {k: getattr(c, k) for k in _COUNTERS}
        self.base.update({k: v for k, v in engine.stats().items() if k in _STATS})
        self.base.update({f"finished_{r}": n for r, n in c.finished.items()})

    def snapshot(self) -> dict:
        eng, b = self.engine, self.base
        s, c = eng.stats(), eng.counters
        snap = {k: s[k] for k in _LOAD}
        snap.update({k: s[k] - b.get(k, 0) for k in _STATS})
        snap.update({k: getattr(c, k) - b.get(k, 0) for k in _COUNTERS})
        snap["finished"] = {r: n - b.get(f"finished_{r}", 0) for r, n in c.finished.items()}
        return snap

    def run(self) -> None:
        """Serve until a stop command."""
        with torch.inference_mode():
            while self._iteration():
                pass

    def _iteration(self) -> bool:
        eng = self.engine
        cmds = self.recv(not eng.has_unfinished_requests())
        answers = []
        for cmd in cmds:
            kind, rid, payload = cmd
            if kind == "stop":
                return False
            if kind == "add":
                prompt, params, arrival, kvp = payload
                try:
                    eng.add_request(rid, prompt, params, arrival=arrival, kv_transfer_params=kvp)
                    self.live.add(rid)
                    answers.append((rid, None))
                except Exception as e:  # ValueError / TypeError from validation: the client's 400
                    answers.append((rid, e))
            elif kind == "abort":
                if rid in self.live:
                    self.live.discard(rid)
                    eng.abort_request(rid)
                    self._forget(rid)
            elif kind != "wake" and self.on_command is not None:
                self.on_command(cmd)
        if answers:  # published before the step, so an accepted request is in the counts at once
            self.publish(Published(self.snapshot(), answers))
        if not eng.has_unfinished_requests():
            if cmds and not answers:
                self.publish(Published(self.snapshot()))
            return True
        try:
            outs = eng.step()
        except Exception as e:
            self._step_failed(e)
            return True
        for o in outs:
            if o.finished:
                self.live.discard(o.request_id)
        self.publish(Published(self.snapshot(), outputs=outs))
        return True

    def _forget(self, rid: str) -> None:
        if self.on_forget is not None:
            self.on_forget(rid)

    def _step_failed(self, e: Exception) -> None:
        # Which requests the failed batch held is not reported by the engine, and a half-done step leaves their
        # state unknown: abort every live request (their KV blocks are freed) and fail them with the error.
        log.exception("engine step failed; failing %d live requests", len(self.live))
        failed = list(self.live)
        for rid in failed:
            try:
                self.engine.abort_request(rid)
            except Exception:
                log.exception("abort of %s after a failed step failed too", rid)
            self._forget(rid)
        self.live.clear()
        self.publish(Published(self.snapshot(), failed=failed,
                               error=f"the engine failed while running this request: {e!r}"))


class OutputEncoder:
    """Cumulative outputs -> what changed since the request's previous output (its prompt only the first time),
    so a step's message costs O(batch), not O(batch x tokens so far)."""

    def __init__(self):
        self._sent: dict[str, tuple[int, int]] = {}  # request id -> (text chars, tokens) already sent

    def forget(self, rid: str) -> None:
        self._sent.pop(rid, None)

    def encode(self, out: RequestOutput) -> tuple:
        c = out.outputs[0]
        first = out.request_id not in self._sent
        nchars, ntok = self._sent.get(out.request_id, (0, 0))
        if out.finished:
            self._sent.pop(out.request_id, None)
        else:
            self._sent[out.request_id] = (len(c.text), len(c.token_ids))
        lps = c.logprobs[ntok:] if c.logprobs is not None else None
        prompt = (out.prompt, out.prompt_token_ids) if first else None
        return (out.request_id, prompt, c.text[nchars:], c.token_ids[ntok:], lps, c.finish_reason, c.stop_reason,
                out.finished, out.num_cached_tokens, out.metrics)


class OutputDecoder:
    """The inverse of ``OutputEncoder`` on the front end: rebuilds each request's cumulative output."""

    def __init__(self):
        self._last: dict[str, RequestOutput] = {}

    def forget(self, rid: str) -> None:
        self._last.pop(rid, None)

    def decode(self, msg: tuple) -> RequestOutput | None:
        rid, prompt, text, tokens, lps, reason, stop_reason, finished, cached, metrics = msg
        prev = self._last.pop(rid, None)
        if prompt is not None:
            base_prompt, prompt_ids, base_text, base_tokens, base_lps = *prompt, "", [], []
        elif prev is not None:
            p = prev.outputs[0]
            base_prompt, prompt_ids = prev.prompt, prev.prompt_token_ids
            base_text, base_tokens, base_lps = p.text, p.token_ids, p.logprobs or []
        else:  # a late output of a request this side already closed
            return None
        comp = CompletionOutput(0, base_text + text, base_tokens + tokens,
                                base_lps + lps if lps is not None else None, reason, stop_reason)
        out = RequestOutput(rid, base_prompt, prompt_ids, [comp], finished, cached, metrics)
        if not finished:
            self._last[rid] = out
        return out
