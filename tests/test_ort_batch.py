"""Batched decode on the ort backend (issue 15): slots are rows of one KV buffer per layer and decode_batch steps
them in one run of decoder_text; its logits equal each state's own batch-1 decode; old bundles still serve."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from edgemm.config import get_preset  # noqa: E402
from edgemm.errors import EdgemmError  # noqa: E402
from edgemm.model import EdgeMM  # noqa: E402
from edgemm.runtimes.ort_backend import OrtBackend  # noqa: E402

TOL = 1e-5


def _model(variant: str):
    cfg = get_preset("tiny-shapes")
    cfg.decoder.n_layers, cfg.decoder.max_seq_len = 2, 128
    if variant == "cogvlm":     # external RoPE over [batch, seq] positions, input_rows, grouped-query attention
        cfg.decoder.position_rule, cfg.decoder.eoi_branch, cfg.decoder.n_kv_heads = "cogvlm", "text", 2
    torch.manual_seed(0)
    return EdgeMM(cfg).init_weights(seed=3).eval()


@pytest.fixture(scope="module", params=["sequential", "cogvlm"])
def exported(request, tmp_path_factory, tokenizer):
    from edgemm.export.onnx import export_onnx
    torch.set_num_threads(1)
    m = _model(request.param)
    out = tmp_path_factory.mktemp("batch") / request.param
    man = export_onnx(model=(m, tokenizer), out=out, precision="fp32", threads=1, log=None, seed=1)
    return m, out, man


def _prompts(b, rng):
    """Three prompts of different lengths: text, text + image + text, text."""
    V, D, n = b.cfg.decoder.vocab_size, b.cfg.decoder.d_model, b.cfg.n_image_rows
    img = rng.standard_normal((1, n, D)).astype(np.float32)
    return [[("text", rng.integers(0, V, 3).tolist())],
            [("text", rng.integers(0, V, 2).tolist()), ("image", img), ("text", rng.integers(0, V, 4).tolist())],
            [("text", rng.integers(0, V, 9).tolist())]]


def _prefill(b, st, prompt):
    out = None
    for kind, data in prompt:
        out = b.text(st, data) if kind == "text" else b.image(st, data)
    return out


def test_batched_steps_equal_single_decodes(exported, monkeypatch):
    _, bundle, man = exported
    assert "batch" in man["stages"]["decoder_text"]
    b = OrtBackend.open(bundle=str(bundle), device="cpu", threads=1, slots=3)
    single = OrtBackend.open(bundle=str(bundle), device="cpu", threads=1)      # batch-1 states of their own
    assert b.batched and single.batched
    rng = np.random.default_rng(0)
    prompts = _prompts(b, rng) + _prompts(b, rng)[:1]
    sts, refs = [b.new_state(64) for _ in range(3)], [single.new_state(64) for _ in range(3)]
    assert all(b.pooled(s) for s in sts) and not any(single.pooled(s) for s in refs)
    assert b.new_state(64).cache.get("pool") is None              # a fourth live state: a buffer of its own
    toks = []
    for st, rf, p in zip(sts, refs, prompts):
        got, want = _prefill(b, st, p), _prefill(single, rf, p)
        assert np.abs(got - want).max() <= TOL
        toks.append(int(np.argmax(want)))
    assert len({st.length for st in sts}) == 3                      # different lengths in one step

    def no_single(*a, **k):
        raise AssertionError("decode_batch ran a state alone")

    def step(which):
        with monkeypatch.context() as mp:
            mp.setattr(b, "text", no_single)
            got = b.decode_batch([sts[i] for i in which], [toks[i] for i in which])
        for i, g in zip(which, got):
            want = single.text(refs[i], [toks[i]])
            assert np.abs(g - want).max() <= TOL, (i, np.abs(g - want).max())
            assert sts[i].length == refs[i].length and sts[i].pos == refs[i].pos
            toks[i] = int(np.argmax(want))

    for _ in range(3):
        step([0, 1, 2])
    step([0, 2])                        # row 1 sits out (its dummy row goes past what it holds)
    step([1, 2])
    b.release(sts[1])                   # a finished request: its row is reused by the next state
    with pytest.raises(EdgemmError, match="released"):
        b.text(sts[1], [1])
    sts[1], refs[1] = b.new_state(64), single.new_state(64)
    assert b.pooled(sts[1]) and sts[1].cache["row"] == 1
    p = prompts[3]
    assert np.abs(_prefill(b, sts[1], p) - _prefill(single, refs[1], p)).max() <= TOL
    toks[1] = int(np.argmax(single.text(refs[1], [5])))
    b.text(sts[1], [5])
    for _ in range(3):
        step([0, 1, 2])
    step([0, 1])


def test_full_row_sits_out(exported):
    """A row whose cache is full sits out on the spare row: the others' logits and its cache are untouched."""
    _, bundle, _ = exported
    b = OrtBackend.open(bundle=str(bundle), device="cpu", threads=1, slots=3)
    single = OrtBackend.open(bundle=str(bundle), device="cpu", threads=1)
    a, full, c = (b.new_state(8) for _ in range(3))
    ra, rc = single.new_state(8), single.new_state(8)
    assert [b._pool.row(x) for x in (a, full, c)] == [0, 1, 2]
    for st, rf, ids in ((a, ra, [1, 2, 3]), (c, rc, [4, 5])):
        b.text(st, ids)
        single.text(rf, ids)
    b.text(full, list(range(8)))
    held = [x[0, :, :8].copy() for x in full.cache["arrays"]]
    for t in (6, 7):
        got = b.decode_batch([a, c], [t, t])
        assert np.abs(got[0] - single.text(ra, [t])).max() <= TOL
        assert np.abs(got[1] - single.text(rc, [t])).max() <= TOL
    b.context_limit = 8                 # (below the context a full row grows the pool instead: test_kv_growth.py)
    with pytest.raises(EdgemmError, match="KV cache full"):
        b.decode_batch([a, full], [1, 2])
    assert all(np.array_equal(x[0, :, :8], h) for x, h in zip(full.cache["arrays"], held))


def test_busy_row_sits_out(exported):
    """A row being prefilled on another thread (State.busy: serve's side worker) is left out of the batched step
    (the rows on either side of it run apart): none of its rows is written, and the others' logits are each
    state's own (without busy the dummy row lands at its length: the test can fail). The caches hold the whole
    context, as a server's do (a dummy row past them would need RoPE tables longer than the context)."""
    _, bundle, _ = exported
    b = OrtBackend.open(bundle=str(bundle), device="cpu", threads=1, slots=3)
    single = OrtBackend.open(bundle=str(bundle), device="cpu", threads=1)
    a, busy, c = (b.new_state() for _ in range(3))
    ra, rc = single.new_state(), single.new_state()
    for st, rf, ids in ((a, ra, [1, 2, 3]), (c, rc, [4, 5])):
        b.text(st, ids)
        single.text(rf, ids)
    b.text(busy, [7, 8])
    for x in busy.cache["arrays"]:            # what a prefill in flight would be writing
        x[0, :, 2:16] = 0.25
    held = [x[0, :, :16].copy() for x in busy.cache["arrays"]]
    busy.busy = True
    for t in (6, 7):
        got = b.decode_batch([a, c], [t, t])
        assert np.abs(got[0] - single.text(ra, [t])).max() <= TOL
        assert np.abs(got[1] - single.text(rc, [t])).max() <= TOL
    assert all(np.array_equal(x[0, :, :16], h) for x, h in zip(busy.cache["arrays"], held))
    busy.busy = False
    b.decode_batch([a, c], [1, 1])
    assert not all(np.array_equal(x[0, :, :16], h) for x, h in zip(busy.cache["arrays"], held))


def test_exporter_validates_the_batched_step(exported):
    from edgemm.export.onnx import validate_batch
    m, bundle, man = exported
    v = man["validation"]["decode_batch"]
    assert v["ok"] and v["compared"] == 12 and v["max_abs_err"] <= 1e-4
    b = OrtBackend.open(bundle=str(bundle), device="cpu", threads=1, slots=3)
    rows = validate_batch(m, b, torch.Generator().manual_seed(5))
    assert max(r[0] for r in rows) <= 1e-4
    orig = type(b).decode_batch

    def swapped(self, states, tokens):          # a step that mixes up the rows must fail the check
        return orig(self, states, tokens)[::-1]
    b.decode_batch = swapped.__get__(b)
    rows = validate_batch(m, b, torch.Generator().manual_seed(5))
    assert max(r[0] for r in rows) > 1e-2


def _old_bundle(m, bundle, dst):
    """The bundle as exports before the batch dimension wrote it: decoder_text batch 1, no `batch` field."""
    import onnx
    from edgemm.bundle import write_manifest
    from edgemm.export.decoder_graph import decoder_graph
    from edgemm.export.graph import io_spec
    shutil.copytree(bundle, dst)
    g, _ = decoder_graph(m, "text")
    onnx.save(g, dst / "decoder_text.onnx")
    man = json.loads((dst / "edgemm.json").read_text())
    st = man["stages"]["decoder_text"]
    st.pop("batch")
    st["inputs"], st["outputs"] = io_spec(g)
    for k in ("format", "format_version", "created", "files"):
        man.pop(k)
    write_manifest(dst, man)
    return dst


def _answer(b, prompt, gen):
    """One request the way the engine runs it, alone (batch-1 states) -> its text."""
    from edgemm.generation import AnswerStream
    st = b.new_state(64)
    logits, ans = _prefill(b, st, prompt), AnswerStream(b.tokenizer, gen)
    while not ans.push(logits)[1]:
        logits = b.text(st, [ans.ids[-1]])
    b.release(st)
    return ans.text


def _serve(b, prompts, gen):
    """The requests through edgemm.serve's engine with 3 slots at once -> their texts."""
    from edgemm.serve.engine import Engine, Job
    eng = Engine(b, parallel=3)
    done, texts, ends = threading.Event(), {k: "" for k in range(len(prompts))}, {}

    def on_event(k):
        def ev(kind, data):
            if kind == "text":
                texts[k] += data
            elif kind in ("done", "error"):
                ends[k] = (kind, data)
                if len(ends) == len(prompts):
                    done.set()
        return ev
    try:
        with eng.cv:                        # admitted together: the slots decode side by side
            for k, p in enumerate(prompts):
                eng.submit(Job(segments=p, pixels=[], gen=gen, on_event=on_event(k)))
        assert done.wait(120)
    finally:
        eng.close()
    assert all(kind == "done" for kind, _ in ends.values()), ends
    return [texts[k] for k in range(len(prompts))], eng


def test_old_bundle_still_serves(exported, tmp_path):
    from edgemm.generation import GenerationConfig
    m, bundle, _ = exported
    old = _old_bundle(m, bundle, tmp_path / "old")
    backends = {"old": OrtBackend.open(bundle=str(old), device="cpu", threads=1, slots=3),
                "new": OrtBackend.open(bundle=str(bundle), device="cpu", threads=1, slots=3)}
    assert not backends["old"].batched and backends["new"].batched
    rng = np.random.default_rng(1)
    prompts = [[("text", rng.integers(0, 500, n).tolist())] for n in (3, 5, 8)]
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    want = [_answer(backends["old"], p, gen) for p in prompts]
    for name, b in backends.items():
        widths = []
        step = b.decode_batch
        b.decode_batch = lambda states, tokens, step=step: widths.append(len(states)) or step(states, tokens)
        texts, eng = _serve(b, prompts, gen)
        assert texts == want, name
        assert max(widths) == 3                     # the engine stepped the three slots in one call
        assert [b.pooled(s.state) for s in eng.slots] == [name == "new"] * 3    # rows of one buffer (new)
