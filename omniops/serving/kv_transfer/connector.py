"""``KVConnector``: an engine's side of prefill/decode disaggregation (vLLM's ``kv_transfer_params`` protocol).

Prefill role: a request sent with ``{"do_remote_decode": true}`` runs as usual; when it finishes, its prompt
blocks are held (one extra reference) and served on the KV port; its output carries ``{"do_remote_prefill":
true, "remote_engine_id", "remote_host", "remote_port", "remote_block_ids", "remote_request_id"}``, what the
proxy passes to a decode engine. The ack or a timeout releases the hold.

Decode role: a request carrying those params does not enter the scheduler. It waits here for the blocks of its
prompt (local prefix-cache hits first, as any request), a pull thread copies the remote blocks of the rest into
them and acknowledges, and only then is the request queued, with ``num_computed_tokens = prompt_len - 1``: the
engine computes just the last prompt token and samples the first output token itself, so greedy output equals
a mixed engine's. A failed pull (prefill engine gone, timed out) falls back to recomputing the prompt here:
slower, never lost.

Threads: everything that touches the block pool or the scheduler runs on the engine thread (``poll`` at the top
of ``step``); pull and server threads only move bytes and post events, then call ``wake`` so an idle engine
thread notices (AsyncEngine sets it; it defaults to a no-op for a caller that polls the engine itself).
"""

from __future__ import annotations

import logging
import queue
import socket
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from omniops.serving.kv_transfer.server import KVServer
from omniops.serving.kv_transfer.stats import TransferStats
from omniops.serving.kv_transfer.wire import (
    KVTransferError,
    cache_tensors,
    check_layout,
    layout,
    recv_header,
    recv_into_tensor,
    send_msg,
)
from omniops.serving.request import Request

log = logging.getLogger("omniops.serving.kv_transfer")
ROLES = ("mixed", "prefill", "decode")


class KVConnector:
    def __init__(self, engine, role: str, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0,
                 engine_id: str | None = None, advertise_host: str | None = None, pull_threads: int = 4,
                 connect_timeout: float = 5.0):
        if role not in ("prefill", "decode"):
            raise ValueError(f"role: a KV connector is for 'prefill' or 'decode' engines, got {role!r}")
        if not timeout > 0:
            raise ValueError(f"kv_timeout: must be > 0 seconds, got {timeout!r}")
        self.engine, self.role = engine, role
        self.engine_id = engine_id or f"omni-{role}-{uuid.uuid4().hex[:8]}"
        self.tensors = cache_tensors(engine.model)
        self.layout = layout(self.tensors)
        self.block_size = engine.kv.block_size
        self.stats = TransferStats()
        self.connect_timeout = connect_timeout
        self.wake = lambda: None
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # from server / pull threads to the engine thread
        self.held: dict[str, list[int]] = {}  # prefill: request id -> held block ids (engine-thread view)
        self.pending: deque[tuple[Request, dict]] = deque()  # decode: waiting for blocks to pull into
        self.inflight: dict[str, tuple[Request, dict]] = {}  # decode: pull running
        self.aborted: set[str] = set()  # decode: aborted while their pull runs (freed when it ends)
        self.server: KVServer | None = None
        self._pool: ThreadPoolExecutor | None = None
        if role == "prefill":
            self.server = KVServer(self.tensors, host, port, timeout, self._released,
                                   lambda n, s: self.stats.observe("sent", n, s))
            self.stats.held_blocks = self.server.num_held_blocks
            self.host, self.port = advertise_host or self.server.host, self.server.port
            self.server.start()
        else:
            self._pool = ThreadPoolExecutor(pull_threads, thread_name_prefix="omni-kv-pull")
            self.host, self.port = advertise_host or host, None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _post(self, *event) -> None:
        self._events.put(event)
        self.wake()

    # ---- engine hooks (engine thread) ----------------------------------------------------------------------
    def takes(self, req: Request, params: dict | None) -> bool:
        """Whether the request is the connector's to admit (a decode engine's remote prefill). A prefill
        engine's requests go to the scheduler as usual; params a role does not handle are ignored (as vLLM's
        engines without a matching connector do)."""
        if not isinstance(params, dict):
            return False
        req.kv_transfer_params = params
        if self.role == "decode" and params.get("do_remote_prefill"):
            for key in ("remote_host", "remote_port", "remote_request_id"):
                if params.get(key) in (None, ""):
                    raise ValueError(f"kv_transfer_params: {key} is missing (do_remote_prefill needs "
                                     "remote_host, remote_port and remote_request_id)")
            rbs = params.get("remote_block_size")
            if rbs is not None and rbs != self.block_size:
                raise ValueError(f"kv_transfer_params: block size mismatch: the prefill engine has {rbs}-token "
                                 f"blocks, this decode engine {self.block_size}; start both with the same "
                                 "--block-size")
            self.pending.append((req, params))
            return True
        return False

    def has_work(self) -> bool:
        return not self._events.empty() or bool(self.pending)

    def num_waiting(self) -> int:
        return len(self.pending) + len(self.inflight)

    def request_finished(self, req: Request) -> dict | None:
        """Prefill: hold the finished prompt's blocks for a decode engine; the kv_transfer_params to answer."""
        p = req.kv_transfer_params
        if self.role != "prefill" or not p or not p.get("do_remote_decode") or req.finish_reason == "abort":
            return None
        n = -(-req.num_prompt_tokens // self.block_size)
        ids = list(req.block_ids[:n])
        self.engine.kv.pool.touch(ids)
        self.held[req.request_id] = ids
        self.server.hold(req.request_id, ids)
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
                "remote_host": self.host, "remote_port": self.port, "remote_block_ids": ids,
                "remote_request_id": req.request_id, "remote_block_size": self.block_size,
                "remote_num_tokens": req.num_prompt_tokens}

    def abort(self, req: Request) -> bool:
        """Decode: True if the connector frees the request itself (its pull is still writing its blocks)."""
        rid = req.request_id
        if rid in self.inflight:
            self.aborted.add(rid)
            return True
        for i, (r, p) in enumerate(self.pending):
            if r is req:
                del self.pending[i]
                self._pool.submit(self._ack, p)  # nothing read: let the prefill engine free its hold now
                break
        return False

    def poll(self) -> None:
        """Apply what the threads reported, then start the pulls that now fit in the block pool."""
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            if ev[0] == "released":
                ids = self.held.pop(ev[1], None)
                if ids is not None:
                    self.engine.kv.pool.release(ids[::-1])
                if ev[2] == "timeout":
                    self.stats.count("timeouts")
            else:
                self._pulled(*ev[1:])
        kv, bs = self.engine.kv, self.block_size
        while self.pending:
            req, params = self.pending[0]
            prefix = kv.find_cached_prefix(req)
            if not kv.allocate(req, req.num_prompt_tokens - len(prefix) * bs, prefix):
                break  # FCFS: later ones wait too, until blocks free up
            self.pending.popleft()
            req.num_cached_tokens = len(prefix) * bs
            kv.record_prefix_query(req.num_prompt_tokens, req.num_cached_tokens)
            # the KV of tokens 0..L-2 is needed; the last prompt token is recomputed here
            need = -(-(req.num_prompt_tokens - 1) // bs)
            first = min(len(prefix), need)
            self.inflight[req.request_id] = (req, params)
            self._pool.submit(self._pull, req.request_id, params, first, req.block_ids[first:need])

    def _pulled(self, rid: str, err: BaseException | None) -> None:
        req, _ = self.inflight.pop(rid)
        eng = self.engine
        if rid in self.aborted:  # finished (aborted) while pulling: its blocks were kept for the pull until now
            self.aborted.discard(rid)
            eng.kv.free(req)
            return
        if err is None:
            req.num_computed_tokens = req.num_prompt_tokens - 1
        else:
            self.stats.count("failures")
            log.warning("kv: pull for %s failed (%s); recomputing its prompt here", rid, err)
            eng.kv.free(req)  # recomputed from scratch (the scheduler looks the prefix cache up again)
            req.num_computed_tokens = 0
        eng.scheduler.add(req)

    # ---- transfer threads ----------------------------------------------------------------------------------
    def _released(self, rid: str, why: str) -> None:
        self._post("released", rid, why)

    def _connect(self, params: dict) -> socket.socket:
        s = socket.create_connection((params["remote_host"], int(params["remote_port"])), self.connect_timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _pull(self, rid: str, params: dict, first: int, local_ids: list[int]) -> None:
        err, t0 = None, time.perf_counter()
        try:
            with self._connect(params) as s:
                send_msg(s, {"op": "read", "request_id": params["remote_request_id"], "first": first,
                             "count": len(local_ids), "layout": self.layout})
                head, _ = recv_header(s)
                if not head.get("ok"):
                    raise KVTransferError(f"the prefill engine refused the read: {head.get('error')}")
                check_layout(self.layout, head.get("layout", {}))
                if head["num_blocks"] != len(local_ids):
                    raise KVTransferError(f"{head['num_blocks']} blocks sent, {len(local_ids)} expected")
                if local_ids:
                    idx = torch.tensor(local_ids, dtype=torch.long)
                    for t in self.tensors:  # these blocks are this request's alone: no step reads them yet
                        buf = torch.empty((len(local_ids), *t.shape[1:]), dtype=t.dtype)
                        recv_into_tensor(s, buf)
                        t.index_copy_(0, idx, buf)
                send_msg(s, {"op": "ack", "request_id": params["remote_request_id"]})
                recv_header(s)
            self.stats.observe("received", len(local_ids), time.perf_counter() - t0)
        except (OSError, KVTransferError, ValueError, KeyError) as e:
            err = e
            if not isinstance(e, OSError):
                self._ack(params)  # the peer is alive but the blocks are useless to us: free them there
        except BaseException as e:  # never leave a request stuck in flight
            err = e
        self._post("pulled", rid, err)

    def _ack(self, params: dict) -> None:
        try:
            with self._connect(params) as s:
                send_msg(s, {"op": "ack", "request_id": params["remote_request_id"]})
                recv_header(s)
        except (OSError, KVTransferError):
            pass  # the prefill engine's timeout frees the blocks
