"""The HTTP app of `edgemm serve`: OpenAI-compatible routes over the slots of edgemm.serve.engine.

Routes: POST /v1/chat/completions (streamed as server-sent events or not; edgemm.serve.routes_chat), GET /v1/models,
GET /health (no key), POST /tokenize, GET /metrics (Prometheus text, when enabled) (edgemm.serve.routes_info).
Errors use OpenAI's shape {"error": {"message", "type", "code"}} with the matching status (edgemm.serve.api,
edgemm.serve.guard); images of a request: edgemm.serve.images; slow clients: edgemm.serve.clients.
"""
from __future__ import annotations

import threading

from .api import Limits, Model  # noqa: F401 (imported from here by the CLI, Ray Serve and the tests)


def start_loading(state, loader, metrics) -> None:
    """Fill `state.models` from `loader()` in a thread; /health says 503 (and why, if it fails) until then."""
    def _load():
        try:
            loaded = loader()
            for m in loaded.values():
                m.engine.metrics = metrics
            state.models.update(loaded)
            state.ready = True
        except Exception as e:                      # reported by /health
            state.load_error = str(e)
    threading.Thread(target=_load, name="edgemm-load", daemon=True).start()


def create_app(models: dict, limits: Limits | None = None, api_key: str | None = None, metrics: bool = False,
               loader=None):
    """models: {id: Model}, or filled later by `loader()` (-> {id: Model}) in a thread: /health says 503 until
    it returns."""
    from fastapi import FastAPI
    from .clients import BodyDeadline
    from .drain import install_drain
    from .engine import Metrics
    from .guard import install_error_handlers, install_guard
    from .routes_chat import install_chat_route
    from .routes_info import install_info_routes
    from .schema import install_openapi
    app = FastAPI(title="edgemm", docs_url=None, redoc_url=None)
    state = app.state
    state.models, state.ready, state.load_error = dict(models), loader is None, None
    state.limits, state.metrics = limits or Limits(), Metrics()
    for m in models.values():                         # one set of figures for every engine
        m.engine.metrics = state.metrics
    if loader is not None:
        start_loading(state, loader, state.metrics)
    install_error_handlers(app)
    install_guard(app, state.limits, api_key)
    app.add_middleware(BodyDeadline, seconds=state.limits.body_seconds, max_bytes=state.limits.body_bytes,
                       count=state.metrics.request)
    install_drain(app)                                # outermost: SIGTERM's 503s and the in-flight count
    install_info_routes(app, metrics)
    install_chat_route(app)
    install_openapi(app, state.limits.max_tokens)          # what /openapi.json says of the bodies
    return app
