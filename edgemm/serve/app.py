"""The HTTP app of `edgemm serve`: OpenAI-compatible routes over the slots of edgemm.serve.engine.

Routes: POST /v1/chat/completions (streamed as server-sent events or not), GET /v1/models, GET /health (no key),
POST /tokenize, GET /metrics (Prometheus text, when enabled). Errors use OpenAI's shape
{"error": {"message", "type", "code"}} with the matching status.
"""

import asyncio
import base64
import hmac
import io
import ipaddress
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlparse

from ..errors import EdgemmError
from ..generation import GenerationConfig


@dataclass
class Limits:
    body_bytes: int = 32 * 2**20            # request body
    images_per_request: int = 1
    image_pixels: int = 16_000_000          # decoded pixels per image (below Pillow's ~89 MP bomb check)
    max_tokens: int = 512                   # hard cap on max_tokens
    remote_hosts: tuple = ()                # --allow-remote-images: hosts image URLs may come from
    remote_bytes: int = 20 * 2**20
    remote_seconds: float = 10.0


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


# --------------------------------------------------------------------------- images
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


def decode_image(data: bytes, limits: Limits):
    """bytes of a png / jpeg / webp -> an RGB PIL image, within the pixel limit; APIError 400 otherwise."""
    from PIL import Image, UnidentifiedImageError
    from ..processor import to_rgb
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in ALLOWED_FORMATS:
            raise APIError(400, f"image format {img.format} is not accepted (png, jpeg, webp)", code="invalid_image")
        w, h = img.size
        if w * h > limits.image_pixels:
            raise APIError(400, f"the image is {w}x{h} pixels, over this server's limit of {limits.image_pixels} "
                                "pixels; downscale it", code="image_too_large")
        img.load()
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise APIError(400, "the image is too large to decode safely", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(400, "the image does not decode (not a png, jpeg or webp, or damaged)",
                       code="invalid_image") from None
    return to_rgb(img)


def _public_address(host: str) -> None:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise APIError(400, f"cannot resolve the image host {host}", code="invalid_image_url") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            raise APIError(400, f"image host {host} resolves to a non-public address; refused",
                           code="invalid_image_url")


def fetch_image(url: str, limits: Limits) -> bytes:
    """data: URIs always; http(s) only for hosts named by --allow-remote-images, public addresses, bounded."""
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if not head.startswith("data:image/") or not head.endswith(";base64"):
            raise APIError(400, "image_url data URIs must be data:image/<png|jpeg|webp>;base64,...",
                           code="invalid_image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:
            raise APIError(400, "the image's base64 data does not decode", code="invalid_image") from None
    u = urlparse(url)
    if u.scheme not in ("http", "https"):
        raise APIError(400, "image_url must be a data: URI (or http(s) where the server allows it)",
                       code="invalid_image_url")
    if not limits.remote_hosts or u.hostname not in limits.remote_hosts:
        raise APIError(400, "remote image URLs are refused by this server (start it with --allow-remote-images "
                            "HOST to allow a host); send the image as a data: URI", code="invalid_image_url")
    _public_address(u.hostname)
    import urllib.request
    req = urllib.request.Request(url, headers={"User-Agent": "edgemm"})
    try:
        with urllib.request.urlopen(req, timeout=limits.remote_seconds) as r:     # noqa: S310 (checked above)
            data = r.read(limits.remote_bytes + 1)
    except OSError as e:
        raise APIError(400, f"cannot fetch the image: {e}", code="invalid_image_url") from None
    if len(data) > limits.remote_bytes:
        raise APIError(400, "the remote image is larger than this server accepts", code="image_too_large")
    return data


# --------------------------------------------------------------------------- the app
def create_app(models: dict, limits: Limits | None = None, api_key: str | None = None, metrics: bool = False,
               loader=None):
    """models: {id: Model}, or filled later by `loader()` (-> {id: Model}) in a thread: /health says 503 until
    it returns."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from .engine import Job, Metrics, QueueFull
    from .prompt import build_segments
    limits = limits or Limits()
    app = FastAPI(title="edgemm", docs_url=None, redoc_url=None)
    app.state.models = dict(models)
    app.state.ready = loader is None
    app.state.load_error = None
    app.state.metrics = Metrics()
    m_ = app.state.metrics
    for m in models.values():                         # one set of figures for every engine
        m.engine.metrics = m_

    if loader is not None:
        def _load():
            try:
                loaded = loader()
                for m in loaded.values():
                    m.engine.metrics = m_
                app.state.models.update(loaded)
                app.state.ready = True
            except Exception as e:                      # reported by /health
                app.state.load_error = str(e)
        threading.Thread(target=_load, name="edgemm-load", daemon=True).start()

    def err(e: APIError):
        m_.request(e.status)
        return JSONResponse(error_body(e.message, e.type, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return err(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        return err(APIError(400, f"bad request: {where}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        return err(APIError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error"))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # the body limit, before anything reads the body (a declared length, then the bytes that really come)
        n = request.headers.get("content-length")
        if n is not None and (not n.isdigit() or int(n) > limits.body_bytes):
            return err(APIError(413, f"the request body is over this server's limit of {limits.body_bytes} bytes",
                                code="body_too_large"))
        if api_key and request.url.path not in ("/health", "/"):        # the page itself asks for the key
            got = request.headers.get("authorization", "")
            token = got[7:] if got.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return err(APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                    "authentication_error", "invalid_api_key"))
        resp = await call_next(request)
        if getattr(app.state, "replica", None):        # Ray Serve: which replica answered
            resp.headers["x-edgemm-replica"] = str(app.state.replica)
        return resp

    async def read_json(request: Request) -> dict:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.body_bytes:
                raise APIError(413, f"the request body is over this server's limit of {limits.body_bytes} bytes",
                               code="body_too_large")
        try:
            data = json.loads(bytes(body) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        return data

    def ready():
        if not app.state.ready:
            raise APIError(503, "the server is loading its models" if not app.state.load_error
                           else f"loading the models failed: {app.state.load_error}", "server_error", "loading",
                           headers={"Retry-After": "2"})

    def pick(name) -> Model:
        ready()
        ms = app.state.models
        if name is None and len(ms) == 1:
            return next(iter(ms.values()))
        if name not in ms:
            raise APIError(404, f"model {name!r} is not served here; models: {', '.join(ms)}", code="model_not_found")
        return ms[name]

    from pathlib import Path
    page_html = (Path(__file__).parent / "static" / "index.html").read_text()      # read once, not per request

    @app.get("/")
    async def page():
        """The browser chat page (static, no CDN: works on an offline box), over the /v1 routes."""
        from fastapi.responses import HTMLResponse
        return HTMLResponse(page_html)

    @app.get("/health")
    async def health():
        if not app.state.ready:
            return JSONResponse({"status": "error" if app.state.load_error else "loading",
                                 "error": app.state.load_error}, status_code=503)
        out = {"status": "ok", "models": list(app.state.models)}
        if getattr(app.state, "replica", None):
            import os
            out.update(replica=str(app.state.replica), pid=os.getpid())
        return out

    @app.get("/v1/models")
    async def list_models():
        ready()
        data = []
        for mid, m in app.state.models.items():
            cfg = m.backend.cfg
            data.append({"id": mid, "object": "model", "created": m.created, "owned_by": "edgemm",
                         "meta": {"backend": m.backend.describe(), "context_length": m.backend.context_length,
                                  "image_size": cfg.vision.image_size, "image_rows": cfg.n_image_rows,
                                  "image_rows_note": "the most one image takes" if cfg.vision.grid_pinpoints
                                  else "per image",
                                  "slots": m.engine.parallel}})
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def prom():
        if not metrics:
            raise APIError(404, "metrics are off (start the server with --metrics)", code="not_found")
        return PlainTextResponse(m_.prometheus({k: v.engine for k, v in app.state.models.items()}))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request)
        m = pick(body.get("model"))
        tok = m.backend.tokenizer
        if isinstance(body.get("messages"), list):
            try:
                segs, _ = build_segments(tok, m.template, body["messages"], limits.images_per_request)
            except EdgemmError as e:
                raise APIError(400, str(e)) from None
            ids = [t for k, d in segs if k == "text" for t in d]
            rows = sum(len(d) if k == "text" else m.backend.cfg.n_image_rows for k, d in segs)
            m_.request(200)
            return {"tokens": ids, "count": rows, "image_rows": rows - len(ids)}
        if not isinstance(body.get("content"), str):
            raise APIError(400, "tokenize takes 'content' (a string) or 'messages'")
        ids = tok.encode(body["content"])
        m_.request(200)
        return {"tokens": ids, "count": len(ids)}

    def gen_config(body) -> GenerationConfig:
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        if mt is None:
            mt = min(limits.max_tokens, 128)
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise APIError(400, "max_tokens must be a positive integer")
        if mt > limits.max_tokens:
            raise APIError(400, f"max_tokens {mt} is over this server's cap of {limits.max_tokens}")
        stop = body.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of at most 4 strings")
        t, p, seed = body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("seed")
        for name, v in (("temperature", t), ("top_p", p)):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise APIError(400, f"{name} must be a number")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise APIError(400, "seed must be an integer")
        if body.get("n", 1) != 1:
            raise APIError(400, "n must be 1")
        try:
            return GenerationConfig(max_new_tokens=mt, temperature=float(t), top_p=float(p), seed=seed,
                                    stop=tuple(stop), ignore_eos=bool(body.get("ignore_eos", False)))
        except EdgemmError as e:
            raise APIError(400, str(e).replace("--", "")) from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        m = pick(body.get("model"))
        gen = gen_config(body)
        b = m.backend
        try:
            segs, urls = build_segments(b.tokenizer, m.template, body.get("messages"), limits.images_per_request)
        except EdgemmError as e:
            raise APIError(400, str(e)) from None
        rows = sum(len(d) if k == "text" else b.cfg.n_image_rows for k, d in segs)
        if rows + gen.max_new_tokens > b.context_length:           # before any image is decoded or encoded
            raise APIError(400, f"the prompt needs {rows} tokens (image rows included) plus max_tokens "
                                f"{gen.max_new_tokens}, over the model's context of {b.context_length}; shorten "
                                "the conversation or lower max_tokens", code="context_length_exceeded")
        from ..anyres import preprocess_image
        pixels = []
        for u in urls:
            data = await asyncio.to_thread(fetch_image, u, limits)
            img = await asyncio.to_thread(decode_image, data, limits)
            pixels.append(preprocess_image(img, b.cfg.vision))
        if b.cfg.vision.grid_pinpoints:     # any-resolution tiling: each image's own row count
            rows += sum(b.cfg.image_rows_for(p.hw[1], p.hw[0]) - b.cfg.n_image_rows for p in pixels)
        from .prompt import normalize_messages
        instructions = None                 # InstructBLIP: each image with the text of the message it comes in
        if b.cfg.reads_question:
            from ..qformer import instruction
            instructions = [instruction(b.tokenizer, b.cfg, m["text"]) for m in normalize_messages(body["messages"])
                            for _ in m["images"]]
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        job = Job(segments=segs, pixels=pixels, gen=gen, prompt_rows=rows, instructions=instructions,
                  on_event=lambda kind, data: loop.call_soon_threadsafe(q.put_nowait, (kind, data)))
        try:
            m.engine.submit(job)
        except QueueFull:
            raise APIError(503, "the server is busy (all slots and the queue are full); retry shortly",
                           "server_error", "queue_full", headers={"Retry-After": "1"}) from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta, finish=None, usage=None):
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": m.id,
                 "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                c["usage"] = usage
            return f"data: {json.dumps(c)}\n\n"

        def usage_of(d):
            return {"prompt_tokens": d["prompt_tokens"], "completion_tokens": d["completion_tokens"],
                    "total_tokens": d["prompt_tokens"] + d["completion_tokens"]}

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def events():
                lead = True                      # the answer's leading space (" red"), stripped as when whole
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    while True:
                        kind, data = await q.get()
                        if kind == "text":
                            if lead:
                                data = data.lstrip()
                                lead = not data
                            if data:
                                yield chunk({"content": data})
                        elif kind == "error":
                            yield f"data: {json.dumps(error_body(data, 'server_error', None))}\n\n"
                            break
                        else:
                            yield chunk({}, data["finish_reason"])
                            if include_usage:
                                yield chunk({}, usage=usage_of(data))
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancel()                 # a client that disconnects frees its slot
            m_.request(200)
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts = []
        try:
            while True:
                try:
                    kind, data = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "text":
                    parts.append(data)
                elif kind == "error":
                    raise APIError(500, data, "server_error")
                else:
                    break
        finally:
            job.cancel()
        m_.request(200)
        return {"id": cid, "object": "chat.completion", "created": created, "model": m.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts).strip()},
                             "finish_reason": data["finish_reason"]}],
                "usage": usage_of(data)}

    return app
