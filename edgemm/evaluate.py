"""Accuracy on the shapes test split (1,000 questions, fixed seed) or a JSONL of (image, question, answer)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import EdgemmError

TEST_SIZE = 1000


def load_jsonl(path: str | Path) -> list[tuple[object, str, str, str]]:
    """Rows {"image": path relative to the file, "question", "answer", optional "type"}."""
    path = Path(path)
    if not path.is_file():
        raise EdgemmError(f"--data file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            rows.append((path.parent / r["image"], str(r["question"]), str(r["answer"]), str(r.get("type", "all"))))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EdgemmError(f"{path}:{n}: bad row ({e}); each line needs image, question, answer") from None
    if not rows:
        raise EdgemmError(f"{path} holds no rows")
    return rows


def test_items(n: int = TEST_SIZE):
    from . import shapes
    return [(img, q.question, q.answer, q.qtype) for img, q in shapes.make_split("test", n)]


def normalize(s: str) -> str:
    return s.strip().lower()


def evaluate(backend, data: str | Path | None = None, limit: int | None = None, progress: bool = True,
             max_new_tokens: int = 8) -> dict:
    """Greedy answers, exact match after lower-casing and stripping. -> figures per question type."""
    from tqdm import tqdm
    from .generation import ChatSession, GenerationConfig
    items = load_jsonl(data) if data else test_items(limit or TEST_SIZE)
    if limit:
        items = items[:limit]
    sess = ChatSession(backend, GenerationConfig(max_new_tokens=max_new_tokens))
    per: dict[str, list[int]] = {}
    rows = []
    for img, q, a, t in tqdm(items, desc="eval", unit="q", disable=not progress, leave=False):
        sess.set_image(img)
        pred = sess.ask(q)
        ok = normalize(pred) == normalize(a)
        per.setdefault(t, [0, 0])
        per[t][0] += ok
        per[t][1] += 1
        rows.append({"question": q, "answer": a, "prediction": pred, "type": t, "correct": ok})
    right, total = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    return {"accuracy": right / total, "correct": right, "total": total,
            "per_type": {t: {"accuracy": c / n, "correct": c, "total": n} for t, (c, n) in sorted(per.items())},
            "predictions": rows}


def format_report(res: dict) -> str:
    lines = [f"{'type':<10} {'accuracy':>8} {'correct':>8} {'total':>6}"]
    for t, r in res["per_type"].items():
        lines.append(f"{t:<10} {r['accuracy']:>8.3f} {r['correct']:>8} {r['total']:>6}")
    lines.append(f"accuracy: {res['accuracy']:.3f} ({res['correct']}/{res['total']})")
    return "\n".join(lines)
