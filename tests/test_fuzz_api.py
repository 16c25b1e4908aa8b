"""The HTTP fuzz suite: requests generated from the server's own /openapi.json (schemathesis over hypothesis)
against a live `edgemm serve` of a tiny onnx bundle on 127.0.0.1.

Properties, for every generated request (bodies the schema allows, and bodies it does not): no 5xx; an answer
within REQUEST_SECONDS (no hang); every error in OpenAI's shape {"error": {"message", "type", ...}}, in a JSON
response or a server-sent event; status codes, content types and bodies as the schema declares them. Bounded:
derandomized, a fixed number of examples per operation (EDGEMM_FUZZ_EXAMPLES scales it for a longer local run),
the whole module well under 3 minutes on two slow cores.
"""
from __future__ import annotations

import json
import os
import time

import pytest

from tests.test_serve import Server, pytestmark as serve_marks

st_ = pytest.importorskip("schemathesis", reason="needs the test extra (schemathesis)")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = serve_marks
REQUEST_SECONDS = 20.0          # one request, answer included (max_tokens is capped at MAX_TOKENS)
MAX_TOKENS = 4
SCALE = float(os.environ.get("EDGEMM_FUZZ_EXAMPLES", "1"))
ERROR_TYPES = {"invalid_request_error", "authentication_error", "server_error"}


def fuzz_settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=SCALE == 1, database=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from edgemm.export.onnx import export_onnx
    d = tmp_path_factory.mktemp("fuzz") / "tiny"
    export_onnx(model="tiny-shapes", out=d, precision="fp32", threads=2, log=None)
    s = Server("--bundle", str(d), "--parallel", "2", "--max-queue", "4", "--metrics",
               "--max-tokens", str(MAX_TOKENS))
    yield s
    log = s.log()
    s.stop()
    assert "Traceback" not in log, log[-3000:]             # nothing failed inside the server either


@pytest.fixture(scope="module")
def api(server):
    import schemathesis
    code, body, _ = server.get("/openapi.json")
    assert code == 200
    schema = schemathesis.openapi.from_dict(json.loads(body))
    schema.config.update(base_url=server.url)
    return schema


def is_error_shape(v) -> bool:
    e = v.get("error") if isinstance(v, dict) else None
    return (isinstance(e, dict) and isinstance(e.get("message"), str) and bool(e["message"])
            and e.get("type") in ERROR_TYPES)


def sse_events(text: str) -> list:
    """The JSON of each `data:` event of a stream, which ends with data: [DONE]."""
    data = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert data and data[-1] == "[DONE]", text[-500:]
    return [json.loads(d) for d in data[:-1]]


def check_answer(case, resp) -> None:
    """Our properties of one response (schemathesis's own checks run beside them)."""
    ctype = (resp.headers.get("content-type") or [""])[0]          # lower-case keys, list values
    assert resp.status_code < 500, (resp.status_code, resp.text[:500], case.body)
    if resp.status_code >= 400:
        assert ctype.startswith("application/json"), (resp.status_code, ctype, resp.text[:300])
        assert is_error_shape(resp.json()), resp.text[:500]
    elif ctype.startswith("text/event-stream"):
        events = sse_events(resp.text)
        for ev in events:
            assert is_error_shape(ev) or ev.get("object") == "chat.completion.chunk", ev


def run_case(api, case) -> None:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)
    t = time.monotonic()
    resp = case.call(timeout=REQUEST_SECONDS)           # a hang: requests raises a timeout, the test fails
    assert time.monotonic() - t < REQUEST_SECONDS, case.body
    check_answer(case, resp)
    case.validate_response(resp, checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                         response_schema_conformance])


def test_openapi_describes_the_request_bodies(api, server):
    """The chat request's body is in the schema (else the fuzzer would have nothing to generate from)."""
    doc = json.loads(server.get("/openapi.json")[1])
    comps = doc["components"]["schemas"]
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    req = comps[body["$ref"].rsplit("/", 1)[1]]
    assert {"messages", "max_tokens", "temperature", "stream", "stream_options", "stop"} <= set(req["properties"])
    assert req["required"] == ["messages"]
    assert {s.get("maximum") for s in req["properties"]["max_tokens"]["anyOf"]} == {MAX_TOKENS, None}
    assert set(comps["ImagePart"]["properties"]) == {"type", "image_url"}
    assert "requestBody" in doc["paths"]["/tokenize"]["post"]
    err = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert err["$ref"].endswith("/ErrorResponse")


def tiny_png_url() -> str:
    import base64
    import io
    from PIL import Image
    b = io.BytesIO()
    Image.new("RGB", (12, 9), (200, 10, 10)).save(b, "PNG")
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


TINY_PNG = tiny_png_url()


def steer(body, image: bool) -> None:
    """A generated chat body moved toward the answering path, its other values kept: no model named (the one
    served), no tools (its template takes none), a conversation edgemm's format takes (user and assistant turns
    only, the last the user's, each user turn with text, one image at most, in a user turn) and, when `image`,
    that image a real PNG."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return
    for k in ("model", "tools", "tool_choice", "parallel_tool_calls"):
        body.pop(k, None)
    seen = 0
    for m in body["messages"]:
        if not isinstance(m, dict):
            continue
        m.pop("tool_calls", None)
        parts = m.get("content") if isinstance(m.get("content"), list) else []
        imgs = [p for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
        parts[:] = [p for p in parts if p not in imgs[1 - seen:]] if len(imgs) + seen > 1 else parts
        imgs, seen = imgs[:1 - seen], seen + len(imgs[:1 - seen])
        m["role"] = "user" if imgs or m.get("role") in ("system", "tool") else m.get("role")
        for p in imgs if image else ():
            p["image_url"] = {"url": TINY_PNG}
        if m["role"] == "user" and not any(isinstance(p, dict) and str(p.get("text", "")).strip() for p in parts):
            m["content"] = (parts + [{"type": "text", "text": "What color is the circle?"}] if parts
                            else f"{m.get('content') or ''} What color is the circle?")
    if body["messages"] and isinstance(body["messages"][-1], dict):
        body["messages"][-1]["role"] = "user"


# (method, path, mode, examples); the GET routes take no parameters: nothing to break, one request each
OPERATIONS = [("POST", "/v1/chat/completions", "positive", 100), ("POST", "/v1/chat/completions", "negative", 100),
              ("POST", "/tokenize", "positive", 40), ("POST", "/tokenize", "negative", 40)]
OPERATIONS += [("GET", p, "positive", 1) for p in ("/v1/models", "/health", "/metrics", "/")]


@pytest.mark.parametrize("method,path,mode,n", OPERATIONS, ids=[f"{m} {p} {g}" for m, p, g, _ in OPERATIONS])
def test_fuzz_operation(api, method, path, mode, n):
    """Bodies the schema allows (positive) and bodies that break it (negative): no 5xx, no hang, OpenAI-shaped
    errors, answers as declared."""
    from schemathesis import GenerationMode
    op = api[path][method]
    strategy = op.as_strategy(generation_mode=GenerationMode(mode))

    @fuzz_settings(n)
    @given(case=strategy, steered=st.booleans(), image=st.booleans())
    def fuzz(case, steered, image):
        if steered and mode == "positive" and path == "/v1/chat/completions":
            steer(case.body, image)
        run_case(api, case)
    fuzz()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=12)
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stop",
          "stream", "stream_options", "ignore_eos", "content", "response_format", "tools", "tool_choice",
          "parallel_tool_calls"]


@fuzz_settings(100)
@given(base=st.fixed_dictionaries({"messages": st.just([{"role": "user", "content": "What color is the circle?"}]),
                                   "max_tokens": st.just(2), "content": st.just("Q: hi"),
                                   "stream": st.booleans()}),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3),
       path=st.sampled_from(["/v1/chat/completions", "/tokenize"]))
def test_fuzz_any_json_in_every_field(server, base, body, path):
    """Any JSON value in a few fields the routes read, the rest of the request valid (beyond what schemathesis's
    mutations reach; NaN and Infinity too, which Python's JSON reader takes): a 200 or an OpenAI-shaped 4xx,
    never a 5xx."""
    import requests
    body = {**base, **body}
    r = requests.post(server.url + path, data=json.dumps(body), timeout=REQUEST_SECONDS,
                      headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300], body)
    if r.status_code >= 400:
        assert is_error_shape(r.json()), r.text[:300]
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert all(is_error_shape(e) or e.get("object") == "chat.completion.chunk" for e in sse_events(r.text))


# what the fuzzer found (each a 5xx before its fix), replayed on every run
Q = '"messages": [{"role": "user", "content": "What color is the circle?"}], "max_tokens": 2'
FOUND = [
    ("/v1/chat/completions", '{"model": [], %s}' % Q, 400, "model must be a string"),       # unhashable: 500
    ("/tokenize", '{"model": {}, "content": "hi"}', 400, "model must be a string"),
    ("/v1/chat/completions", '{"stream": true, "stream_options": "x", %s}' % Q, 400,           # .get of a str: 500
     "stream_options must be an object"),
    ("/v1/chat/completions", '{"seed": -1, %s}' % Q, 400, "seed must be a non-negative integer"),  # numpy: 500
    ("/v1/chat/completions", '{"temperature": NaN, %s}' % Q, 400, "temperature must be a number"),  # NaN probs
    ("/v1/chat/completions", '{"top_p": Infinity, %s}' % Q, 400, "top_p must be a number"),
    ("/v1/chat/completions", '{"temperature": 1e-320, %s}' % Q, 200, None),                   # inf - inf: 500
    ("/tokenize", '{"content": "\\ud800"}', 400, "lone UTF-16 surrogate"),                    # tokenizers: 500
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\udfff"}]}', 400,
     "lone UTF-16 surrogate"),
    ("/tokenize", '{"content": "\\ud83d\\ude00"}', 200, None),                                  # a pair is fine
]


@pytest.mark.parametrize("path,raw,status,message", FOUND, ids=[f"{i}" for i in range(len(FOUND))])
def test_what_the_fuzzer_found(server, path, raw, status, message):
    code, body, headers = server.request("POST", path, raw=raw.encode())
    assert code == status, (code, body[:300])
    if message is not None:
        assert headers["content-type"].startswith("application/json")
        out = json.loads(body)
        assert is_error_shape(out) and message in out["error"]["message"], out


def test_an_unforeseen_failure_still_answers_in_openai_shape():
    """A route that raises something no handler expects: a 500 in OpenAI's shape, not Starlette's plain text."""
    import asyncio
    from edgemm.serve.app import create_app
    app = create_app({})

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "path": "/boom",
             "raw_path": b"/boom", "root_path": "", "scheme": "http", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    with pytest.raises(RuntimeError, match="a bug"):           # re-raised after answering, so it is logged
        asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 500
    out = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert is_error_shape(out) and out["error"]["type"] == "server_error", out
