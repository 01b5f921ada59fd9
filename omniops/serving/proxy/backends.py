"""The engines behind omni-proxy: what the proxy has in flight on each, their health, and their counters.

Health: every ``interval`` seconds each engine's /health and /load are fetched (``timeout`` each). An engine
that refuses the connection (dead) leaves the rotation at once, as does one whose connection breaks under a
request; one that fails ``fail_threshold`` checks in a row otherwise (error status, or no answer in time: hung
— one slow answer on a busy 2-core host is not enough) too. Its attempts still running are cancelled: those
that have not reached their client's first token retry elsewhere at once, the streams already answering end
with an error event, instead of waiting on a hung socket. It is put back as soon as a check passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx

from omniops.serving.proxy.policies import DecayedHistory, EngineLoad, LinearCost

log = logging.getLogger("omniops.serving.proxy")


@dataclass
class Backend:
    url: str
    role: str  # "mixed" | "prefill" | "decode"
    healthy: bool = True  # optimistic until the first check: the first requests need not wait for it
    requests: int = 0  # the proxy's own in flight
    tokens: int = 0
    prefill_cost: float = 0.0
    prefilling: int = 0  # of ``requests``, those whose prompt is still being computed
    decode_tokens: int = 0
    reported: int = 0  # running + waiting from the engine's last /load
    own_at_report: int = 0  # the proxy's own in-flight requests when that /load was read
    requests_total: int = 0
    errors_total: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    cost: LinearCost = field(default_factory=LinearCost)
    history: DecayedHistory = field(default_factory=DecayedHistory)
    attempts: set = field(default_factory=set)  # asyncio tasks of the attempts running on it
    failed_checks: int = 0

    def load(self) -> EngineLoad:
        """The proxy's own in-flight load, plus what the engine reports beyond it (other clients), each extra
        request counted at the mean size of the proxy's own there."""
        extra = max(0, self.reported - self.own_at_report)
        per = self.tokens / self.requests if self.requests else 0.0
        per_cost = self.prefill_cost / self.requests if self.requests else self.cost.predict(0)
        per_dec = self.decode_tokens / self.requests if self.requests else 0.0
        return EngineLoad(self.url, self.requests + extra, int(self.tokens + extra * per),
                          self.prefill_cost + extra * per_cost, int(self.decode_tokens + extra * per_dec),
                          self.prefilling)

    def mark_down(self, why: str) -> None:
        if self.healthy:
            log.warning("proxy: %s %s out of rotation: %s", self.role, self.url, why)
        self.healthy = False
        for task in list(self.attempts):  # they retry elsewhere (the attempt turns the cancel into a retry)
            task.cancel()
        self.attempts.clear()

    def mark_up(self) -> None:
        if not self.healthy:
            log.info("proxy: %s %s back in rotation", self.role, self.url)
        self.healthy = True


class HealthChecker:
    def __init__(self, backends: list[Backend], client: httpx.AsyncClient, interval: float = 1.0,
                 timeout: float = 5.0, fail_threshold: int = 2):
        self.backends, self.client = backends, client
        self.interval, self.timeout, self.fail_threshold = interval, timeout, fail_threshold
        self._task: asyncio.Task | None = None
        self.checks = 0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def check(self, b: Backend) -> None:
        own = b.requests
        try:
            r = await self.client.get(f"{b.url}/health", timeout=self.timeout)
            if r.status_code != 200:
                raise httpx.HTTPStatusError(f"/health answered {r.status_code}", request=r.request, response=r)
            r = await self.client.get(f"{b.url}/load", timeout=self.timeout)
            if r.status_code == 200:  # engines without /load (vLLM) are balanced on the proxy's view alone
                load = r.json()
                # the proxy's own count may change while /load is in flight (a burst arriving): compare with the
                # larger of before and after, so its own requests never read as somebody else's load
                b.reported = int(load.get("running", 0)) + int(load.get("waiting", 0))
                b.own_at_report = max(own, b.requests)
        except (httpx.HTTPError, ValueError) as e:
            b.failed_checks += 1
            if isinstance(e, httpx.ConnectError) or b.failed_checks >= self.fail_threshold:
                b.mark_down(f"health check failed: {type(e).__name__}: {e}")
            return
        b.failed_checks = 0
        b.mark_up()

    async def _loop(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.gather(*(self.check(b) for b in self.backends))
            self.checks += 1
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - t0)))
