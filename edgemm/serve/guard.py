"""What stands before the routes of edgemm.serve.app: every error answered in OpenAI's shape, the body-size
limit (the declared length, before anything reads the body), the API key, and the replica header of Ray Serve."""
from __future__ import annotations

import hmac

from .api import APIError, body_too_large, error_response

OPEN_PATHS = ("/health", "/")               # no key: health checks, and the page (which asks for the key itself)


def install_error_handlers(app) -> None:
    """APIError, FastAPI's validation errors and Starlette's HTTP errors -> OpenAI-shaped JSON."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(app.state, e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return error_response(app.state, APIError(400, f"bad request: {where}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(app.state, APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def _bug(request, e):            # a bug still answers in OpenAI's shape (and is logged with its traceback)
        return error_response(app.state, APIError(500, f"internal error: {type(e).__name__}", "server_error"))


def refusal(request, limits, api_key: str | None) -> APIError | None:
    """Why a request is refused before it runs (None: it may run)."""
    n = request.headers.get("content-length")
    if n is not None and (not n.isdigit() or int(n) > limits.body_bytes):
        return body_too_large(limits)
    if api_key and request.url.path not in OPEN_PATHS:
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            return APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error",
                            "invalid_api_key")
    return None


def install_guard(app, limits, api_key: str | None) -> None:
    @app.middleware("http")
    async def guard(request, call_next):
        refused = refusal(request, limits, api_key)
        if refused is not None:
            return error_response(app.state, refused)
        resp = await call_next(request)
        if getattr(app.state, "replica", None):        # Ray Serve: which replica answered
            resp.headers["x-edgemm-replica"] = str(app.state.replica)
        return resp
