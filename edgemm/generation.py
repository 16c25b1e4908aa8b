"""Generation above the backends: sampling, stop strings, streaming, and multi-turn chat on one KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import EdgemmError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0        # 0: greedy
    top_k: int = 0                  # 0: off
    top_p: float = 1.0              # 1: off
    seed: int | None = None
    stop: tuple = ()                # stop strings (not included in the answer)
    ignore_eos: bool = False        # keep going past </s> until max_new_tokens (benchmarks, load tests)
    grammar: object = None          # edgemm.grammar.Grammar: only the tokens it allows are sampled
    trigger: tuple | None = None    # (text, Grammar, token id | None): that grammar from the point the answer's text
                                    # holds `text` (or that token is sampled) on (tool_choice auto: a call's opening
                                    # tag; edgemm.tools.call_trigger)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise EdgemmError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise EdgemmError("--temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise EdgemmError("--top-p must be in (0, 1]")
        if self.top_k < 0:
            raise EdgemmError("--top-k must be >= 0")


class Sampler:
    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        c = self.cfg
        if c.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64)
        with np.errstate(over="ignore"):        # shifted first: a tiny temperature makes -inf, never inf - inf
            z = (z - z.max()) / c.temperature
        if c.top_k:
            kth = np.partition(z, -c.top_k)[-c.top_k] if c.top_k < z.size else -np.inf
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if c.top_p < 1:
            order = np.argsort(-p)
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, c.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(p.size, p=p))


class TextStream:
    """Incremental detokenization: each new token costs a decode of a short tail, not of the whole answer.

    The text of ids[prefix:] minus the text of ids[prefix:read] is what the new tokens add; a byte-level BPE
    token can end inside a UTF-8 character, so while the tail ends in U+FFFD nothing is emitted yet."""

    def __init__(self, tok):
        self.tok, self.ids, self.prefix, self.read, self.text = tok, [], 0, 0, ""

    def add(self, t: int) -> str:
        self.ids.append(t)
        head = self.tok.decode(self.ids[self.prefix:self.read])
        tail = self.tok.decode(self.ids[self.prefix:])
        if len(tail) > len(head) and not tail.endswith("\ufffd"):
            new = tail[len(head):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += new
            return new
        return ""

    def finish(self) -> None:
        """The answer ended: what was held back for an unfinished UTF-8 character joins the text as the tokenizer
        decodes it (U+FFFD for bytes that end early), so the text is the decode of every id, as transformers'
        decode and TextStreamer's end give it."""
        head = self.tok.decode(self.ids[self.prefix:self.read])
        tail = self.tok.decode(self.ids[self.prefix:])
        if len(tail) > len(head):
            self.text += tail[len(head):]
        self.prefix = self.read = len(self.ids)


class AnswerStream:
    """One answer being generated: sampling, incremental text, stop strings and the length limit, fed one
    logits vector at a time (ChatSession.ask and the server's slots both drive it).

    push(logits) -> (text to emit now, finished). Text that may still turn into a stop string is held back
    until it cannot. After it finishes: `ids` the answer's tokens, `text` the answer, `finish_reason`
    ("stop" | "length"), `unfed` the sampled tokens whose rows are not in the KV cache (a token cut by a stop
    string, or the last one at the length limit)."""

    def __init__(self, tok, gen: GenerationConfig):
        self.tok, self.gen = tok, gen
        self.sampler = Sampler(gen)
        self.stream = TextStream(tok)
        self.stops = [x for x in (*gen.stop, *getattr(tok, "stops", ())) if x]     # the request's + the model's
        self.hold = max((len(x) for x in self.stops), default=1) - 1
        self.emitted = 0
        self.ids: list[int] = []
        self.unfed: list[int] = []
        self.finish_reason: str | None = None
        self.constraint = gen.grammar.start() if gen.grammar is not None else None
        self.trigger = gen.trigger if gen.grammar is None else None

    @property
    def text(self) -> str:
        return self.stream.text

    def _flush(self) -> str:
        piece = self.stream.text[self.emitted:]
        self.emitted = len(self.stream.text)
        return piece

    def _triggered(self, t: int) -> None:
        """Switch the trigger's grammar on once the text holds its text (or its token was sampled), fed what
        follows it in the text so far (llguidance matches bytes: any tokenization of them does)."""
        text, grammar, tid = self.trigger
        at = len(self.stream.text) if t == tid else self.stream.text.find(text)
        if at < 0:
            return
        self.trigger, self.constraint = None, grammar.start()
        for i in self.tok.encode(self.stream.text[at + len(text):] if t != tid else ""):
            self.constraint.accept(i)

    def push(self, logits) -> tuple[str, bool]:
        c = self.constraint                  # a grammar: the tokens it forbids are never sampled
        t = self.sampler(logits if c is None else c.mask(logits))
        if self.tok.is_eos(t) and (c is not None or not self.gen.ignore_eos):
            self.finish_reason = "stop"
            self.stream.finish()
            return self._flush(), True
        self.ids.append(t)
        self.stream.add(t)
        if c is not None:
            c.accept(t)
        elif self.trigger is not None:
            self._triggered(t)
        hits = [self.stream.text.find(x) for x in self.stops if x in self.stream.text]
        if hits:
            self.stream.text = self.stream.text[:min(hits)]
            self.unfed, self.finish_reason = [t], "stop"
            return self._flush(), True
        if c is not None and c.done:         # only end-of-sequence can follow: the answer is complete
            self.unfed, self.finish_reason = [t], "stop"
            self.stream.finish()
            return self._flush(), True
        if len(self.ids) >= self.gen.max_new_tokens:
            self.unfed, self.finish_reason = [t], "length"     # nothing reads this token's logits
            self.stream.finish()
            return self._flush(), True
        piece = ""
        if len(self.stream.text) - self.hold > self.emitted:
            piece = self.stream.text[self.emitted:len(self.stream.text) - self.hold]
            self.emitted = len(self.stream.text) - self.hold
        return piece, False


class ChatSession:
    """A conversation about (at most) one image. The KV cache is kept across turns; only the new turn's
    tokens are fed. When the context fills, the oldest whole turns are dropped (never the image).

    A turn's closing </s> (and a token sampled but cut by a stop string) is not fed at the end of the turn: it
    goes into the cache with the next question, in the same call, so a one-question session makes no decoder
    call that nothing reads. The KV cache is sized to what the conversation needs (at least CACHE_MIN rows,
    doubling as turns arrive, never past the context) rather than the whole context at every image."""

    CACHE_MIN = 256

    def __init__(self, backend, gen: GenerationConfig | None = None, log: Callable[[str], None] | None = None,
                 template: str | None = "auto"):
        self.b = backend
        self.tok = backend.tokenizer
        self.gen = gen or GenerationConfig()
        self.log = log or (lambda s: None)
        # an imported model is prompted through its own chat template (edgemm.chat_template); edgemm's own
        # models keep their training format, built piece by piece below
        from .tokenizer import CHAT_TEMPLATE
        if template == "auto":
            from .chat_template import chat_template_of
            template = chat_template_of(backend)
        self.template = template if template and template.strip() != CHAT_TEMPLATE.strip() else None
        self.fed: list = []           # template mode: the prompt items in the cache (token ids, "image"), and
        self.fed_at: list = []        # the (length, pos) after each
        self.rows = None              # image rows [1, P+2, D] from the vision stage
        self.pixels = None            # InstructBLIP: the image, encoded with the conversation's first question
        self.video = False            # the rows are a clip's (edgemm.video; a str: its text, frames as images)
        self.turns: list[tuple[str, list[int]]] = []   # (question, answer ids incl. </s>)
        self.state = None
        self.capacity = 0             # rows the state's KV cache holds
        self.pending: list[int] = []  # ids of the last turn not yet in the cache (its </s>)
        self._warned = False

    # ---- conversation control -------------------------------------------------
    def set_image(self, src) -> None:
        """Load an image (path, PIL image or uint8 array) and start a new conversation about it."""
        from .tilings import image_rows, preprocess_image
        if self.b.cfg.reads_question:                # InstructBLIP: the vision stage reads the question too
            self.pixels, self.rows = preprocess_image(src, self.b.cfg.vision), None
        else:
            self.pixels, self.rows = None, image_rows(self.b, src)   # (tiled and packed for any-resolution models)
        self.video = False
        self.reset()

    def set_image_rows(self, rows, video: bool | str = False) -> None:
        """Rows of an image, or (video) of a clip (edgemm.video.clip_rows), which the template puts at its video
        place: video=True, one array; video=its text (edgemm.video.video_text), a list of one array per frame."""
        self.pixels, self.rows, self.video = None, rows, video
        self.reset()

    def set_clip(self, pixels) -> None:
        """LLaMA-VID: a clip's frames [F, 3, S, S], encoded with the conversation's first question (the template's
        video place); a clip whose rows do not fit the context is refused before any frame is encoded."""
        from .video import frame_rows
        n = frame_rows(self.b.cfg, pixels)[0]
        if n >= self.b.context_length:
            raise EdgemmError(f"the clip's {len(pixels)} frames take {n} rows, but the context holds "
                              f"{self.b.context_length}: use a shorter clip")
        self.pixels, self.rows, self.video = pixels, None, True
        self.reset()

    def _encode_with(self, question: str) -> None:
        """InstructBLIP, LLaMA-VID: the image's (clip's) rows from its pixels and the conversation's first question
        (the Q-Former's instruction, tokenized as their processors do); later turns keep them (and the KV cache)."""
        from .qformer import instruction
        ins = instruction(self.tok, self.b.cfg, question)
        if self.video:
            from .video import question_rows
            self.rows = question_rows(self.b, self.pixels, ins)
        else:
            self.rows = self.b.vision(self.pixels, *ins)
        if self.state is not None and self.template is None:       # the prefix now holds the image
            self.state.length = self.state.pos = 0
            self.state = self._fill(self.state, [])

    def reset(self) -> None:
        if self.pixels is not None:             # InstructBLIP: re-encoded with the next first question
            self.rows = None
        self.turns = []
        self.pending = []
        self.fed, self.fed_at = [], []
        if self.state is not None:              # keep the allocated cache: rewinding it costs nothing
            self.state.length = self.state.pos = 0
            self.state = self._fill(self.state, [])

    # ---- prompt pieces ---------------------------------------------------------
    def _prefix_segments(self):
        segs = [("text", self.tok.prefix_ids())]
        if self.rows is not None:
            segs.append(("image", self.rows))
        return segs

    def _rows(self, segs) -> int:
        return sum(len(d) if k == "text" else d.shape[1] for k, d in segs)

    def _turn_rows(self, turns) -> int:
        return sum(len(self.tok.user_turn(q, i == 0)) + len(a) for i, (q, a) in enumerate(turns))

    def _fill(self, st, turns):
        """Feed the prefix and `turns` into the (empty) state `st`; -> st."""
        pending: list[int] = []
        for kind, data in self._prefix_segments():
            if kind == "image":
                if pending:
                    self.b.text(st, pending)
                    pending = []
                self.b.image(st, data)
            else:
                pending += data
        for i, (q, a) in enumerate(turns):
            pending += self.tok.user_turn(q, first=(i == 0)) + a
        if pending:
            self.b.text(st, pending)
        return st

    def _replay(self, turns, need: int):
        """A fresh state of at least `need` rows holding the prefix and `turns`."""
        ctx = self.b.context_length
        cap = max(self.CACHE_MIN, self.capacity)
        while cap < need:
            cap *= 2
        self.capacity = min(cap, ctx)
        self.pending = []
        return self._fill(self.b.new_state(max_len=self.capacity), turns)

    # ---- one turn ------------------------------------------------------------------
    def _generate(self, st, logits, on_text, fed=None) -> AnswerStream:
        """Sample the answer from `logits` on, feeding each token back; fed(token) after each one is in."""
        ans = AnswerStream(self.tok, self.gen)
        while True:
            piece, done = ans.push(logits)
            if on_text and piece:
                on_text(piece)
            if done:
                return ans
            logits = self.b.text(st, [ans.ids[-1]])
            if fed:
                fed(ans.ids[-1])

    def _template_items(self, turns, question) -> list:
        from .chat_template import normalize_messages, segments_template
        msgs, img = [], self.rows is not None
        for i, (q, a) in enumerate([*turns, (question, None)]):
            kind = "video_url" if self.video else "image_url"
            parts = ([{"type": kind, kind: {"url": "data:,"}}] if img and i == 0 else [])
            msgs.append({"role": "user", "content": parts + [{"type": "text", "text": q}]})
            if a is not None:
                msgs.append({"role": "assistant", "content": a})
        segs = segments_template(self.tok, self.template, normalize_messages(msgs),
                                 video_text=[self.video] if isinstance(self.video, str) else None)
        return [t for k, d in segs for t in (d if k == "text" else ["image"])]

    def _ask_template(self, question: str, on_text) -> str:
        """The conversation rendered by the model's chat template; the cache keeps the longest prefix of the
        rendered items it already holds, only the rest is fed."""
        ctx, gen = self.b.context_length, self.gen
        vis = self.rows if isinstance(self.rows, list) else [self.rows]        # (a list: a clip's frames)
        size = lambda items: sum(vis[k].shape[1] for k in range(items.count("image"))) \
            + sum(t != "image" for t in items)                                   # noqa: E731
        turns = list(self.turns)
        items = self._template_items(turns, question)
        while size(items) + gen.max_new_tokens + 1 > ctx:
            if not turns:
                raise EdgemmError(f"the prompt needs {size(items)} tokens plus {gen.max_new_tokens} to answer, "
                                  f"but the context holds {ctx}: shorten the question or lower --max-new-tokens")
            turns.pop(0)
            items = self._template_items(turns, question)
            if not self._warned:
                self.log(f"note: the context ({ctx} tokens) is full; dropping the oldest turns (the image stays)")
                self._warned = True
        self.turns = turns
        if self.state is None:               # sized to this turn where the backend grows it for the next ones
            from .blocks.kv_rows import kv_rows
            need = size(items) + gen.max_new_tokens + 1
            self.state = self.b.new_state(max_len=kv_rows(need, ctx) if self.b.kv_grows else ctx)
        st = self.state
        p = 0
        while p < len(self.fed) and p < len(items) and self.fed[p] == items[p]:
            p += 1
        p = min(p, len(items) - 1)                       # the last item is always run: its logits start the answer
        self.fed, self.fed_at = self.fed[:p], self.fed_at[:p]
        st.length, st.pos = self.fed_at[-1] if p else (0, 0)
        i, logits = p, None
        while i < len(items):
            if items[i] == "image":
                logits = self.b.image(st, vis[items[:i].count("image")])
                self.fed.append("image")
                self.fed_at.append((st.length, st.pos))
                i += 1
                continue
            j = i
            while j < len(items) and items[j] != "image":
                j += 1
            length0, pos0 = st.length, st.pos
            logits = self.b.text(st, items[i:j])
            self.fed += items[i:j]
            self.fed_at += [(length0 + k + 1, pos0 + k + 1) for k in range(j - i)]
            i = j
        def fed(t):
            self.fed.append(t)
            self.fed_at.append((st.length, st.pos))
        ans = self._generate(st, logits, on_text, fed)
        self.turns.append((question, ans.text.strip()))
        return ans.text.strip()

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        if not question or not question.strip():
            raise EdgemmError("the question is empty: type a question about the image")
        if self.pixels is not None and self.rows is None:
            self._encode_with(question)
        if self.template is not None:
            return self._ask_template(question, on_text)
        ctx = self.b.context_length
        gen = self.gen
        q_ids = self.tok.user_turn(question, first=not self.turns)
        prefix_rows = self._rows(self._prefix_segments())
        if prefix_rows + len(self.tok.user_turn(question, first=True)) + gen.max_new_tokens + 1 > ctx:
            raise EdgemmError(
                f"the prompt needs {prefix_rows + len(q_ids)} tokens plus {gen.max_new_tokens} to answer, "
                f"but the context holds {ctx}: shorten the question or lower --max-new-tokens")
        answer_rows = gen.max_new_tokens + 1
        if self.state is None:
            self.state = self._replay([], prefix_rows + len(q_ids) + answer_rows)
        need = self.state.length + len(self.pending) + len(q_ids) + answer_rows
        if need > ctx:
            turns = list(self.turns)
            while turns and prefix_rows + self._turn_rows(turns) \
                    + len(self.tok.user_turn(question, not turns)) + answer_rows > ctx:
                turns.pop(0)
            if not self._warned:
                self.log(f"note: the context ({ctx} tokens) is full; dropping the oldest turns "
                         f"({len(self.turns) - len(turns)} now, more later as needed; the image stays)")
                self._warned = True
            self.turns = turns
            q_ids = self.tok.user_turn(question, first=not turns)
            self.state = self._replay(turns, prefix_rows + self._turn_rows(turns) + len(q_ids) + answer_rows)
        elif need > self.capacity:                               # grow the cache: replay into a bigger one
            self.state = self._replay(self.turns, need)
        logits = self.b.text(self.state, self.pending + q_ids)
        ans = self._generate(self.state, logits, on_text)
        out = ans.ids
        self.pending = ans.unfed
        # the turn closes with </s>; it enters the cache with the next question (see the class docstring)
        self.pending = self.pending + [self.tok.eos_id]
        self.turns.append((question, out + [self.tok.eos_id]))
        return ans.text.strip()


def answer(backend, image, question: str, gen: GenerationConfig | None = None, on_text=None) -> str:
    """One question about one image (image may be None for a text-only prompt)."""
    s = ChatSession(backend, gen)
    if image is not None:
        s.set_image(image)
    return s.ask(question, on_text)
