"""Calibration sets: lists of (image, prompt[, answer]) pairs.

- the bundled set: the shapes task's `calib` split (a seeded stream disjoint from `test`, `train` and `val`);
- a user folder: images plus a `prompts.jsonl` whose lines are {"image": "rel/path.png", "prompt": "..."}
  (optional "answer"; "question" is accepted for "prompt"). Image paths are relative to the folder.

Every set has a digest (sha256 over the image bytes, prompts and answers), which keys the statistics cache.

Held-out items: every set is split, deterministically, into the calibration part (`samples`: what statistics and
scales are fitted on) and a held-out part (`held_out`: the prompts an export's check runs on), disjoint by
construction (no held-out item equals a calibration item in image, prompt and answer):

- bundled: calibration = the `calib` split's items 0 .. n-1; held out = its items HOLDOUT_START ..
  HOLDOUT_START + HOLDOUT_BUNDLED - 1 (an index range no calibration set reaches: n is refused at HOLDOUT_START);
- a folder: the held-out items are chosen by content, whatever the file's order: the max(1, min(16, N // 8)) items
  whose sha256 (image bytes, prompt, answer) is smallest (identical lines fall on the same side); the rest
  calibrates, `limit` taking the first ones of it in file order. A folder needs two items.
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
HOLDOUT_START = 1 << 20            # the bundled set's held-out items: the calib split from this index on
HOLDOUT_BUNDLED = 16
HOLDOUT_MAX = 16                   # a folder: max(1, min(HOLDOUT_MAX, N // HOLDOUT_EVERY)) items held out
HOLDOUT_EVERY = 8


@dataclass(frozen=True)
class CalibSample:
    image: object            # uint8 [H, W, 3] array or a path
    prompt: str
    answer: str | None = None
    id: str = ""             # where it comes from: "shapes-calib#5", "prompts.jsonl:3 (a.png)"

    def key(self) -> str:
        """sha256 of the item's content (image bytes, prompt, answer): equal items have equal keys."""
        h = hashlib.sha256()
        _hash_sample(h, self)
        return h.hexdigest()


def _hash_sample(h, s) -> None:
    if isinstance(s.image, np.ndarray):
        h.update(str(s.image.shape).encode())
        h.update(np.ascontiguousarray(s.image).tobytes())
    else:
        h.update(Path(s.image).read_bytes())
    h.update(b"\0" + s.prompt.encode() + b"\0" + (s.answer or "").encode() + b"\1")


@dataclass(frozen=True)
class CalibSet:
    name: str
    samples: tuple           # the calibration part
    held_out: tuple = ()     # the export check's part, disjoint from `samples`

    def __post_init__(self):
        seen = {s.key() for s in self.samples}
        object.__setattr__(self, "held_out", tuple(s for s in self.held_out if s.key() not in seen))

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def digest(self) -> str:
        """Of the calibration part (what statistics are fitted on)."""
        h = hashlib.sha256()
        for s in self.samples:
            _hash_sample(h, s)
        return h.hexdigest()

    def describe(self) -> str:
        return f"{self.name} ({len(self)} samples, digest {self.digest()[:12]})"


def bundled_set(n: int = BUNDLED_SIZE) -> CalibSet:
    """The shapes `calib` split: n (image, question, answer) items, every question type equally often."""
    from edgemm import shapes
    if n < 1:
        raise EdgemmError("a calibration set needs at least one sample")
    if n >= HOLDOUT_START:
        raise EdgemmError(f"a bundled calibration set of {n} samples reaches the held-out items (index "
                          f"{HOLDOUT_START} on); use at most {HOLDOUT_START - 1}")

    def part(count, start=0):
        return tuple(CalibSample(img, q.question, q.answer, f"shapes-calib#{start + i}")
                     for i, (img, q) in enumerate(shapes.make_split("calib", count, start)))
    return CalibSet(f"shapes-calib[{n}]", part(n), part(HOLDOUT_BUNDLED, HOLDOUT_START))


def split_held_out(samples: list) -> tuple[tuple, tuple]:
    """A folder's items -> (calibration part in file order, held-out part): the max(1, min(HOLDOUT_MAX,
    N // HOLDOUT_EVERY)) items of smallest content key held out, items equal to one of them too."""
    k = max(1, min(HOLDOUT_MAX, len(samples) // HOLDOUT_EVERY))
    keys = [s.key() for s in samples]
    cut = sorted(keys)[k - 1]
    held = [s for s, key in zip(samples, keys) if key <= cut]
    return tuple(s for s, key in zip(samples, keys) if key > cut), tuple(held)


MAX_LINE = 64 * 1024


def write_calib_dir(d: str | Path, n: int, split: str = "calib") -> Path:
    """A calibration folder load_calib_dir reads: the first n items of a shapes split as PNGs + prompts.jsonl."""
    from PIL import Image
    from edgemm import shapes
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, q) in enumerate(shapes.make_split(split, n)):
        Image.fromarray(img).save(d / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "prompt": q.question, "answer": q.answer}))
    (d / PROMPTS_FILE).write_text("\n".join(rows) + "\n")
    return d


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
        samples.append(CalibSample(img, prompt, None if ans is None else str(ans), f"{PROMPTS_FILE}:{n} ({row['image']})"))
    if not samples:
        raise EdgemmError(f"--calib {d}: {PROMPTS_FILE} holds no samples (zero non-empty lines)")
    calib, held = split_held_out(samples)
    if not calib:
        raise EdgemmError(f"--calib {d}: {PROMPTS_FILE} holds {len(samples)} sample(s), "
                          f"{len({x.key() for x in samples})} distinct; edgemm holds items out of the set for the "
                          "export's check, so calibration needs at least two different ones (better 32 or more)")
    return CalibSet(f"dir:{d.resolve()}", calib[:limit] if limit else calib, held)


def resolve_calib(calib=None, n: int | None = None) -> CalibSet:
    """None -> the bundled set; a folder path -> load_calib_dir; a CalibSet -> itself."""
    if calib is None:
        return bundled_set(n or BUNDLED_SIZE)
    if isinstance(calib, CalibSet):
        return calib
    return load_calib_dir(calib, limit=n)
