"""The ort backend: same answers as torch, KV cache in place, provider choice, refusing bad bundles."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from edgemm.checkpoint import DEMO_DIR, save_checkpoint  # noqa: E402
from edgemm.cli import main  # noqa: E402
from edgemm.config import get_preset  # noqa: E402
from edgemm.errors import EdgemmError  # noqa: E402
from edgemm.model import EdgeMM  # noqa: E402
from edgemm.runtimes import load_backend, pick_backend  # noqa: E402
from edgemm.runtimes.ort_backend import OrtBackend, provider_candidates  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from edgemm import shapes
    from edgemm.tokenizer import Tokenizer, train_tokenizer
    torch.set_num_threads(1)
    tok = Tokenizer(train_tokenizer(shapes.corpus_lines(), 512))
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(EdgeMM(get_preset("tiny-shapes")).init_weights(seed=2), tok, d)
    return d


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    from edgemm.export.onnx import export_onnx
    out = tmp_path_factory.mktemp("b") / "fp32"
    export_onnx(model=str(ckpt), out=out, precision="fp32", threads=1, log=None)
    return out


@pytest.fixture(scope="module")
def backends(ckpt, bundle):
    return (load_backend("torch", model=str(ckpt), device="cpu", threads=1),
            load_backend("ort", bundle=str(bundle), device="cpu", threads=1))


def _images(n):
    from edgemm import shapes
    rng = np.random.default_rng(7)
    return [shapes.render(shapes.sample_scene(rng)) for _ in range(n)]


def test_greedy_answers_match_torch(backends):
    from edgemm.generation import GenerationConfig, answer
    tb, ob = backends
    gen = GenerationConfig(max_new_tokens=12)
    qs = ["What color is the circle?", "How many shapes are there?", "Where is the red square?"]
    for img, q in zip(_images(3), qs):
        assert answer(ob, img, q, gen) == answer(tb, img, q, gen)
    assert answer(ob, None, "hello", gen) == answer(tb, None, "hello", gen)


def test_multi_turn_chat_matches_torch(backends):
    from edgemm.generation import ChatSession, GenerationConfig
    tb, ob = backends
    img = _images(1)[0]
    outs = []
    for b in backends:
        s = ChatSession(b, GenerationConfig(max_new_tokens=6))
        s.set_image(img)
        outs.append([s.ask(q) for q in ("what color?", "how many?", "where?")])
    assert outs[0] == outs[1]


def test_logits_and_cache_in_place(backends):
    tb, ob = backends
    px = np.random.default_rng(0).standard_normal((1, 3, 48, 48)).astype(np.float32)
    rows = ob.vision(px)
    assert rows.shape == (1, 11, 256) and rows.dtype == np.float32
    np.testing.assert_allclose(rows, tb.vision(px), atol=1e-5)
    st_o, st_t = ob.new_state(max_len=64), tb.new_state(max_len=64)
    bufs = [v.data_ptr() for v in st_o.cache["k"]]
    assert bufs == [a.ctypes.data for a in st_o.cache["arrays"][0::2]]      # the numpy arrays are the buffers
    assert all(p % 64 == 0 for p in bufs)            # aligned as ONNX Runtime's own allocator aligns tensors
    for b, st in ((ob, st_o), (tb, st_t)):
        b.text(st, [1, 5, 9])
        b.image(st, rows)
    lo, lt = ob.text(st_o, [4, 2]), tb.text(st_t, [4, 2])
    np.testing.assert_allclose(lo, lt, atol=1e-4)
    assert st_o.length == st_t.length == 3 + rows.shape[1] + 2 and st_o.pos == st_t.pos
    assert [v.data_ptr() for v in st_o.cache["k"]] == bufs         # same memory, written in place
    k0 = st_o.cache["arrays"][0]
    np.testing.assert_allclose(k0[0, :, :st_o.length], st_t.cache.k[0, 0, :, :st_t.length].numpy(), atol=1e-5)
    assert not k0[0, :, st_o.length:].any()                       # nothing written past the filled rows
    # rewinding the state re-runs the same rows to the same logits
    st_o.length -= 2
    st_o.pos -= 2
    np.testing.assert_allclose(ob.text(st_o, [4, 2]), lo, atol=1e-6)
    ob.text(st_o, list(range(64)))             # past its 64 rows: the cache grows (tests/test_kv_growth.py)
    assert st_o.cache["capacity"] >= st_o.length > 64
    with pytest.raises(EdgemmError, match="KV cache full"):    # but not past the context
        ob.text(st_o, list(range(ob.context_length)))


def test_auto_picks_ort_for_onnx_bundles(bundle):
    name, why = pick_backend(str(bundle), "auto")
    assert name == "ort" and "onnx" in why
    logs = []
    b = load_backend("auto", bundle=str(bundle), device="cpu", threads=1, log=logs.append)
    assert isinstance(b, OrtBackend) and b.provider == "CPUExecutionProvider"
    assert any("provider CPUExecutionProvider" in s for s in logs)


def test_provider_order_and_fallback(bundle, monkeypatch):
    allp = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert provider_candidates("auto", allp) == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                 "CPUExecutionProvider"]
    assert provider_candidates("cpu", allp) == ["CPUExecutionProvider"]
    assert provider_candidates("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    # a CUDA provider that does not initialise -> the CPU, with a note
    real = ort.InferenceSession

    def fake_session(path, so=None, providers=None, **kw):
        if providers and providers[0] == "CUDAExecutionProvider":
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        return real(path, so, providers=providers, **kw)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    logs = []
    b = OrtBackend.open(bundle=str(bundle), device="cuda", threads=1, log=logs.append)
    assert b.provider == "CPUExecutionProvider" and b.device == "cpu"
    assert any("falling back to the CPU" in s and "CUDA" in s for s in logs)


def test_placement_report_names_nodes_off_the_provider(bundle):
    """ONNX Runtime's own placement report: on this CPU-only machine every node is on the CPU provider, so
    asked against CUDA the report lists every node by op type (GroupQueryAttention included), against the CPU
    nothing."""
    from edgemm.runtimes.ort_backend import off_provider_nodes, placement_line
    so = ort.SessionOptions()
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    sess = ort.InferenceSession(str(bundle / "decoder_text.onnx"), so, providers=["CPUExecutionProvider"])
    info = sess.get_provider_graph_assignment_info()
    assert off_provider_nodes(info, "CPUExecutionProvider") == {}
    off = off_provider_nodes(info, "CUDAExecutionProvider")
    n_layers = get_preset("tiny-shapes").decoder.n_layers
    assert off.get("com.microsoft.GroupQueryAttention") == n_layers and sum(off.values()) > 4 * n_layers
    line = placement_line("decoder_text", "CUDAExecutionProvider", off)
    assert line.startswith(f"note: {sum(off.values())} node(s) of decoder_text run off CUDAExecutionProvider")
    assert placement_line("decoder_text", "CPUExecutionProvider", {}) is None


# ---- bad bundles: one-line errors, exit code 2 -------------------------------------------------------
def _copy(bundle, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    return d


def _edit_manifest(d, fn):
    p = d / "edgemm.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def _run_cli(d, *extra):
    return CliRunner().invoke(main, ["run", "--bundle", str(d), "--threads", "1", "--max-new-tokens", "2",
                                     *extra, "hello"])


def _bad(name, d):
    if name == "version":
        _edit_manifest(d, lambda m: m.update(format_version=99))
        return "format version"
    if name == "missing":
        (d / "decoder_image.onnx").unlink()
        return "decoder_image.onnx is missing"
    if name == "sha":
        with open(d / "vision.onnx", "ab") as f:
            f.write(b"\0")
        return "sha256"
    if name == "escape":
        shutil.copy(d / "vision.onnx", d.parent / "evil.onnx")
        _edit_manifest(d, lambda m: m["stages"]["vision"].update(file="../evil.onnx"))
        return "outside the bundle"
    if name == "io":
        def ren(m):
            m["stages"]["decoder_text"]["inputs"][0]["name"] = "tokens"
        _edit_manifest(d, ren)
        return "I/O names do not match"
    if name == "config":
        _edit_manifest(d, lambda m: m["model"]["decoder"].update(n_layers=2))
        return "the manifest's config says 2"
    raise AssertionError(name)


@pytest.mark.parametrize("case", ["version", "missing", "sha", "escape", "io", "config"])
def test_bad_bundle_refused(bundle, tmp_path, case):
    d = _copy(bundle, tmp_path)
    want = _bad(case, d)
    with pytest.raises(EdgemmError, match=want):
        OrtBackend.open(bundle=str(d), device="cpu", threads=1)
    r = _run_cli(d)
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and want in err[0] and "Traceback" not in r.output


def test_torch_backend_with_bundle_says_so(bundle):
    r = _run_cli(bundle, "--backend", "torch")
    assert r.exit_code == 2
    assert "torch backend runs model directories" in r.output


def test_cli_run_and_eval_on_bundle(bundle, ckpt):
    r = _run_cli(bundle)
    assert r.exit_code == 0, r.output
    assert "provider CPUExecutionProvider" in r.output
    rt = CliRunner().invoke(main, ["run", "--model", str(ckpt), "--threads", "1", "--max-new-tokens", "2", "hello"])
    assert r.output.splitlines()[-1] == rt.output.splitlines()[-1]
    r = CliRunner().invoke(main, ["eval", "--bundle", str(bundle), "--threads", "1", "--limit", "3"])
    assert r.exit_code == 0, r.output
    assert "accuracy:" in r.output


@pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").exists(),
                    reason="the shipped tiny-shapes weights are not trained yet (edgemm/data/tiny-shapes)")
def test_shipped_model_accuracy_matches(tmp_path):
    """The trained demo model: fp32 bundle within 1e-4, same greedy answers as torch on 100 test questions."""
    from edgemm.evaluate import evaluate
    from edgemm.export.onnx import export_onnx
    m = export_onnx(model="tiny-shapes", out=tmp_path / "fp32", precision="fp32", threads=2, log=None, seed=0)
    assert all(f["max_abs_err"] <= 1e-4 for f in m["validation"]["stages"].values())
    tb = load_backend("torch", model="tiny-shapes", device="cpu", threads=2)
    ob = load_backend("ort", bundle=str(tmp_path / "fp32"), device="cpu", threads=2)
    rt, ro = evaluate(tb, limit=100, progress=False), evaluate(ob, limit=100, progress=False)
    assert [p["prediction"] for p in ro["predictions"]] == [p["prediction"] for p in rt["predictions"]]
    assert ro["accuracy"] == rt["accuracy"]


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").exists(),
                    reason="the shipped tiny-shapes weights are not trained yet (edgemm/data/tiny-shapes)")
def test_shipped_model_full_split(tmp_path):
    """Acceptance: fp32 greedy answers identical to torch on all 1,000 test questions; fp16 within 1 point."""
    from edgemm.evaluate import evaluate
    from edgemm.export.onnx import export_onnx
    for p in ("fp32", "fp16"):
        export_onnx(model="tiny-shapes", out=tmp_path / p, precision=p, log=None, seed=0)
    rt = evaluate(load_backend("torch", model="tiny-shapes", device="cpu"), progress=False)
    r32 = evaluate(load_backend("ort", bundle=str(tmp_path / "fp32"), device="cpu"), progress=False)
    r16 = evaluate(load_backend("ort", bundle=str(tmp_path / "fp16"), device="cpu"), progress=False)
    assert [p["prediction"] for p in r32["predictions"]] == [p["prediction"] for p in rt["predictions"]]
    assert r32["accuracy"] == rt["accuracy"] and r32["total"] == 1000
    assert abs(r16["accuracy"] - r32["accuracy"]) <= 0.01
