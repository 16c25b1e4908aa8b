"""KV caches sized to need and grown (a copy into a bigger buffer) when a sequence outgrows them: the torch cache,
the ort backend's own buffers and its slots' pool (serve --parallel), a single-sequence llama.cpp context. A cache
started a few rows past the prompt grows mid-answer and gives the greedy ids and logits of a cache of the whole
context; the torch model's whole sequence without a cache (forward_full) or llama.cpp's own loop in a context of
the whole size is the independent reference."""
from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgemm.config import get_preset  # noqa: E402
from edgemm.memory import kv_rows  # noqa: E402
from edgemm.model import EdgeMM  # noqa: E402

STEPS = 24


def _model():
    cfg = get_preset("tiny-shapes")
    cfg.decoder.n_layers, cfg.decoder.max_seq_len = 2, 256
    torch.manual_seed(0)
    return EdgeMM(cfg).init_weights(seed=3).eval()


def _prompt(cfg, rng):
    V, D = cfg.decoder.vocab_size, cfg.decoder.d_model
    return [("text", rng.integers(0, V, 3).tolist()),
            ("image", (rng.standard_normal((1, cfg.n_image_rows, D)) * 0.5).astype(np.float32)),
            ("text", rng.integers(0, V, 5).tolist())]


def _greedy(b, st, prompt, steps=STEPS):
    """-> (ids, logits per step) of a greedy answer."""
    for kind, data in prompt:
        logits = b.text(st, data) if kind == "text" else b.image(st, data)
    ids, seen = [], []
    for _ in range(steps):
        seen.append(logits)
        ids.append(int(np.argmax(logits)))
        logits = b.text(st, [ids[-1]])
    return ids, seen


def _full_reference(m, prompt, ids) -> np.ndarray:
    """The last row's logits of prompt + ids through the whole sequence at once (no KV cache)."""
    segs = [(k, torch.tensor([d]) if k == "text" else torch.from_numpy(d)) for k, d in prompt]
    segs.append(("text", torch.tensor([ids[:-1]])))
    with torch.inference_mode():
        return m.forward_full(segs)[0, -1].float().numpy()


def test_kv_rows_blocks_doubling_and_limit():
    assert kv_rows(1, 4096) == 64 and kv_rows(64, 4096) == 64 and kv_rows(65, 4096) == 128
    assert kv_rows(300, 4096, capacity=256) == 512           # a growing cache at least doubles
    assert kv_rows(300, 320, capacity=256) == 320            # never past the context
    assert kv_rows(300, 4096, block=256) == 512


def test_torch_cache_grows_mid_answer():
    from edgemm.runtimes.torch_backend import TorchBackend
    torch.set_num_threads(1)
    m = _model()
    b = TorchBackend(m, None)
    prompt = _prompt(m.cfg, np.random.default_rng(0))
    rows = 3 + m.cfg.n_image_rows + 5
    small, full = b.new_state(max_len=rows + 3), b.new_state()
    assert small.cache.capacity == rows + 3 and full.cache.capacity == 256
    got, got_logits = _greedy(b, small, prompt)
    want, want_logits = _greedy(b, full, prompt)
    assert small.cache.capacity > rows + 3 and small.cache.limit == 256     # it grew, mid-answer
    assert got == want
    assert max(np.abs(g - w).max() for g, w in zip(got_logits, want_logits)) <= 1e-5
    ref = _full_reference(m, prompt, got)
    assert np.abs(got_logits[-1] - ref).max() <= 1e-3
    # a cache at the context still refuses more rows
    with pytest.raises(ValueError, match="KV cache full"):
        b.text(small, list(range(256)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    pytest.importorskip("onnxruntime")
    from edgemm.export.onnx import export_onnx
    torch.set_num_threads(1)
    m = _model()
    out = tmp_path_factory.mktemp("grow") / "b"
    export_onnx(model=(m, tokenizer), out=out, precision="fp32", threads=1, log=None, seed=1)
    return m, str(out)


def test_ort_state_grows_mid_answer(exported):
    from edgemm.runtimes.ort_backend import OrtBackend
    m, bundle = exported
    b = OrtBackend.open(bundle=bundle, device="cpu", threads=1)
    prompt = _prompt(m.cfg, np.random.default_rng(1))
    rows = 3 + m.cfg.n_image_rows + 5
    small, full = b.new_state(max_len=rows + 3), b.new_state()
    assert full.cache["capacity"] == 256
    got, got_logits = _greedy(b, small, prompt)
    want, want_logits = _greedy(b, full, prompt)
    assert small.cache["capacity"] == kv_rows(rows + 4, 256, rows + 3)           # grew once, doubling
    assert small.cache["arrays"][0].shape[2] == small.cache["capacity"]
    assert got == want
    assert max(np.abs(g - w).max() for g, w in zip(got_logits, want_logits)) <= 1e-5
    assert np.abs(got_logits[-1] - _full_reference(m, prompt, got)).max() <= 1e-3
    np.testing.assert_array_equal(small.cache["arrays"][0][0, :, :small.length],
                                  full.cache["arrays"][0][0, :, :full.length])


def test_ort_pool_grows_mid_answer_beside_a_prefill_on_another_thread(exported):
    """Two pooled slots sized just past their prompts decode in batched steps until one outgrows the pool, which
    grows (every row copied) while a third slot is being prefilled on another thread (serve's side worker): the
    answers are those of full-size caches of their own, and the third slot's prefill is unharmed."""
    from edgemm.runtimes.ort_backend import OrtBackend
    m, bundle = exported
    b = OrtBackend.open(bundle=bundle, device="cpu", threads=1, slots=3)
    single = OrtBackend.open(bundle=bundle, device="cpu", threads=1)
    rng = np.random.default_rng(2)
    prompts = [_prompt(m.cfg, rng), [("text", rng.integers(0, m.cfg.decoder.vocab_size, 9).tolist())]]
    rows = 3 + m.cfg.n_image_rows + 5
    sts = [b.new_state(max_len=rows + 2) for _ in range(2)]
    assert all(b.pooled(s) for s in sts) and b._pool.capacity == rows + 2
    refs = [single.new_state() for _ in range(2)]
    toks = []
    for st, rf, p in zip(sts, refs, prompts):
        for kind, data in p:
            got = b.text(st, data) if kind == "text" else b.image(st, data)
            want = single.text(rf, data) if kind == "text" else single.image(rf, data)
        assert np.abs(got - want).max() <= 1e-5
        toks.append(int(np.argmax(want)))
    # a third slot prefilled in pieces on another thread meanwhile (its state busy, as serve's side worker does)
    third = b.new_state(max_len=rows + 2)
    third_ref = single.new_state()
    side_ids = rng.integers(0, m.cfg.decoder.vocab_size, 18).tolist()
    third.busy = True
    out = {}

    def side():
        for a in range(0, 18, 3):
            out["logits"] = b.text(third, side_ids[a:a + 3])

    t = threading.Thread(target=side)
    t.start()
    cap0 = b._pool.capacity
    for _ in range(STEPS):
        got = b.decode_batch(sts, toks)
        for i in range(2):
            want = single.text(refs[i], [toks[i]])
            assert np.abs(got[i] - want).max() <= 1e-5, i
            toks[i] = int(np.argmax(want))
    t.join()
    third.busy = False
    assert b._pool.capacity > cap0                                   # grew mid-answer
    assert all(s.cache["capacity"] == b._pool.capacity for s in (*sts, third))
    assert np.abs(out["logits"] - single.text(third_ref, side_ids)).max() <= 1e-5
    got = b.decode_batch([*sts, third], [*toks, 7])                  # all three rows step on in the grown pool
    for g, rf, t_ in zip(got, [*refs, third_ref], [*toks, 7]):
        assert np.abs(g - single.text(rf, [t_])).max() <= 1e-5
    # a new state asking more than the pool holds grows it when a row is free
    b.release(third)
    st = b.new_state(max_len=b._pool.capacity + 1)
    assert b.pooled(st) and b._pool.capacity >= st.cache["capacity"] > cap0


def test_engine_sizes_slots_to_need(exported):
    """edgemm serve's slots: a cache of prompt + max_tokens rows (rounded to a block), not of the context, and grown
    for a longer request in the same slot."""
    from edgemm.generation import GenerationConfig
    from edgemm.runtimes.ort_backend import OrtBackend
    from edgemm.serve.engine import Engine, Job
    m, bundle = exported
    b = OrtBackend.open(bundle=bundle, device="cpu", threads=1, slots=2)
    eng = Engine(b, parallel=1, prefill_chunk=0)
    try:
        for n, max_tokens in ((5, 8), (40, 100)):
            done = threading.Event()
            ids = list(range(3, 3 + n))
            eng.submit(Job(segments=[("text", ids)], pixels=[], gen=GenerationConfig(max_new_tokens=max_tokens),
                           on_event=lambda kind, data: done.set() if kind in ("done", "error") else None,
                           prompt_rows=n))
            assert done.wait(60)
            assert eng.slots[0].state.cache["capacity"] == kv_rows(n + max_tokens + 1, 256)
    finally:
        eng.close()


llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")


@llama
def test_llamacpp_context_sized_to_need_and_grown(tmp_path, tokenizer):
    """A single-sequence llamacpp backend makes its context as large as new_state asks (not the model's context)
    and grows it (the sequence copied into a new context) mid-answer: its greedy logits are those of stock
    llama-cpp-python's Llama in a context of the whole size (no edgemm code)."""
    from edgemm.checkpoint import save_checkpoint
    from edgemm.export.gguf import export_gguf
    from edgemm.llamacpp import load_llama_cpp
    from edgemm.runtimes.llamacpp_backend import FIRST_CTX, LlamaCppBackend
    m = _model()
    m.cfg.decoder.max_seq_len = 2048
    save_checkpoint(m, tokenizer, tmp_path / "ckpt")
    out = tmp_path / "g"
    export_gguf(model=str(tmp_path / "ckpt"), out=out, precision={"vision": "f32", "decoder": "f32"}, log=None)
    b = LlamaCppBackend.open(bundle=str(out), threads=1, device="cpu")
    try:
        assert b.context_length == 2048 and b.kv_grows
        st = b.new_state(max_len=20)
        n0 = b.runner.n_ctx
        assert n0 == FIRST_CTX
        V = m.cfg.decoder.vocab_size
        prompt = np.random.default_rng(3).integers(0, V, n0 - 4).tolist()
        logits, got, seen = b.text(st, prompt), [], []
        for _ in range(12):                               # past n0 rows: the context grows mid-answer
            seen.append(logits)
            got.append(int(np.argmax(logits)))
            logits = b.text(st, [got[-1]])
        assert b.runner.n_ctx > n0 and st.length == len(prompt) + 12
    finally:
        b.close()
    import json
    load_llama_cpp()            # registers llama.cpp's CPU variant; from here on stock llama-cpp-python only
    from llama_cpp import Llama
    man = json.loads((out / "edgemm.json").read_text())
    # logits_all: llama.cpp's cogvlm graph does not select output rows (tests/test_gguf.py); f32 KV as the backend's
    llm = Llama(model_path=str(out / man["stages"]["decoder"]["file"]), n_ctx=2048, n_batch=512, n_threads=1,
                logits_all=True, type_k=0, type_v=0, verbose=False)
    llm.eval(prompt)
    for i, t in enumerate(got):
        ref = np.asarray(llm.scores[llm.n_tokens - 1], np.float32)
        assert np.abs(ref - seen[i]).max() <= 1e-4, i
        assert int(np.argmax(ref)) == t
        llm.eval([t])
