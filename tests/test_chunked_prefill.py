"""Chunked prefill (issue 31, item 2): a prompt appended in pieces of at most `chunk` rows (Backend.prefill) leaves
the KV cache one run leaves, on the torch, ort and llamacpp backends, text and image rows (CogVLM's position rule and
eoi row included); the serving engine interleaves a newcomer's pieces with the running streams' decode steps, and
its greedy answers equal the unchunked engine's and `edgemm run`'s."""
from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgemm.config import get_preset  # noqa: E402
from edgemm.generation import AnswerStream, GenerationConfig  # noqa: E402
from edgemm.model import EdgeMM  # noqa: E402
from edgemm.runtimes.base import last  # noqa: E402

EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
GEN = GenerationConfig(max_new_tokens=30, ignore_eos=True)


def _cogvlm_model():
    """Random weights with CogVLM's rules (boi p, patches p+1, eoi p+2; eoi through the text branch), GQA."""
    cfg = get_preset("tiny-shapes")
    cfg.decoder.n_layers, cfg.decoder.max_seq_len = 2, 160
    cfg.decoder.position_rule, cfg.decoder.eoi_branch, cfg.decoder.n_kv_heads = "cogvlm", "text", 2
    torch.manual_seed(0)
    return EdgeMM(cfg).init_weights(seed=3).eval()


@pytest.fixture(scope="module")
def backends(tmp_path_factory, tokenizer):
    """name -> backend: torch (shipped model and the CogVLM-rule one), ort (both), llamacpp (shipped, f32)."""
    from edgemm.export.onnx import export_onnx
    from edgemm.runtimes import load_backend
    from edgemm.runtimes.ort_backend import OrtBackend
    from edgemm.runtimes.torch_backend import TorchBackend
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("chunk")
    cog = _cogvlm_model()
    out = {"torch": load_backend("torch", model="tiny-shapes", device="cpu", threads=1),
           "torch-cogvlm": TorchBackend(cog, tokenizer)}
    export_onnx(model="tiny-shapes", out=d / "ort", precision="fp32", threads=1, log=None, seed=1)
    export_onnx(model=(cog, tokenizer), out=d / "ort-cogvlm", precision="fp32", threads=1, log=None, seed=1)
    out["ort"] = OrtBackend.open(bundle=str(d / "ort"), device="cpu", threads=1, slots=3)
    out["ort-cogvlm"] = OrtBackend.open(bundle=str(d / "ort-cogvlm"), device="cpu", threads=1)
    try:
        from edgemm.export.gguf import export_gguf
        export_gguf(model="tiny-shapes", out=d / "gguf", precision={"vision": "f32", "decoder": "f32"}, log=None)
        out["llamacpp"] = load_backend("llamacpp", bundle=str(d / "gguf"), device="cpu", threads=1, slots=3)
    except ImportError:
        pass
    return out


def _prompt(b, rng):
    V, D = b.cfg.decoder.vocab_size, b.cfg.decoder.d_model
    rows = (rng.standard_normal((1, b.cfg.n_image_rows, D)) * 0.5).astype(np.float32)
    return [("text", rng.integers(3, V, 5).tolist()), ("image", rows), ("text", rng.integers(3, V, 11).tolist())]


def _greedy(b, st, logits, n=8):
    ids = []
    for _ in range(n):
        ids.append(int(np.argmax(logits)))
        logits = b.text(st, [ids[-1]])
    return ids


@pytest.mark.parametrize("name", ["torch", "torch-cogvlm", "ort", "ort-cogvlm", "llamacpp"])
def test_prefill_in_pieces_equals_one_run(backends, name):
    if name not in backends:
        pytest.skip("llama-cpp-python is not installed")
    b = backends[name]
    assert b.chunked_image_why() is None                      # images split too
    prompt = _prompt(b, np.random.default_rng(0))
    one = b.new_state(160)
    for kind, data in prompt:
        want = b.text(one, data) if kind == "text" else b.image(one, data)
    held = (one.length, one.pos)
    want_ids = _greedy(b, one, want)
    b.release(one)
    for chunk in (1, 4, 7):
        st, pieces = b.new_state(160), []
        for kind, data in prompt:
            before = st.length
            outs = list(b.prefill(st, kind, data, chunk))
            assert all(o is None for o in outs[:-1]) and outs[-1] is not None
            rows, eoi = st.length - before, kind == "image" and name.endswith("cogvlm")
            assert len(outs) == -(-(rows - eoi) // chunk) + eoi          # (CogVLM's eoi row: a piece of its own)
            pieces.append(len(outs))
        assert pieces[1] > 1                                  # the image's rows went in several pieces
        assert np.abs(outs[-1] - want).max() < 1e-4, (chunk, np.abs(outs[-1] - want).max())
        assert (st.length, st.pos) == held and _greedy(b, st, outs[-1]) == want_ids
        b.release(st)


class Recorder:
    """Wraps a backend: logs the engine's calls (the rows of each prefill piece, decode_batch sizes)."""

    def __init__(self, b):
        self.b, self.calls, self.threads = b, [], []

    def __getattr__(self, k):
        return getattr(self.b, k)

    def vision(self, *a):
        self.threads.append(("vision", threading.current_thread().name))
        return self.b.vision(*a)

    def prefill(self, st, kind, data, chunk=None):
        pieces = self.b.prefill(st, kind, data, chunk)
        while True:
            before = st.length
            try:
                out = next(pieces)
            except StopIteration:
                return
            self.calls.append((kind, st.length - before, id(st)))
            self.threads.append(("prefill", threading.current_thread().name))
            yield out

    def decode_batch(self, states, tokens):
        self.calls.append(("decode", len(states), None))
        return self.b.decode_batch(states, tokens)


def _serve(b, jobs_in, chunk, late=(), side=0, rec=None, vary=False):
    """Questions about the example image through the engine with 3 slots (side: its side worker's threads; vary:
    each job's image a little different, so none takes another's rows); `late` ones are submitted once the others
    have answered 3 tokens -> (texts, recorder calls)."""
    from edgemm.tilings import preprocess_image
    from edgemm.serve.engine import Engine, Job
    rec = rec or Recorder(b)
    eng = Engine(rec, parallel=3, prefill_chunk=chunk, side_threads=side)
    texts, ends, n_tok = {}, {}, {}
    every, started = threading.Event(), threading.Event()
    total = len(jobs_in) + len(late)
    px = preprocess_image(str(EXAMPLE), b.cfg.vision)

    def submit(k, q):
        ids = b.tokenizer.user_turn(q, first=True)
        texts[k], n_tok[k] = "", 0

        def ev(kind, data):
            if kind == "text":
                texts[k] += data
                n_tok[k] += 1
                if k < len(jobs_in) and all(n_tok.get(i, 0) >= 3 for i in range(len(jobs_in))):
                    started.set()
            elif kind in ("done", "error"):
                ends[k] = (kind, data)
                if len(ends) == total:
                    every.set()
        pk = px
        if vary:                # (an 8-bit image still: llama.cpp's mtmd encodes it)
            img = np.asarray(__import__("PIL.Image").Image.open(EXAMPLE).convert("RGB")).copy()
            img[:4, :4] = 40 * k
            pk = preprocess_image(img, b.cfg.vision)
        eng.submit(Job(segments=[("text", b.tokenizer.prefix_ids()), ("image", 0), ("text", ids)], pixels=[pk], gen=GEN,
                       on_event=ev, prompt_rows=0))
    try:
        with eng.cv:
            for k, q in enumerate(jobs_in):
                submit(k, q)
        if late:
            assert started.wait(60)
            n = len(rec.calls)
            for k, q in enumerate(late):
                submit(len(jobs_in) + k, q)
        assert every.wait(120)
    finally:
        eng.close()
    assert all(kind == "done" for kind, _ in ends.values()), ends
    return [texts[k] for k in range(total)], rec.calls[n:] if late else rec.calls


def _run_answers(b, questions) -> list:
    """What `edgemm run` answers each question about the example image."""
    from edgemm.generation import ChatSession
    want = []
    for q in questions:
        s = ChatSession(b, GEN)
        s.set_image(str(EXAMPLE))
        want.append(s.ask(q))
    return want


@pytest.mark.parametrize("name", ["torch", "ort", "llamacpp"])
def test_engine_interleaves_and_answers_the_same(backends, name):
    if name not in backends:
        pytest.skip("llama-cpp-python is not installed")
    b = backends[name]
    qs, late = ["What color is the circle?", "How many shapes are there?"], ["Where is the square?"]
    plain, plain_calls = _serve(b, qs, 0, late)
    got, calls = _serve(b, qs, 8, late)
    assert got == plain
    want = _run_answers(b, qs + late)
    assert [g.lstrip() for g in got] == want                  # what `edgemm run` answers (it drops the lead space)
    n = b.cfg.n_image_rows

    def prefill_runs(cs):
        return [c for c in cs if c[0] != "decode" and c[1] > 1]
    # unchunked: the newcomer's whole image in one call, no decode step of the others in between
    assert any(c[0] == "image" and c[1] == n for c in plain_calls)
    # chunked: no piece over 8 rows, and decode steps of the running streams between the newcomer's pieces
    runs = prefill_runs(calls)
    assert runs and max(c[1] for c in runs) <= 8
    first, end = calls.index(runs[0]), calls.index(runs[-1])
    between = [c for c in calls[first:end] if c[0] == "decode" and c[1] == 2]
    assert len(between) >= len(runs) - 1 >= n // 8


@pytest.mark.parametrize("name", ["torch", "ort", "llamacpp"])
def test_side_worker_answers_the_same(backends, name):
    """serve's side worker: the newcomers' image encodes (and on torch / ort their whole prefill) run on another
    thread beside the decode loop; the answers are the in-loop engine's (3 different images: each is encoded)."""
    if name not in backends:
        pytest.skip("llama-cpp-python is not installed")
    b = backends[name]
    qs, late = ["What color is the circle?", "How many shapes are there?"], ["Where is the square?"]
    plain, _ = _serve(b, qs, 0, late, vary=True)
    rec = Recorder(b)
    got, _ = _serve(b, qs, 8, late, side=1, rec=rec, vary=True)
    assert got == plain
    assert sum(k == "vision" for k, _ in rec.threads) == 3
    where = {kind: {t.split("_")[0] for k, t in rec.threads if k == kind} for kind in ("vision", "prefill")}
    assert where["vision"] == {"edgemm-side"}                 # every encode on the side worker
    beside = b.prefill_beside_why() is None
    assert where["prefill"] == ({"edgemm-side"} if beside else {"edgemm-engine"}), where
    assert beside == (name != "llamacpp")


class Gate(Recorder):
    """A backend whose vision() waits for `go` (once `entered` says it has begun)."""

    def __init__(self, b):
        super().__init__(b)
        self.entered, self.go = threading.Event(), threading.Event()

    def vision(self, *a):
        self.entered.set()
        assert self.go.wait(60)
        return super().vision(*a)


def _ask(eng, b, px, q, events):
    from edgemm.serve.engine import Job
    ids = b.tokenizer.user_turn(q, first=True)
    job = Job(segments=[("text", b.tokenizer.prefix_ids()), ("image", 0), ("text", ids)], pixels=[px], gen=GEN,
              on_event=lambda kind, data: events.append((kind, data)), prompt_rows=0)
    eng.submit(job)
    return job


def _until(cond, seconds=60):
    import time
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < seconds
        time.sleep(0.01)


@pytest.mark.parametrize("name", ["torch", "llamacpp"])
def test_cancel_during_side_encode_leaves_nothing(backends, name):
    """Clients gone while the side worker encodes their images (torch: the whole prefill there; llamacpp: the
    encode only): both end 'cancelled', their slots come back empty (no job, no side work, no encodes, not busy,
    no cache claimed), no rows of theirs are kept, the worker is idle, and the next request answers what a
    fresh engine answers."""
    from edgemm.serve.engine import Engine
    from edgemm.tilings import preprocess_image
    if name not in backends:
        pytest.skip("llama-cpp-python is not installed")
    b = backends[name]
    img = np.asarray(__import__("PIL.Image").Image.open(EXAMPLE).convert("RGB")).copy()
    pxs = []
    for k in range(2):
        img[:4, :4] = 90 + 60 * k
        pxs.append(preprocess_image(img, b.cfg.vision))
    gate = Gate(b)
    eng = Engine(gate, parallel=2, prefill_chunk=8, side_threads=1)
    try:
        ev1, ev2 = [], []
        j1 = _ask(eng, b, pxs[0], "What color is the circle?", ev1)
        assert gate.entered.wait(60)                          # the first encode has begun
        j2 = _ask(eng, b, pxs[1], "Where is the square?", ev2)  # the second queued behind it on the worker
        _until(lambda: all(s.job is not None for s in eng.slots))
        j1.cancel()
        j2.cancel()
        gate.go.set()
        _until(lambda: ev1 and ev2)
        assert ev1[-1][0] == ev2[-1][0] == "done"
        assert ev1[-1][1]["finish_reason"] == ev2[-1][1]["finish_reason"] == "cancelled"
        assert not any(kind == "text" for kind, _ in ev1 + ev2)
        _until(lambda: all(s.job is None and s.side is None for s in eng.slots))
        for s in eng.slots:
            assert s.encodes == {} and s.blocked is None and s.pieces is None and s.held == []
            assert s.state is None or not s.state.busy
        assert len(eng.rows_cache) == 0                       # no rows of a cancelled request kept
        assert eng.side.submit(lambda: 7).result(timeout=60) == 7 and eng.side._work_queue.empty()
        assert [k for k, _ in gate.threads].count("vision") == 1     # the queued one never encoded
        ev3 = []
        _ask(eng, b, pxs[0], "What color is the circle?", ev3)
        _until(lambda: ev3 and ev3[-1][0] in ("done", "error"))
    finally:
        eng.close()
    fresh = Engine(b, parallel=1)
    try:
        ev4 = []
        _ask(fresh, b, pxs[0], "What color is the circle?", ev4)
        _until(lambda: ev4 and ev4[-1][0] in ("done", "error"))
    finally:
        fresh.close()
    text = lambda ev: "".join(d for k, d in ev if k == "text")              # noqa: E731
    assert ev3[-1][0] == ev4[-1][0] == "done" and text(ev3) == text(ev4) and text(ev3)


class RideRecorder(Recorder):
    """Recorder + the rows of a prefill piece each decode step carried (Backend.riding)."""

    def decode_batch(self, states, tokens):
        out = self.b.decode_batch(states, tokens)
        self.calls.append(("decode", len(states), self.b.ride_rows))
        return out


def test_llamacpp_text_pieces_ride_the_decode_step(backends):
    """On llama.cpp a newcomer's text pieces go into the running streams' llama_decode (as llama-server batches its
    slots): some steps carry a piece's rows, and every answer is the unchunked engine's and `edgemm run`'s."""
    if "llamacpp" not in backends:
        pytest.skip("llama-cpp-python is not installed")
    b = backends["llamacpp"]
    assert b.rides
    qs, late = ["What color is the circle?", "How many shapes are there?"], ["Where is the square?"]
    plain, _ = _serve(b, qs, 0, late)
    rec = RideRecorder(b)
    got, calls = _serve(b, qs, 8, late, rec=rec)
    assert got == plain
    want = _run_answers(b, qs + late)
    assert [g.lstrip() for g in got] == want
    rode = [c for c in calls if c[0] == "decode" and c[2]]
    # pieces rode steps of the running streams: both of them, and (where the pieces are small enough on a fast CPU
    # to outlast the shorter answer) the one still running
    assert rode and any(c[1] == 2 for c in rode) and all(c[1] >= 1 for c in rode), calls
    assert not b.ride_pending()
