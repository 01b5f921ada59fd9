"""The prefill engine's KV port: serves the blocks of finished prefills to decode engines over TCP.

Blocks of a finished ``do_remote_decode`` request are *held* here under its request id (the engine took an
extra reference on them, so they can be neither evicted nor reallocated). A decode engine connects, reads them
(``op: read``), and acknowledges (``op: ack``); the ack, or the hold's timeout when none comes (a dead decode
engine must not leak prefill memory), hands the request id to ``on_release``, which gives the blocks back on
the engine thread (the block pool is not thread-safe; this thread never touches it).

Reads happen on this server's threads while the engine keeps stepping. That is safe because nobody writes a
held block: its request is finished, and a block in the prefix cache is only ever read by other requests. A
read in progress keeps its hold alive (the sweeper skips it), so a timeout can never free blocks mid-read.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from omniops.serving.kv_transfer.wire import KVTransferError, check_layout, gather, layout, recv_header, send_msg

log = logging.getLogger("omniops.serving.kv_transfer")


@dataclass
class Hold:
    block_ids: list[int]
    deadline: float
    readers: int = 0


class KVServer:
    def __init__(self, tensors: list[Tensor], host: str, port: int, timeout: float,
                 on_release: Callable[[str, str], None], on_sent: Callable[[int, float], None]):
        self.tensors = tensors
        self.layout = layout(tensors)
        self.timeout = timeout
        self.on_release = on_release  # (request_id, "ack" | "timeout"), from a server thread
        self.on_sent = on_sent  # (blocks, seconds) of each read served
        self.holds: dict[str, Hold] = {}
        self.lock = threading.Lock()
        self.sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                         reuse_port=False)
        self.host, self.port = self.sock.getsockname()[:2]
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._accept, name="omni-kv-accept", daemon=True).start()
        threading.Thread(target=self._sweep, name="omni-kv-sweep", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()

    # ---- holds (called from the engine thread) -------------------------------------------------------------
    def hold(self, request_id: str, block_ids: list[int]) -> None:
        with self.lock:
            self.holds[request_id] = Hold(list(block_ids), time.monotonic() + self.timeout)

    def num_held_blocks(self) -> int:
        with self.lock:
            return sum(len(h.block_ids) for h in self.holds.values())

    def _drop(self, request_id: str, why: str) -> bool:
        with self.lock:
            h = self.holds.get(request_id)
            if h is None or h.readers:
                return False
            del self.holds[request_id]
        self.on_release(request_id, why)
        return True

    def _sweep(self) -> None:
        period = min(1.0, max(0.05, self.timeout / 4))
        while not self._stop.wait(period):
            now = time.monotonic()
            with self.lock:
                expired = [rid for rid, h in self.holds.items() if h.deadline <= now and not h.readers]
            for rid in expired:
                if self._drop(rid, "timeout"):
                    log.warning("kv: no ack for %s within %.0f s: its blocks are freed", rid, self.timeout)

    # ---- connections ---------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="omni-kv-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    try:
                        msg, plen = recv_header(conn)
                    except KVTransferError:  # the peer closed the connection: done
                        return
                    if plen:
                        send_msg(conn, {"ok": False, "error": "requests carry no payload"})
                        return
                    op, rid = msg.get("op"), str(msg.get("request_id"))
                    if op == "read":
                        try:  # before any payload: a mismatched reader gets a clear error, then acks
                            check_layout(msg.get("layout") or self.layout, self.layout)
                        except KVTransferError as e:
                            send_msg(conn, {"ok": False, "error": str(e)})
                            continue
                        self._read(conn, rid, int(msg.get("first", 0)), msg.get("count"))
                    elif op == "ack":
                        send_msg(conn, {"ok": self._drop(rid, "ack")})
                    elif op == "layout":
                        send_msg(conn, {"ok": True, "layout": self.layout})
                    else:
                        send_msg(conn, {"ok": False, "error": f"unknown op {op!r}"})
            except OSError as e:
                log.info("kv: connection dropped: %s", e)

    def _read(self, conn: socket.socket, rid: str, first: int, count: int | None) -> None:
        with self.lock:
            h = self.holds.get(rid)
            if h is not None:
                h.readers += 1
        if h is None:
            send_msg(conn, {"ok": False, "error": f"no blocks held for {rid!r} (never prefilled here, already "
                                                  "acknowledged, or timed out)"})
            return
        try:
            ids = h.block_ids[first:] if count is None else h.block_ids[first:first + int(count)]
            t0 = time.perf_counter()
            send_msg(conn, {"ok": True, "layout": self.layout, "num_blocks": len(ids)}, gather(self.tensors, ids))
            self.on_sent(len(ids), time.perf_counter() - t0)
        finally:
            with self.lock:
                h.readers -= 1
                h.deadline = max(h.deadline, time.monotonic() + 1.0)  # room for the ack that follows the read
