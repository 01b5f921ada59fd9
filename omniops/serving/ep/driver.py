"""Rank 0 of the expert-parallel engine: starts or joins the ranks, drives them step by step, fails cleanly.

``start_ep(engine, num_blocks)`` is called from ``LLMEngine.__init__`` when ``config.ep > 1``. It replaces
``engine.runner`` with an ``EPRunner``: the scheduler, sampler and detokenizer stay on rank 0 as before; each
step's flat batch is broadcast to the other ranks, every rank runs the same forward, only rank 0 computes the
logits. Under torchrun the ranks > 0 run ``serve`` inside this call and leave the process (SystemExit(0))
when rank 0 stops them: the same command line works on every rank and host.

Failure: any exception inside an EP step (a rank killed -> its sockets close -> gloo fails at once; a rank
hung -> the data group's ``ep_timeout``) marks the engine down with an ``EPRankError`` naming the ranks that
exited, stops the local ranks, and runs the ``on_failure`` callbacks (omni-serve shuts its server down and
exits non-zero). Every later step raises the same error at once: no hang, no half-state.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from omniops.serving.ep.comm import EPGroup, init_groups, send_step, send_stop, torchrun_env
from omniops.serving.ep.placement_loop import PlacementLoop, PlacementStats
from omniops.serving.ep.worker import START_TIMEOUT, check_layout, connect_store, serve, setup_model

log = logging.getLogger("omniops.serving.ep")

# the EngineConfig fields a worker needs (not the whole config: other fields need not be JSON)
_WORKER_FIELDS = ("model", "dtype", "max_model_len", "block_size", "max_num_batched_tokens", "enable_chunked_prefill",
                  "quantization", "enforce_eager", "ep", "redundant_experts", "placement", "placement_interval",
                  "placement_max_moves", "placement_nodes", "ep_timeout")


# not ``-m omniops.serving.ep.worker``: the package imports that module first, and runpy warns about it
_WORKER_MAIN = "import sys; from omniops.serving.ep.worker import main; main(sys.argv[1:])"


class EPRankError(RuntimeError):
    """An expert-parallel rank stopped (exited, hung past ``ep_timeout``, or failed to start): the engine is down
    and must be restarted with all its ranks."""


class EPEngine:
    """Rank 0's handle on the group: ``step`` (one forward on every rank), ``stats``, ``shutdown``."""

    def __init__(self, group: EPGroup, loop: PlacementLoop, procs: list[subprocess.Popen], store: dist.Store,
                 timeout: float):
        self.group, self.loop, self.procs, self._store, self.timeout = group, loop, procs, store, timeout
        self.threads: int | None = None  # rank 0's thread count before start_ep lowered it (spawn mode)
        self.error: EPRankError | None = None
        self.on_failure: list[Callable[[EPRankError], None]] = []
        self._closed = False
        atexit.register(self.shutdown)

    @property
    def stats(self) -> PlacementStats:
        return self.loop.stats

    def step(self, model, input_ids: Tensor, meta) -> Tensor:
        if self.error is not None:
            raise self.error
        if self._closed:
            raise EPRankError("expert-parallel engine: shut down")
        try:
            sync = self.loop.sync_due()
            send_step(self.group, input_ids, meta, sync)
            hidden = model.forward(input_ids, meta)
            self.loop.after_step(sync)
            return hidden
        except Exception as e:  # the ranks' state is unknown after a failed collective: the engine is down
            raise self._fail(e) from e

    def _fail(self, exc: Exception) -> EPRankError:
        if self.error is None:
            time.sleep(0.2)  # a killed rank's exit status lands a moment after its sockets close
            gone = [f"rank {r} (exit code {p.poll()})" for r, p in enumerate(self.procs, 1) if p.poll() is not None]
            why = (f"{', '.join(gone)} exited" if gone else f"a rank failed or stopped answering within ep_timeout="
                   f"{self.timeout:g} s ({type(exc).__name__}: {exc})")
            self.error = EPRankError(f"expert-parallel engine is down: {why}. In-flight requests failed; restart "
                                     f"the engine (all {self.group.world} ranks)")
            log.error("%s", self.error)
            self._teardown()
            for cb in self.on_failure:
                try:
                    cb(self.error)
                except Exception:
                    log.exception("ep on_failure callback failed")
        return self.error

    def _teardown(self) -> None:
        for p in self.procs:  # our own children, by pid
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:  # e.g. a stopped (SIGSTOP) rank: SIGTERM waits for SIGCONT
                p.kill()
                p.wait(10)
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # what the process had before the ranks shared its cores
        self._closed = True
        atexit.unregister(self.shutdown)

    def shutdown(self) -> None:
        """Stop the other ranks (STOP message, then wait for them) and leave the process group. Idempotent."""
        if self._closed:
            return
        if self.error is None:
            try:
                send_stop(self.group)
            except Exception as e:  # a rank already gone: nothing more to tell it
                log.warning("ep: stop message failed: %s", e)
            for p in self.procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    pass
        self._teardown()


class EPRunner:
    """Stands in for ``ModelRunner`` on rank 0: the same ``prepare``, an ``execute`` that drives every rank."""

    def __init__(self, inner, ep: EPEngine):
        self.inner, self.ep = inner, ep
        self.model, self.block_size = inner.model, inner.block_size
        self.compile_report = (f"eager (expert parallel over {ep.group.world} ranks: the MoE layers run "
                               "collectives)")

    def prepare(self, batch):
        return self.inner.prepare(batch)

    @torch.inference_mode()
    def execute(self, input_ids: Tensor, meta, sample_rows: list[int]) -> Tensor:
        hidden = self.ep.step(self.model, input_ids, meta)
        if not sample_rows:
            return hidden.new_empty(0, 0, dtype=torch.float32)
        return self.model.logits(hidden[torch.tensor(sample_rows, dtype=torch.long)])


def _spawn(cfg, num_blocks: int, port: int, threads: int) -> list[subprocess.Popen]:
    fields = json.dumps({k: getattr(cfg, k) for k in _WORKER_FIELDS})
    procs = []
    for r in range(1, cfg.ep):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(cfg.ep),
               "LOCAL_WORLD_SIZE": str(cfg.ep), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMNI_EP_THREADS": str(threads)}
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, fields, str(num_blocks)],
                                      env=env, stdin=subprocess.DEVNULL))
    return procs


def _wait_ready(store: dist.TCPStore, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT.total_seconds()
    pending = set(range(1, len(procs) + 1))
    while pending:
        for r in sorted(pending):
            if store.check([f"omni_ep/error/{r}"]):
                raise EPRankError(f"ep: rank {r} failed to start: {store.get(f'omni_ep/error/{r}').decode()}")
            if store.check([f"omni_ep/ready/{r}"]):
                pending.discard(r)
            elif procs[r - 1].poll() is not None:
                raise EPRankError(f"ep: rank {r} exited with code {procs[r - 1].returncode} while starting")
        if time.monotonic() > deadline:
            raise EPRankError(f"ep: ranks {sorted(pending)} not ready after {START_TIMEOUT.total_seconds():.0f} s")
        time.sleep(0.05)


def start_ep(engine, num_blocks: int) -> EPEngine:
    """Start (or, under torchrun, join) the ranks and make ``engine`` drive them. See the module docstring."""
    cfg = engine.config
    check_layout(engine.model, cfg, cfg.ep)
    if dist.is_initialized():
        raise EPRankError("ep: torch.distributed is already initialised in this process; one expert-parallel "
                          "engine per process (stop the other first: engine.ep.shutdown())")
    env = torchrun_env()
    procs: list[subprocess.Popen] = []
    if env is None:
        rank, world, launched = 0, cfg.ep, "spawn"
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=START_TIMEOUT, wait_for_workers=False)
        # one share of the cores per rank: oversubscribed OpenMP threads spin against each other's collectives
        threads = max(1, len(os.sched_getaffinity(0)) // world)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        procs = _spawn(cfg, num_blocks, store.port, threads)
        try:
            _wait_ready(store, procs)
        except BaseException:
            for p in procs:
                p.kill()
                p.wait()
            torch.set_num_threads(threads_before)
            raise
    else:
        (rank, world), launched = env, "torchrun"
        if world != cfg.ep:
            raise ValueError(f"ep: {cfg.ep} ranks asked for, the launcher started WORLD_SIZE={world}")
        store = connect_store(rank, world)
    group = init_groups(rank, world, cfg.ep_timeout, engine.model.embed.device,
                        store=dist.PrefixStore("omni_ep", store), launched=launched)
    loop = setup_model(engine.model, engine.hf_config, group, cfg, num_blocks)
    if rank != 0:  # torchrun: this process is a worker; rank 0's STOP ends it
        try:
            serve(engine.model, group, loop)
        finally:
            dist.destroy_process_group()
        raise SystemExit(0)
    ep = EPEngine(group, loop, procs, store, cfg.ep_timeout)
    if launched == "spawn":
        ep.threads = threads_before
    engine.runner = EPRunner(engine.runner, ep)
    log.info("ep: %d ranks (%s), %d routed-expert layers, %d slots per layer (%d redundant), placement %s every "
             "%d steps", world, launched, len(loop.layers), loop.num_slots, cfg.redundant_experts, cfg.placement,
             cfg.placement_interval)
    return ep
