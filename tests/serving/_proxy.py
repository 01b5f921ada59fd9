"""omni-proxy as a real subprocess for the P/D and proxy tests (``--port 0`` on loopback, ready once it logs
its URL and /health answers), and starting several omni-serve engines at once (model loads overlap)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.serving._server import OmniServer

_READY = re.compile(r"ready on (http://127\.0\.0\.1:\d+)")
ENGINE_ARGS = ("--served-model-name", "tiny", "--max-model-len", "512", "--kv-cache-memory", "0.05",
               "--enforce-eager", "--disable-uvicorn-access-log", "--disable-log-requests")


def start_engines(ckpt: str, tmp: Path, roles: dict[str, tuple[str, ...]]) -> dict[str, OmniServer]:
    """{name: extra args} -> {name: started OmniServer}, started in parallel; all stopped if one fails."""
    servers = {name: OmniServer(ckpt, tmp / f"{name}.log", *ENGINE_ARGS, *args) for name, args in roles.items()}
    with ThreadPoolExecutor(len(servers)) as ex:
        futs = {name: ex.submit(s.start) for name, s in servers.items()}
        errors = [f.exception() for f in futs.values() if f.exception() is not None]
    if errors:
        for s in servers.values():
            s.stop()
        raise errors[0]
    return servers


class ProxyServer:
    def __init__(self, log_path: Path, *args: str):
        self.cmd = [sys.executable, "-m", "omniops.serving.proxy.cli", "--host", "127.0.0.1", "--port", "0",
                    "--health-interval", "0.5", *args]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60.0, require_healthy: bool = True) -> ProxyServer:
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"omni-proxy exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            m = self.url or _READY.search(self.log())
            if m and not self.url:
                self.url = m[1]
            if self.url and not require_healthy:
                return self
            if self.url:
                try:
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"omni-proxy not ready after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def load(self) -> dict:
        return httpx.get(f"{self.url}/load", timeout=5).json()
