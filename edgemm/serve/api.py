"""What the routes of edgemm.serve.app share: the server's limits, a served model, OpenAI-shaped errors, and
reading a request (its JSON body within the size limit, the model it names).

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} with the matching status. The app keeps
its state on `app.state`: `models` ({id: Model}), `ready`, `load_error`, `metrics` (edgemm.serve.engine.Metrics),
`limits`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


@dataclass
class Limits:
    body_bytes: int = 32 * 2**20            # request body
    images_per_request: int = 1
    image_pixels: int = 16_000_000          # decoded pixels per image (below Pillow's ~89 MP bomb check)
    max_tokens: int = 512                   # hard cap on max_tokens
    remote_hosts: tuple = ()                # --allow-remote-images: hosts image URLs may come from
    remote_bytes: int = 20 * 2**20
    remote_seconds: float = 10.0
    body_seconds: float = 30.0              # a request's head, then its body, arrive within this (serve.clients)
    client_connections: int = 64            # open connections per client address (plain `edgemm serve`)
    stream_interval: float = 0.0            # seconds: a streamed answer's text goes out at most this often, the
    #                                         tokens that came meanwhile in one chunk (0: a chunk per token)


@dataclass
class Model:
    id: str
    backend: object
    engine: object
    template: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def error_body(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def error_response(state, e: APIError):
    """The JSON response of `e`, counted in the app's metrics."""
    from fastapi.responses import JSONResponse
    state.metrics.request(e.status)
    return JSONResponse(error_body(e.message, e.type, e.code), status_code=e.status, headers=e.headers)


def body_too_large(limits: Limits) -> APIError:
    return APIError(413, f"the request body is over this server's limit of {limits.body_bytes} bytes",
                    code="body_too_large")


async def read_json(request, limits: Limits) -> dict:
    """The request's body as a JSON object (413 past the body limit, 400 for anything but an object)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.body_bytes:
            raise body_too_large(limits)
    try:
        data = json.loads(bytes(body) or b"null")
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if b"\\u" in body and has_lone_surrogate(data):     # "\ud800" escapes make strings no tokenizer takes
        raise APIError(400, "the request body has a lone UTF-16 surrogate (a \\ud800-\\udfff escape without "
                            "its pair)")
    return data


def has_lone_surrogate(data) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def ensure_ready(state) -> None:
    """503 with Retry-After while the models load (or say why loading failed)."""
    if not state.ready:
        raise APIError(503, "the server is loading its models" if not state.load_error
                       else f"loading the models failed: {state.load_error}", "server_error", "loading",
                       headers={"Retry-After": "2"})


def pick_model(state, name) -> Model:
    """The served model a request names (the only one when it names none); 404 for another."""
    ensure_ready(state)
    ms = state.models
    if name is None and len(ms) == 1:
        return next(iter(ms.values()))
    if name is not None and not isinstance(name, str):
        raise APIError(400, "model must be a string: a served model's id (GET /v1/models)")
    if name not in ms:
        raise APIError(404, f"model {name!r} is not served here; models: {', '.join(ms)}", code="model_not_found")
    return ms[name]
