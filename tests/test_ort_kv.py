"""`--kv-cache int8` on the ort backend (issue 31, item 3): ONNX Runtime's GroupQueryAttention keeps the cache in
int8 on the CPU provider (checked against the op's equations re-computed here), the bundle's decoder graphs
rewritten with the scales fitted at export (runtimes/ort_kv.py, export/kv_scales.py) run against ORT's own
float-cache run of the same bundle, and the refusals and `edgemm info` say what they should."""
from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")

from edgemm.errors import EdgemmError  # noqa: E402

EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


def _gqa_int8(H, K, E, cap, quant):
    from onnx import TensorProto as TP, helper as h
    f, i8 = TP.FLOAT, TP.INT8
    ins = [h.make_tensor_value_info(n, t, s) for n, t, s in (
        ("q", f, [1, None, H * E]), ("k", f, [1, None, K * E]), ("v", f, [1, None, K * E]),
        ("past_key", i8, [1, K, cap, E]), ("past_value", i8, [1, K, cap, E]), ("seqlens_k", TP.INT32, [1]),
        ("total", TP.INT32, []), ("k_scale", f, None), ("v_scale", f, None))]
    outs = [h.make_tensor_value_info("o", f, [1, None, H * E]), h.make_tensor_value_info("pk", i8, [1, K, cap, E]),
            h.make_tensor_value_info("pv", i8, [1, K, cap, E])]
    node = h.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total"]
                       + [""] * 5 + ["k_scale", "v_scale"], ["o", "pk", "pv"], domain="com.microsoft", num_heads=H,
                       kv_num_heads=K, k_quant_type=quant, v_quant_type=quant, kv_cache_bit_width=8)
    m = h.make_model(h.make_graph([node], "g", ins, outs),
                     opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("quant", ["PER_TENSOR", "PER_CHANNEL"])
def test_gqa_int8_cache_computes_on_the_cpu(quant):
    """The evidence that ORT's CPU kernel really computes with an int8 cache: the new rows stored as
    round(x / scale) clamped to int8, and the output the causal softmax attention over the dequantized cache
    (grouped heads), re-computed here from those equations."""
    H, K, E, cap, P, S = 4, 2, 16, 32, 5, 3
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, S, n * E)).astype(np.float32) for n in (H, K, K))
    shape = [1] if quant == "PER_TENSOR" else [1, K, 1, E]
    ks, vs = ((0.02 + 0.02 * rng.random(shape)).astype(np.float32) for _ in range(2))
    past = [np.zeros((1, K, cap, E), np.int8) for _ in range(2)]
    for p in past:
        p[:, :, :P] = rng.integers(-128, 128, (1, K, P, E))
    o, pk, pv = _gqa_int8(H, K, E, cap, quant).run(None, {
        "q": q, "k": k, "v": v, "past_key": past[0], "past_value": past[1],
        "seqlens_k": np.array([P + S - 1], np.int32), "total": np.array(P + S, np.int32), "k_scale": ks,
        "v_scale": vs})
    heads = lambda x: x.reshape(1, S, K, E).transpose(0, 2, 1, 3)                        # noqa: E731
    kq, vq = (np.clip(np.round(heads(x) / s), -128, 127) for x, s in ((k, ks), (v, vs)))
    assert np.array_equal(pk[:, :, P:P + S], kq) and np.array_equal(pv[:, :, P:P + S], vq)
    assert np.array_equal(pk[:, :, :P], past[0][:, :, :P])
    Kd = np.concatenate([past[0][:, :, :P], kq], 2) * ks                                   # dequantized
    Vd = np.concatenate([past[1][:, :, :P], vq], 2) * vs
    Q = q.reshape(1, S, H, E).transpose(0, 2, 1, 3)
    sc = Q @ np.repeat(Kd, H // K, 1).transpose(0, 1, 3, 2) / np.sqrt(E)
    sc = np.where(np.arange(P + S)[None, :] > (P + np.arange(S))[:, None], -np.inf, sc)
    w = np.exp(sc - sc.max(-1, keepdims=True))
    want = ((w / w.sum(-1, keepdims=True)) @ np.repeat(Vd, H // K, 1)).transpose(0, 2, 1, 3).reshape(1, S, H * E)
    assert np.abs(o - want).max() < 1e-5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The shipped model as an fp32 onnx bundle (with its fitted kv_cache_int8 scales)."""
    from edgemm.export.onnx import export_onnx
    out = tmp_path_factory.mktemp("kv8") / "fp32"
    export_onnx(model="tiny-shapes", out=out, precision="fp32", threads=1, log=None, seed=1)
    return str(out)


def _open(bundle, **kw):
    from edgemm.runtimes import load_backend
    return load_backend("ort", bundle=bundle, device="cpu", threads=1, **kw)


def test_manifest_records_the_scales(bundle):
    from edgemm.bundle import read_manifest
    from edgemm.config import ModelConfig
    m = read_manifest(bundle)
    c = ModelConfig.from_dict(m["model"]).decoder
    rec = m["kv_cache_int8"]
    assert rec["granularity"] == "per_head" and "shapes-calib" in rec["calibration"]
    for kv in ("k", "v"):
        s = np.asarray(rec[kv])
        assert s.shape == (c.n_layers, c.cache_heads) and (s > 0).all()


def test_int8_cache_against_the_float_cache(bundle):
    """The same bundle on ORT with its float cache and with --kv-cache int8: the first layer's int8 cache holds the
    float cache rounded at the manifest's scales (its inputs are the same in both runs), the later layers' within
    a step on average (their inputs carry the earlier layers' rounding), the logits after an image prompt stay
    close, and greedy answers to the example's questions are the same."""
    from edgemm.bundle import read_manifest
    from edgemm.generation import ChatSession, GenerationConfig
    f, q = _open(bundle), _open(bundle, kv_cache="int8")
    assert q.kv_dtype == np.int8 and "KV cache int8" in q.describe()
    rec = read_manifest(bundle)["kv_cache_int8"]
    gen = GenerationConfig(max_new_tokens=16)
    for question in ("What color is the circle?", "How many shapes are there?", "Where is the square?"):
        answers, states = [], []
        for b in (f, q):
            s = ChatSession(b, gen)
            s.set_image(str(EXAMPLE))
            answers.append(s.ask(question))
            states.append(s.state)
        assert answers[0] == answers[1], (question, answers)
    sf, sq = states
    n = sf.length
    assert sq.length == n
    for i, (af, aq) in enumerate(zip(sf.cache["arrays"], sq.cache["arrays"])):
        scale = np.asarray(rec["k" if i % 2 == 0 else "v"][i // 2], np.float32).reshape(1, -1, 1, 1)
        assert aq.dtype == np.int8
        got = aq[:, :, :n].astype(np.float32) * scale
        err = np.abs(got - af[:, :, :n]) / scale
        assert (err.max() <= 0.5 + 1e-3) if i < 2 else (err.mean() < 1.0), (i, err.max(), err.mean())
    prompt = [int(t) for t in f.tokenizer.user_turn("What color is the circle?", first=True)]
    rows = f.vision(__import__("edgemm.tilings", fromlist=["x"]).preprocess_image(str(EXAMPLE), f.cfg.vision))
    a, b = f.new_state(128), q.new_state(128)
    for be, st in ((f, a), (q, b)):
        be.image(st, rows)
    lf, lq = f.text(a, prompt), q.text(b, prompt)
    assert int(np.argmax(lf)) == int(np.argmax(lq)) and np.abs(lf - lq).max() < 0.05 * np.abs(lf).max()


def test_int8_pool_steps_equal_single_steps(bundle):
    """serve --parallel: int8 states as rows of one pool, stepped in one batched run, give each state's own
    batch-1 int8 logits."""
    q, single = _open(bundle, kv_cache="int8", slots=3), _open(bundle, kv_cache="int8")
    V = q.cfg.decoder.vocab_size
    rng = np.random.default_rng(1)
    pooled, alone = [q.new_state(64) for _ in range(3)], [single.new_state(64) for _ in range(3)]
    assert all(q.pooled(s) for s in pooled) and q._pool.dtype == np.int8
    for a, b, n in zip(pooled, alone, (3, 7, 5)):
        ids = rng.integers(3, V, n).tolist()
        q.text(a, ids)
        single.text(b, ids)
    for t in (5, 9):
        got = q.decode_batch(pooled, [t] * 3)
        for g, b in zip(got, alone):
            assert np.abs(g - single.text(b, [t])).max() < 1e-4


def test_refusals(bundle, tmp_path):
    import json
    import shutil
    from edgemm.runtimes import load_backend
    with pytest.raises(EdgemmError, match="the ort backend takes --kv-cache int8"):
        _open(bundle, kv_cache="q8_0")
    with pytest.raises(EdgemmError, match="this bundle's KV cache is f32"):
        _open(bundle, kv_cache="f16")
    with pytest.raises(EdgemmError, match="is the ort backend's"):
        load_backend("llamacpp", bundle=bundle, kv_cache="int8")
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    man = json.loads((old / "edgemm.json").read_text())
    del man["kv_cache_int8"]
    (old / "edgemm.json").write_text(json.dumps(man))
    from edgemm.runtimes.ort_backend import OrtBackend
    with pytest.raises(EdgemmError, match="records no KV-cache scales .* re-export"):
        OrtBackend.open(bundle=str(old), device="cpu", threads=1, verify=False, kv_cache="int8")


def test_info_shows_int8_kv_bytes(bundle):
    """`edgemm info --bundle B --kv-cache int8` on an fp32 onnx bundle: the cache at a quarter of the float bytes."""
    from edgemm.bundle import read_manifest
    from edgemm.config import ModelConfig
    from edgemm.info import _fmt, describe, kv_cache_bytes
    cfg = ModelConfig.from_dict(read_manifest(bundle)["model"])
    text = describe(bundle=bundle, contexts=[64], kv_cache="int8")
    line = text.splitlines()[-1]
    assert f"ctx     64  {_fmt(kv_cache_bytes(cfg, 64, 1.0)):>10}  (f32 {_fmt(kv_cache_bytes(cfg, 64, 4.0)):>10}, 0.25x)" \
        in line, line


def test_bench_rows_per_kv_cache(bundle):
    """`edgemm bench B --backend ort --kv-cache f32 --kv-cache int8`: one row each, measured on that cache."""
    from edgemm.bench import bench
    rep = bench([bundle], backends=("ort",), kv_caches=("f32", "int8"), limit=16, repeats=1, warmup=0,
                decode_steps=2, threads=1, fidelity_n=0, isolate=False, progress=False, log=None)
    rows = rep["results"]
    assert [r["name"].rsplit(" ", 2)[1:] for r in rows] == [["kv", "f32"], ["kv", "int8"]]
    assert "KV cache int8" in rows[1]["describe"] and "KV cache int8" not in rows[0]["describe"]
    assert rows[0]["total"] == rows[1]["total"] == 16 and min(r["accuracy"] for r in rows) >= 0.8
