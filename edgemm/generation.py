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
        z = logits.astype(np.float64) / c.temperature
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


class ChatSession:
    """A conversation about (at most) one image. The KV cache is kept across turns; only the new turn's
    tokens are fed. When the context fills, the oldest whole turns are dropped (never the image)."""

    def __init__(self, backend, gen: GenerationConfig | None = None, log: Callable[[str], None] | None = None):
        self.b = backend
        self.tok = backend.tokenizer
        self.gen = gen or GenerationConfig()
        self.log = log or (lambda s: None)
        self.rows = None              # image rows [1, P+2, D] from the vision stage
        self.turns: list[tuple[str, list[int]]] = []   # (question, answer ids incl. </s>)
        self.state = None
        self._warned = False

    # ---- conversation control -------------------------------------------------
    def set_image(self, src) -> None:
        """Load an image (path, PIL image or uint8 array) and start a new conversation about it."""
        from .processor import preprocess
        pixels = preprocess(src, self.b.cfg.vision)
        self.rows = self.b.vision(pixels)
        self.reset()

    def set_image_rows(self, rows) -> None:
        self.rows = rows
        self.reset()

    def reset(self) -> None:
        self.turns = []
        self.state = None

    # ---- prompt pieces ---------------------------------------------------------
    def _prefix_segments(self):
        segs = [("text", [self.tok.bos_id])]
        if self.rows is not None:
            segs.append(("image", self.rows))
        return segs

    def _rows(self, segs) -> int:
        return sum(len(d) if k == "text" else d.shape[1] for k, d in segs)

    def _replay(self, turns) -> tuple[object, np.ndarray]:
        """Fresh state holding the prefix and `turns`; returns (state, logits of the last row)."""
        st = self.b.new_state()
        logits = None
        pending: list[int] = []
        for kind, data in self._prefix_segments():
            if kind == "image":
                if pending:
                    self.b.text(st, pending)
                    pending = []
                logits = self.b.image(st, data)
            else:
                pending += data
        for i, (q, a) in enumerate(turns):
            pending += self.tok.user_turn(q, first=(i == 0)) + a
        if pending:
            logits = self.b.text(st, pending)
        return st, logits

    # ---- one turn ------------------------------------------------------------------
    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        if not question or not question.strip():
            raise EdgemmError("the question is empty: type a question about the image")
        ctx = self.b.context_length
        gen = self.gen
        first = not self.turns
        q_ids = self.tok.user_turn(question, first=first)
        prefix_rows = self._rows(self._prefix_segments())
        if prefix_rows + len(self.tok.user_turn(question, first=True)) + gen.max_new_tokens + 1 > ctx:
            raise EdgemmError(
                f"the prompt needs {prefix_rows + len(q_ids)} tokens plus {gen.max_new_tokens} to answer, "
                f"but the context holds {ctx}: shorten the question or lower --max-new-tokens")
        if self.state is None:
            self.state, _ = self._replay([])
        need = len(q_ids) + gen.max_new_tokens + 1
        if self.state.length + need > ctx:
            turns = list(self.turns)
            while turns and prefix_rows + sum(len(self.tok.user_turn(q, i == 0)) + len(a)
                                              for i, (q, a) in enumerate(turns)) \
                    + len(self.tok.user_turn(question, not turns)) + gen.max_new_tokens + 1 > ctx:
                turns.pop(0)
            if not self._warned:
                self.log(f"note: the context ({ctx} tokens) is full; dropping the oldest turns "
                         f"({len(self.turns) - len(turns)} now, more later as needed; the image stays)")
                self._warned = True
            self.turns = turns
            self.state, _ = self._replay(turns)
            q_ids = self.tok.user_turn(question, first=not turns)
        logits = self.b.text(self.state, q_ids)
        sampler = Sampler(gen)
        out: list[int] = []
        unfed: list[int] = []
        text = ""
        for _ in range(gen.max_new_tokens):
            t = sampler(logits)
            if t == self.tok.eos_id:
                break
            out.append(t)
            new_text = self.tok.decode(out)
            hit = [new_text.find(s) for s in gen.stop if s and s in new_text]
            if hit:
                new_text = new_text[: min(hit)]
            if on_text and len(new_text) > len(text) and new_text.startswith(text):
                on_text(new_text[len(text):])
            text = new_text
            if hit:
                unfed = [t]
                break
            logits = self.b.text(self.state, [t])
        # close the turn in the cache with </s>, so the next turn appends to exactly what a replay would hold
        self.b.text(self.state, unfed + [self.tok.eos_id])
        self.turns.append((question, out + [self.tok.eos_id]))
        return text.strip()


def answer(backend, image, question: str, gen: GenerationConfig | None = None, on_text=None) -> str:
    """One question about one image (image may be None for a text-only prompt)."""
    s = ChatSession(backend, gen)
    if image is not None:
        s.set_image(image)
    return s.ask(question, on_text)
