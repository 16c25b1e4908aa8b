"""`edgemm serve`: the real server on a free loopback port, driven by the official openai client."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import requires_demo

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("openai") is None,
                                 reason="needs the serve and test extras (fastapi, uvicorn, openai)"), requires_demo]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`edgemm serve` in its own process group on 127.0.0.1; stopped by its pid's group at the end."""

    def __init__(self, *args, key=None, code=None):
        """args: `edgemm serve`'s options; or code: Python that serves on {port} (settings the CLI does not take)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        cmd = [sys.executable, "-c", "from edgemm.cli import main; main()", "serve", "--port", str(self.port),
               "--threads", "2", *args] + (["--api-key", key] if key else [])
        if code is not None:
            cmd = [sys.executable, "-c", code.format(port=self.port)]
        import tempfile
        self.logf = tempfile.NamedTemporaryFile(prefix="edgemm-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()[-2000:]}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy")

    def client(self, key=None):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key or "none", max_retries=0, timeout=120)

    def request(self, method, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json", **(headers or {})}
        if self.key and "Authorization" not in h:
            h["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}

    def get(self, path):
        return self.request("GET", path)

    def rss_anon_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def log(self) -> str:
        return Path(self.logf.name).read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()
        Path(self.logf.name).unlink(missing_ok=True)


def served_reply(bundle, image, question, max_tokens):
    """`edgemm serve --bundle B` asked one image question by the official openai client (greedy): the response."""
    s = Server("--bundle", str(bundle), "--max-tokens", str(max_tokens))
    try:
        url = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
        return s.client().chat.completions.create(model=Path(bundle).name, temperature=0, max_tokens=max_tokens,
                                                  messages=[{"role": "user", "content": [
                                                      {"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}])
    finally:
        s.stop()


def _img_url(path=EXAMPLE) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _msg(q, url=None):
    parts = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + [{"type": "text", "text": q}]
    return {"role": "user", "content": parts}


@pytest.fixture(scope="module")
def server():
    s = Server("--parallel", "2", "--max-queue", "4", "--metrics", "--max-tokens", "64")
    yield s
    print(s.log()[-3000:])
    s.stop()


@pytest.fixture(scope="module")
def reference():
    """edgemm's own answers (what `edgemm run` prints) through the same generation code, torch backend."""
    from edgemm.generation import ChatSession, GenerationConfig, answer
    from edgemm.runtimes import load_backend
    b = load_backend("torch", model="tiny-shapes", device="cpu")
    out = {"circle": answer(b, str(EXAMPLE), "What color is the circle?", GenerationConfig(max_new_tokens=16))}
    s = ChatSession(b, GenerationConfig(max_new_tokens=16))
    s.set_image(str(EXAMPLE))
    out["turn1"] = s.ask("How many shapes are there?")
    out["turn2"] = s.ask("What color is the circle?")
    tok = b.tokenizer
    out["prompt_tokens"] = 1 + b.cfg.n_image_rows + len(tok.user_turn("What color is the circle?", first=True))
    out["completion_tokens"] = len(tok.encode(" " + out["circle"]))        # the answer's tokens, not its </s>
    return out


def test_cli_run_answer_matches(reference):
    r = subprocess.run([sys.executable, "-c", "from edgemm.cli import main; main()", "run", "--image", str(EXAMPLE),
                        "What color is the circle?"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == reference["circle"]


def test_served_answer_equals_edgemm_run_streamed_and_not(server, reference):
    c = server.client()
    msgs = [_msg("What color is the circle?", _img_url())]
    r = c.chat.completions.create(model="tiny-shapes", messages=msgs, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == reference["circle"] and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == reference["prompt_tokens"]                     # image rows included
    assert r.usage.completion_tokens == reference["completion_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    pieces, usage = [], []
    for ch in c.chat.completions.create(model="tiny-shapes", messages=msgs, temperature=0, max_tokens=16,
                                        stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        if ch.usage:
            usage.append(ch.usage)
    assert "".join(pieces) == reference["circle"] and len(usage) == 1
    assert usage[0].prompt_tokens == reference["prompt_tokens"]
    no_usage = [ch for ch in c.chat.completions.create(model="tiny-shapes", messages=msgs, temperature=0,
                                                       max_tokens=16, stream=True) if ch.usage]
    assert no_usage == []                                     # the usage chunk only when asked for
    # vLLM's continuous_usage_stats: every content chunk says how many tokens the answer has so far (what
    # bench_serve --arrivals divides a chunk's gap by); the same text
    pieces, counts = [], []
    for ch in c.chat.completions.create(model="tiny-shapes", messages=msgs, temperature=0, max_tokens=16,
                                        stream=True, stream_options={"continuous_usage_stats": True}):
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
            counts.append(ch.usage.completion_tokens)
    assert "".join(pieces) == reference["circle"]
    assert counts == sorted(counts) and 1 <= counts[0] and counts[-1] <= reference["completion_tokens"]


def test_multi_turn_matches_a_chat_session(server, reference):
    c = server.client()
    msgs = [_msg("How many shapes are there?", _img_url()), {"role": "assistant", "content": reference["turn1"]},
            _msg("What color is the circle?")]
    r = c.chat.completions.create(model="tiny-shapes", messages=msgs, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == reference["turn2"]


def test_prompt_cache_reuses_the_image_and_answers_the_same(server, reference):
    from edgemm.checkpoint import DEMO_DIR
    from edgemm.tokenizer import Tokenizer
    c = server.client()

    def reused():
        line = [ln for ln in server.get("/metrics")[1].decode().splitlines()
                if ln.startswith("edgemm_prompt_rows_reused_total")]
        return float(line[0].split()[-1])
    msgs = [_msg("What color is the circle?", _img_url())]
    first = c.chat.completions.create(model="tiny-shapes", messages=msgs, temperature=0, max_tokens=16)
    before = reused()
    again = c.chat.completions.create(model="tiny-shapes", messages=msgs, temperature=0, max_tokens=16)
    assert again.choices[0].message.content == first.choices[0].message.content == reference["circle"]
    q_rows = len(Tokenizer.load(DEMO_DIR / "tokenizer.json").user_turn("What color is the circle?", first=True))
    assert reused() - before >= first.usage.prompt_tokens - q_rows      # <s> and the image rows, at least


def test_models_health_tokenize_metrics(server):
    c = server.client()
    ms = c.models.list().data
    assert [m.id for m in ms] == ["tiny-shapes"]
    code, body, _ = server.get("/health")
    assert code == 200 and json.loads(body)["status"] == "ok"
    code, body, _ = server.request("POST", "/tokenize", {"model": "tiny-shapes", "content": "Q: hi"})
    from edgemm.checkpoint import DEMO_DIR
    from edgemm.tokenizer import Tokenizer
    assert code == 200 and json.loads(body)["tokens"] == Tokenizer.load(DEMO_DIR / "tokenizer.json").encode("Q: hi")
    c.chat.completions.create(model="tiny-shapes", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    code, body, _ = server.get("/metrics")          # a chat answered above: the TTFT summary has a count
    text = body.decode()
    assert code == 200 and "edgemm_requests_total" in text and "edgemm_queue_depth" in text
    count = [ln for ln in text.splitlines() if ln.startswith("edgemm_ttft_seconds_count ")]
    assert count and int(count[0].split()[1]) >= 1


def _tiny_png(w=8, h=8) -> bytes:
    from PIL import Image
    b = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(b, "PNG")
    return b.getvalue()


def _bomb_png(w, h) -> bytes:
    from tests.test_io import _bomb_png as bomb
    return bomb(w, h)


def _body(messages, **kw):
    return {"model": "tiny-shapes", "messages": messages, "max_tokens": 8, "temperature": 0, **kw}


@pytest.mark.parametrize("case,status,code_", [
    ("bad json", 400, None), ("not an object", 400, None), ("no messages", 400, None),
    ("image does not decode", 400, "invalid_image"), ("gif refused", 400, "invalid_image"),
    ("too many pixels", 400, "image_too_large"), ("remote url", 400, "invalid_image_url"),
    ("context", 400, "context_length_exceeded"), ("max_tokens cap", 400, None),
    ("unknown model", 404, "model_not_found"), ("body too large", 413, "body_too_large"),
    ("bad role", 400, None), ("last not user", 400, None)])
def test_errors_have_openai_shape_and_the_server_keeps_answering(server, case, status, code_):
    bad = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
    raw = None
    if case == "bad json":
        raw = b"{nope"
    elif case == "not an object":
        raw = b"[1, 2]"
    body = {"no messages": {"model": "tiny-shapes"},
            "image does not decode": _body([_msg("hi", bad)]),
            "gif refused": _body([_msg("hi", "data:image/gif;base64," + base64.b64encode(b"GIF89a").decode())]),
            "too many pixels": _body([_msg("hi", "data:image/png;base64," + base64.b64encode(_bomb_png(5000, 5000)).decode())]),
            "remote url": _body([_msg("hi", "http://example.com/cat.png")]),
            # over-long and with an undecodable image: the length check answers before any image is touched
            "context": _body([_msg("why " * 3000, bad)]),
            "max_tokens cap": _body([_msg("hi")], max_tokens=100000),
            "unknown model": dict(_body([_msg("hi")]), model="nope"),
            "bad role": _body([{"role": "robot", "content": "hi"}]),
            "last not user": _body([_msg("hi"), {"role": "assistant", "content": "x"}])}.get(case)
    if case == "body too large":        # declared over the limit: answered before the body is read
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sk:
            sk.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n{\"x\": \"aaaa" % (33 * 2**20))
            resp = b""
            while b"\r\n\r\n" not in resp or len(resp.split(b"\r\n\r\n", 1)[1]) < 20:
                got = sk.recv(65536)
                if not got:
                    break
                resp += got
        head, out = resp.split(b"\r\n\r\n", 1)
        code = int(head.split()[1])
        out = out[:out.rfind(b"}") + 1]
    else:
        code, out, _ = server.request("POST", "/v1/chat/completions", body, raw=raw)
    assert code == status, out[:300]
    err = json.loads(out)["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    if code_:
        assert err["code"] == code_
    ok = server.client().chat.completions.create(model="tiny-shapes", messages=[_msg("What color is the circle?",
                                                  _img_url())], temperature=0, max_tokens=4)
    assert ok.choices[0].message.content


def test_api_key_queue_full_and_loopback_only():
    import openai
    s = Server("--parallel", "1", "--max-queue", "0", key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(key="wrong").models.list()
        code, _, _ = s.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert code == 401
        assert s.request("GET", "/health", headers={"Authorization": ""})[0] == 200     # no key needed
        c = s.client()
        msgs = [_msg("What color is the circle?", _img_url())]
        stream = c.chat.completions.create(model="tiny-shapes", messages=msgs, max_tokens=480, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))                                          # the only slot is busy now
        code, body, headers = s.request("POST", "/v1/chat/completions", _body(msgs))
        assert code == 503 and json.loads(body)["error"]["code"] == "queue_full" and headers.get("retry-after")
        stream.close()                                              # a client that goes away frees the slot
        deadline = time.time() + 30
        while time.time() < deadline:
            code, body, _ = s.request("POST", "/v1/chat/completions", _body(msgs))
            if code == 200:
                break
            time.sleep(0.2)
        assert code == 200
    finally:
        s.stop()
    r = subprocess.run([sys.executable, "-c", "from edgemm.cli import main; main()", "serve", "--host", "0.0.0.0",
                        "--port", str(_free_port())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--api-key" in r.stderr and "Traceback" not in r.stderr


def test_chat_template_sandbox():
    from edgemm.errors import EdgemmError
    from edgemm.serve.prompt import build_segments
    from edgemm.checkpoint import DEMO_DIR
    from edgemm.tokenizer import Tokenizer
    tok = Tokenizer.load(DEMO_DIR / "tokenizer.json")
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(EdgemmError, match="sandbox"):
        build_segments(tok, evil, [{"role": "user", "content": "hi"}])
    tmpl = ("{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{% if p['type'] == 'image' %}"
            "<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}assistant:")
    segs, urls = build_segments(tok, tmpl, [_msg("hi", "data:x")])
    assert [k for k, _ in segs] == ["text", "image", "text"] and urls == ["data:x"]
    assert tok.decode(segs[0][1]) == "user: " and tok.decode(segs[2][1]) == "hi\nassistant:"



def _timed_chat(port) -> tuple[int, float]:
    """One normal chat request (an image, 8 tokens) from 127.0.0.2, another client than the slow ones."""
    import http.client
    body = json.dumps(_body([_msg("What color is the circle?", _img_url())])).encode()
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=("127.0.0.2", 0))
    try:
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        status = c.getresponse().status
    finally:
        c.close()
    return status, time.perf_counter() - t0


def test_slow_clients_are_capped_and_timed_out_while_others_are_answered():
    """50 connections from one client (127.0.0.1) that send a request head and then a body byte every 0.5 s (5 of
    them trickle the head itself): the connections over the per-client cap (10) get 429 at once, the others are
    closed when the deadline (3 s) passes (408 for the bodies), and a normal request from another client answers
    meanwhile within its usual time."""
    limits = "Limits(body_seconds=3, client_connections=10)"
    s = Server(code="from edgemm.serve import serve; from edgemm.serve.api import Limits; "
                    f"serve(port={{port}}, threads=2, limits={limits}, log=print)")
    socks = []
    try:
        usual = max(_timed_chat(s.port)[1] for _ in range(3))
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        for i in range(50):
            sk = socket.create_connection(("127.0.0.1", s.port), timeout=10, source_address=("127.0.0.1", 0))
            sk.sendall(head if i < 5 else head + b"Content-Length: 100\r\n\r\n{")
            socks.append(sk)
        t_open, stop = time.monotonic(), threading.Event()

        def trickle():                                  # one byte per connection every 0.5 s, for at most 10 s
            while not stop.wait(0.5) and time.monotonic() - t_open < 10:
                for sk in socks:
                    try:
                        sk.send(b"X-a: b\r\n" if socks.index(sk) < 5 else b" ")
                    except OSError:
                        pass
        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        status, took = _timed_chat(s.port)
        assert status == 200 and took <= 2 * usual + 1.0, (took, usual)
        got = []
        for sk in socks:                                # every one closed by the server within the deadline
            data, closed = b"", True
            sk.settimeout(max(0.1, t_open + 3 + 3 - time.monotonic()))
            try:
                while chunk := sk.recv(65536):
                    data += chunk
            except TimeoutError:
                closed = False
            except OSError:                             # reset: the server closed it while bytes came in
                pass
            got.append((data.split(b"\r\n", 1)[0], closed, time.monotonic() - t_open))
        stop.set()
        t.join(5)
        assert all(g[1] for g in got), [g for g in got if not g[1]]     # every one closed by the server
        codes = [g[0] for g in got]
        assert codes[:5] == [b""] * 5, codes[:5]                          # a head that never ends: closed
        assert codes[5:10] == [b"HTTP/1.1 408 Request Timeout"] * 5, codes[5:10]
        assert codes[10:] == [b"HTTP/1.1 429 Too Many Requests"] * 40, set(codes[10:])
        assert max(g[2] for g in got) < 3 + 2.5, got
        assert _timed_chat(s.port)[0] == 200                              # and it keeps answering
    finally:
        for sk in socks:
            sk.close()
        s.stop()


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
def test_llamacpp_parallel_slots_answer_as_one_at_a_time(tmp_path_factory, reference):
    """Four concurrent requests on --parallel 4 (one batched llama_decode per step over four sequences) give the
    answers each gives alone."""
    from edgemm.export.gguf import export_gguf
    d = tmp_path_factory.mktemp("g") / "tiny-f32"
    export_gguf(model="tiny-shapes", out=d, precision={"vision": "f32", "decoder": "f32"}, log=None)
    s = Server("--bundle", str(d), "--parallel", "4")
    try:
        c = s.client()
        qs = ["What color is the circle?", "How many shapes are there?", "Where is the red square?",
              "What shape is at the top left?"]
        alone = [c.chat.completions.create(model="tiny-f32", messages=[_msg(q, _img_url())], temperature=0,
                                           max_tokens=12).choices[0].message.content for q in qs]
        assert alone[0] == reference["circle"]
        got = [None] * 4

        def ask(i):
            got[i] = c.chat.completions.create(model="tiny-f32", messages=[_msg(qs[i], _img_url())], temperature=0,
                                               max_tokens=12).choices[0].message.content
        ts = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert got == alone
    finally:
        s.stop()


@pytest.mark.slow
def test_soak_300_requests_with_cancellations(reference):
    """300 image requests from 4 concurrent clients, every 7th cancelled mid-stream: no 5xx, every completed
    answer right, and the server's RssAnon after the run within 5% of after the first 50 requests."""
    import openai
    s = Server("--parallel", "4", "--max-queue", "8")
    try:
        url = _img_url()
        c = s.client()
        lock = threading.Lock()
        done = {"n": 0, "bad": [], "errors": [], "rss50": None}
        t_end = time.time() + 900

        def worker(k):
            for i in range(k, 300, 4):
                if time.time() > t_end:
                    return
                try:
                    if i % 7 == 3:
                        st = c.chat.completions.create(model="tiny-shapes", messages=[_msg("What color is the circle?", url)],
                                                       temperature=0, max_tokens=16, stream=True)
                        next(iter(st))
                        st.close()
                    else:
                        a = c.chat.completions.create(model="tiny-shapes", messages=[_msg("What color is the circle?", url)],
                                                      temperature=0, max_tokens=16).choices[0].message.content
                        if a != reference["circle"]:
                            with lock:
                                done["bad"].append(a)
                except openai.APIStatusError as e:
                    with lock:
                        done["errors"].append(e.status_code)
                with lock:
                    done["n"] += 1
                    if done["n"] == 50:
                        done["rss50"] = s.rss_anon_kb()
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(960)
        assert done["n"] == 300 and not done["bad"]
        assert not [e for e in done["errors"] if e >= 500], done["errors"]
        assert s.rss_anon_kb() <= 1.05 * done["rss50"], (s.rss_anon_kb(), done["rss50"])
    finally:
        s.stop()


def test_reuse_point_whole_segments_then_tokens():
    from edgemm.serve.engine import reuse_point
    img, t = ("image", "abc"), (lambda *ids: ("text", tuple(ids)))
    held = [(t(1, 2), 2, 2), (img, 13, 3), (t(5, 6, 7), 16, 6), (("gen", (8, 9)), 18, 8)]
    # the next turn: the same lead, its last text segment = the old one + the answer + a new question
    assert reuse_point(held, [t(1, 2), img, t(5, 6, 7, 8, 9, 2, 4)]) == (2, 5, 18, 8)
    assert reuse_point(held, [t(1, 2), img, t(5, 6, 7, 8, 9, 2, 4)], tokens=False) == (2, 0, 13, 3)
    assert reuse_point(held, [t(1, 2), img, t(5, 6, 7)]) == (2, 2, 15, 5)      # the same prompt: one row runs
    assert reuse_point(held, [t(1, 2), img, t(5, 3)]) == (2, 1, 14, 4)         # diverges inside the segment
    assert reuse_point(held, [t(1, 2), ("image", "other"), t(5, 6)]) == (1, 0, 2, 2)   # another image
    assert reuse_point(held, [t(1, 9), img]) == (0, 1, 1, 1)                   # inside the first segment
    assert reuse_point([], [t(1, 2)]) == (0, 0, 0, 0)


@requires_demo
def test_engine_multi_turn_prefills_only_the_new_message():
    """A second turn (the first turn's question, image and answer sent back, then a new question) reuses the
    cache through the previous answer, and answers as an engine with nothing cached."""
    from edgemm.tilings import preprocess_image
    from edgemm.generation import GenerationConfig
    from edgemm.processor import load_image
    from edgemm.runtimes import load_backend
    from edgemm.serve.engine import Engine, Job
    from edgemm.serve.prompt import build_segments
    b = load_backend("torch", model="tiny-shapes", device="cpu", threads=1)
    pixels = [preprocess_image(load_image(str(EXAMPLE)), b.cfg.vision)]

    def ask(engine, messages):
        segs, _ = build_segments(b.tokenizer, None, messages, 1)
        done, out = threading.Event(), []

        def on_event(kind, data):
            if kind == "text":
                out.append(data)
            elif kind in ("done", "error"):
                out.append((kind, data))
                done.set()
        engine.submit(Job(segments=segs, pixels=pixels, gen=GenerationConfig(max_new_tokens=16), on_event=on_event,
                          prompt_rows=sum(len(d) if k == "text" else b.cfg.n_image_rows for k, d in segs)))
        assert done.wait(60) and out[-1][0] == "done", out
        return "".join(x for x in out if isinstance(x, str)).strip(), out[-1][1]
    e, fresh = Engine(b, parallel=1), Engine(b, parallel=1)
    try:
        turn1 = [_msg("How many shapes are there?", "data:")]
        a1, u1 = ask(e, turn1)
        turn2 = turn1 + [{"role": "assistant", "content": a1}, _msg("What color is the circle?")]
        before = e.prefill_rows_saved
        a2, u2 = ask(e, turn2)
        saved = e.prefill_rows_saved - before
        # everything up to the answer's last fed token (its final token was sampled, never fed), less the
        # couple of tokens where the client's copy of the answer is closed differently
        assert saved >= u1["prompt_tokens"] + u1["completion_tokens"] - 3, (saved, u1, u2)
        assert u2["prompt_tokens"] - saved <= len(b.tokenizer.user_turn("What color is the circle?", first=False)) + 3
        assert ask(fresh, turn2)[0] == a2                              # nothing cached: the same answer
    finally:
        e.close()
        fresh.close()


def test_streamed_events_coalesce_into_one_write_with_the_same_text():
    """Events the engine sends while the event loop is busy go out as one SSE write, consecutive texts merged into
    one chunk (issue 34: a server that costs nothing per token); the client reads the same text, usage last."""
    import asyncio
    from edgemm.serve.routes_chat import Answer, Events, events

    class FakeJob:
        prompt_rows = 3

        def cancel(self):
            self.cancelled = True

    async def run(delay_between: bool):
        q, job = Events(asyncio.get_running_loop()), FakeJob()
        a = Answer("m", job, q, "id", 0)
        pieces = [" re", "d", " squ", "are"]

        def worker():                                       # the engine thread
            for i, p in enumerate(pieces):
                q.put("text", p, i + 1)
                while delay_between and q.items:            # the loop took it before the next token
                    time.sleep(0.001)
            q.put("done", {"finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 4}, 4)
        t = threading.Thread(target=worker)
        writes = []
        if not delay_between:                               # everything queued before the loop reads
            t.start()
            t.join()
            async for w in events(a, True, True):
                writes.append(w)
        else:
            t.start()
            async for w in events(a, True, True):
                writes.append(w)
            t.join()
        assert job.cancelled
        return writes

    def parse(writes):
        chunks = [json.loads(x[len("data: "):]) for w in writes for x in w.split("\n\n") if x.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        return chunks, text
    batched = asyncio.run(run(False))
    spread = asyncio.run(run(True))
    (cb, tb), (cs, ts) = parse(batched), parse(spread)
    assert tb == ts == "red square"
    assert len(batched) == 3 and batched[-1] == "data: [DONE]\n\n"          # role chunk, one batch, [DONE]
    content = [c for c in cb if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == 1 and content[0]["usage"]["completion_tokens"] == 4
    assert cb[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert cb[-2]["choices"][0]["finish_reason"] == "length"
    assert len([c for c in cs if c["choices"] and c["choices"][0]["delta"].get("content")]) == 4   # one a token


def test_stream_interval_sends_the_tokens_of_an_interval_as_one_chunk():
    """serve --stream-interval: tokens decoded within an interval of the last write go out together, the first at
    once and the end without waiting out the interval; the text is the same."""
    import asyncio
    from edgemm.serve.routes_chat import Answer, Events, events

    class FakeJob:
        prompt_rows = 1

        def cancel(self):
            pass

    async def run(interval):
        import types
        q = Events(asyncio.get_running_loop())
        a = Answer("m", FakeJob(), q, "id", 0)
        real = q.loop.call_soon_threadsafe
        q.loop = types.SimpleNamespace(call_soon_threadsafe=lambda *x: (wakes.append(1), real(*x)))

        def worker():
            q.put("text", " t0", 1)
            while q.items:                                   # the first token was taken (and written at once)
                time.sleep(0.001)
            for i in range(1, 40):
                q.put("text", f" t{i}", i + 1)
                time.sleep(0.001)
            q.put("done", {"finish_reason": "length", "prompt_tokens": 1, "completion_tokens": 40}, 40)
        t = threading.Thread(target=worker)
        t.start()
        chunks, t0 = [], time.perf_counter()
        async for w in events(a, False, False, interval):
            chunks += [json.loads(x[6:]) for x in w.split("\n\n") if x.startswith("data: {")]
        t.join()
        return [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and
                c["choices"][0]["delta"].get("content")], time.perf_counter() - t0
    wakes = []
    texts, took = asyncio.run(run(30.0))
    assert texts == ["t0", "".join(f" t{i}" for i in range(1, 40))]     # the first at once, the rest with the end
    assert took < 25                                                      # (the end did not wait out the interval)
    assert len(wakes) <= 3, len(wakes)      # the loop woken for t0, the next batch's first token and the end only


def test_serve_cli_passes_the_stream_interval(monkeypatch):
    """edgemm serve --stream-interval MS reaches the app's Limits in seconds (default 0: a chunk a token)."""
    from click.testing import CliRunner
    import edgemm.serve as serve_mod
    from edgemm.cli import main
    got = []
    from edgemm.serve.api import Limits
    monkeypatch.setattr(serve_mod, "serve", lambda *a, **k: got.append(next(x for x in a if isinstance(x, Limits))))
    for args, want in (([], 0.0), (["--stream-interval", "20"], 0.02), (["--stream-interval", "5"], 0.005)):
        r = CliRunner().invoke(main, ["serve", "--model", "tiny-shapes"] + args)
        assert r.exit_code == 0, r.output
        assert got[-1].stream_interval == pytest.approx(want)
    r = CliRunner().invoke(main, ["serve", "--model", "tiny-shapes", "--stream-interval", "-1"])
    assert r.exit_code == 2
