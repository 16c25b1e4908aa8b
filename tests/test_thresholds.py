"""Export checks: one table of thresholds (edgemm.export.thresholds) that README quotes and every check judges by,
and quantized bundles checked on held-out prompts that share no item with the calibration set."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from edgemm.export import thresholds as TH

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_table() -> str:
    text = README.read_text()
    lines = text[text.index("| target | precision | stage | check |"):].splitlines()
    return "\n".join(itertools.takewhile(lambda ln: ln.startswith("|"), lines))


def test_readme_threshold_table_is_the_code_table():
    assert _readme_table() == TH.readme_table(), "README's threshold table differs from edgemm.export.thresholds: " \
                                                 "regenerate it with `python -m edgemm.export.thresholds`"
    # and README states no other cosine bound of its own
    stated = {float(x) for x in re.findall(r"cosine >= ([0-9.]+)", README.read_text())}
    assert stated <= {b.value for row in TH.TABLE.values() for bs in row.values() for b in bs}


def test_judge_reads_the_table(monkeypatch):
    assert TH.judge("trt", "decoder_text", "int8", 1.0, 0.991, 1.0) == ("cosine >= 0.99", True)
    assert not TH.judge("trt", "decoder_text", "int8", 1.0, 0.989, 1.0)[1]
    assert TH.judge("onnx", "decoder_text", "int4", 1.0, 0.81, 1.0)[1]
    assert not TH.judge("onnx", "decoder_batch", "int4", 1.0, 0.99, 1.0)[1]   # stricter where named
    assert TH.judge("onnx", "vision", "fp16", 0.015, 0.99995, 4.0)[1]         # relative: 5e-3 x |ref| 4
    assert not TH.judge("onnx", "vision", "fp16", 0.015, 0.99995, 1.0)[1]
    assert not TH.judge("onnx", "vision", "fp16", 0.0, 0.9998, 1.0)[1]
    monkeypatch.setitem(TH.TABLE, ("trt", "int8"), {"*": (TH.Bound("cosine", 0.995),)})
    assert not TH.judge("trt", "decoder_text", "int8", 1.0, 0.991, 1.0)[1]   # the data decides, not the code
    with pytest.raises(KeyError):
        TH.judge("onnx", "vision", "q4_0", 0.0, 1.0, 1.0)


def test_gguf_bounds_come_from_the_table():
    from edgemm.export import gguf_validate as G
    for p in ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"):
        assert G.FIDELITY_KL[p] == TH.bound("gguf", p, "fidelity", "mean_kl")
        assert G.FIDELITY_TOP1[p] == TH.bound("gguf", p, "fidelity", "top1_confident")
    assert G.LOGIT_TOL == {"f32": 1e-3, "f16": 5e-2} and G.ROWS_TOL == {"f32": 1e-3}


def _calib_folder(d: Path, n: int) -> Path:
    from edgemm.calib.sets import write_calib_dir
    return write_calib_dir(d, n, "val")


def test_quantized_export_checks_held_out_prompts(random_ckpt, tmp_path):
    """An int8 bundle's manifest names the held-out prompts its check drew from and the one it ran on; none is an
    item of the calibration part (what the statistics were fitted on: the manifest's set digest), and the
    thresholds it records are the table's."""
    from edgemm.calib.sets import load_calib_dir
    from edgemm.export.onnx import export_onnx, group
    calib = _calib_folder(tmp_path / "calib", 16)
    man = export_onnx(model=str(random_ckpt), out=tmp_path / "b", precision="int8", threads=1, calib=str(calib),
                      log=None)
    v, cset = man["validation"], load_calib_dir(calib)
    assert man["calibration"]["set_digest"] == cset.digest() and man["calibration"]["samples"] == 14
    assert v["held_out"] == [x.id for x in cset.held_out] and len(v["held_out"]) == 2
    assert v["prompt"]["id"] == v["held_out"][0] and v["prompt"]["id"] in v["inputs"]      # seed 0: the first
    assert v["prompt"]["question"] == cset.held_out[0].prompt and "random" not in v["inputs"]
    assert not set(v["held_out"]) & {x.id for x in cset.samples}
    assert not {x.key() for x in cset.held_out} & {x.key() for x in cset.samples}
    prec = man["precision"]
    assert set(v["stages"]) <= set(v["thresholds"])
    assert v["thresholds"] == TH.used("onnx", lambda s: prec[group(s)], v["thresholds"])
    assert v["thresholds"]["decoder_text"] == f"cosine >= {TH.bound('onnx', 'int8', 'decoder_text', 'cosine'):g}"
    for s, f in v["stages"].items():
        assert f["tolerance"] == v["thresholds"][s]


def test_unquantized_export_says_its_inputs_were_random(random_ckpt, tmp_path):
    from edgemm.export.onnx import export_onnx
    man = export_onnx(model=str(random_ckpt), out=tmp_path / "b", precision="fp32", threads=1, log=None)
    v = man["validation"]
    assert v["inputs"].startswith("random inputs seed 0:") and v["seed"] == 0 and "held_out" not in v
    assert set(v["thresholds"].values()) == {"max abs <= 0.0001 x max(1, max abs of the reference)"}
