"""The FastAPI app of omni-serve: OpenAI's /v1 routes, /health, /load, /metrics, and errors in OpenAI's shape.

``build_app(engine, ...)`` wraps an already loaded ``LLMEngine``; its lifespan starts the engine thread on
uvicorn's event loop and stops it on shutdown. ``omniops.serving.cli`` is the command line around it.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from omniops.serving.api import protocol as P
from omniops.serving.api.handlers import APIError, ClientGone, OpenAIServing
from omniops.serving.api.metrics import CONTENT_TYPE, ServerMetrics
from omniops.serving.async_engine import AsyncEngine
from omniops.serving.engine import LLMEngine, load_tokenizer
from omniops.serving.engine_core import EngineProcess

log = logging.getLogger("omniops.serving.api")


class BearerAuth:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer streams and hide disconnects): /v1/* needs
    ``Authorization: Bearer <key>``; /health, /load and /metrics stay open for probes and scrapers (as in vLLM).
    Checked before the body is read, so a request without the key gets 401 whatever its body."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                msg = "Incorrect API key provided." if auth else "Missing bearer token: set Authorization."
                await APIError(401, msg, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _bad_request(errs: list) -> APIError:
    """FastAPI answers 422; OpenAI's API (and its clients' error classes) use 400."""
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}")
    parts, param = [], None
    for e in errs[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""
    return APIError(400, "; ".join(parts) + more, param=param)


async def _parse(request: Request, model: type[BaseModel]):
    """The body as JSON whatever its Content-Type (curl -d sends form-urlencoded), validated by pydantic's own
    JSON parser (strict: a wrong type is a 400, not coerced)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise _bad_request(e.errors()) from None


def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    return _bad_request(list(exc.errors())).response()


def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), type=kind).response()


def _internal_error(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return APIError(500, f"internal error: {exc!r}", type="server_error").response()


def build_app(engine: LLMEngine | EngineProcess, *, served_model_name: str | None = None, api_key: str | None = None,
              max_queue: int | None = None, log_requests: bool = True, url: str | None = None) -> FastAPI:
    name = served_model_name or engine.config.model
    metrics = ServerMetrics(name)
    aengine = AsyncEngine(engine, max_queue=max_queue, on_output=metrics.observe)
    metrics.engine = aengine
    # the server's own tokenizer: the engine's is never called from the event loop
    serving = OpenAIServing(aengine, load_tokenizer(engine.config.model), name, engine.config.max_model_len,
                            log_requests)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        aengine.start()
        if url is not None:
            log.info("omni-serve: ready on %s (model %s)", url, name)
        yield
        aengine.stop()
        if getattr(engine, "kv_connector", None) is not None:  # an in-process engine's (a core closes its own)
            engine.kv_connector.close()

    app = FastAPI(title="omni-serve", lifespan=lifespan)
    app.state.engine, app.state.serving, app.state.metrics = aengine, serving, metrics
    app.add_exception_handler(APIError, lambda _, e: e.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            return await serving.completion(await _parse(request, P.CompletionRequest), request)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            return await serving.chat(await _parse(request, P.ChatCompletionRequest), request)
        except ClientGone:
            return Response(status_code=499)

    @app.get("/v1/models")
    async def models() -> Response:
        card = P.ModelCard(id=name, root=engine.config.model, max_model_len=engine.config.max_model_len)
        return Response(P.ModelList(data=[card]).model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        if not aengine.alive:
            return APIError(503, "the engine is not running", type="server_error").response()
        return Response(status_code=200)

    @app.get("/load")
    async def load() -> JSONResponse:
        return JSONResponse(aengine.load())

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.engine_families = await aengine.metric_families(name)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
