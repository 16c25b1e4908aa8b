"""Calibration sets: lists of (image, prompt[, answer]) pairs.

- the bundled set: the shapes task's `calib` split (a seeded stream disjoint from `test`, `train` and `val`);
- a user folder: images plus a `prompts.jsonl` whose lines are {"image": "rel/path.png", "prompt": "..."}
  (optional "answer"; "question" is accepted for "prompt"). Image paths are relative to the folder.

Every set has a digest (sha256 over the image bytes, prompts and answers), which keys the statistics cache.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError

BUNDLED_SIZE = 64
PROMPTS_FILE = "prompts.jsonl"


@dataclass(frozen=True)
class CalibSample:
    image: object            # uint8 [H, W, 3] array or a path
    prompt: str
    answer: str | None = None


@dataclass(frozen=True)
class CalibSet:
    name: str
    samples: tuple

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def digest(self) -> str:
        h = hashlib.sha256()
        for s in self.samples:
            if isinstance(s.image, np.ndarray):
                h.update(str(s.image.shape).encode())
                h.update(np.ascontiguousarray(s.image).tobytes())
            else:
                h.update(Path(s.image).read_bytes())
            h.update(b"\0" + s.prompt.encode() + b"\0" + (s.answer or "").encode() + b"\1")
        return h.hexdigest()

    def describe(self) -> str:
        return f"{self.name} ({len(self)} samples, digest {self.digest()[:12]})"


def bundled_set(n: int = BUNDLED_SIZE) -> CalibSet:
    """The shapes `calib` split: n (image, question, answer) items, every question type equally often."""
    from edgemm import shapes
    if n < 1:
        raise EdgemmError("a calibration set needs at least one sample")
    items = shapes.make_split("calib", n)
    return CalibSet(f"shapes-calib[{n}]", tuple(CalibSample(img, q.question, q.answer) for img, q in items))


MAX_LINE = 64 * 1024


def load_calib_dir(path: str | Path, limit: int | None = None) -> CalibSet:
    """A folder with images and prompts.jsonl -> CalibSet; every problem is an EdgemmError naming the line."""
    d = Path(path)
    if not d.is_dir():
        raise EdgemmError(f"--calib {d}: not a directory (expected a folder with images and {PROMPTS_FILE})")
    pf = d / PROMPTS_FILE
    if not pf.is_file():
        raise EdgemmError(f"--calib {d}: {PROMPTS_FILE} is missing; write one line per sample: "
                          '{"image": "img.png", "prompt": "What is shown?"}')
    from edgemm.safety import inside
    samples = []
    try:
        text = pf.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = pf.read_bytes()[:e.start].count(b"\n") + 1
        raise EdgemmError(f"{pf}:{line}: not valid UTF-8; save the file as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE:
            raise EdgemmError(f"{pf}:{n}: the line is {len(line)} characters long (limit {MAX_LINE})")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgemmError(f"{pf}:{n}: not valid JSON ({e.msg}); each line is one JSON object "
                              '{"image": ..., "prompt": ...}') from None
        except RecursionError:
            raise EdgemmError(f"{pf}:{n}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise EdgemmError(f"{pf}:{n}: expected a JSON object with \"image\" and \"prompt\", got "
                              f"{type(row).__name__}")
        prompt = row.get("prompt", row.get("question"))
        if "image" not in row or not isinstance(row["image"], str) or not isinstance(prompt, str) or \
                not prompt.strip():
            raise EdgemmError(f"{pf}:{n}: each line needs a string \"image\" and a non-empty string \"prompt\"")
        img = inside(d, row["image"], f"{pf}:{n}: image")
        if not img.is_file():
            raise EdgemmError(f"{pf}:{n}: image {row['image']!r} not found in {d}")
        ans = row.get("answer")
        samples.append(CalibSample(img, prompt, None if ans is None else str(ans)))
        if limit and len(samples) >= limit:
            break
    if not samples:
        raise EdgemmError(f"--calib {d}: {PROMPTS_FILE} holds no samples (zero non-empty lines)")
    return CalibSet(f"dir:{d.resolve()}", tuple(samples))


def resolve_calib(calib=None, n: int | None = None) -> CalibSet:
    """None -> the bundled set; a folder path -> load_calib_dir; a CalibSet -> itself."""
    if calib is None:
        return bundled_set(n or BUNDLED_SIZE)
    if isinstance(calib, CalibSet):
        return calib
    return load_calib_dir(calib, limit=n)
