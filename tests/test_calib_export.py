"""Quantized ONNX exports end to end (random-weight tiny model, 2-sample calibration): manifest records, the
ort backend runs them, per-stage precision choice, and a bad --calib folder fails before anything is written."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edgemm.errors import EdgemmError  # noqa: E402


@pytest.fixture(scope="module")
def stats(random_ckpt, tmp_path_factory):
    from edgemm.calib.sets import bundled_set
    from edgemm.calib.stats import collect_stats
    return collect_stats(str(random_ckpt), bundled_set(2), cache=tmp_path_factory.mktemp("cache"), progress=False,
                         log=None)


@pytest.mark.parametrize("precision", [{"vision": "fp16", "decoder": "int4"}, "int8", "fp8"])
def test_quantized_export(random_ckpt, stats, tmp_path, precision):
    from edgemm.export.onnx import export_onnx
    from edgemm.runtimes.ort_backend import OrtBackend
    logs = []
    man = export_onnx(model=str(random_ckpt), out=tmp_path / "b", precision=precision, threads=1, stats=stats,
                      log=logs.append)
    prec = precision if isinstance(precision, dict) else {"vision": precision, "decoder": precision}
    assert man["precision"] == prec
    st = man["stages"]
    assert st["vision"]["precision"] == prec["vision"]
    for s in ("decoder_text", "decoder_image"):
        q = st[s]["quantization"]
        assert q["quantized"] == len(q["layers"]) > 0 and q["kept"] == 0
        assert all(r["layer"] for r in q["layers"])           # every weight found its calibration layer
    if prec["decoder"] in ("int8", "fp8"):
        assert man["calibration"]["set_digest"] == stats.meta["set_digest"]
        assert all(r["layer"].startswith("decoder_image/") and ".vision." in r["layer"] or "lm_head" in r["layer"]
                   for r in st["decoder_image"]["quantization"]["layers"])
    assert all(f["ok"] for k, f in man["validation"]["stages"].items())
    b = OrtBackend.open(bundle=str(tmp_path / "b"), device="cpu", threads=1)
    st_ = b.new_state(max_len=32)
    logits = b.text(st_, [1, 5, 7])
    assert logits.shape == (b.cfg.decoder.vocab_size,) and np.isfinite(logits).all()
    on_disk = json.loads((tmp_path / "b" / "edgemm.json").read_text())
    assert on_disk["stages"]["decoder_text"]["weights"] == st["decoder_text"]["weights"]


def test_export_bad_calib_dir(random_ckpt, tmp_path):
    from edgemm.export.onnx import export_onnx
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "prompts.jsonl").write_text('{"image": "x.png", "prompt": "q"}\n')
    with pytest.raises(EdgemmError, match="prompts.jsonl:1: image 'x.png' not found"):
        export_onnx(model=str(random_ckpt), out=tmp_path / "b", precision="int8", threads=1,
                    calib=str(tmp_path / "calib"), log=None)
    assert not (tmp_path / "b").exists()
