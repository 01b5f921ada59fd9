"""omni-serve's engine core process: the ``LLMEngine`` and its ``EngineLoop`` in a child process (vLLM v1's
EngineCore), the HTTP server in the parent.

Why a process: the engine's Python between kernels (scheduling, sampling, detokenizing) and the event loop's
(HTTP, JSON, SSE) would otherwise share one GIL, and on a small machine every step then waits for the server's
work on the other core (measured on 2 cores: the step grew from ~23 ms offline to ~36 ms inside the server at
concurrency 16). With the core in its own process the two only meet at a pipe.

Messages (pickled over ``multiprocessing.Pipe``):
  parent -> core: ``("add", id, (prompt, params, arrival, kv_transfer_params))``, ``("abort", id, None)``,
                  ``("metrics", token, model_name)``, ``("stop", None, None)``;
  core -> parent: ``("ready", info)`` or ``("error", message)`` once at start, then ``("pub", snapshot, answers,
                  outputs, failed, error)`` per loop iteration (outputs as ``OutputEncoder`` deltas) and
                  ``("families", token, metrics)``.
The core exits when the parent goes (the pipe's EOF, and PR_SET_PDEATHSIG for a parent killed by SIGKILL); the
parent sees the core's exit as EOF, fails the open requests and shuts down (``AsyncEngine.on_dead``).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from prometheus_client.core import Metric

from omniops.serving.config import EngineConfig
from omniops.serving.engine_loop import (
    STOP,
    WAKE,
    Command,
    EngineError,
    EngineLoop,
    OutputDecoder,
    OutputEncoder,
    Published,
)

log = logging.getLogger("omniops.serving.engine_core")

START_TIMEOUT = 900.0  # load + warmup + the compile probe of a large model on few cores


@dataclass
class CoreSpec:
    """Everything the core needs to build its engine (picklable: it crosses to the child)."""

    config: EngineConfig
    threads: int
    role: str = "mixed"  # prefill / decode: a KVConnector with ``kv`` as its keyword arguments
    kv: dict = field(default_factory=dict)
    log_level: str = "INFO"


def set_engine_threads(threads: int) -> None:
    """The engine core's compute threads. More than one: the omni kernels on omniops' cooperative pool and torch's
    ops on one thread, because the core shares the machine with the HTTP process and the clients, and an OpenMP
    team stalls at every barrier while one of its threads is descheduled (measured on 2 cores, a decode step at
    batch 16 beside a process taking 10% of a core: 2 OpenMP threads 108 ms, 1 thread 36 ms, the pool 23 ms; on a
    quiet machine 19 ms for both 2-thread kinds, 33 ms for 1)."""
    import torch

    import omniops

    if threads > 1 and omniops.cpu_info()["isa"] is not None:
        torch.set_num_threads(1)
        omniops.set_kernel_threads(threads)
    else:
        torch.set_num_threads(threads)


def start_engine(spec: CoreSpec):
    """Build, warm up and (for a P/D role) connect the engine; returns it with the facts the startup line logs."""
    import torch

    import omniops
    from omniops.serving.engine import LLMEngine

    set_engine_threads(spec.threads)
    engine = LLMEngine(spec.config)
    engine.warmup()  # first-call costs of the kernels, before the first client pays them
    info = {"model_class": type(engine.model).__name__, "dtype": str(engine.model.dtype),
            "num_blocks": engine.kv.num_blocks, "runner": getattr(engine.runner, "compile_report", None),
            "threads": max(torch.get_num_threads(), omniops.get_kernel_threads()), "kv": None}
    if spec.role != "mixed":
        from omniops.serving.kv_transfer import KVConnector

        c = engine.kv_connector = KVConnector(engine, spec.role, **spec.kv)
        info["kv"] = {"engine_id": c.engine_id, "host": c.host, "port": c.port}
    return engine, info


# ---- the child ---------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    try:  # Linux: SIGKILL this process when the parent thread that forked it dies, whatever killed the parent
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def core_main(conn: Connection, spec: CoreSpec) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us in order
    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine, info = start_engine(spec)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        conn.send(("error", str(e)))
        return
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    encoder = OutputEncoder()
    if engine.kv_connector is not None:  # KV pulls and acks end on the connector's threads
        engine.kv_connector.wake = lambda: os.write(wake_w, b"w")

    def recv(block: bool) -> list[Command]:
        if block:
            wait([conn, wake_r])
        cmds = []
        while conn.poll():  # EOFError when the parent is gone: ends the loop
            cmds.append(conn.recv())
        try:
            os.read(wake_r, 4096)
        except BlockingIOError:
            pass
        return cmds or ([WAKE] if block else [])

    def publish(pub: Published) -> None:
        conn.send(("pub", pub.snapshot, pub.answers, [encoder.encode(o) for o in pub.outputs], pub.failed,
                   pub.error))

    def on_command(cmd: Command) -> None:
        kind, token, model_name = cmd
        if kind == "metrics":
            c = engine.kv_connector
            conn.send(("families", token, list(c.stats.families(model_name)) if c is not None else []))

    engine_loop = EngineLoop(engine, recv, publish, on_command, on_forget=encoder.forget)
    conn.send(("ready", {**info, "snapshot": engine_loop.snapshot()}))
    try:
        engine_loop.run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.info("engine core: the server is gone; exiting")
    finally:
        if engine.kv_connector is not None:
            engine.kv_connector.close()


# ---- the parent ------------------------------------------------------------------------------------------------
class EngineProcess:
    """The parent's handle on the core: ``start()`` spawns it and waits until its engine is ready; then it is an
    ``AsyncEngine`` backend (``AsyncEngine(EngineProcess(...).start())``)."""

    def __init__(self, spec: CoreSpec):
        self.spec, self.config = spec, spec.config
        self.info: dict = {}
        self.proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._sendq: queue.SimpleQueue = queue.SimpleQueue()
        self._decoder = OutputDecoder()
        self._families: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._on_dead: Callable[[BaseException], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dead: BaseException | None = None

    def start(self, timeout: float = START_TIMEOUT) -> EngineProcess:
        """Raises RuntimeError with the core's own message when its engine cannot start."""
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked OpenMP / torch thread state
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=core_main, args=(child, self.spec), name="omni-engine-core", daemon=True)
        self.proc.start()
        child.close()
        self._conn = parent
        deadline = time.monotonic() + timeout
        while not parent.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"the engine core exited with code {self.proc.exitcode} while starting")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the engine core was not ready after {timeout:.0f} s")
        try:
            kind, payload = parent.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(f"the engine core exited with code {self.proc.exitcode} while starting") from None
        if kind == "error":
            self.proc.join(5)
            raise RuntimeError(payload)
        self.info = payload
        return self

    # ---- AsyncEngine backend (event loop) ------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop, on_published: Callable[[Published], None],
                      on_dead: Callable[[BaseException], None]) -> dict:
        self._loop, self._on_published, self._on_dead = loop, on_published, on_dead
        loop.add_reader(self._conn.fileno(), self._readable)
        # sends from a thread: a large prompt never blocks the event loop on a full pipe
        threading.Thread(target=self._send_loop, name="omni-core-send", daemon=True).start()
        return self.info["snapshot"]

    def _send_loop(self) -> None:
        while True:
            cmd = self._sendq.get()
            try:
                self._conn.send(cmd)
            except (OSError, ValueError):  # the core is gone: the reader reports it
                return
            if cmd is STOP:
                return

    def submit(self, cmd: Command) -> None:
        self._sendq.put(cmd)

    def closed(self, request_id: str) -> None:
        self._decoder.forget(request_id)

    @property
    def alive(self) -> bool:
        return self.dead is None and self.proc is not None and self.proc.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
        if self.proc is not None and self.proc.is_alive():
            self._sendq.put(STOP)
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        if self.dead is None:
            self.dead = RuntimeError("the engine core is stopped")

    async def metric_families(self, model_name: str) -> list[Metric]:
        token = next(self._tokens)
        fut = self._families[token] = self._loop.create_future()
        self.submit(("metrics", token, model_name))
        try:
            return await asyncio.wait_for(fut, 5.0)
        except TimeoutError:
            return []
        finally:
            self._families.pop(token, None)

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            self._lost()

    def _dispatch(self, msg: tuple) -> None:
        if msg[0] == "families":
            fut = self._families.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
            return
        _, snapshot, answers, encoded, failed, error = msg
        outs = [o for o in map(self._decoder.decode, encoded) if o is not None]
        self._on_published(Published(snapshot, answers, outs, failed, error))

    def _lost(self) -> None:
        self._loop.remove_reader(self._conn.fileno())
        self.proc.join(5)
        self.dead = EngineError(f"the engine core exited (code {self.proc.exitcode})")
        log.error("%s", self.dead)
        self._on_dead(self.dead)
