"""ONNX export: bundles, manifest, validation, static routing, failure modes. Small random-weight models only."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from edgemm.checkpoint import file_sha256, save_checkpoint  # noqa: E402
from edgemm.config import get_preset  # noqa: E402
from edgemm.errors import EdgemmError, UnsupportedVariant  # noqa: E402
from edgemm.model import EdgeMM  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from edgemm import shapes
    from edgemm.tokenizer import Tokenizer, train_tokenizer
    return Tokenizer(train_tokenizer(shapes.corpus_lines(), 512))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(EdgeMM(get_preset("tiny-shapes")).init_weights(seed=1), tokenizer, d)
    return d


def _export(ckpt, out, precision="fp32", **kw):
    from edgemm.export.onnx import export_onnx
    logs = []
    m = export_onnx(model=str(ckpt), out=out, precision={"vision": precision, "decoder": precision},
                    threads=1, log=logs.append, **kw)
    return m, "\n".join(logs)


@pytest.fixture(scope="module")
def fp32_bundle(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "fp32"
    m, log = _export(ckpt, out, "fp32")
    return out, m, log


@pytest.fixture(scope="module")
def fp16_bundle(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "fp16"
    m, log = _export(ckpt, out, "fp16")
    return out, m, log


def test_fp32_bundle_manifest(fp32_bundle, ckpt):
    out, m, log = fp32_bundle
    on_disk = json.loads((out / "edgemm.json").read_text())
    assert on_disk["files"] == m["files"]
    assert m["target"] == "onnx" and m["format_version"] == 1
    assert m["model"] == get_preset("tiny-shapes").to_dict()
    assert m["source"]["digest"] == "sha256:" + file_sha256(ckpt / "model.safetensors")
    assert m["reference"]["digest"] == m["source"]["digest"]
    assert m["precision"] == {"vision": "fp32", "decoder": "fp32"}
    assert set(m["stages"]) == {"vision", "decoder_text", "decoder_image"}
    assert {"onnx", "onnxruntime", "torch"} <= set(m["tools"])
    for name, st in m["stages"].items():
        assert (out / st["file"]).is_file() and st["file"] in m["files"]
        assert st["inputs"] and st["outputs"] and st["precision"] == "fp32"
        onnx.checker.check_model(str(out / st["file"]))
    dt = m["stages"]["decoder_text"]
    assert dt["graph"] == "ort-contrib-gqa" and m["stages"]["vision"]["graph"] == "onnx-standard"
    ins = {i["name"]: i for i in dt["inputs"]}
    assert ins["input_ids"]["shape"] == ["batch", "seq"] and ins["input_ids"]["dtype"] == "int64"   # decode_batch
    assert ins["past_key.0"]["shape"] == ["batch", 4, "cache_len", 64]
    assert (out / "tokenizer.json").is_file()
    # validation figures recorded and printed
    for stage in ("vision", "decoder_text", "decoder_image"):
        f = m["validation"]["stages"][stage]
        assert f["ok"] and f["max_abs_err"] <= 1e-4 and f["cosine"] > 0.99999
        assert stage in log
    assert "max abs err" in log and "cosine" in log


def test_fp16_bundle(fp16_bundle, fp32_bundle):
    out, m, log = fp16_bundle
    assert m["precision"] == {"vision": "fp16", "decoder": "fp16"}
    for stage, f in m["validation"]["stages"].items():
        assert f["ok"] and f["cosine"] >= 0.999, stage
    g = onnx.load(str(out / "decoder_text.onnx"))
    dtypes = {t.data_type for t in g.graph.initializer if len(t.dims) >= 2 and not t.name.startswith("rotary.")}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    size = lambda d: sum(p.stat().st_size for p in Path(d).glob("*.onnx"))  # noqa: E731
    assert size(out) < 0.6 * size(fp32_bundle[0])


def _initializers(path):
    from onnx import numpy_helper
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_decoder_text_holds_no_vision_weight(fp32_bundle, ckpt):
    from edgemm.checkpoint import load_checkpoint
    out, _, _ = fp32_bundle
    model, _ = load_checkpoint(ckpt)
    for stage, own, other in (("decoder_text", "text", "vision"), ("decoder_image", "vision", "text")):
        inits = _initializers(out / f"{stage}.onnx")
        assert not [n for n in inits if f".{other}." in n], stage
        assert [n for n in inits if f".{own}." in n]
        # by value too: no initializer equals any weight of the other branch (as stored or transposed)
        other_w = {}
        for name, p in model.decoder.named_parameters():
            if f".{other}." in name:
                a = p.detach().numpy()
                other_w[a.shape] = other_w.get(a.shape, []) + [a]
                other_w[a.T.shape] = other_w.get(a.T.shape, []) + [a.T]
        for n, a in inits.items():
            for w in other_w.get(a.shape, []):
                assert not np.array_equal(a, w), f"{stage}:{n} is a {other}-branch weight"
        # and no vision-tower weight in the decoders
        tower = {p.detach().numpy().tobytes() for p in model.vision.parameters()}
        assert not [n for n, a in inits.items() if a.tobytes() in tower and a.size > 16]


def test_validation_failure_leaves_no_bundle(ckpt, tmp_path, monkeypatch):
    from edgemm.export import thresholds
    monkeypatch.setitem(thresholds.TABLE, ("onnx", "fp32"), {"*": (thresholds.Bound("max_abs", 0.0),)})
    out = tmp_path / "bad"
    with pytest.raises(EdgemmError, match="validation failed"):
        _export(ckpt, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []          # no partial directory either


def test_external_data(ckpt, tmp_path, monkeypatch):
    import edgemm.export.graph as eg
    from edgemm.bundle import verify_bundle
    monkeypatch.setattr(eg, "EXTERNAL_DATA_BYTES", 1000)   # force the >2 GB path on a small model
    out = tmp_path / "ext"
    m, _ = _export(ckpt, out)
    for st in m["stages"].values():
        assert st["extra_files"] == [st["file"] + ".data"]
        assert (out / st["extra_files"][0]).stat().st_size > (out / st["file"]).stat().st_size
        assert st["extra_files"][0] in m["files"]
    assert all(f["ok"] for f in m["validation"]["stages"].values())
    verify_bundle(out)


def test_variants(tokenizer, tmp_path):
    """Grouped-query attention, QKV bias and the cogvlm position rule export exactly; a variant the graphs cannot
    compute is refused by name. (Imported CogVLM and Libra variants: tests/test_import_export.py; mPLUG-Owl2's
    per-modality K/V: tests/test_model.py.)"""
    from edgemm.config import ModelConfig
    from edgemm.export.onnx import export_onnx
    d = get_preset("tiny-shapes").to_dict()
    d["decoder"].update(n_layers=2, n_kv_heads=2, qkv_bias=True, position_rule="cogvlm")
    cfg = ModelConfig.from_dict(d)
    model = EdgeMM(cfg).init_weights(seed=3)
    with torch.no_grad():
        for layer in model.decoder.layers:
            for br in (layer.text, layer.vision):
                br.qkv.bias.normal_(0, 0.1)
    m = export_onnx(model=(model, tokenizer), out=tmp_path / "gqa", precision="fp32", threads=1, log=None)
    assert all(f["ok"] for f in m["validation"]["stages"].values())
    assert m["stages"]["decoder_text"]["inputs"][4]["shape"] == ["batch", 2, "cache_len", 64]
    from edgemm.export.onnx import check_variants
    bad = ModelConfig.from_dict(d)
    bad.variants = lambda: ["some future variant"]         # a variant no graph computes yet
    with pytest.raises(UnsupportedVariant, match="onnx exporter.*'some future variant'; targets that can: none yet"):
        check_variants(bad, "the onnx exporter", {"vision": "fp32", "decoder": "fp32"})


def test_unsupported_precision(ckpt, tmp_path):
    from edgemm.export.onnx import export_onnx
    with pytest.raises(EdgemmError, match="q4_k_m"):
        export_onnx(model=str(ckpt), out=tmp_path / "q", precision={"vision": "fp32", "decoder": "q4_k_m"})
    assert not (tmp_path / "q").exists()


def test_cli_export_refuses_existing_out(ckpt, tmp_path):
    from click.testing import CliRunner
    from edgemm.cli import main
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = CliRunner().invoke(main, ["export", "--target", "onnx", "--model", str(ckpt), "-o", str(out),
                                  "--threads", "1"])
    assert r.exit_code == 2, r.output
    assert "already exists" in r.output and "--force" in r.output
    assert (out / "keep.txt").exists()
    r = CliRunner().invoke(main, ["export", "--target", "onnx", "--model", str(ckpt), "-o", str(out),
                                  "--threads", "1", "--force"])
    assert r.exit_code == 0, r.output
    assert (out / "edgemm.json").is_file() and not (out / "keep.txt").exists()


def test_fp16_bundle_on_the_cpu_says_what_fp16_does_there(fp16_bundle):
    from edgemm.runtimes.ort_backend import OrtBackend
    logs = []
    OrtBackend.open(bundle=str(fp16_bundle[0]), device="cpu", threads=1, log=logs.append)
    note = [s for s in logs if "stored in fp16" in s]
    assert len(note) == 1 and "decoder_text" in note[0] and "fp32 when it loads" in note[0]
