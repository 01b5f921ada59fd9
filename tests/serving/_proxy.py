"""omni-proxy as a real subprocess for the P/D and proxy tests (``--port 0`` on loopback, ready once it logs
its URL and /health answers), and starting several omni-serve engines at once (model loads overlap)."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.serving._server import LoopbackProcess, OmniServer

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


class ProxyServer(LoopbackProcess):
    name = "omni-proxy"
    stop_timeout = 10.0
    poll_s = 0.1

    def __init__(self, log_path: Path, *args: str):
        super().__init__([sys.executable, "-m", "omniops.serving.proxy.cli", "--host", "127.0.0.1", "--port", "0",
                          "--health-interval", "0.5", *args], log_path)

    def start(self, timeout: float = 60.0, require_healthy: bool = True) -> ProxyServer:
        return super().start(timeout, require_healthy)

    def load(self) -> dict:
        return httpx.get(f"{self.url}/load", timeout=5).json()
