"""Prefill pieces sized by measured time (issue 31): the engine measures what a decode step and a prefill row cost
and gives each newcomer piece the rows that keep piece + step within (1 + PIECE_SHARE) x the step. A backend whose
step and row costs are known (a sleep added to the tiny model's own calls) gets the piece size those costs predict,
a dearer row gets smaller pieces, the answers stay those of an unchunked engine, and the side worker runs one piece
between two decode steps, never beside one."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from edgemm.generation import GenerationConfig  # noqa: E402
from edgemm.serve.engine import PIECE_SHARE, Engine, Job, PieceSizer  # noqa: E402


def test_sizer_settles_where_a_piece_costs_its_budget():
    a, b, step = 0.08, 0.006, 0.3                 # a piece of n rows costs a + b n; a step of 3 streams 0.3 s
    s = PieceSizer(most=64)
    assert s.rows("loop", 3) == 4                 # nothing measured yet: the floor
    s.step(3, step)
    for _ in range(30):
        n = s.rows("loop", 3)
        s.piece("loop", n, a + b * n)
    want = (PIECE_SHARE * step - a) / b           # where a + b n = share x step
    assert want - 2 <= n <= want, (n, want)       # (whole rows: it settles just under)
    assert a + b * n <= PIECE_SHARE * step
    s.step(3, 2 * step)                           # a dearer step (the average moves): bigger pieces
    assert s.rows("loop", 3) > n
    assert s.rows("loop", 0) == 64                # none decoding: the most
    assert s.rows("side", 3) == 4                 # the side worker's row cost is its own, not measured yet
    s.step(1, 0.01)                               # a step far cheaper than a piece's fixed share: the floor
    assert s.rows("loop", 1) == 4
    assert PieceSizer(most=8).rows("loop", 3) == 4 and PieceSizer(most=2).rows("loop", 3) == 2
    big = PieceSizer(most=16)
    big.step(3, 10.0)
    big.piece("loop", 4, 0.01)
    assert big.rows("loop", 3) == 16              # never past the most (--prefill-chunk)


class Timed:
    """The tiny torch backend with known costs added: a decode step `step` s per stream, a prefill piece
    `fixed` + `row` x its rows; logs (what, rows or streams, thread, start, end) per call."""

    def __init__(self, b, step, fixed, row):
        self.b, self.costs, self.log, self.lock = b, (step, fixed, row), [], threading.Lock()

    def __getattr__(self, k):
        return getattr(self.b, k)

    def prefill(self, st, kind, data, chunk=None):
        pieces = self.b.prefill(st, kind, data, chunk)
        while True:
            t0, before = time.perf_counter(), st.length
            try:
                out = next(pieces)
            except StopIteration:
                return
            n = st.length - before
            time.sleep(self.costs[1] + self.costs[2] * n)
            with self.lock:
                self.log.append(("piece", n, threading.current_thread().name, t0, time.perf_counter()))
            yield out

    def decode_batch(self, states, tokens):
        t0 = time.perf_counter()
        out = self.b.decode_batch(states, tokens)
        time.sleep(self.costs[0] * len(states))
        with self.lock:
            self.log.append(("decode", len(states), threading.current_thread().name, t0, time.perf_counter()))
        return out


@pytest.fixture(scope="module")
def tiny():
    import torch
    from edgemm.runtimes import load_backend
    torch.set_num_threads(1)
    return load_backend("torch", model="tiny-shapes", device="cpu", threads=1)


def _run(b, chunk, side=0, rows=240, beside=False):
    """2 streams of 40 tokens, then (once both have 3) a newcomer with a `rows`-token prompt -> (answers, log)."""
    eng = Engine(b, parallel=3, prefill_chunk=chunk, side_threads=side, side_beside=beside)
    rng = np.random.default_rng(0)
    texts, done, started = {}, threading.Event(), threading.Event()
    counts = {}

    def job(k, ids, n):
        texts[k], counts[k] = "", 0

        def ev(kind, data):
            if kind == "text":
                texts[k] += data
                counts[k] += 1
                if counts.get(0, 0) >= 3 and counts.get(1, 0) >= 3:
                    started.set()
            elif kind == "done":
                ended.add(k)
                if len(ended) == 3:
                    done.set()
            elif kind == "error":
                raise AssertionError(data)
        return Job(segments=[("text", ids)], pixels=[], gen=GenerationConfig(max_new_tokens=n, ignore_eos=True),
                   on_event=ev, prompt_rows=len(ids))
    ended = set()
    try:
        for k in range(2):
            eng.submit(job(k, rng.integers(3, 500, 6).tolist(), 40))
        assert started.wait(60)
        eng.submit(job(2, rng.integers(3, 500, rows).tolist(), 4))
        assert done.wait(120)
    finally:
        eng.close()
    return [texts[k] for k in range(3)], b.log if isinstance(b, Timed) else []


def _newcomer_pieces(log):
    """The newcomer's pieces (after the first step of 2 streams; not its last, the rest of its prompt)."""
    t = min(e[3] for e in log if e[0] == "decode" and e[1] == 2)
    return [e for e in log if e[0] == "piece" and e[3] > t][:-1]


def test_engine_sizes_pieces_by_measured_cost(tiny):
    plain, _ = _run(tiny, 0)
    # a step of 2 streams costs 300 ms, a piece 50 ms + 5 ms a row: a piece of (0.5 * 300 - 50) / 5 = 20 rows
    # (the tiny model's own compute adds a little to both: about 17)
    got, log = _run(Timed(tiny, 0.15, 0.05, 0.005), 64)
    assert got == plain                                       # the answers do not depend on the pieces
    sizes = [e[1] for e in _newcomer_pieces(log)]
    settled = float(np.median(sizes[len(sizes) // 2:]))
    assert 13 <= settled <= 24, sizes
    # a dearer row (15 ms): (150 - 50) / 15 = 7 rows
    _, dear = _run(Timed(tiny, 0.15, 0.05, 0.015), 64)
    sizes3 = [e[1] for e in _newcomer_pieces(dear)]
    assert float(np.median(sizes3[len(sizes3) // 2:])) <= 9, sizes3
    # the cap: --prefill-chunk 8 takes no piece over 8 rows
    _, capped = _run(Timed(tiny, 0.15, 0.05, 0.005), 8)
    assert max(e[1] for e in _newcomer_pieces(capped)) <= 8


def test_side_worker_takes_turns_with_the_steps(tiny):
    """The side worker's prefill: pieces sized by its own measured row cost, one between two decode steps while
    streams decode (never beside one), and the answers of the unchunked engine."""
    plain, _ = _run(tiny, 0)
    got, log = _run(Timed(tiny, 0.15, 0.05, 0.005), 64, side=1)
    assert got == plain
    side = [e for e in _newcomer_pieces(log) if e[2].startswith("edgemm-side")]
    assert len(side) >= 5, log
    steps = [e for e in log if e[0] == "decode"]
    last_step = max(e[4] for e in steps)
    for p, q in zip(side, side[1:]):
        if q[3] < last_step:                                  # (streams still decoding)
            assert any(p[3] - 0.005 <= s[4] <= q[3] + 0.001 for s in steps), (p, q)   # a step ended between
    for p in side:                                            # never beside a step: one or the other
        assert not any(s[3] < p[4] and p[3] < s[4] for s in steps), p
    sizes = [e[1] for e in side]
    assert 10 <= float(np.median(sizes[len(sizes) // 2:])) <= 30, sizes


def test_side_worker_with_cpus_of_its_own_prefills_while_the_streams_step(tiny):
    """side_beside: the side worker's pieces run while the loop steps (no turn-taking), the answers unchanged."""
    plain, _ = _run(tiny, 0)
    got, log = _run(Timed(tiny, 0.15, 0.05, 0.005), 64, side=1, beside=True)
    assert got == plain
    side = [e for e in _newcomer_pieces(log) if e[2].startswith("edgemm-side")]
    steps = [e for e in log if e[0] == "decode"]
    overlapping = [p for p in side if any(s[3] < p[4] and p[3] < s[4] for s in steps)]
    assert side and len(overlapping) >= len(side) // 2, (side, steps)
    # back to back: no piece waits for a step to end after the previous one
    assert any(not any(p[4] <= s[4] <= q[3] for s in steps) for p, q in zip(side, side[1:])), side


def test_serve_runs_side_pieces_beside_the_steps_only_on_cpus_of_their_own(monkeypatch):
    import edgemm.cpu as cpu
    from edgemm.serve import side_has_own_cpus, side_threads_default
    monkeypatch.setattr(cpu, "default_threads", lambda *a, **k: (4, "cpu_count"))
    assert side_has_own_cpus(2, side_threads_default(2))           # 2 + 2 of 4
    assert side_has_own_cpus(1, 1) and not side_has_own_cpus(4, 1) and not side_has_own_cpus(3, 2)
    assert not side_has_own_cpus(None, side_threads_default(None))  # --threads at every CPU: 4 + 1
    assert not side_has_own_cpus(1, 0)                             # no side worker
