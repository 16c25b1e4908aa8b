"""Slots: N conversations decoding at once over one backend, scheduled token by token.

One worker thread owns the backend (backends are not thread-safe). Each loop it admits waiting requests into
free slots, runs one piece of the oldest newcomer's prefill (an image's encode, or at most `prefill_chunk` prompt
rows: Backend.prefill; after its last piece the first token is sampled), then advances every slot past its
prefill by one token in one `decode_batch` call (llama.cpp: one llama_decode over all the slots' sequences; ort
with a batch-capable decoder_text: one run over the slots' rows of one KV buffer per layer; either way the weights
are read once for all of them; the other backends step the slots one after another). A long answer therefore
never blocks the others, nor does a newcomer's prompt (the running streams wait for one piece, not the whole
prompt; prefill_chunk 0: the whole prompt at admission), a cancelled request (client gone) frees its slot before
the next step, and at most `max_queue` requests wait beyond the slots (more are refused: the server answers 503
with Retry-After).

The side worker (`side_threads` > 0, edgemm serve's default): one more thread, with threads of its own
(Backend.on_side_thread, load_backend's vision_threads), encodes a newcomer's images beside the decode loop (the
loop runs other pieces meanwhile: an encode is no longer a piece of its own), and where the backend lets a state's
prefill run beside decode_batch (Backend.prefill_beside_why: torch, ort; the state is `busy` meanwhile) the
newcomer's whole prefill runs there and the loop only samples its first token. A request cancelled meanwhile ends
when the worker reaches its next piece (an encode not begun is dropped; rows of a cancelled request are not kept).
Where the worker has CPUs of its own (`side_beside`: --threads + --side-threads within the CPUs, as edgemm serve
decides) its prefill pieces run at the same time as the decode steps; otherwise they take turns with them, one
piece between two steps (two compute threads on one core slow both). Measured on 2 cores, --threads 1, bench-0.5b
(`bench_serve.py --arrivals 1 --servers side`): p95 gap with arrivals over the calm median, beside / in turns,
ort int4 1.56x / 2.32x, torch 1.55x / 1.76x.

Riding (Backend.rides: llamacpp): a text piece in the loop goes into that turn's decode step, one forward for the
streams' tokens and the piece's rows (_prefill_step records it under Backend.riding, decode_batch runs it, a prompt
whose last piece rode gets its first token after the step: _after_ride); a ridden piece's cost for PieceSizer is
what it added to the step.

Prompt caching: a slot keeps what its KV cache holds, segment by segment (text ids; images by a digest of their
pixels; the tokens its last answer fed back). A new request goes to the free slot whose cache shares the longest
lead with its prompt: whole segments, then token by token into the first text segment that differs (a text row is
one token at the next position, so a cache can be cut anywhere inside text). The cache is rewound there and only
the rest is prefilled, so in a multi-turn conversation neither the image, nor the history, nor the previous answer
is recomputed: a turn prefills its new message and the few tokens where the client's copy of the answer is
tokenized or closed differently. Image rows are also kept for the last few images. (Gated cross-attention models
reuse whole segments only: which image a row reads depends on the tokens before it.)
"""
from __future__ import annotations

import hashlib
import contextlib
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import EdgemmError
from ..generation import AnswerStream, GenerationConfig
from ..blocks.kv_rows import kv_rows
from ..runtimes.base import Ridden


class QueueFull(Exception):
    pass


def _drive(pieces):
    """Run a prefill generator (Engine._prefill) to its end -> what it returns."""
    try:
        while True:
            next(pieces)
    except StopIteration as e:
        return e.value


@dataclass
class Job:
    segments: list                      # [("text", ids) | ("image", index)]
    pixels: list                        # float32 [1, 3, S, S] per image index
    gen: GenerationConfig
    on_event: object                    # callable(kind, data), called from the worker thread
    prompt_rows: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    n_out: int = 0
    keys: list | None = None            # the segments' cache keys (segment_keys)
    instructions: list | None = None    # InstructBLIP: (ids, mask) of each image's question (edgemm.qformer)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class Slot:
    state: object
    job: Job | None = None
    ans: AnswerStream | None = None
    held: list = field(default_factory=list)     # [(segment key, length after, pos after)] in the KV cache
    fed: list = field(default_factory=list)      # the answer's tokens fed to the cache so far (decode steps)
    pieces: object = None                        # its prompt's prefill still to run (a generator: Engine._prefill)
    side: object = None                          # the side worker's Future running that prefill (side_prefill)
    encodes: dict = field(default_factory=dict)  # image digest -> the side worker's Future of its rows
    blocked: object = None                       # the encode Future its prefill waits for (in the loop)
    ridden: object = None                        # its last prefill piece's logits, riding this turn's step (Ridden)


def segment_keys(job: Job) -> list:
    if job.keys is not None:
        return job.keys
    keys = []
    for kind, data in job.segments:
        if kind == "text":
            keys.append(("text", tuple(data)))
        else:
            h = hashlib.sha1(job.pixels[data].tobytes())
            if job.instructions:            # InstructBLIP: the rows depend on the question too
                h.update(b"q" + np.asarray(job.instructions[data][0], np.int64).tobytes())
            keys.append(("image", h.hexdigest()))
    job.keys = keys
    return keys


def reuse_score(slot: Slot, keys: list, tokens: bool = True) -> float:
    """Rows a slot's cache saves this prompt, less half of those it would throw away (so a text-only prompt
    takes an empty slot rather than the one holding an image for the next request)."""
    reused = reuse_point(slot.held, keys, tokens)[2]
    held = slot.state.length if slot.state is not None else 0
    return reused - 0.5 * (held - reused)


def reuse_point(held: list, keys: list, tokens: bool = True) -> tuple[int, int, int, int]:
    """Where a prompt (its segment keys) starts in a cache that holds `held` -> (k, j, length, pos): its first k
    segments are held whole and (tokens) the first j ids of segment k too, matched over the held text and answer
    tokens from there on; (length, pos) is the cache's state at that point. The last segment always runs at least
    one row: its logits start the answer."""
    last = len(keys) - 1
    k = min(common_prefix(held, keys), last)
    length, pos = (held[k - 1][1], held[k - 1][2]) if k else (0, 0)
    j = 0
    if tokens and keys[k][0] == "text":
        run = []
        for key, _, _ in held[k:]:
            if key[0] not in ("text", "gen"):
                break
            run.extend(key[1])
        new = keys[k][1]
        cap = min(len(run), len(new) - 1 if k == last else len(new))
        while j < cap and run[j] == new[j]:
            j += 1
    return k, j, length + j, pos + j


def common_prefix(held: list, keys: list) -> int:
    n = 0
    while n < len(held) and n < len(keys) and held[n][0] == keys[n]:
        n += 1
    return n


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}                   # status code -> count
        self.tokens = 0
        self.decode_seconds = 0.0
        self.ttft = []                       # seconds, the last 1000

    def request(self, code: int) -> None:
        with self.lock:
            self.requests[code] = self.requests.get(code, 0) + 1

    def prometheus(self, engines: dict) -> str:
        with self.lock:
            lines = ["# HELP edgemm_requests_total HTTP requests by status code", "# TYPE edgemm_requests_total counter"]
            lines += [f'edgemm_requests_total{{code="{c}"}} {n}' for c, n in sorted(self.requests.items())]
            lines += ["# HELP edgemm_generated_tokens_total tokens generated", "# TYPE edgemm_generated_tokens_total counter",
                      f"edgemm_generated_tokens_total {self.tokens}",
                      "# HELP edgemm_decode_tokens_per_second generated tokens per second of decoding",
                      "# TYPE edgemm_decode_tokens_per_second gauge",
                      f"edgemm_decode_tokens_per_second {self.tokens / self.decode_seconds if self.decode_seconds else 0.0:.3f}"]
            if self.ttft:
                q = np.quantile(self.ttft, [0.5, 0.95])
                lines += ["# HELP edgemm_ttft_seconds time to first token", "# TYPE edgemm_ttft_seconds summary",
                          f'edgemm_ttft_seconds{{quantile="0.5"}} {q[0]:.6f}',
                          f'edgemm_ttft_seconds{{quantile="0.95"}} {q[1]:.6f}',
                          f"edgemm_ttft_seconds_count {len(self.ttft)}"]
        lines += ["# HELP edgemm_queue_depth requests waiting for a slot", "# TYPE edgemm_queue_depth gauge"]
        lines += [f'edgemm_queue_depth{{model="{m}"}} {len(e.waiting)}' for m, e in engines.items()]
        lines += ["# HELP edgemm_prompt_rows_reused_total prompt rows taken from a slot's cache, not recomputed",
                  "# TYPE edgemm_prompt_rows_reused_total counter"]
        lines += [f'edgemm_prompt_rows_reused_total{{model="{m}"}} {e.prefill_rows_saved}' for m, e in engines.items()]
        lines += ["# HELP edgemm_active_slots slots decoding", "# TYPE edgemm_active_slots gauge"]
        lines += [f'edgemm_active_slots{{model="{m}"}} {e.active()}' for m, e in engines.items()]
        return "\n".join(lines) + "\n"


# rows a prefill piece takes at most (serve --prefill-chunk N: another maximum); within it each piece is sized by
# measured time (PieceSizer). 64 rows cost 390 ms on bench-0.5b (torch, 1 CPU thread), 2.7x a decode step of 3
# streams there; a GPU's step and piece costs are far apart, so the time rule, not this cap, sizes pieces
PREFILL_CHUNK = 64
PIECE_FLOOR = 4         # rows a piece takes at least (a prefill always progresses)
# a piece costs at most this share of the decode step it comes with: a turn with a piece stays within 1.5x the
# step, and within 2x the step before a newcomer began decoding too (torch steps its streams one after another:
# a 4th stream makes the step 4/3; 4/3 x 1.5 = 2)
PIECE_SHARE = 0.5


class PieceSizer:
    """Rows of a newcomer's next prefill piece, from costs this engine measured (running averages): a decode step
    of n streams (calm steps only: no side-worker work beside them) and a prefill row (a piece's seconds / its
    rows, its fixed share included; the loop's and the side worker's apart). A piece is given `share` x the step of
    the streams decoding now, in rows at the row cost, within [floor, most]; with none decoding, `most`. A piece of
    n rows costs a + b n (a: reading the weights once), so its per-row average is a / n + b and the rule
    n' = budget / (cost(n) / n) settles where cost(n) = budget: the running streams' gap is then at most
    (1 + share) x their step. Before the costs are measured: `floor` rows."""

    def __init__(self, most: int, floor: int = PIECE_FLOOR, share: float = PIECE_SHARE, weight: float = 0.3):
        self.most, self.floor, self.share, self.weight = int(most), min(int(floor), int(most)), share, weight
        self.steps: dict = {}            # streams -> seconds of a calm decode step
        self.row: dict = {}              # "loop" / "side" -> seconds per prefill row

    def _avg(self, d: dict, key, x: float) -> None:
        d[key] = x if key not in d else d[key] + self.weight * (x - d[key])

    def step(self, live: int, seconds: float) -> None:
        self._avg(self.steps, live, seconds)

    def piece(self, where: str, rows: int, seconds: float) -> None:
        if rows > 0:
            self._avg(self.row, where, seconds / rows)

    def rows(self, where: str, live: int) -> int:
        if not live:
            return self.most
        known = self.steps.get(live) or (self.steps[min(self.steps, key=lambda n: abs(n - live))]
                                         if self.steps else None)       # (the nearest count measured)
        row = self.row.get(where)
        if not known or not row:
            return self.floor
        return int(max(self.floor, min(self.most, self.share * known / row)))


class Engine:
    """The slots of one model (see the module docstring)."""

    def __init__(self, backend, parallel: int = 1, max_queue: int = 16, metrics: Metrics | None = None, log=None,
                 prefill_chunk: int | None = PREFILL_CHUNK, side_threads: int = 0, side_beside: bool = False):
        self.b = backend
        self.parallel, self.max_queue = int(parallel), int(max_queue)
        self.prefill_chunk = int(prefill_chunk or 0)      # 0: a newcomer's whole prompt before the next step
        self.sizer = PieceSizer(self.prefill_chunk) if self.prefill_chunk else None     # else the most rows a piece
        self._live = 0                  # streams the loop's next decode step advances (the side worker reads it)
        self._steps = 0                 # decode steps done (under self.turns; the side worker waits for the next)
        self._side_encodes, self._side_busy = 0, 0     # side-worker encodes begun, running now
        self._side_rows = self._rows_traced = 0         # rows the side worker prefilled (up to the last trace line)
        self.turns = threading.Condition()
        self.exclusive = threading.Lock()   # a decode step or a side prefill piece, one at a time
        self.metrics = metrics or Metrics()
        self.log = log or (lambda s: None)
        why = backend.chunked_image_why() if self.prefill_chunk else None
        if why:
            self.log(f"note: --prefill-chunk splits text only: {why}")
        self.slots = [Slot(state=None) for _ in range(self.parallel)]
        self.waiting: deque[Job] = deque()
        self.rows_cache: OrderedDict = OrderedDict()      # image digest -> rows, the last ROWS_CACHE images
        self.prefill_rows_saved = 0
        # (see the module docstring; EDGEMM_PROMPT_REUSE=segments turns token reuse off: benchmarks/bench_serve.py
        # --turns compares the two)
        self.token_reuse = (not backend.cfg.decoder.cross_attn_every
                            and os.environ.get("EDGEMM_PROMPT_REUSE", "tokens") != "segments")
        # the side worker (side_threads > 0): newcomers' image encodes run on it, beside the decode loop, with
        # side_threads threads of their own (Backend.on_side_thread); where a state's prefill may run beside
        # decode_batch (Backend.prefill_beside_why) the newcomer's whole prefill runs there
        self.side, self.side_prefill = None, False
        self.side_beside = bool(side_beside) and bool(side_threads)     # (see the module docstring)
        if side_threads:
            from concurrent.futures import ThreadPoolExecutor
            self.side = ThreadPoolExecutor(1, thread_name_prefix="edgemm-side", initializer=backend.on_side_thread,
                                           initargs=(int(side_threads),))
            why = backend.prefill_beside_why()
            self.side_prefill = why is None
            if why:
                self.log(f"note: newcomers' images are encoded beside the decode loop, their prompts prefilled in it "
                         f"({why})")
        # EDGEMM_ENGINE_TRACE=FILE: one JSON line per loop turn that decoded (what the turn spent its time on:
        # benchmarks/bench_serve.py --trace reads them to say what makes the longest gaps between tokens)
        path = os.environ.get("EDGEMM_ENGINE_TRACE")
        self._trace = open(path, "a", buffering=1) if path else None
        self.cv = threading.Condition()
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="edgemm-engine", daemon=True)
        self.thread.start()

    # ---- from the HTTP side -----------------------------------------------------------------------
    def active(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    def submit(self, job: Job) -> None:
        with self.cv:
            if len(self.waiting) >= self.max_queue and self.active() + len(self.waiting) >= self.parallel:
                raise QueueFull()
            self.waiting.append(job)
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.running = False
            self.cv.notify()
        self.thread.join(timeout=10)
        if self.side is not None:
            for slot in self.slots:             # prefills on the side worker stop at their next piece
                if slot.side is not None and slot.job is not None:
                    slot.job.cancel()
            self.side.shutdown(wait=True, cancel_futures=True)

    # ---- the worker ----------------------------------------------------------------------------------
    def _finish(self, slot: Slot, reason: str | None = None, error: str | None = None) -> None:
        job = slot.job
        if slot.pieces is not None and slot.side is None:
            slot.pieces.close()
        for fut in slot.encodes.values():       # its encodes not begun are dropped (running: their rows are)
            fut.cancel()
        if slot.ridden is not None:             # ended before its riding piece's step: what its cache holds is unsure
            slot.held, slot.ridden = [], None
        slot.job, slot.ans, slot.pieces, slot.encodes, slot.blocked = None, None, None, {}, None
        if error is None and slot.fed and slot.state is not None:        # the answer is in the cache too
            slot.held.append((("gen", tuple(slot.fed)), slot.state.length, slot.state.pos))
        slot.fed = []
        if error is not None:
            slot.held = []                  # what the cache holds is not known after a failure
            job.on_event("error", error)
        else:
            job.on_event("done", {"finish_reason": reason, "prompt_tokens": job.prompt_rows,
                                  "completion_tokens": job.n_out})

    ROWS_CACHE = 8

    def _encode(self, job: Job, index: int):
        """Image `index` of a job -> its rows (tiled and packed for any-resolution models; InstructBLIP: with its
        question's Q-Former ids; a clip: serve.videos). Runs on the engine's thread or the side worker."""
        from ..tilings import encode_pixels
        pixels, ins = job.pixels[index], job.instructions[index] if job.instructions else ()
        return pixels.video_rows(self.b, ins) if hasattr(pixels, "video_rows") \
            else self.b.vision(pixels, *ins) if ins else encode_pixels(self.b, pixels)

    def _side_encode(self, job: Job, index: int):
        """_encode on the side worker, unless the request was cancelled while it waited there (None)."""
        if job.cancelled.is_set():
            return None
        self._side_encodes, self._side_busy = self._side_encodes + 1, self._side_busy + 1
        try:
            return self._encode(job, index)
        finally:
            self._side_busy -= 1

    def _side_drive(self, slot: Slot, job: Job):
        """_drive on the side worker. With CPUs of its own (side_beside) its pieces (sized by time: PieceSizer) run
        while the loop steps; else it takes turns with the decode loop: one piece between two decode steps of the
        running streams, never beside one (self.exclusive), and after a piece it waits until a step has ended
        since (none decoding: it goes on). (Traced on torch with dense F.linear, 2 cores, load 6.6: a step beside a
        side piece took 3x a calm one; with the worker on a CPU of its own and the Linears packed, beside is the
        faster of the two: the module docstring.) The images, encoded before (_start), always run beside the
        steps."""
        st, seen = slot.state, None
        while True:
            with self.turns:
                while (seen is not None and not self.side_beside and self._steps == seen and self._live
                       and self.running
                       and not job.cancelled.is_set()):
                    self.turns.wait(0.05)
            n0 = st.length
            try:
                with contextlib.nullcontext() if self.side_beside else self.exclusive:
                    t0 = time.perf_counter()
                    next(slot.pieces)
            except StopIteration as e:
                return e.value
            finally:
                rows = st.length - n0
                self._side_rows += max(rows, 0)
                if self.sizer is not None:
                    self.sizer.piece("side", rows, time.perf_counter() - t0)
                seen = self._steps

    def _chunk(self, where: str):
        """The rows Backend.prefill's next piece takes: sized by time (a callable), or None (the whole segment)."""
        return (lambda: self.sizer.rows(where, self._live)) if self.sizer is not None else None

    def _keep_rows(self, key: str, rows) -> None:
        self.rows_cache[key] = rows
        while len(self.rows_cache) > self.ROWS_CACHE:
            self.rows_cache.popitem(last=False)

    def _wake(self, _future=None) -> None:
        with self.cv:
            self.cv.notify()

    def _start(self, slot: Slot, job: Job) -> None:
        """Rewind the slot's cache to the lead it shares with the prompt and set up the rest's prefill: run now
        whole (no prefill_chunk), else piece by piece between the others' decode steps (_once)."""
        b = self.b
        # the slot's KV cache sized to what this request can use, grown (a copy) when a later one needs more:
        # ONNX Runtime's attention reads the whole buffer each step, and torch zeroes the whole of it
        need = kv_rows(job.prompt_rows + job.gen.max_new_tokens + 1, b.context_length)
        if slot.state is None:
            slot.state = b.new_state(max_len=need)
        else:
            b.reserve(slot.state, need)
        st = slot.state
        # reuse the cached lead (whole segments, then tokens), but always run a row of the last segment
        k, j, st.length, st.pos = reuse_point(slot.held, segment_keys(job), self.token_reuse)   # rewind there
        slot.held, slot.fed = slot.held[:k], []
        self.prefill_rows_saved += st.length
        slot.pieces = self._prefill(slot, job, k, j, "side" if self.side_prefill else "loop")
        if self.side is not None:                # the images encoded on the side worker, from now on (before a
            for (kind, data), key in zip(job.segments[k:], segment_keys(job)[k:]):      # prefill there: in order)
                if kind == "image" and key[1] not in self.rows_cache and key[1] not in slot.encodes:
                    fut = slot.encodes[key[1]] = self.side.submit(self._side_encode, job, data)
                    fut.add_done_callback(self._wake)
        if self.side_prefill:                    # the whole prefill on the side worker (a busy state)
            st.busy = True
            slot.side = self.side.submit(self._side_drive, slot, job)
            slot.side.add_done_callback(self._wake)
            return
        if not self.prefill_chunk:
            self._first(slot, job, _drive(slot.pieces))

    def _prefill(self, slot: Slot, job: Job, k: int, j: int, where: str = "loop"):
        """The prompt from segment k (its first j ids held) -> a generator: each next() runs one piece (an image's
        encode, or at most prefill_chunk rows sized by time: Backend.prefill, PieceSizer) or waits a turn for an
        image the side worker is encoding; it returns the last row's logits (None when the request was
        cancelled). where: "loop" or "side", whose measured row cost sizes the pieces."""
        b, st, logits, ran = self.b, slot.state, None, False
        keys = segment_keys(job)
        for n, ((kind, data), key) in enumerate(zip(job.segments[k:], keys[k:])):
            if n == 0 and j:
                data = data[j:]                  # the held first j ids of this text segment
                if not data:                     # all of it (not the last segment): nothing to run
                    slot.held.append((key, st.length, st.pos))
                    continue
            if ran:                              # a piece ran this turn: the others' decode step comes first
                yield
            if job.cancelled.is_set():
                return None
            if kind == "image":
                fut = slot.encodes.get(key[1])
                while fut is not None and not fut.done() and self.prefill_chunk:   # encoding on the side worker
                    slot.blocked = fut
                    yield
                    if job.cancelled.is_set():
                        return None
                slot.blocked = None
                if key[1] in self.rows_cache:
                    self.rows_cache.move_to_end(key[1])
                    data = self.rows_cache[key[1]]
                else:                            # (here: one piece, bounded by --max-image-pixels)
                    data, ran = (fut.result(), ran) if fut is not None else (self._encode(job, data), True)
                    if data is None:             # (the side worker skipped it: cancelled meanwhile)
                        return None
                    if not job.cancelled.is_set():
                        self._keep_rows(key[1], data)
                    if ran:
                        yield
                        if job.cancelled.is_set():
                            return None
            for out in b.prefill(st, kind, data, self._chunk(where)):
                logits, ran = out, True
                if out is None:                  # more pieces of this segment
                    yield
                    if job.cancelled.is_set():
                        return None
            slot.held.append((key, st.length, st.pos))
        return logits

    def _first(self, slot: Slot, job: Job, logits) -> None:
        """A prefill has ended: sample the first token (or end a cancelled request)."""
        slot.pieces = None
        if job.cancelled.is_set():
            slot.held = []                       # what its cache holds is not known
            self._finish(slot, "cancelled")
            return
        slot.ans = AnswerStream(self.b.tokenizer, job.gen)
        self._advance(slot, logits)

    def _prefill_step(self) -> None:
        """One piece of the oldest prefill not waiting for its image (the newcomers' prompts interleave with the
        decode steps); and the first token of those the side worker has prefilled."""
        for slot in self.slots:
            if slot.side is not None and slot.side.done():
                fut, slot.side = slot.side, None
                slot.state.busy = False
                try:
                    logits = fut.result()
                except Exception as e:
                    slot.pieces = None
                    self._fail(slot, e)
                    continue
                self._first(slot, slot.job, logits)
        slots = [s for s in self.slots if s.job is not None and s.pieces is not None and s.side is None
                 and (s.blocked is None or s.blocked.done())]
        if not slots:
            return
        slot = min(slots, key=lambda s: s.job.t_submit)
        self._live = sum(s.ans is not None for s in self.slots)
        st, t0 = slot.state, time.perf_counter()
        n0 = st.length
        ride = self.b.rides and self._live > 0       # a text piece goes into this turn's decode step (riding)
        try:
            with self.b.riding() if ride else contextlib.nullcontext():
                next(slot.pieces)
        except StopIteration as e:
            self._piece_ran(st, n0, t0, ride)
            if isinstance(e.value, Ridden):             # its logits come with the step: the first token after it
                slot.pieces, slot.ridden = None, e.value
            else:
                self._first(slot, slot.job, e.value)
        except Exception as e:
            if ride:
                self.b.flush_ride()
            self._fail(slot, e)
        else:
            self._piece_ran(st, n0, t0, ride)

    def _after_ride(self) -> None:
        """The first tokens of prompts whose last piece rode this turn's step (or ran alone: flush_ride)."""
        for slot in self.slots:
            if slot.ridden is not None:
                logits, slot.ridden = slot.ridden.value, None
                if logits is None:
                    self._fail(slot, EdgemmError("internal error: a prefill piece that rode a failed step"))
                else:
                    self._first(slot, slot.job, logits)

    def _piece_ran(self, st, n0: int, t0: float, ride: bool = False) -> None:
        self._piece_rows = st.length - n0
        if self.sizer is not None and not (ride and self.b.ride_pending()):    # (a ridden piece: timed in its step)
            self.sizer.piece("loop", self._piece_rows, time.perf_counter() - t0)

    def _fail(self, slot: Slot, e: Exception) -> None:
        if isinstance(e, EdgemmError):
            self._finish(slot, error=str(e))
        else:                                   # a backend failure ends this request, not the server
            self._finish(slot, error=f"internal error: {type(e).__name__}: {e}")

    def _advance(self, slot: Slot, logits) -> None:
        job, ans = slot.job, slot.ans
        piece, done = ans.push(logits)
        if job.t_first is None:
            job.t_first = time.perf_counter()
            with self.metrics.lock:
                self.metrics.ttft = (self.metrics.ttft + [job.t_first - job.t_submit])[-1000:]
        job.n_out = len(ans.ids)
        if piece:
            job.on_event("text", piece)
        if done:
            self._finish(slot, ans.finish_reason)

    def _loop(self) -> None:
        while self.running:
            try:
                self._once()
            except Exception as e:      # never let the worker die: fail what it was doing, keep serving
                self.log(f"error: the engine's step failed ({type(e).__name__}: {e}); its requests were ended")
                for slot in self.slots:
                    if slot.side is not None:           # the side worker still writes its cache: it stops soon
                        slot.job.cancel()
                    elif slot.job is not None:
                        self._finish(slot, error=f"internal error: {type(e).__name__}: {e}")

    def _ready(self) -> bool:
        """Whether _once has something to do (under self.cv)."""
        if self.waiting and any(s.job is None and s.side is None for s in self.slots):
            return True
        for s in self.slots:
            if s.side is not None:
                if s.side.done():
                    return True
            elif s.job is not None and (s.ans is not None or s.job.cancelled.is_set() or s.blocked is None
                                        or s.blocked.done()):
                return True
        return False

    def _once(self) -> None:
        """One admission round and one decode step."""
        with self.cv:
            while self.running and not self._ready():
                # (woken by submit and by the side worker's futures; the timeout notices a client gone meanwhile)
                self.cv.wait(0.05 if self.active() else None)
            if not self.running:
                return
            admit = []
            free = [s for s in self.slots if s.job is None and s.side is None]
            while free and self.waiting:
                job = self.waiting.popleft()
                keys = segment_keys(job)
                slot = max(free, key=lambda s: reuse_score(s, keys, self.token_reuse))     # the best cached lead
                free.remove(slot)
                slot.job = job                             # taken now: submit() counts it as active
                admit.append(slot)
        t_turn = time.perf_counter()
        for slot in admit:
            job = slot.job
            if job.cancelled.is_set():
                self._finish(slot, "cancelled")
                continue
            try:
                self._start(slot, job)
            except Exception as e:
                self._fail(slot, e)
        t_admit = time.perf_counter()
        self._piece_rows = 0
        self._prefill_step()
        t_prefill = time.perf_counter()
        for slot in self.slots:                     # clients that went away free their slots now (the side worker's
            if slot.job is not None and slot.job.cancelled.is_set() and slot.side is None:      # prefill: once done)
                if slot.pieces is not None:         # mid-prefill: what its cache holds is not known
                    slot.held = []
                self._finish(slot, "cancelled")
        live = [s for s in self.slots if s.job is not None and s.ans is not None]
        if not live:
            self.b.flush_ride()                 # (a piece recorded to ride a step that will not come)
            self._after_ride()
            self._set_live()
            return
        side = (sum(s.side is not None and not s.side.done() for s in self.slots),
                sum(not f.done() for s in self.slots for f in s.encodes.values())) if self._trace else None
        try:
            with self.exclusive:                # (a side prefill piece ends first)
                side0, t0 = (self._side_encodes, self._side_busy), time.perf_counter()
                outs = self.b.decode_batch([s.state for s in live], [s.ans.ids[-1] for s in live])
                t1 = time.perf_counter()
        except Exception as e:
            for s in live:
                self._finish(s, error=f"decoding failed: {e}")
            self._after_ride()
            self._set_live()
            return
        rode = self.b.ride_rows if self.b.rides else 0
        if self.sizer is not None and side0 == (self._side_encodes, 0) and not self._side_busy:    # no encode beside
            if not rode:
                self.sizer.step(len(live), t1 - t0)
            elif len(live) in self.sizer.steps:      # a ridden piece's cost: what it added to the step
                self.sizer.piece("loop", rode, max(t1 - t0 - self.sizer.steps[len(live)], 1e-4 * rode))
        with self.metrics.lock:
            self.metrics.decode_seconds += t1 - t0
            self.metrics.tokens += len(live)
        if self._trace is not None:
            import json
            self._trace.write(json.dumps({
                "t": t_turn, "admit": t_admit - t_turn, "admitted": len(admit), "prefill": t_prefill - t_admit,
                "decode": t1 - t0, "live": len(live), "side_prefill": side[0], "side_encode": side[1],
                "rows": self._piece_rows, "side_rows": self._side_rows - self._rows_traced}) + "\n")
            self._rows_traced = self._side_rows
        for s, logits in zip(live, outs):
            s.fed.append(s.ans.ids[-1])
            try:
                self._advance(s, logits)
            except EdgemmError as e:            # (a grammar that allows no token): this request only
                self._finish(s, error=str(e))
        self._after_ride()
        self._set_live(1)

    def _set_live(self, stepped: int = 0) -> None:
        """After a turn: the streams the next step advances, and (stepped) one more step done (the side worker
        waits for it)."""
        with self.turns:
            self._live = sum(s.ans is not None for s in self.slots)
            self._steps += stepped
            self.turns.notify_all()
