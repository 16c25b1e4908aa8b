#!/usr/bin/env python
"""Load test of `edgemm serve` with the official openai client (issue 15; not a test).

    python benchmarks/bench_serve.py --bundle out/q4km --parallel 4            # starts the server itself
    python benchmarks/bench_serve.py --url http://127.0.0.1:8080 --model q4km  # a server already running

N concurrent clients (N = --clients, default 1,2,4) send streamed chat requests for --seconds each level, half
with the example image and half text-only, each asking for --max-tokens tokens with ignore_eos (so every
request decodes the same number of tokens). Printed per N: requests/s, aggregate decode tokens/s (completion
tokens / wall time), TTFT p50/p95, per-token latency p50/p95 (gaps between streamed chunks), and the server's
peak RSS (VmHWM, when this script started it). --rounds R repeats the levels interleaved (1,2,4,1,2,4,...) and
compares their medians, so a machine shared with other work loads every level alike.

--turns T: multi-turn conversations instead (the image on the first turn, a new question each turn, the answers
sent back as the history), against two servers started here: one reusing its prompt cache token by token (the
default) and one reusing whole segments only (EDGEMM_PROMPT_REUSE=segments), conversations alternating between
them --rounds times. Printed: the TTFT of each turn on both and the prompt tokens it carries.

--arrivals S: prefill that does not stall decoding (issue 31). 3 streams decode --max-tokens tokens each while a new
image request (4 tokens; each a different image, so none is served from the prompt cache) arrives every S seconds,
against three servers started here: one prefilling a newcomer's whole prompt before the next decode step
(--prefill-chunk 0 --side-threads 0), one in pieces between the streams' steps (sized by measured time, at most
--prefill-chunk rows: default the server's), the image encode one piece among them (--side-threads 0), and one with
its side worker (--side-threads, default the server's: the encode beside the decode loop, and on torch / ort the
prefill's pieces on that thread, one between two steps); each round measures every server without arrivals, then
with them (servers alternating).
Printed: the median gap between the streams' tokens without arrivals, their p50 / p95 / max gap with arrivals,
and p95 over the median without (issue 31's acceptance: within 2x). Gaps count from when all 3 streams have
their first token until the first finishes; the newcomers still running then are closed (cancelled). Gaps are per
token: a chunk covering m tokens (text held back until a UTF-8 character completes) is m gaps of its gap / m.
--trace: each server writes its loop turns (EDGEMM_ENGINE_TRACE: admission, loop prefill piece and its rows,
decode_batch, live streams, side-worker prefills / encodes running, rows the side worker prefilled since) and the turns in the arrival windows longer than 2x the calm median
gap are broken down: what makes the worst gaps, measured.

--vs-raw: one client's decode speed through the server against the backend's own decode loop on the same bundle
(issue 34: a server that costs nothing per token). Rounds alternate: --requests streamed text requests
(--max-tokens tokens, greedy, ignore_eos) to the server, whose rate is (completion tokens - 1) / (last chunk - first
chunk) per request, to two servers (--stream-interval 20 ms and the default 0: a chunk per token, alternating);
then a fresh process opens the backend with the same --threads and runs the same prompt and --max-tokens greedy
steps --requests times (tokens after the first / their time), its cache sized as serve sizes a slot (prompt +
--max-tokens, rounded up: edgemm.memory.kv_rows). Printed: the medians and server / raw.
"""
from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def start_server(args, env: dict | None = None, extra=()) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from edgemm.cli import main; main()", "serve", "--port", str(port),
           "--parallel", str(args.parallel), "--max-queue", "64", "--max-tokens", str(max(512, args.max_tokens))]
    cmd += ["--bundle", args.bundle] if args.bundle else ["--model", args.model_path]
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += list(extra)
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return p, url
        except OSError:
            time.sleep(0.5)
    os.killpg(p.pid, signal.SIGTERM)
    raise SystemExit("the server did not become healthy")


def stop_servers(servers: dict) -> None:
    for p, _ in servers.values():
        os.killpg(p.pid, signal.SIGTERM)
    for p, _ in servers.values():            # (a server still draining after a minute is killed)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def client_for(url):
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("EDGEMM_API_KEY", "none"), max_retries=0,
                         timeout=300)


def stream_chat(c, model, messages, max_tokens) -> tuple[float | None, list, str, object]:
    """One streamed greedy request (ignore_eos) -> (TTFT s, gaps between chunks s, text, usage)."""
    t0 = time.perf_counter()
    last, ttft, gaps, text, usage = None, None, [], [], None
    for ch in c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                        stream=True, stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True}):
        now = time.perf_counter()
        if ch.choices and ch.choices[0].delta.content:
            if ttft is None:
                ttft = now - t0
            elif last is not None:
                gaps.append(now - last)
            last = now
            text.append(ch.choices[0].delta.content)
        if ch.usage:
            usage = ch.usage
    return ttft, gaps, "".join(text), usage


def run_level(url, model, n, seconds, max_tokens, image_url):
    import openai
    c = client_for(url)
    stats = {"ttft": [], "gaps": [], "tokens": 0, "requests": 0, "errors": 0}
    lock = threading.Lock()
    t_stop = time.perf_counter() + seconds

    def client(k):
        i = 0
        while time.perf_counter() < t_stop:
            content = [{"type": "text", "text": "What color is the circle?"}]
            if (i + k) % 2 == 0:
                content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
            i += 1
            try:
                ttft, gaps, _, usage = stream_chat(c, model, [{"role": "user", "content": content}], max_tokens)
                ntok = usage.completion_tokens if usage else 0
            except openai.APIError:
                with lock:
                    stats["errors"] += 1
                continue
            with lock:
                stats["requests"] += 1
                stats["tokens"] += ntok
                if ttft is not None:
                    stats["ttft"].append(ttft)
                stats["gaps"] += gaps
    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    q = lambda xs, p: 1e3 * float(np.quantile(xs, p)) if xs else float("nan")   # noqa: E731
    return {"clients": n, "requests_per_s": stats["requests"] / wall, "decode_tok_s": stats["tokens"] / wall,
            "ttft_p50_ms": q(stats["ttft"], 0.5), "ttft_p95_ms": q(stats["ttft"], 0.95),
            "token_p50_ms": q(stats["gaps"], 0.5), "token_p95_ms": q(stats["gaps"], 0.95),
            "requests": stats["requests"], "errors": stats["errors"]}


QUESTIONS = ["How many shapes are there?", "What color is the circle?", "Is there a square?",
             "What shape is red?", "How many circles are there?", "Is there a triangle?"]


def conversation(url, model, turns, max_tokens, image_url) -> list[tuple[float, int]]:
    """One conversation of `turns` turns -> [(TTFT s, prompt tokens)] per turn."""
    c = client_for(url)
    msgs, out = [], []
    for t in range(turns):
        content = [{"type": "text", "text": QUESTIONS[t % len(QUESTIONS)]}]
        if t == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
        msgs.append({"role": "user", "content": content})
        ttft, _, text, usage = stream_chat(c, model, msgs, max_tokens)
        msgs.append({"role": "assistant", "content": text})
        out.append((ttft, usage.prompt_tokens))
    return out


def turns_only(a) -> int:
    """--turns: token-level against whole-segment prompt reuse, conversations alternating between two servers."""
    image_url = "data:image/png;base64," + base64.b64encode((ROOT / "examples" / "shapes.png").read_bytes()).decode()
    servers = {m: start_server(a, {"EDGEMM_PROMPT_REUSE": m}) for m in ("tokens", "segments")}
    try:
        model = a.model or client_for(servers["tokens"][1]).models.list().data[0].id
        runs = {m: [] for m in servers}
        for r in range(a.rounds):
            for m in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                runs[m].append(conversation(servers[m][1], model, a.turns, a.max_tokens, image_url))
        print(f"{model}: {a.turns}-turn conversations, {a.max_tokens} tokens per answer (ignore_eos), "
              f"median TTFT of {a.rounds} rounds; prompt reuse token by token vs whole segments")
        print(f"{'turn':>4} {'prompt tokens':>13} {'TTFT tokens':>12} {'TTFT segments':>14} {'ratio':>6}")
        for t in range(a.turns):
            tok, seg = (float(np.median([c[t][0] for c in runs[m]])) for m in ("tokens", "segments"))
            print(f"{t + 1:>4} {runs['tokens'][0][t][1]:>13} {tok * 1e3:>10.0f}ms {seg * 1e3:>12.0f}ms "
                  f"{seg / tok:>5.2f}x")
    finally:
        stop_servers(servers)
    return 0


def image_variant(n: int) -> str:
    """The example image with pixel (0, 0) set from n: a data URL whose rows no server has cached (a newcomer's
    image is encoded and prefilled, not taken from the prompt cache)."""
    import io
    from PIL import Image
    img = Image.open(ROOT / "examples" / "shapes.png").convert("RGB")
    img.putpixel((0, 0), (n % 256, n // 256 % 256, 7))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


ARRIVALS = iter(range(1 << 30))         # the newcomers' image variants, never the same twice in a run


def gaps_with_arrivals(url, model, every, max_tokens) -> list[float]:
    """3 streams (text, greedy, ignore_eos) and, once all have their first token, a new image request (an image
    not seen before) every `every` seconds (0: none) until the first stream ends -> the streams' gaps between
    tokens in that window (s). A chunk covering m tokens (those whose bytes end inside a UTF-8 character add no text:
    bench-0.5b's byte tokens often do, and the server sends their text with a later token's) counts as m gaps of
    its gap / m (the server's stream_options.continuous_usage_stats says m), so text held back is not read as a
    stall; the first chunk read after the wait for the other streams' first tokens starts the count."""
    c = client_for(url)
    first, stop, lock = threading.Barrier(4), threading.Event(), threading.Lock()
    gaps, opened = [], []

    def stream(k):
        last, started, n = None, False, 0
        s = c.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True},
                                      stream_options={"continuous_usage_stats": True},
                                      messages=[{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}])
        for ch in s:
            if not (ch.choices and ch.choices[0].delta.content):
                continue
            now = time.perf_counter()
            m = ch.usage.completion_tokens - n if ch.usage else 1      # the tokens this chunk covers
            n += m
            if not started:
                started = True
                first.wait()
                continue            # (last stays None: the wait for the others is no gap)
            if last is not None and not stop.is_set():
                with lock:
                    gaps.extend([(now - last) / max(m, 1)] * max(m, 1))
            last = now
        stop.set()

    def newcomer(image_url):
        try:
            s = c.chat.completions.create(model=model, max_tokens=4, temperature=0, stream=True, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": "What color is the circle?"}]}])
            with lock:
                opened.append(s)
            for _ in s:
                if stop.is_set():
                    break
        except Exception:       # closed from the main thread at the end
            pass

    ts = [threading.Thread(target=stream, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    first.wait()
    extra = []
    while every and not stop.wait(every):
        extra.append(threading.Thread(target=newcomer, args=(image_variant(next(ARRIVALS)),), daemon=True))
        extra[-1].start()
    for t in ts:
        t.join()
    with lock:
        for s in opened:
            try:
                s.response.close()
            except Exception:
                pass
    return gaps


def arrivals_only(a) -> int:
    """--arrivals: the running streams' token gaps with newcomers arriving, unchunked vs chunked prefill."""
    side = [] if a.side_threads is None else ["--side-threads", str(a.side_threads)]
    chunk, c = ([], "auto") if a.prefill_chunk is None else (["--prefill-chunk", str(a.prefill_chunk)], a.prefill_chunk)
    names = {"unchunked": ["--prefill-chunk", "0", "--side-threads", "0"],
             f"chunk {c}": chunk + ["--side-threads", "0"],
             f"{c}+side": chunk + side}
    if a.servers:                   # --servers unchunked,chunk,side: a subset
        keep = [k for k, n in zip(names, ("unchunked", "chunk", "side")) if n in a.servers.split(",")]
        names = {k: names[k] for k in keep}
    traces = {m: Path(tempfile.mkdtemp(prefix="edgemm-trace-")) / "engine.jsonl" for m in names} if a.trace else {}
    servers = {m: start_server(a, extra=x, env={"EDGEMM_ENGINE_TRACE": str(traces[m])} if a.trace else None)
               for m, x in names.items()}
    try:
        model = a.model or client_for(next(iter(servers.values()))[1]).models.list().data[0].id
        calm, busy, windows = {m: [] for m in servers}, {m: [] for m in servers}, {m: [] for m in servers}
        for r in range(a.rounds):
            for m in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                calm[m] += gaps_with_arrivals(servers[m][1], model, 0, a.max_tokens)
                t0 = time.perf_counter()
                busy[m] += gaps_with_arrivals(servers[m][1], model, a.arrivals, a.max_tokens)
                windows[m].append((t0, time.perf_counter()))
        print(f"{model}: 3 streams of {a.max_tokens} tokens, a new image request every {a.arrivals:g} s; gaps "
              f"between the streams' tokens over {a.rounds} round(s), servers alternating (load average "
              f"{os.getloadavg()[0]:.1f})")
        print(f"{'prefill':>10} {'calm p50':>9} {'busy p50':>9} {'busy p95':>9} {'busy max':>9} {'p95/calm':>9} "
              f"{'gaps':>5}")
        for m in servers:
            med = float(np.median(calm[m]))
            p50, p95, mx = (float(np.quantile(busy[m], q)) for q in (0.5, 0.95, 1.0))
            print(f"{m:>10} {med * 1e3:>7.0f}ms {p50 * 1e3:>7.0f}ms {p95 * 1e3:>7.0f}ms {mx * 1e3:>7.0f}ms "
                  f"{p95 / med:>8.2f}x {len(busy[m]):>5}")
        for m in traces:
            print_trace(m, traces[m], windows[m], 2 * float(np.median(calm[m])))
    finally:
        stop_servers(servers)
    return 0


def print_trace(name: str, path: Path, windows: list, bound: float) -> None:
    """--trace: the engine's loop turns (EDGEMM_ENGINE_TRACE) in the windows with arrivals: a turn's period (start
    to the next turn's start) is the gap the decoding streams see; for the turns over `bound` (2x the calm median
    gap), where their time went."""
    import json
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    turns = []
    for a_, b_ in zip(rows, rows[1:]):
        if any(lo <= a_["t"] and b_["t"] <= hi for lo, hi in windows):
            turns.append({**a_, "period": b_["t"] - a_["t"]})
    if not turns:
        print(f"  trace {name}: no turns in the arrival windows")
        return
    per = np.array([t["period"] for t in turns])
    slow = [t for t in turns if t["period"] > bound]
    print(f"  trace {name}: {len(turns)} loop turns with arrivals, period p50 {np.median(per) * 1e3:.0f} ms, p95 "
          f"{np.quantile(per, 0.95) * 1e3:.0f} ms; {len(slow)} over 2x the calm median ({bound * 1e3:.0f} ms)")
    for label, group in (("over", slow), ("the rest", [t for t in turns if t["period"] <= bound])):
        if not group:
            continue
        mean = {k: float(np.mean([t[k] for t in group])) * 1e3 for k in ("period", "admit", "prefill", "decode")}
        rows = [t.get("rows", 0) for t in group if t.get("rows")]
        side_rows = [t.get("side_rows", 0) for t in group if t.get("side_rows")]
        other = mean["period"] - mean["admit"] - mean["prefill"] - mean["decode"]
        share = lambda f: sum(1 for t in group if f(t)) / len(group)     # noqa: E731
        print(f"    {label:>8}: mean period {mean['period']:.0f} ms = admission {mean['admit']:.0f} + loop prefill "
              f"piece {mean['prefill']:.0f} + decode_batch {mean['decode']:.0f} + other {other:.0f} ms; "
              f"{share(lambda t: t['live'] >= 4):.0%} step 4 streams, {share(lambda t: t['side_prefill']):.0%} "
              f"beside a side prefill, {share(lambda t: t['side_encode']):.0%} beside a side encode, "
              f"{share(lambda t: t['admitted']):.0%} admitted a request; loop pieces of "
              f"{np.median(rows) if rows else 0:.0f} rows (median), side rows per step {np.median(side_rows) if side_rows else 0:.0f}")


def decode_batch_only(a) -> int:
    from edgemm.runtimes import load_backend
    b = load_backend(a.backend or "auto", bundle=a.bundle, model=None if a.bundle else a.model_path,
                     threads=a.threads, slots=4)
    sts = [b.new_state(max_len=512) for _ in range(4)]
    for st in sts:
        b.text(st, [b.tokenizer.bos_id, 5, 6, 7])
    base, levels = None, (1, 2, 4)
    batched = getattr(b, "pooled", lambda st: b.name == "llamacpp")(sts[0])
    how = "one batched run" if batched else "one run per sequence"
    print(f"{b.describe()}: decode_batch, one token per sequence per step ({how}; median of 5 interleaved rounds "
          "x 10 steps)")
    per = {n: [] for n in levels}
    for n in levels:
        b.decode_batch(sts[:n], [5] * n)               # warm-up (and the bindings)
    for _ in range(5):
        for n in levels:
            t = time.perf_counter()
            for _ in range(10):
                b.decode_batch(sts[:n], [5] * n)
            per[n].append((time.perf_counter() - t) / 10)
    for n in levels:
        dt = float(np.median(per[n]))
        base = base or n / dt
        print(f"  {n} sequence(s): {dt * 1e3:6.1f} ms/step, {n / dt:6.1f} tok/s aggregate ({n / dt / base:.2f}x)")
    return 0


RAW_LOOP = """
import json, sys, time
import numpy as np
from edgemm.runtimes import load_backend
bundle, backend, threads, steps, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
b = load_backend(backend, bundle=bundle, threads=threads)
ids = b.tokenizer.user_turn(sys.argv[6], first=True)
from edgemm.memory import kv_rows
prompt = b.tokenizer.prefix_ids() + ids
rates, st = [], b.new_state(max_len=kv_rows(len(prompt) + steps + 1, b.context_length))   # as serve sizes a slot
for _ in range(n + 1):                                # the first one warms up
    st.length = st.pos = 0
    t = int(np.argmax(b.text(st, prompt)))
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        t = int(np.argmax(b.text(st, [t])))
    rates.append((steps - 1) / (time.perf_counter() - t0))
print(json.dumps(rates[1:]))
"""


def server_rates(url, model, n, max_tokens) -> list[float]:
    """n streamed text requests one after another -> decode tok/s of each: the tokens between the first and the
    last content chunk (their counts from stream_options.continuous_usage_stats) over the time between them."""
    c = client_for(url)
    out = []
    for _ in range(n):
        first = last = None
        for ch in c.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"continuous_usage_stats": True},
                                            extra_body={"ignore_eos": True},
                                            messages=[{"role": "user", "content": QUESTIONS[1]}]):
            now = time.perf_counter()
            if ch.choices and ch.choices[0].delta.content and ch.usage:
                first = first or (now, ch.usage.completion_tokens)
                last = (now, ch.usage.completion_tokens)
        if first is not None and last[0] > first[0]:
            out.append((last[1] - first[1]) / (last[0] - first[0]))
    return out


def vs_raw_only(a) -> int:
    """--vs-raw: one client through the server(s) against the backend's own loop in a fresh process, alternating."""
    import json
    import subprocess
    envs = {"--stream-interval 20": ["--stream-interval", "20"], "--stream-interval 0 (default)": []}
    servers = {k: start_server(a, extra=x) for k, x in envs.items()}
    try:
        model = a.model or client_for(next(iter(servers.values()))[1]).models.list().data[0].id
        backend = a.backend or "auto"
        runs = {**{k: [] for k in servers}, "raw": []}
        for r in range(a.rounds):
            for k in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                runs[k] += server_rates(servers[k][1], model, a.requests, a.max_tokens)
            out = subprocess.run([sys.executable, "-c", RAW_LOOP, a.bundle, backend, str(a.threads or 0),
                                  str(a.max_tokens), str(a.requests), QUESTIONS[1]], capture_output=True, text=True,
                                 check=True)
            runs["raw"] += json.loads(out.stdout.strip().splitlines()[-1])
        raw = float(np.median(runs["raw"]))
        print(f"{model} ({a.bundle}, backend {backend}, {a.threads} threads): one client, {a.max_tokens} tokens a request (greedy, "
              f"ignore_eos), {a.requests} requests a round, {a.rounds} rounds alternating (load average "
              f"{os.getloadavg()[0]:.1f})")
        print(f"  raw backend loop (fresh process): {raw:7.1f} tok/s (median of {len(runs['raw'])})")
        for k in envs:
            v = float(np.median(runs[k]))
            print(f"  through the server, {k}: {v:7.1f} tok/s (median of {len(runs[k])}), {v / raw:.3f}x raw")
    finally:
        stop_servers(servers)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="A running server (else one is started with --bundle/--model).")
    ap.add_argument("--model", default=None, help="Model id to request (default: the first in /v1/models).")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--model-path", default="tiny-shapes", help="--model for the server this script starts.")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="Repeat the client levels this many times, interleaved "
                    "(1,2,4,1,2,4,...), and compare their medians (load from other processes then hits every level).")
    ap.add_argument("--ray", type=int, default=None, help="Serve on a local Ray Serve cluster with this many "
                    "replicas (started here, stopped at the end) instead of plain `edgemm serve`.")
    ap.add_argument("--decode-batch", action="store_true", help="Only time the backend's decode_batch for 1, 2 "
                    "and 4 sequences (no HTTP): the ceiling slots can reach on this machine.")
    ap.add_argument("--turns", type=int, default=None, help="Multi-turn conversations of this many turns: TTFT per "
                    "turn with token-level against whole-segment prompt reuse (two servers started here).")
    ap.add_argument("--arrivals", type=float, default=None, help="3 streams decoding while a new image request "
                    "arrives every this many seconds: their token gaps, unchunked vs --prefill-chunk (two servers).")
    ap.add_argument("--side-threads", type=int, default=None, help="--arrivals: the side-worker server's "
                    "--side-threads (default: the server's own)")
    ap.add_argument("--servers", default=None, help="--arrivals: only these of unchunked,chunk,side (the "
                    "unchunked server's queue of newcomers can starve its streams past the client's timeout on a "
                    "loaded machine).")
    ap.add_argument("--trace", action="store_true", help="--arrivals: the servers' loop turns traced "
                    "(EDGEMM_ENGINE_TRACE): where the turns longer than 2x the calm median gap spend their time.")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="--arrivals: the chunked servers' "
                    "--prefill-chunk (default: the server's own, pieces sized by measured time).")
    ap.add_argument("--vs-raw", action="store_true", help="One client through the server against the backend's "
                    "own decode loop (a fresh process), alternating rounds.")
    ap.add_argument("--requests", type=int, default=4, help="--vs-raw: requests (and raw runs) a round.")
    a = ap.parse_args(argv)
    if a.vs_raw:
        return vs_raw_only(a)
    if a.arrivals:
        return arrivals_only(a)
    if a.decode_batch:
        return decode_batch_only(a)
    if a.turns:
        return turns_only(a)
    proc = None
    url = a.url
    ray_started = False
    if a.ray:
        import ray
        from ray import serve
        from edgemm.serve import ray_app
        from edgemm.serve.app import Limits
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_started = True
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ray_app.ray_args([] if a.bundle else [a.model_path], [a.bundle] if a.bundle else [], a.backend or "auto",
                                "cpu", a.threads, a.parallel, 64, None, False,
                                Limits(max_tokens=max(512, a.max_tokens)), a.ray, None, False)
        serve.run(ray_app.build_app(args), name=ray_app.APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
    elif url is None:
        proc, url = start_server(a)
    try:
        import openai
        c = openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("EDGEMM_API_KEY", "none"))
        models = c.models.list().data
        model = a.model or models[0].id
        meta = next((m for m in models if m.id == model), models[0]).model_extra.get("meta", {})
        image_url = "data:image/png;base64," + base64.b64encode((ROOT / "examples" / "shapes.png").read_bytes()).decode()
        print(f"server {url}, model {model}: {meta.get('backend')}, {meta.get('slots')} slot(s); "
              f"{a.max_tokens} tokens per request (ignore_eos), half the requests with an image")
        print(f"{'clients':>7} {'req/s':>7} {'decode tok/s':>12} {'TTFT p50':>9} {'TTFT p95':>9} "
              f"{'tok p50':>8} {'tok p95':>8} {'requests':>8} {'errors':>6}")
        rows, levels = [], [int(x) for x in a.clients.split(",")]
        for _ in range(a.rounds):                   # the levels interleaved, round after round
            for n in levels:
                r = run_level(url, model, n, a.seconds, a.max_tokens, image_url)
                rows.append(r)
                print(f"{n:>7} {r['requests_per_s']:>7.2f} {r['decode_tok_s']:>12.1f} {r['ttft_p50_ms']:>7.0f}ms "
                      f"{r['ttft_p95_ms']:>7.0f}ms {r['token_p50_ms']:>6.1f}ms {r['token_p95_ms']:>6.1f}ms "
                      f"{r['requests']:>8} {r['errors']:>6}")
        med = {n: float(np.median([r["decode_tok_s"] for r in rows if r["clients"] == n])) for n in levels}
        if a.rounds > 1:
            print("median decode tok/s over the rounds: " + ", ".join(f"{n} client(s) {v:.1f}" for n, v in med.items()))
        if len(levels) > 1:
            print(f"aggregate decode tok/s at {levels[-1]} clients / at {levels[0]}: "
                  f"{med[levels[-1]] / med[levels[0]]:.2f}x" + (" (medians)" if a.rounds > 1 else ""))
        if proc is not None:
            print(f"server peak RSS: {peak_rss_mb(proc.pid):.0f} MB")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        if ray_started:
            from ray import serve
            import ray
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
