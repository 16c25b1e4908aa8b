"""Imported checkpoints through the exporters: CogVLM in its original rules (eoi through the text branch, the
cogvlm position rule, vision-expert QKV bias) and Libra (low-rank vision branches, per-modality norms, the
cross-modal K/V bridge, image-token input) export to onnx and to trt's Q/DQ graphs (no engine build), pass the
exporters' own validation, and the bundles' runtimes give the torch reference's logits on an image + text
prompt. Sharded checkpoints get a digest over every shard; GGUF refuses what it cannot compute, naming onnx and
trt as the targets that can."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from edgemm.checkpoint import checkpoint_digest, load_checkpoint  # noqa: E402
from edgemm.errors import EdgemmError, UnsupportedVariant  # noqa: E402
from edgemm.importers import import_checkpoint  # noqa: E402
from tests.test_import import (COGVLM_CONFIG, LIBRA_CONFIG, _text_ids, cogvlm_tensors,  # noqa: E402
                               libra_tensors, write_hf)

TOL = 1e-4                      # fp32 graphs against the fp32 reference


@pytest.fixture(scope="module")
def cogvlm_ckpt(tmp_path_factory):
    """CogVLM in its original rules, imported into a sharded edgemm checkpoint."""
    d = tmp_path_factory.mktemp("cog")
    src = write_hf(d / "hf", COGVLM_CONFIG, cogvlm_tensors(), shards=2)
    import_checkpoint(src, d / "edgemm", shard_bytes=20_000, log=None)
    return d / "edgemm"


@pytest.fixture(scope="module")
def libra_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("libra")
    import_checkpoint(write_hf(d / "hf", LIBRA_CONFIG, libra_tensors(), shards=3), d / "edgemm", log=None)
    return d / "edgemm"


def _export(target, ckpt, out):
    if target == "onnx":
        from edgemm.export.onnx import export_onnx
        return export_onnx(model=str(ckpt), out=out, precision="fp32", threads=1, seed=0, log=None)
    from edgemm.export.trt import export_trt
    return export_trt(model=str(ckpt), out=out, precision="fp16", no_build=True, threads=1, seed=0, log=None)


def _open(target, bundle):
    from edgemm.runtimes import load_backend
    return load_backend("ort" if target == "onnx" else "trt", bundle=str(bundle), device="cpu", threads=1)


def _image_input(m):
    """The image input of the model (pixels, or Libra's image tokens and signal) -> (reference rows, runner)."""
    g = torch.Generator().manual_seed(5)
    if m.cfg.input_stage == "vision":
        px = torch.randn(1, 3, m.cfg.vision.image_size, m.cfg.vision.image_size, generator=g)
        return m.encode_image(px), lambda b: b.vision(px.numpy())
    a, n = m.cfg.adapter, m.cfg.n_image_rows
    codes = torch.randint(0, a.vision_vocab, (1, n, a.codebooks), generator=g)
    signal = torch.randn(1, n, a.signal_size, generator=g)
    return m.encode_image_tokens(codes, signal), lambda b: b.image_tokens(codes.numpy(), signal.numpy())


@pytest.mark.parametrize("target", ["onnx", "trt"])
@pytest.mark.parametrize("family", ["cogvlm", "libra"])
def test_imported_model_exports_and_runs(family, target, cogvlm_ckpt, libra_ckpt, tmp_path):
    ckpt = cogvlm_ckpt if family == "cogvlm" else libra_ckpt
    m, _ = load_checkpoint(ckpt)
    want = {"cogvlm": ["eoi through the text branch", "collapsed image positions (cogvlm position rule)",
                       "qkv bias"],
            "libra": ["low-rank vision branches", "per-modality norms", "cross-modal K/V bridge",
                      "libra image tokens"]}[family]
    assert set(want) <= set(m.cfg.variants())
    man = _export(target, ckpt, tmp_path / "b")
    stages = man["validation"]["stages"]
    assert set(stages) == set(m.cfg.stages) and all(f["ok"] for f in stages.values()), stages
    assert max(f["max_abs_err"] for f in stages.values()) <= TOL
    assert man["variants"] == m.cfg.variants()
    if family == "cogvlm":
        assert "eoi_row" in man["stages"]["decoder_text"]
        assert [i["name"] for i in man["stages"]["decoder_text"]["inputs"][:2]] == ["input_ids", "input_rows"]
    else:
        assert "image_tokens" in man["stages"] and "vision" not in man["stages"]
        assert "bridge" in man["stages"]["decoder_image"]

    # image + text prompt on the bundle's runtime against the torch reference
    b = _open(target, tmp_path / "b")
    pre, post = _text_ids(1, 5), _text_ids(2, 7)
    with torch.no_grad():
        rows, encode = _image_input(m)
        ref = m.forward_full([("text", pre), ("image", rows), ("text", post)])[0]
    got_rows = encode(b)
    assert np.abs(got_rows - rows.numpy()).max() <= TOL
    st = b.new_state(max_len=64)
    b.text(st, pre[0].tolist())
    eoi_logits = b.image(st, got_rows)
    last = b.text(st, post[0].tolist())
    n_eoi = pre.shape[1] + m.cfg.n_image_rows - 1
    err = max(np.abs(eoi_logits - ref[n_eoi].numpy()).max(), np.abs(last - ref[-1].numpy()).max())
    print(f"{family}/{target}: validation max abs {max(f['max_abs_err'] for f in stages.values()):.2e}, "
          f"runtime vs torch max abs {err:.2e}")
    assert err <= TOL
    if family == "libra":
        with pytest.raises(EdgemmError, match="image tokens, not pixels"):
            b.vision(np.zeros((1, 3, 3, 3), np.float32))


def test_sharded_checkpoint_digest_covers_every_shard(cogvlm_ckpt, tmp_path):
    shards = sorted(cogvlm_ckpt.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (cogvlm_ckpt / "model.safetensors").exists()
    d = checkpoint_digest(cogvlm_ckpt)
    assert d.startswith("sha256-shards:") and d == checkpoint_digest(cogvlm_ckpt)
    copy = tmp_path / "copy"
    shutil.copytree(cogvlm_ckpt, copy)
    last = copy / shards[-1].name                     # change one byte of the last shard: another digest
    data = bytearray(last.read_bytes())
    data[-1] ^= 1
    last.write_bytes(bytes(data))
    assert checkpoint_digest(copy) != d
    last.unlink()
    with pytest.raises(EdgemmError, match="missing"):
        checkpoint_digest(copy)


def test_sharded_export_records_the_digest(cogvlm_ckpt, tmp_path):
    from edgemm.export.onnx import _load_source
    _, _, source = _load_source(str(cogvlm_ckpt))
    assert source["digest"] == checkpoint_digest(cogvlm_ckpt)


def test_gguf_refuses_libra_and_cogvlm_original_naming_onnx_and_trt(cogvlm_ckpt, libra_ckpt, tmp_path):
    from edgemm.export.gguf import export_gguf
    for ckpt in (libra_ckpt, cogvlm_ckpt):
        with pytest.raises(UnsupportedVariant, match=r"gguf.*variant '.*'; targets that can: onnx, trt"):
            export_gguf(model=str(ckpt), out=tmp_path / "g", precision="f32", log=None)
        assert not (tmp_path / "g").exists()


def test_libra_quantized_export_is_refused(libra_ckpt, tmp_path):
    from edgemm.export.trt import export_trt
    with pytest.raises(EdgemmError, match="VQ image tokenizer is not imported"):
        export_trt(model=str(libra_ckpt), out=tmp_path / "q", precision="int8", no_build=True, log=None)
    assert not (tmp_path / "q").exists()
