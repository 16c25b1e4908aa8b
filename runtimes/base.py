"""The backend protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class State:
    """One KV cache: `length` rows filled, `pos` the next RoPE position (they differ under the cogvlm rule).

    `cache` is the backend's own, one type per backend: torch `edgemm.model.KVCache`; ort and trt a dict
    {"k": [per layer], "v": [per layer], "capacity": rows} of OrtValues / arrays; llamacpp the int id of the
    llama context's sequence that holds it. Setting `length` (and `pos`) lower rewinds the cache."""
    cache: Any = None
    length: int = 0
    pos: int = 0
    extra: dict = field(default_factory=dict)


class Backend:
    """Base class. Subclasses implement open/vision/text/image/new_state; `cfg` and `tokenizer` are set."""
    name = "base"
    device = "cpu"
    cfg = None          # edgemm.config.ModelConfig
    tokenizer = None    # edgemm.tokenizer.Tokenizer
    source = ""         # what was opened (path or preset)

    @classmethod
    def open(cls, model=None, bundle=None, device="auto", threads=None, log=None) -> "Backend":
        raise NotImplementedError(f"{cls.__name__}.open")

    @classmethod
    def available(cls, manifest: dict, device: str) -> tuple[bool, str]:
        """Whether this backend can run the bundle on this machine, and why (for `--backend auto`)."""
        return False, "not implemented"

    @property
    def context_length(self) -> int:
        return self.cfg.decoder.max_seq_len

    def new_state(self, max_len: int | None = None) -> State:
        """An empty KV cache of `max_len` rows (default: the whole context)."""
        raise NotImplementedError

    def vision(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [1, 3, S, S] -> image rows float32 [1, P + 2, D]."""
        raise NotImplementedError

    def text(self, state: State, ids: list[int]) -> np.ndarray:
        """Append a text segment (text branch); -> float32 logits [vocab] of its last row."""
        raise NotImplementedError

    def image(self, state: State, rows: np.ndarray) -> np.ndarray:
        """Append an image segment (vision branch); -> float32 logits [vocab] of its last row."""
        raise NotImplementedError

    def decode_batch(self, states: list, tokens: list[int]) -> list[np.ndarray]:
        """One decode step for several states (token i appended to state i) -> logits per state. Backends that
        can batch sequences (llamacpp) do it in one call; the default runs them one after another."""
        return [self.text(st, [t]) for st, t in zip(states, tokens)]

    def release(self, state: State) -> None:
        """Return a state's resources early (a finished server request); by default nothing to do."""

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


class SegmentRunner(Backend):
    """Segments over exported decoder graphs (the ort and trt backends): subclasses implement
    `_run(stage, state, feeds, positions) -> logits` and `_encode(stage, feeds) -> image rows`.

    Model variants handled here, once: the cogvlm position rule, CogVLM's original routing (the image segment's
    eoi row runs through decoder_text's `input_rows` input) and Libra's `image_tokens` input stage."""

    @staticmethod
    def _room(state: State, T: int) -> int:
        """-> the rows filled after appending T; an error when the KV cache cannot take them."""
        from edgemm.errors import EdgemmError
        cap = state.cache["capacity"]
        if state.length + T > cap:
            raise EdgemmError(f"KV cache full: {state.length} + {T} rows > capacity {cap}")
        return state.length + T

    def _eoi_text(self) -> bool:
        return self.cfg.decoder.eoi_branch == "text"

    def _text_feeds(self, ids: np.ndarray, rows: np.ndarray | None = None) -> dict:
        feeds = {"input_ids": ids}
        if self._eoi_text():      # that model's decoder_text also takes rows (0 of them for a text segment)
            d = self.cfg.decoder.d_model
            feeds["input_rows"] = np.zeros((1, 0, d), np.float32) if rows is None else rows
        return feeds

    def text(self, state: State, ids) -> np.ndarray:
        ids = np.asarray([list(ids)], np.int64)
        positions = np.arange(state.pos, state.pos + ids.shape[1])
        logits = self._run("decoder_text", state, self._text_feeds(ids), positions)
        state.pos += ids.shape[1]
        return logits

    def image_positions(self, start: int) -> np.ndarray:
        n = self.cfg.n_image_rows
        if self.cfg.decoder.position_rule == "cogvlm":       # boi p, every patch p+1, eoi p+2
            pos = np.full(n, start + 1)
            pos[0], pos[-1] = start, start + 2
            return pos
        return np.arange(start, start + n)

    def image(self, state: State, rows) -> np.ndarray:
        from edgemm.errors import EdgemmError
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 3 or rows.shape[0] != 1 or rows.shape[2] != self.cfg.decoder.d_model:
            raise EdgemmError(f"image rows must be [1, n, {self.cfg.decoder.d_model}], got {list(rows.shape)}")
        positions = self.image_positions(state.pos)[: rows.shape[1]]
        if self._eoi_text() and rows.shape[1] == self.cfg.n_image_rows:
            self._run("decoder_image", state, {"image_rows": rows[:, :-1]}, positions[:-1])
            logits = self._run("decoder_text", state, self._text_feeds(np.zeros((1, 0), np.int64), rows[:, -1:]),
                               positions[-1:])
        else:
            logits = self._run("decoder_image", state, {"image_rows": rows}, positions)
        state.pos = int(positions[-1]) + 1
        return logits

    def vision(self, pixels) -> np.ndarray:
        from edgemm.errors import EdgemmError
        if self.cfg.input_stage != "vision":
            raise EdgemmError("this bundle (Libra) takes image tokens, not pixels: its VQ image tokenizer and CLIP "
                              "signal encoder are not imported; use image_tokens(codes, signal)")
        return self._encode("vision", {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})

    def image_tokens(self, codes, signal=None) -> np.ndarray:
        """Libra: image tokens [1, rows, codebooks] (+ continuous signal [1, rows, signal_size]) -> image rows."""
        from edgemm.errors import EdgemmError
        if self.cfg.input_stage != "image_tokens":
            raise EdgemmError("this bundle takes pixels (vision stage), not image tokens")
        feeds = {"codes": np.ascontiguousarray(codes, dtype=np.int64)}
        a = self.cfg.adapter
        if a.signal_size:          # no signal: zeros (what the reference does)
            feeds["signal"] = np.ascontiguousarray(np.zeros(feeds["codes"].shape[:2] + (a.signal_size,))
                                                   if signal is None else signal, dtype=np.float32)
        return self._encode("image_tokens", feeds)
