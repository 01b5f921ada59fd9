"""omni-serve's HTTP layer: an OpenAI-compatible API (FastAPI) over ``AsyncEngine``, with Prometheus metrics.

``build_app(engine, served_model_name=..., api_key=..., max_queue=...)`` returns the ASGI app; the
``omni-serve`` command (``omniops.serving.cli``) loads the engine and runs it under uvicorn.
"""

from omniops.serving.api.server import build_app

__all__ = ["build_app"]
