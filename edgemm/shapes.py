"""The synthetic shapes VQA task: procedural images of 1-4 coloured shapes and questions about them.

Objects sit in the cells of a 3x3 grid (random size, jitter inside the cell), every object has its own colour,
shapes may repeat. Splits are disjoint seeded streams: every image of a split is drawn from
numpy.random.default_rng([SPLIT_ID, index]).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
          "purple": (150, 70, 205), "orange": (250, 140, 25)}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
QTYPES = ("color", "shape", "count", "position")
SPLITS = {"train": 0, "val": 1, "test": 2, "calib": 3}
IMAGE_SIZE = 48
GRID = 3
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cell: int
    size: float     # fraction of a cell
    dx: float       # jitter inside the cell, in [-1, 1] of the free room
    dy: float


@dataclass(frozen=True)
class Scene:
    objects: tuple
    background: tuple
    noise: float
    seed: int

    def signature(self) -> tuple:
        return (tuple((o.shape, o.color, o.cell, round(o.size, 6)) for o in self.objects), self.background)


@dataclass(frozen=True)
class Question:
    qtype: str
    question: str
    answer: str


def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 5))
    cells = rng.choice(GRID * GRID, n, replace=False)
    colors = rng.choice(len(COLORS), n, replace=False)
    names = list(COLORS)
    objs = tuple(Obj(SHAPES[int(rng.integers(len(SHAPES)))], names[int(c)], int(cell),
                     float(rng.uniform(0.5, 0.85)), float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
                 for cell, c in zip(cells, colors))
    grey = rng.uniform(10, 110)
    bg = tuple(int(np.clip(grey + rng.uniform(-15, 15), 0, 255)) for _ in range(3))
    return Scene(objs, bg, float(rng.uniform(0, 10)), int(rng.integers(2**31)))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Scene -> uint8 [size, size, 3], drawn supersampled then reduced (anti-aliased), plus pixel noise."""
    S = size * SUPERSAMPLE
    cell = S / GRID
    img = Image.new("RGB", (S, S), scene.background)
    d = ImageDraw.Draw(img)
    rng = np.random.default_rng(scene.seed)
    for o in scene.objects:
        r, c = divmod(o.cell, GRID)
        s = o.size * cell
        room = (cell - s) / 2
        cx = (c + 0.5) * cell + o.dx * room
        cy = (r + 0.5) * cell + o.dy * room
        x0, y0, x1, y1 = cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2
        jitter = rng.integers(-12, 13, 3)
        col = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLORS[o.color], jitter))
        if o.shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=col)
        elif o.shape == "square":
            d.rectangle([x0 + s * 0.08, y0 + s * 0.08, x1 - s * 0.08, y1 - s * 0.08], fill=col)
        elif o.shape == "triangle":
            d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=col)
        else:  # cross
            t = s / 6
            d.rectangle([cx - t, y0, cx + t, y1], fill=col)
            d.rectangle([x0, cy - t, x1, cy + t], fill=col)
    arr = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32)
    arr = arr + rng.normal(0, scene.noise, arr.shape)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def questions_for(scene: Scene, qtype: str, rng: np.random.Generator) -> Question | None:
    objs = scene.objects
    if qtype == "color":
        counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
        unique = [o for o in objs if counts[o.shape] == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return Question("color", f"What color is the {o.shape}?", o.color)
    if qtype == "shape":
        o = objs[int(rng.integers(len(objs)))]
        return Question("shape", f"What shape is the {o.color} object?", o.shape)
    if qtype == "count":
        if rng.random() < 0.5:
            return Question("count", "How many shapes are there?", str(len(objs)))
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        return Question("count", f"How many {s}s are there?", str(sum(o.shape == s for o in objs)))
    o = objs[int(rng.integers(len(objs)))]
    return Question("position", f"Where is the {o.color} {o.shape}?", POSITIONS[o.cell])


def all_questions(scene: Scene) -> list[Question]:
    """Every question the templates can ask about `scene`, in a fixed order (each object's shape, position and, if
    its shape is unique, color; the counts): a checker's prompt set in the model's own distribution."""
    objs, out = scene.objects, []
    counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    for o in objs:
        out.append(Question("shape", f"What shape is the {o.color} object?", o.shape))
        out.append(Question("position", f"Where is the {o.color} {o.shape}?", POSITIONS[o.cell]))
        if counts[o.shape] == 1:
            out.append(Question("color", f"What color is the {o.shape}?", o.color))
    out.append(Question("count", "How many shapes are there?", str(len(objs))))
    out += [Question("count", f"How many {s}s are there?", str(counts[s])) for s in SHAPES]
    return out


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> Question:
    """A question of qtype, or of the next type that the scene can answer."""
    i = QTYPES.index(qtype)
    for k in range(len(QTYPES)):
        q = questions_for(scene, QTYPES[(i + k) % len(QTYPES)], rng)
        if q is not None:
            return q
    raise AssertionError("unreachable: shape questions always exist")


def scene_at(split: str, index: int) -> Scene:
    return sample_scene(np.random.default_rng([SPLITS[split], index]))


def make_split(split: str, n: int, start: int = 0):
    """n (image uint8 [H, W, 3], Question) items of a split; question types cycle so every type gets n/4."""
    out = []
    for i in range(start, start + n):
        scene = scene_at(split, i)
        q = ask(scene, QTYPES[i % len(QTYPES)], np.random.default_rng([SPLITS[split], i, 1]))
        out.append((render(scene), q))
    return out


def corpus_lines() -> list[str]:
    """Every question and answer string the task can produce (the tokenizer's training corpus)."""
    lines = []
    for s in SHAPES:
        lines.append(f"What color is the {s}?")
        lines.append(f"How many {s}s are there?")
        for c in COLORS:
            lines.append(f"Where is the {c} {s}?")
    for c in COLORS:
        lines.append(f"What shape is the {c} object?")
    lines.append("How many shapes are there?")
    answers = list(COLORS) + list(SHAPES) + list(POSITIONS) + [str(i) for i in range(10)]
    return lines + answers
