"""The backend protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class State:
    """One KV cache: `length` rows filled, `pos` the next RoPE position (they differ under the cogvlm rule)."""
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

    def new_state(self) -> State:
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

    def describe(self) -> str:
        return f"{self.name} on {self.device}"
