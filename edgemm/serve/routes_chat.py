"""POST /v1/chat/completions: a request checked and turned into a job for a model's engine (edgemm.serve.engine),
its answer streamed as server-sent events or returned whole, in OpenAI's shapes."""
# (no `from __future__ import annotations`: FastAPI reads the routes' `Request` annotations as objects)
import asyncio
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass

from .. import tilings
from ..errors import EdgemmError
from ..generation import GenerationConfig
from .api import APIError, Limits, error_body, pick_model, read_json
from .images import decode_image, fetch_image
from .prompt import build_segments, normalize_messages
from .videos import Clips, videos_of


def _number(name: str, v) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise APIError(400, f"{name} must be a number")         # (NaN and Infinity, which JSON readers take, too)
    return float(v)


def _max_tokens(body: dict, limits: Limits) -> int:
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is None:
        mt = min(limits.max_tokens, 128)
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        raise APIError(400, "max_tokens must be a positive integer")
    if mt > limits.max_tokens:
        raise APIError(400, f"max_tokens {mt} is over this server's cap of {limits.max_tokens}")
    return mt


def _stop(body: dict) -> tuple:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a string or a list of at most 4 strings")
    return tuple(stop)


def gen_config(body: dict, limits: Limits) -> GenerationConfig:
    """The request's sampling settings, checked (400 for a bad one)."""
    mt, stop = _max_tokens(body, limits), _stop(body)
    t, p = _number("temperature", body.get("temperature", 1.0)), _number("top_p", body.get("top_p", 1.0))
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise APIError(400, "seed must be a non-negative integer")
    if body.get("n", 1) != 1:
        raise APIError(400, "n must be 1")
    try:
        return GenerationConfig(max_new_tokens=mt, temperature=t, top_p=p, seed=seed, stop=stop,
                                ignore_eos=bool(body.get("ignore_eos", False)))
    except EdgemmError as e:
        raise APIError(400, str(e).replace("--", "")) from None


def prompt_of(m, body: dict, gen: GenerationConfig, limits: Limits, tools=None,
              clips: Clips | None = None) -> tuple[list, list, int]:
    """-> (segments, image urls, prompt rows), the context checked before any image is decoded or encoded."""
    b = m.backend
    clips = clips or Clips()
    try:
        segs, urls = build_segments(b.tokenizer, m.template, body.get("messages"), limits.images_per_request, tools,
                                    clips.texts)
    except EdgemmError as e:
        raise APIError(400, str(e)) from None
    rows = sum(len(d) if k == "text" else b.cfg.n_image_rows if d < len(urls) else clips.rows[d - len(urls)]
               for k, d in segs)                                # (clips: indexed after the images)
    if rows + gen.max_new_tokens > b.context_length:
        raise APIError(400, f"the prompt needs {rows} tokens (image rows included) plus max_tokens "
                            f"{gen.max_new_tokens}, over the model's context of {b.context_length}; shorten "
                            "the conversation or lower max_tokens", code="context_length_exceeded")
    return segs, urls, rows


async def pixels_of(urls: list, cfg, limits: Limits) -> list:
    """Each image fetched, decoded and preprocessed for the model (off the event loop)."""
    from ..tilings import preprocess_image
    pixels = []
    for u in urls:
        data = await asyncio.to_thread(fetch_image, u, limits)
        img = await asyncio.to_thread(decode_image, data, limits)
        pixels.append(preprocess_image(img, cfg.vision))
    return pixels


def instructions_of(b, messages) -> list | None:
    """InstructBLIP, LLaMA-VID: each image, then each clip, with the text of the message it comes in (None for other
    models); indexed as the job's pixels are (the images, then the clips' blocks)."""
    if not b.cfg.reads_question:
        return None
    from ..qformer import instruction
    msgs = normalize_messages(messages)
    return [instruction(b.tokenizer, b.cfg, m["text"]) for what in ("images", "videos") for m in msgs
            for _ in m.get(what, ())]


def include_usage(body: dict) -> bool:
    """stream_options.include_usage (checked before the job is queued)."""
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise APIError(400, "stream_options must be an object")
    return bool((so or {}).get("include_usage"))


def continuous_usage(body: dict) -> bool:
    """stream_options.continuous_usage_stats (vLLM's extension): the usage so far on every content chunk, so a
    client can tell how many tokens a chunk covers (a token whose bytes end inside a UTF-8 character adds no text:
    its text comes with a later chunk; benchmarks/bench_serve.py --arrivals counts gaps per token with it)."""
    return bool((body.get("stream_options") or {}).get("continuous_usage_stats"))


def usage_of(d: dict) -> dict:
    return {"prompt_tokens": d["prompt_tokens"], "completion_tokens": d["completion_tokens"],
            "total_tokens": d["prompt_tokens"] + d["completion_tokens"]}


class Events:
    """A request's events from the engine's worker thread to the event loop, handed over in batches: put() appends
    (kind, data, n_out) and wakes the loop only when nothing is waiting already (one call_soon_threadsafe, so one
    self-pipe write, per batch, not per token); take() returns all that came since the last take. When the loop
    falls behind the engine, the tokens that piled up go out as one chunk, in one write. While `quiet` (the stream
    waits out its interval), text does not wake the loop at all; the answer's end still does."""

    def __init__(self, loop):
        self.loop, self.items, self.lock, self.woken, self.quiet = loop, [], threading.Lock(), False, False
        self.ready = asyncio.Event()

    def put(self, kind, data, n_out) -> None:             # the worker thread
        with self.lock:
            self.items.append((kind, data, n_out))
            if self.woken or (self.quiet and kind == "text"):
                return
            self.woken = True
        self.loop.call_soon_threadsafe(self.ready.set)

    async def take(self, timeout: float | None = None) -> list:
        """All events since the last take (waits for one; [] after `timeout` seconds without any)."""
        if timeout is None:
            await self.ready.wait()
        else:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        return self.drain()

    def drain(self) -> list:
        """All events since the last take, without waiting."""
        with self.lock:
            self.ready.clear()
            self.woken = False
            out, self.items = self.items, []
        return out


def merged(events: list) -> list:
    """Consecutive text events as one (their texts joined, the last one's token count)."""
    out = []
    for kind, data, n in events:
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + data, n)
        else:
            out.append((kind, data, n))
    return out


@dataclass
class Answer:
    """One request's answer as it comes from the engine: events on `q` (Events), the job to cancel."""
    model: str
    job: object
    q: Events
    id: str
    created: int
    fmt: str | None = None           # the tool-call form the answer is parsed in (edgemm.tools)

    def chunk(self, delta, finish=None, usage=None) -> str:
        """delta None: a usage-only chunk (no choices)."""
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            c["usage"] = usage
        return f"data: {json.dumps(c)}\n\n"


async def submit(m, body: dict, limits: Limits) -> Answer:
    """The request checked, its images prepared, its job queued on the model's engine (503 when full)."""
    from .engine import Job, QueueFull
    from .structured import structured_of
    gen = gen_config(body, limits)
    b = m.backend
    st = await asyncio.to_thread(structured_of, body, b.tokenizer, m.template)    # response_format, tools
    gen.grammar, gen.trigger = st.grammar, st.trigger
    clips = await videos_of(b.cfg, body.get("messages"), limits)      # a clip's frame count sets its prompt
    segs, urls, rows = prompt_of(m, body, gen, limits, st.tools, clips)
    pixels = await pixels_of(urls, b.cfg, limits)
    tiles = tilings.of(b.cfg.vision)
    if tiles is not None:               # tiled: each image's own row count (prompt_of counted the most one takes)
        rows += sum(tiles.pixel_rows(b.cfg, p) - b.cfg.n_image_rows for p in pixels)
    pixels += clips.blocks                   # (indexed after the images)
    q = Events(asyncio.get_running_loop())
    job = Job(segments=segs, pixels=pixels, gen=gen, prompt_rows=rows,
              instructions=instructions_of(b, body.get("messages")),
              on_event=lambda kind, data: q.put(kind, data, job.n_out))
    try:
        m.engine.submit(job)
    except QueueFull:
        raise APIError(503, "the server is busy (all slots and the queue are full); retry shortly",
                       "server_error", "queue_full", headers={"Retry-After": "1"}) from None
    return Answer(m.id, job, q, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), st.fmt)


async def events(a: Answer, include_usage: bool, continuous: bool = False, interval: float = 0.0):
    """The answer as server-sent events; a client that disconnects frees its slot. interval (Limits.stream_interval):
    after a write, the next waits until `interval` seconds have passed (the answer's end at once), so the tokens
    decoded meanwhile go out as one chunk: fewer writes, and fewer chunks for the client to parse, per token."""
    from ..tools import ToolStream
    from .structured import call_deltas
    lead = True                      # the answer's leading space (" red"), stripped as when whole
    tools, calls = (ToolStream(a.fmt) if a.fmt else None), 0   # tool calls, streamed as OpenAI does (calls: opened)
    try:
        yield a.chunk({"role": "assistant", "content": ""})
        end, loop, sent = False, asyncio.get_running_loop(), float("-inf")
        while not end:
            evs = await a.q.take()
            wait = sent + interval - loop.time()
            if wait > 0 and all(k == "text" for k, _, _ in evs):     # (the first text, and the end, at once)
                a.q.quiet = True                  # the interval's tokens wait without waking the loop
                try:
                    evs += await a.q.take(timeout=wait)               # (returns early for the answer's end)
                finally:
                    a.q.quiet = False
                evs += a.q.drain()
            out = []                              # the chunks of one batch of events: one write
            for kind, data, n_out in merged(evs):   # (n_out: the answer's tokens at that event)
                if kind in ("text", "done") and tools is not None:
                    evs = tools.feed(data) if kind == "text" else tools.finish()
                else:
                    evs = [("content", data)] if kind == "text" else []
                for k, d in evs:
                    if k in ("call", "call_name", "call_args"):
                        out += [a.chunk(delta) for delta in call_deltas(calls, k, d)]
                        calls += k != "call_args"
                        continue
                    if lead:
                        d = d.lstrip()
                        lead = not d
                    if d:
                        out.append(a.chunk({"content": d}, usage=usage_of({
                            "prompt_tokens": a.job.prompt_rows, "completion_tokens": n_out}) if continuous else None))
                if kind == "error":
                    out.append(f"data: {json.dumps(error_body(data, 'server_error', None))}\n\n")
                    end = True
                    break
                if kind == "done":
                    out.append(a.chunk({}, "tool_calls" if calls and data["finish_reason"] == "stop"
                                       else data["finish_reason"]))
                    if include_usage:
                        out.append(a.chunk(None, usage=usage_of(data)))
                    end = True
                    break
            if out:
                yield "".join(out)
                sent = loop.time()
        yield "data: [DONE]\n\n"
    finally:
        a.job.cancel()


async def whole(a: Answer, request) -> dict | None:
    """The answer in one response (None when the client went away first)."""
    parts = []
    try:
        kind = None
        while kind not in ("done", "error"):
            evs = await a.q.take(timeout=0.5)
            if not evs and await request.is_disconnected():
                return None
            for kind, data, _ in evs:
                if kind == "text":
                    parts.append(data)
                elif kind == "error":
                    raise APIError(500, data, "server_error")
                else:
                    break
    finally:
        a.job.cancel()
    msg, finish = {"role": "assistant", "content": "".join(parts).strip()}, data["finish_reason"]
    if a.fmt:                                   # tool calls, parsed in the model's form (edgemm.tools)
        from ..tools import openai_call, parse_calls
        content, calls = parse_calls(a.fmt, msg["content"])
        if calls:
            msg = {"role": "assistant", "content": content or None, "tool_calls": [openai_call(c) for c in calls]}
            finish = "tool_calls" if finish == "stop" else finish
    return {"id": a.id, "object": "chat.completion", "created": a.created, "model": a.model,
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": usage_of(data)}


def install_chat_route(app) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse
    state = app.state

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request, state.limits)
        usage = include_usage(body)
        a = await submit(pick_model(state, body.get("model")), body, state.limits)
        if body.get("stream"):
            state.metrics.request(200)
            return StreamingResponse(events(a, usage, continuous_usage(body), state.limits.stream_interval),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out = await whole(a, request)
        if out is None:
            return JSONResponse({}, status_code=499)
        state.metrics.request(200)
        return out
