"""omni-proxy's FastAPI app: /v1/completions and /v1/chat/completions routed by the Router (streaming
included), every other /v1 route passed to a healthy engine, /v1/models, /health, /load (the proxy's view of
each engine) and /metrics (Prometheus, ``omni:proxy_*``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.responses import JSONResponse, Response

from omniops.serving.api.handlers import ClientGone, until_disconnect
from omniops.serving.proxy.backends import HealthChecker
from omniops.serving.proxy.forward import BackendFailed, error_body
from omniops.serving.proxy.router import Router

log = logging.getLogger("omniops.serving.proxy")
_PASS_HEADERS = ("authorization", "x-request-id")


class ProxyMetrics:
    """Per-backend in-flight requests and tokens, requests, errors, health; the router's retries, fallbacks
    and outcomes. Collected at scrape time from the counters the event loop keeps."""

    def __init__(self, router: Router):
        self.router = router
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        labels = ["backend", "role"]
        per = (("backend_in_flight_requests", "gauge", "Requests the proxy has in flight there.",
                lambda b: b.requests),
               ("backend_in_flight_tokens", "gauge", "Prompt + expected output tokens in flight there.",
                lambda b: b.tokens),
               ("backend_healthy", "gauge", "1 while in rotation.", lambda b: int(b.healthy)),
               ("backend_requests", "counter", "Requests sent there.", lambda b: b.requests_total),
               ("backend_errors", "counter", "Failed attempts there (5xx, broken or refused connections).",
                lambda b: b.errors_total),
               ("backend_prompt_tokens", "counter", "Prompt tokens it reported (usage).",
                lambda b: b.prompt_tokens_total),
               ("backend_completion_tokens", "counter", "Completion tokens it produced.",
                lambda b: b.completion_tokens_total))
        for name, kind, doc, get in per:
            fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(f"omni:proxy_{name}", doc,
                                                                                   labels=labels)
            for b in self.router.backends:
                fam.add_metric([b.url, b.role], get(b))
            yield fam
        s = self.router.stats
        for name, value, doc in (("retries", s.retries, "Attempts retried on another engine."),
                                 ("fallbacks", s.fallbacks, "P/D requests decoded without a prefill engine.")):
            c = CounterMetricFamily(f"omni:proxy_{name}", doc)
            c.add_metric([], value)
            yield c
        c = CounterMetricFamily("omni:proxy_requests", "Requests by outcome.", labels=["outcome"])
        for outcome, v in (("ok", s.ok), ("client_error", s.client_errors), ("error", s.errors),
                           ("stream_error", s.stream_errors)):
            c.add_metric([outcome], v)
        yield c

    def render(self) -> bytes:
        return generate_latest(self.registry)


def build_app(router: Router, *, health_interval: float = 1.0, health_timeout: float = 5.0,
              url: str | None = None) -> FastAPI:
    health = HealthChecker(router.backends, router.client, health_interval, health_timeout)
    metrics = ProxyMetrics(router)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        health.start()
        if url is not None:
            log.info("omni-proxy: ready on %s", url)
        yield
        await health.stop()
        await router.client.aclose()

    app = FastAPI(title="omni-proxy", lifespan=lifespan)
    app.state.router, app.state.health = router, health

    def headers_of(request: Request) -> dict:
        return {k: v for k, v in request.headers.items() if k.lower() in _PASS_HEADERS}

    async def routed(request: Request, path: str) -> Response:
        try:
            payload = json.loads(await request.body())
        except ValueError as e:
            payload = f"malformed JSON body: {e}"
        if not isinstance(payload, dict):
            router.stats.client_errors += 1
            msg = payload if isinstance(payload, str) else "the body must be a JSON object"
            return Response(error_body(msg, "invalid_request_error"), 400, media_type="application/json")
        try:
            return await until_disconnect(request, router.handle(path, payload, headers_of(request)))
        except ClientGone:  # cancelled: the upstream connections closed and the engines abort the request
            return Response(status_code=499)  # nobody reads it

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await routed(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await routed(request, "/v1/chat/completions")

    @app.get("/health")
    async def healthz() -> Response:
        serving = router.decode or router.mixed
        ok = bool(serving.healthy())
        body = {"status": "ok" if ok else "unavailable",
                "backends": [{"url": b.url, "role": b.role, "healthy": b.healthy} for b in router.backends]}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/load")
    async def load() -> Response:
        return JSONResponse({"backends": [{"url": b.url, "role": b.role, "healthy": b.healthy,
                                           "requests": b.requests, "tokens": b.tokens,
                                           "requests_total": b.requests_total, "errors_total": b.errors_total}
                                          for b in router.backends], "stats": vars(router.stats)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST"])
    async def passthrough(request: Request, rest: str) -> Response:
        """/v1/models and whatever else the engines serve: the first healthy serving engine that answers."""
        serving = (router.decode or router.mixed).healthy() + (router.prefill.healthy() if router.prefill else [])
        body = await request.body()
        for b in serving:
            try:
                r = await router.client.request(request.method, f"{b.url}/v1/{rest}", content=body,
                                                headers={**headers_of(request), "content-type": "application/json"},
                                                params=request.query_params, timeout=router.timeout)
            except httpx.TransportError as e:
                b.mark_down(f"{type(e).__name__}: {e}")
                continue
            if r.status_code >= 500:
                b.errors_total += 1
                continue
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))
        return Response(error_body("no healthy engine answered", code="no_backend"), 503,
                        media_type="application/json")

    return app


__all__ = ["BackendFailed", "ProxyMetrics", "build_app"]
