"""omni-serve as a real subprocess for the server tests: ``--port 0`` on loopback (the server logs the port it
got, so there is no pick-then-bind race), ready once /health answers; stopped by pid (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT = 120.0  # model load + warmup on 2 shared cores
_READY = re.compile(r"ready on (http://127\.0\.0\.1:\d+)")


class LoopbackProcess:
    """A server subprocess on ``--port 0``: ready once it logs ``ready on URL`` (so there is no pick-then-bind
    race) and /health answers; stopped by pid (SIGTERM, then SIGKILL), also when starting fails."""

    name = "server"
    stop_timeout = 20.0  # SIGTERM grace before SIGKILL
    poll_s = 0.2

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.cmd, self.log_path = cmd, log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = START_TIMEOUT, require_healthy: bool = True):
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
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
                time.sleep(self.poll_s)
            raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log()[-3000:]}")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float | None = None) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class OmniServer(LoopbackProcess):
    name = "omni-serve"

    def __init__(self, model_dir: str, log_path: Path, *args: str):
        super().__init__([sys.executable, "-m", "omniops.serving.cli", model_dir, "--host", "127.0.0.1", "--port",
                          "0", "--dtype", "float32", *args], log_path, {"OMNI_API_KEY": ""})

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def load(self) -> dict:
        return httpx.get(f"{self.url}/load", timeout=5).json()

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """/load until nothing runs or waits (aborts travel to the engine thread asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            load = self.load()
            if (load["running"], load["waiting"]) == (0, 0) or time.monotonic() > deadline:
                return load
            time.sleep(0.05)


def metrics(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value}, labels without model_name (always the served name here)."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        key = re.sub(r',?model_name="[^"]*"', "", key).replace("{,", "{").replace("{}", "")
        out[key] = float(value)
    return out
