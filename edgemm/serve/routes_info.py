"""The routes around the chat: the browser page (GET /), GET /health (no key), GET /v1/models, GET /metrics
(Prometheus text, when enabled) and POST /tokenize."""
# (no `from __future__ import annotations`: FastAPI reads the routes' `Request` annotations as objects)
import os
from pathlib import Path

from ..errors import EdgemmError
from .api import APIError, ensure_ready, pick_model, read_json
from .prompt import build_segments

PAGE = Path(__file__).parent / "static" / "index.html"


def install_page(app) -> None:
    from fastapi.responses import HTMLResponse
    page_html = PAGE.read_text()          # read once, not per request

    @app.get("/")
    async def page():
        """The browser chat page (static, no CDN: works on an offline box), over the /v1 routes."""
        return HTMLResponse(page_html)


def health_of(state):
    from fastapi.responses import JSONResponse
    if not state.ready:
        return JSONResponse({"status": "error" if state.load_error else "loading", "error": state.load_error},
                            status_code=503)
    out = {"status": "ok", "models": list(state.models)}
    if getattr(state, "replica", None):
        out.update(replica=str(state.replica), pid=os.getpid())
    return out


def model_card(mid: str, m) -> dict:
    """One entry of GET /v1/models: OpenAI's fields, and what edgemm knows of the model under `meta`."""
    cfg = m.backend.cfg
    rows_note = "the most one image takes" if cfg.vision.grid_pinpoints else "per image"
    return {"id": mid, "object": "model", "created": m.created, "owned_by": "edgemm",
            "meta": {"backend": m.backend.describe(), "context_length": m.backend.context_length,
                     "image_size": cfg.vision.image_size, "image_rows": cfg.n_image_rows,
                     "image_rows_note": rows_note, "slots": m.engine.parallel}}


def tokenized(state, body: dict) -> dict:
    """POST /tokenize: 'content' (a string) -> its ids; 'messages' -> the prompt's text ids and its rows."""
    m = pick_model(state, body.get("model"))
    tok = m.backend.tokenizer
    if isinstance(body.get("messages"), list):
        try:
            segs, _ = build_segments(tok, m.template, body["messages"], state.limits.images_per_request)
        except EdgemmError as e:
            raise APIError(400, str(e)) from None
        ids = [t for k, d in segs if k == "text" for t in d]
        rows = sum(len(d) if k == "text" else m.backend.cfg.n_image_rows for k, d in segs)
        return {"tokens": ids, "count": rows, "image_rows": rows - len(ids)}
    if not isinstance(body.get("content"), str):
        raise APIError(400, "tokenize takes 'content' (a string) or 'messages'")
    ids = tok.encode(body["content"])
    return {"tokens": ids, "count": len(ids)}


def install_info_routes(app, metrics: bool) -> None:
    from fastapi import Request
    from fastapi.responses import PlainTextResponse
    state = app.state
    install_page(app)

    @app.get("/health")
    async def health():
        return health_of(state)

    @app.get("/v1/models")
    async def list_models():
        ensure_ready(state)
        return {"object": "list", "data": [model_card(mid, m) for mid, m in state.models.items()]}

    @app.get("/metrics")
    async def prom():
        if not metrics:
            raise APIError(404, "metrics are off (start the server with --metrics)", code="not_found")
        return PlainTextResponse(state.metrics.prometheus({k: v.engine for k, v in state.models.items()}))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        out = tokenized(state, await read_json(request, state.limits))
        state.metrics.request(200)
        return out
