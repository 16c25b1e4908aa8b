"""The trt target: Q/DQ graphs on the CPU (onnx.checker, ONNX Runtime vs the reference), profiles, the build plan,
build-engines without a GPU, FP8 refusal, engine/GPU mismatch. Engine builds run only where TensorRT and a CUDA
GPU are present (they skip with the reason elsewhere)."""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from edgemm.checkpoint import DEMO_DIR, save_checkpoint  # noqa: E402
from edgemm.cli import main  # noqa: E402
from edgemm.config import get_preset  # noqa: E402
from edgemm.errors import EdgemmError  # noqa: E402
from edgemm.export import trt as T  # noqa: E402
from edgemm.export import trt_profiles as P  # noqa: E402
from edgemm.export.thresholds import bound  # noqa: E402
from edgemm.model import EdgeMM  # noqa: E402
from edgemm.runtimes import load_backend  # noqa: E402
from edgemm.runtimes import trt_backend as TB  # noqa: E402

HERE = TB.gpu_identity()
needs_gpu = pytest.mark.skipif(HERE is None, reason="needs the tensorrt package and a CUDA GPU "
                                                    "(none on this machine)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.conftest import make_tokenizer
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(EdgeMM(get_preset("tiny-shapes")).init_weights(seed=3), make_tokenizer(), d)
    return d


def _export(ckpt, out, p, **kw):
    return T.export_trt(model=str(ckpt), out=out, precision=p, threads=2, seed=0, calib_size=8, log=None,
                        no_build=True, **kw)


@pytest.fixture(scope="module")
def int8(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "int8"
    return out, _export(ckpt, out, "int8")


@pytest.fixture(scope="module")
def fp16(ckpt, tmp_path_factory):
    """Exported through the CLI: also checks the one-line build hint."""
    out = tmp_path_factory.mktemp("b") / "fp16"
    r = CliRunner().invoke(main, ["export", "--target", "trt", "--precision", "fp16", "--model", str(ckpt),
                                  "-o", str(out), "--threads", "2"])
    assert r.exit_code == 0, r.output
    hint = [ln for ln in r.output.splitlines() if "build-engines" in ln]
    assert len(hint) == 1 and f"edgemm build-engines {out}" in hint[0]
    return out, json.loads((out / "edgemm.json").read_text())


def _ops(path):
    m = onnx.load(str(path))
    return m, [n.op_type for n in m.graph.node]


# ---- Q/DQ graphs on the CPU ------------------------------------------------------------------------------
def test_int8_graphs_are_standard_qdq(int8):
    out, man = int8
    assert man["target"] == "trt" and man["precision"] == {"vision": "int8", "decoder": "int8"}
    for s in T.STAGES:
        path = out / man["stages"][s]["file"]
        onnx.checker.check_model(str(path), full_check=True)
        m, ops = _ops(path)
        assert {o.domain for o in m.opset_import} == {""}           # standard ops only: TensorRT parses them
        assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
        assert "GroupQueryAttention" not in ops
        assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
        inits = {t.name: t for t in m.graph.initializer}
        for n in m.graph.node:                                          # symmetric: every zero point is 0
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
                z = onnx.numpy_helper.to_array(inits[n.input[2]])
                assert not np.any(z.astype(np.float32))
        w8 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert w8, f"{s}: int8 weights stored as int8"
    for s in ("decoder_text", "decoder_image"):
        st = man["stages"][s]
        assert st["graph"] == "onnx-standard-kv-window"
        names = [i["name"] for i in st["inputs"]]
        assert "past_len" in names and "cache_key.0" in names
        assert "new_key.0" in [o["name"] for o in st["outputs"]]
        _, ops = _ops(out / st["file"])
        assert "ScatterElements" in ops and "Where" in ops
    assert man["calibration"]["items"] == 8


def test_int8_validation_figures(int8):
    out, man = int8
    v = man["validation"]["stages"]
    for s in T.STAGES:
        lim = bound("trt", "int8", s, "cosine")
        assert v[s]["ok"] and v[s]["cosine"] >= lim, (s, v[s])
        assert man["validation"]["thresholds"][s] == f"cosine >= {lim:g}"
    assert "engines" in man["trt"] and man["trt"]["engines"] == {}


def test_int8_runs_in_ort_cpu_close_to_reference(int8, ckpt):
    """The trt bundle through `--backend trt --device cpu` (ONNX Runtime, CPU) against the torch backend."""
    out, _ = int8
    b = load_backend("trt", bundle=str(out), device="cpu", threads=2)
    assert isinstance(b, TB.OnnxQdqBackend)
    tb = load_backend("torch", model=str(ckpt), device="cpu", threads=2)
    rng = np.random.default_rng(5)
    px = rng.standard_normal((1, 3, 48, 48)).astype(np.float32)
    rows, rows_t = b.vision(px), tb.vision(px)
    cos = float((rows * rows_t).sum() / np.linalg.norm(rows) / np.linalg.norm(rows_t))
    assert cos > 0.99
    st, stt = b.new_state(max_len=64), tb.new_state(max_len=64)
    for be, s in ((b, st), (tb, stt)):
        be.text(s, [1, 7, 9])
        be.image(s, rows_t)
    lo, lt = b.text(st, [4, 2]), tb.text(stt, [4, 2])
    assert float(lo @ lt / np.linalg.norm(lo) / np.linalg.norm(lt)) > 0.99
    assert st.length == stt.length and st.pos == stt.pos


def test_fp16_graphs_exact_and_kv_window(fp16, ckpt):
    """fp16 bundles hold the fp32 graphs (fp16 is applied by TensorRT): within 1e-4 of torch, cache rows written
    in place at past_len, nothing past the filled rows, rewinding reproduces the logits."""
    out, man = fp16
    for s in T.STAGES:
        _, ops = _ops(out / man["stages"][s]["file"])
        assert "QuantizeLinear" not in ops
        assert man["validation"]["stages"][s]["max_abs_err"] <= 1e-4
    b = load_backend("trt", bundle=str(out), device="cpu", threads=2)
    tb = load_backend("torch", model=str(ckpt), device="cpu", threads=2)
    px = np.random.default_rng(0).standard_normal((1, 3, 48, 48)).astype(np.float32)
    rows = b.vision(px)
    np.testing.assert_allclose(rows, tb.vision(px), atol=1e-5)
    st, stt = b.new_state(max_len=48), tb.new_state(max_len=48)
    for be, s in ((b, st), (tb, stt)):
        be.text(s, [1, 5, 9])
        be.image(s, rows)
    lo, lt = b.text(st, [4, 2]), tb.text(stt, [4, 2])
    np.testing.assert_allclose(lo, lt, atol=1e-4)
    k0 = st.cache["k"][0]                                          # [1, cap, K, E]
    np.testing.assert_allclose(k0[0, :st.length].transpose(1, 0, 2), stt.cache.k[0, 0, :, :stt.length].numpy(),
                               atol=1e-5)
    assert not k0[0, st.length:].any()
    st.length -= 2
    st.pos -= 2
    np.testing.assert_allclose(b.text(st, [4, 2]), lo, atol=1e-6)
    with pytest.raises(EdgemmError, match="KV cache full"):
        b.text(st, list(range(48)))


def test_greedy_answers_match_torch_fp16(fp16, ckpt):
    from edgemm import shapes
    from edgemm.generation import GenerationConfig, answer
    out, _ = fp16
    b = load_backend("trt", bundle=str(out), device="cpu", threads=2)
    tb = load_backend("torch", model=str(ckpt), device="cpu", threads=2)
    img = shapes.render(shapes.sample_scene(np.random.default_rng(3)))
    gen = GenerationConfig(max_new_tokens=8)
    assert answer(b, img, "What color is the circle?", gen) == answer(tb, img, "What color is the circle?", gen)


def test_fp8_and_mixed_precision_per_stage(ckpt, tmp_path):
    """vision=fp16, decoder=fp8: fp8 Q/DQ in the decoder graphs only; validation figures reported."""
    out = tmp_path / "fp8"
    man = _export(ckpt, out, {"vision": "fp16", "decoder": "fp8"})
    _, ops_v = _ops(out / "vision.onnx")
    assert "QuantizeLinear" not in ops_v and man["stages"]["vision"]["precision"] == "fp16"
    for s in ("decoder_text", "decoder_image"):
        m, ops = _ops(out / f"{s}.onnx")
        fp8 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
        assert fp8 and "QuantizeLinear" in ops and man["stages"][s]["precision"] == "fp8"
    v = man["validation"]["stages"]
    assert all(v[s]["ok"] for s in T.STAGES), v
    print({s: round(v[s]["cosine"], 5) for s in T.STAGES})


# ---- profiles and the build plan (pure) ------------------------------------------------------------------
def test_profiles_cover_the_context(int8):
    _, man = int8
    cfg = get_preset("tiny-shapes")
    profs = man["trt"]["profiles"]
    assert set(profs) == {"orin", "workstation"}
    for dc, p in profs.items():
        ctx = p["_meta"]["max_context"]
        assert ctx == min(T.DEVICE_CLASSES[dc]["max_context"], cfg.decoder.max_seq_len) == man["trt"]["max_context"]
        for s in T.STAGES:
            names = {i["name"] for i in man["stages"][s]["inputs"]}
            assert set(p[s]) == names, (dc, s)                         # a shape for every graph input
            for name, r in p[s].items():
                assert all(lo <= o <= hi for lo, o, hi in zip(r["min"], r["opt"], r["max"])), (s, name)
        t = p["decoder_text"]
        assert t["cache_key.0"]["max"][1] == ctx and t["input_ids"]["max"][1] == ctx
        assert t["input_ids"]["min"][1] == 1                          # decode steps
        im = p["decoder_image"]
        assert im["image_rows"]["max"][1] == cfg.n_image_rows and im["cache_value.2"]["max"][1] == ctx
    assert profs["orin"]["vision"]["pixels"]["max"][0] == 1
    assert profs["workstation"]["vision"]["pixels"]["max"][0] == 8
    big = get_preset("bench-0.5b")
    assert T.make_profiles(big, "orin")["_meta"]["max_context"] == 2048
    assert T.make_profiles(big, "workstation")["_meta"]["max_context"] == 4096
    assert T.make_profiles(big, "orin", max_context=1024)["decoder_text"]["cache_key.0"]["max"][1] == 1024
    with pytest.raises(EdgemmError, match="exceeds the model's context"):
        T.make_profiles(big, "orin", max_context=8192)


def _plan(man, trt="10.3.0", cc="8.7", gpu="Orin", dc=None):
    return P.build_plan(man, {"tensorrt": trt, "gpu": gpu, "compute_capability": cc}, dc)


def test_build_plan(int8):
    _, man = int8
    p = _plan(man, dc="orin")
    assert p["device_class"] == "orin" and p["timing_cache"] == "engines/timing.cache"
    for s in T.STAGES:
        sp = p["stages"][s]
        assert sp["strongly_typed"] is False and sp["flags"] == ["INT8", "FP16"]
        assert sp["workspace_bytes"] == 1024 << 20 and sp["engine"] == f"engines/{s}.engine"
        assert sp["profile"] == man["trt"]["profiles"]["orin"][s]
    w = _plan(man, trt="10.8.0", cc="8.9", gpu="RTX 4090", dc="workstation")
    assert w["stages"]["vision"]["workspace_bytes"] == 8192 << 20
    t11 = _plan(man, trt="11.0.0", cc="9.0")
    assert all(sp["strongly_typed"] and sp["flags"] == [] for sp in t11["stages"].values())
    with pytest.raises(EdgemmError, match="too old"):
        _plan(man, trt="8.6.2")
    fp16 = dict(man, precision={"vision": "fp16", "decoder": "fp16"})
    assert _plan(fp16)["stages"]["decoder_text"]["flags"] == ["FP16"]
    with pytest.raises(EdgemmError, match="strongly typed"):
        _plan(fp16, trt="11.0.0")
    assert T.trt_flags("fp8", False) == ["FP8", "FP16"]
    assert T.default_device_class({"gpu": "Orin (nvgpu)"}) == "orin"


def test_fp8_refused_below_sm89(int8, ckpt, tmp_path, monkeypatch):
    _, man = int8
    fp8 = dict(man, precision={"vision": "int8", "decoder": "fp8"})
    for cc in ("8.7", "8.6", "7.5"):
        with pytest.raises(EdgemmError, match=r"8\.9 or newer.*--precision int8"):
            _plan(fp8, cc=cc)
    assert _plan(fp8, trt="10.8.0", cc="8.9", gpu="L4")["stages"]["decoder_text"]["flags"] == ["FP8", "FP16"]
    _plan(fp8, trt="10.8.0", cc="9.0", gpu="H100")
    # at export, on a faked sm 8.7 GPU with TensorRT, before any work is done
    monkeypatch.setattr(TB, "gpu_identity", lambda: {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"})
    with pytest.raises(EdgemmError, match="int8"):
        T.export_trt(model=str(ckpt), out=tmp_path / "x", precision="fp8", log=None)
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(main, ["export", "--target", "trt", "--precision", "fp8", "--model", str(ckpt),
                                  "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--precision int8" in r.output


# ---- engines: refusal paths on any machine -----------------------------------------------------------------
def test_build_engines_without_gpu_exits_2(int8, monkeypatch):
    out, _ = int8
    monkeypatch.setattr(TB, "gpu_identity", lambda: None)
    r = CliRunner().invoke(main, ["build-engines", str(out)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.output
    assert "TensorRT and a CUDA GPU" in lines[0] and f"edgemm build-engines {out}" in lines[0]


def test_engines_for_another_gpu_refused(int8, tmp_path, monkeypatch):
    import shutil
    out, man = int8
    eng = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7",
           "files": {s: f"engines/{s}.engine" for s in T.STAGES}}
    here = {"tensorrt": "10.8.0", "gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    assert "GPU 'Orin'" in TB.engine_mismatch(eng, here)
    assert "TensorRT version" in TB.engine_mismatch(eng, dict(eng, tensorrt="10.4.0"))
    assert TB.engine_mismatch(eng, {k: eng[k] for k in ("tensorrt", "gpu", "compute_capability")}) is None
    assert "no TensorRT engines" in TB.engine_mismatch({}, here)
    d = tmp_path / "b"
    shutil.copytree(out, d)
    m = json.loads((d / "edgemm.json").read_text())
    m["trt"]["engines"] = eng
    (d / "edgemm.json").write_text(json.dumps(m))
    ok, why = TB.TrtBackend.available(m, "auto")
    assert not ok
    monkeypatch.setattr(TB, "gpu_identity", lambda: here)
    ok, why = TB.TrtBackend.available(m, "auto")
    assert not ok and "Orin" in why
    with pytest.raises(EdgemmError, match="rebuild them on this machine: edgemm build-engines"):
        TB.TrtBackend.open(bundle=str(d), device="cuda", verify=False)
    monkeypatch.setattr(TB, "gpu_identity", lambda: None)
    with pytest.raises(EdgemmError, match="needs TensorRT and a CUDA GPU"):
        TB.TrtBackend.open(bundle=str(d), device="auto", verify=False)


def test_trt_backend_refuses_onnx_bundles(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "edgemm.json").write_text(json.dumps({"format": "edgemm-bundle", "format_version": 1, "target": "onnx",
                                               "stages": {s: {"file": f"{s}.onnx"} for s in T.STAGES},
                                               "files": {}}))
    with pytest.raises(EdgemmError, match="trt bundles"):
        TB.TrtBackend.open(bundle=str(d), device="cpu")


def test_failed_engine_rebuild_keeps_the_previous_engines(fp16, tmp_path, monkeypatch):
    """build-engines --force whose new engines fail validation (or whose build dies) leaves the bundle as it was:
    the manifest byte for byte, the previous engine files, and verify_bundle passing (TensorRT mocked: CPU only)."""
    import shutil
    from edgemm import bundle as B
    from edgemm.export import trt_engines as TE
    d = tmp_path / "b"
    shutil.copytree(fp16[0], d)
    here = {"tensorrt": "10.9.0", "gpu": "Fake GPU", "compute_capability": "8.9"}
    # a bundle that already holds (fake) engines for this GPU, committed by the manifest
    man = B.verify_bundle(d)
    (d / "engines").mkdir()
    files = {}
    for s in T.STAGES:
        (d / "engines" / f"{s}.old.engine").write_bytes(b"old " + s.encode())
        files[s] = f"engines/{s}.old.engine"
    man["trt"]["engines"] = {**here, "files": files}
    man.pop("files")
    B.write_manifest(d, man)
    before = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    monkeypatch.setattr(TB, "gpu_identity", lambda: here)
    monkeypatch.setattr(TE, "build_engine", lambda path, sp, cache, log: (b"new engine", b"cache"))

    def bad_validation(bundle, engines=None, **kw):
        assert all((d / f).read_bytes() == b"new engine" for f in engines["files"].values())   # staged, named
        return {s: {"ok": s != "decoder_image", "precision": "fp16", "tolerance": "t", "max_abs_err": 1.0,
                    "cosine": 0.5, "ref_max_abs": 1.0} for s in T.STAGES}
    monkeypatch.setattr(TE, "validate_engines", bad_validation)
    with pytest.raises(EdgemmError, match="decoder_image engine.*previous engines stay"):
        TE.build_engines(d, force=True, log=None)
    assert {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    B.verify_bundle(d)

    def dies(path, sp, cache, log):           # a build interrupted halfway (second stage)
        if "decoder_text" in str(path):
            raise KeyboardInterrupt
        return b"new engine", b"cache"
    monkeypatch.setattr(TE, "build_engine", dies)
    with pytest.raises(KeyboardInterrupt):
        TE.build_engines(d, force=True, log=None)
    assert {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()} == before

    # and a rebuild that validates switches the manifest to the new files and removes the old ones
    monkeypatch.setattr(TE, "build_engine", lambda path, sp, cache, log: (b"new engine", b"cache"))
    monkeypatch.setattr(TE, "validate_engines", lambda bundle, engines=None, **kw: {
        s: {"ok": True, "precision": "fp16", "tolerance": "t", "max_abs_err": 0.0, "cosine": 1.0, "ref_max_abs": 1.0}
        for s in T.STAGES})
    new = TE.build_engines(d, force=True, log=None)
    assert all((d / f).read_bytes() == b"new engine" for f in new["trt"]["engines"]["files"].values())
    assert not any((d / f).exists() for f in files.values())
    B.verify_bundle(d)


# ---- with TensorRT and a GPU ---------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.gpu
def test_build_engines_and_run(int8, fp16, ckpt, tmp_path):
    import shutil
    import time
    from edgemm import shapes
    from edgemm.generation import GenerationConfig
    for src, _ in (fp16, int8):
        d = tmp_path / src.name
        shutil.copytree(src, d)
        man = T.build_engines(d, log=print)
        e = man["trt"]["engines"]
        assert e["tensorrt"] == HERE["tensorrt"] and e["gpu"] == HERE["gpu"]
        assert all(f in man["files"] for f in e["files"].values())
        assert all(f["ok"] for f in e["validation"].values())
        b = load_backend("auto", bundle=str(d))
        assert isinstance(b, TB.TrtBackend)
        # the engines' greedy answer is the Q/DQ graphs' (the numbers they were validated against) where the graphs
        # are sure of each token: a random-weight model's near-ties (top-2 logits within 0.05) may flip either way
        img = shapes.render(shapes.sample_scene(np.random.default_rng(1)))
        cpu = load_backend("trt", bundle=str(d), device="cpu", threads=2)
        ok, got, want = _same_answer_where_sure(b, cpu, img, "What color is the circle?",
                                                GenerationConfig(max_new_tokens=4))
        assert ok, (src.name, got, want)
        st = b.new_state()
        b.text(st, [1])
        t0, n = time.time(), 64
        for _ in range(n):
            b.text(st, [5])
        print(f"{src.name}: build {sum(e['build_seconds'].values()):.1f}s, engines "
              f"{sum(e['bytes'].values()) / 1e6:.1f} MB, decode {n / (time.time() - t0):.0f} tokens/s")
        with pytest.raises(EdgemmError, match="already holds engines"):
            T.build_engines(d, log=None)


class _Tops:
    """A backend that records, for every text() call, its logits' top token and the gap to the second."""

    def __init__(self, b):
        self._b, self.tops = b, []

    def __getattr__(self, name):
        return getattr(self._b, name)

    def text(self, st, ids):
        out = self._b.text(st, ids)
        top2 = np.sort(np.asarray(out, np.float64))[-2:]
        self.tops.append((int(np.argmax(out)), float(top2[1] - top2[0])))
        return out


def _same_answer_where_sure(b, ref, img, question, cfg, margin: float = 0.05):
    """b's greedy answer is ref's, or they part where ref's top-2 logits are within `margin` (a near-tie).
    -> (ok, b's answer, ref's answer)."""
    from edgemm.generation import answer
    rb, rr = _Tops(b), _Tops(ref)
    got, want = answer(rb, img, question, cfg), answer(rr, img, question, cfg)
    if got == want:
        return True, got, want
    k = next((i for i, (x, y) in enumerate(zip(rb.tops, rr.tops)) if x[0] != y[0]), None)
    return k is not None and rr.tops[k][1] < margin, got, want


@needs_gpu
@pytest.mark.gpu
@pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").exists(),
                    reason="the shipped tiny-shapes weights are not in this checkout (edgemm/data/tiny-shapes)")
def test_shipped_model_engines_answer_as_the_reference(tmp_path):
    """The trained model's engines (built at export: TensorRT and a GPU are here) answer the test split's colour and
    shape questions (measured 1.000 and 0.993 in fp32) as the PyTorch reference does, fp16 and int8."""
    from edgemm import shapes
    from edgemm.generation import GenerationConfig, answer
    ref = load_backend("torch", model="tiny-shapes", device="cpu")
    items = [(img, q.question) for img, q in shapes.make_split("test", 16) if q.qtype in ("color", "shape")]
    cfg = GenerationConfig(max_new_tokens=8)
    want = [answer(ref, img, q, cfg) for img, q in items]
    for p in ("fp16", "int8"):
        T.export_trt(model="tiny-shapes", out=tmp_path / p, precision=p, log=None)
        b = load_backend("auto", bundle=str(tmp_path / p))
        assert isinstance(b, TB.TrtBackend)
        assert [answer(b, img, q, cfg) for img, q in items] == want, p


# ---- the shipped demo model -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").exists(),
                    reason="the shipped tiny-shapes weights are not in this checkout (edgemm/data/tiny-shapes)")
def test_shipped_model_int8_accuracy(tmp_path):
    """Acceptance: int8 Q/DQ graphs in ONNX Runtime within 1 point of fp32 on the shapes test split; fp8 reported."""
    from edgemm.evaluate import evaluate
    ref = evaluate(load_backend("torch", model="tiny-shapes", device="cpu"), progress=False)
    accs = {}
    for p in ("int8", "fp8"):
        T.export_trt(model="tiny-shapes", out=tmp_path / p, precision=p, log=None, no_build=True)
        accs[p] = evaluate(load_backend("trt", bundle=str(tmp_path / p), device="cpu"), progress=False)["accuracy"]
    print(f"fp32 {ref['accuracy']:.3f}  int8 {accs['int8']:.3f}  fp8 {accs['fp8']:.3f}")
    assert abs(accs["int8"] - ref["accuracy"]) <= 0.01


def test_auto_backend_falls_back_to_the_cpu_for_trt_bundles(tmp_path):
    """Without TensorRT engines for this GPU, --backend auto runs a trt bundle's Q/DQ graphs on the CPU."""
    if HERE is not None:
        pytest.skip("this machine has TensorRT and a GPU: auto picks the engines")
    import numpy as np
    from edgemm.checkpoint import save_checkpoint
    from edgemm.config import get_preset
    from edgemm.model import EdgeMM
    from edgemm.runtimes import load_backend, pick_backend
    from edgemm.export.trt import export_trt
    from tests.conftest import make_tokenizer
    ck = save_checkpoint(EdgeMM(get_preset("tiny-shapes")).init_weights(2), make_tokenizer(), tmp_path / "m")
    out = tmp_path / "b"
    export_trt(model=str(ck), out=out, precision={"vision": "fp16", "decoder": "fp16"}, no_build=True,
               log=lambda *a: None)
    name, why = pick_backend(str(out), "auto")
    assert name == "trt" and "falling back to the CPU" in why
    notes = []
    b = load_backend("auto", bundle=str(out), log=notes.append)
    assert b.device == "cpu" and any("falling back to the CPU" in n for n in notes)
    st = b.new_state()
    logits = b.text(st, [1, 5, 6])
    assert logits.shape == (512,) and np.isfinite(logits).all()
