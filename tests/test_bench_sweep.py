"""`edgemm bench --images / --frames` (issue 29 item 4): one row per image size or frame count, each with the vision
inputs the model made of it (slices, tiles, frames), its rows, vision ms, TTFT and decode tok/s; a count the model
refuses is an error row of one line beside the others. Tiny random bundles: LLaVA-UHD (slices by aspect ratio) and
LLaVA-NeXT-Video (frames through its onnx video stage)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
pytest.importorskip("av", reason="video input needs PyAV (pip install edgemm[test])")


def _bench(bundle, inputs, **kw):
    from edgemm.bench import bench
    return bench([str(bundle)], limit=0, repeats=kw.pop("repeats", 1), warmup=kw.pop("warmup", 0), decode_steps=3,
                 threads=1, fidelity_n=0, progress=False, log=None, isolate=False, inputs=inputs, **kw)


@pytest.fixture(scope="module")
def uhd(tmp_path_factory):
    from edgemm.export.onnx import export_onnx
    from edgemm.importers import import_checkpoint
    from .test_llava_uhd import _tiny, write_release
    d = tmp_path_factory.mktemp("sweep-uhd")
    src = write_release(*_tiny(), d / "src")
    import_checkpoint(src, d / "ck", log=None)
    export_onnx(model=str(d / "ck"), out=d / "fp32", precision="fp32", threads=1, log=None)
    return d / "fp32"


def test_image_sizes_a_row_each_slices_counted(uhd):
    """Each size's slices + the source image are the vision inputs, as uhd_slices.layout counts them; the rows are
    what the backend's image_rows gives (Q rows each, plus the separators); a video count on this image model is
    refused in its row, in one line."""
    from edgemm.bench import format_table
    from edgemm.bundle import read_manifest
    from edgemm.config import ModelConfig
    from edgemm.uhd_slices import layout
    cfg = ModelConfig.from_dict(read_manifest(uhd)["model"])
    sizes = [(28, 28), (4000, 200)]
    rep = _bench(uhd, [("image", s) for s in sizes] + [("frames", 2)])
    rows = rep["results"]
    assert [r["name"] for r in rows] == ["fp32 28x28", "fp32 4000x200", "fp32 2 frames"]
    q = cfg.adapter.query_tokens
    for r, (w, h) in zip(rows, sizes):
        assert "error" not in r, r
        _, grid, _ = layout(cfg.vision, w, h)
        n = 1 + (grid[0] * grid[1] if grid else 0)
        assert r["vision_inputs"] == n, (r, grid)
        assert r["image_rows"] == n * q + n - 1                     # Q rows each, a separator after each slice
        assert r["vision_ms"] > 0 and r["ttft_ms"] > r["vision_ms"] and r["decode_tok_s"] > 0
    assert rows[1]["vision_inputs"] != rows[0]["vision_inputs"]
    assert rows[2]["error"] == "this model (src) takes no video input (images only)"
    t = format_table(rep)
    assert "vision inputs" in t and "fp32 4000x200" in t and "error: this model (src) takes no video" in t


@pytest.fixture(scope="module")
def lnv_bundle(tmp_path_factory):
    from edgemm.export.onnx import export_onnx
    from edgemm.importers import import_checkpoint
    from .test_anyres import _processor
    from .test_import import write_tokenizer
    from .test_llava_next_video import _tiny
    from .test_video import TEMPLATE
    d = tmp_path_factory.mktemp("sweep-lnv")
    _tiny(3).save_pretrained(d / "hf", safe_serialization=True)
    _processor().save_pretrained(d / "hf")
    write_tokenizer(d / "hf")
    (d / "hf" / "chat_template.jinja").write_text(TEMPLATE)
    import_checkpoint(d / "hf", d / "ck", log=None)
    export_onnx(model=str(d / "ck"), out=d / "fp32", precision="fp32", threads=1, log=None)
    return d / "fp32"


def test_frame_counts_a_row_each(lnv_bundle, tmp_path):
    """Frames: the vision inputs are the frames the model's own sampling took of the generated clip (its video
    stage's batch), the rows grow with them (frame_rows), and the vision time of 16 frames is above 1 frame's (16
    times the decoding, resizing and tower work: robust to a loaded machine); a count over the context is refused in
    its row before any frame is encoded. The JSON and CSV carry the rows."""
    import csv
    import json
    from edgemm.bundle import read_manifest
    from edgemm.config import ModelConfig
    from edgemm.video import frame_rows
    cfg = ModelConfig.from_dict(read_manifest(lnv_bundle)["model"])
    S = cfg.vision.image_size
    clip = lambda n: np.zeros((n, 3, S, S), np.float32)                     # noqa: E731
    per = frame_rows(cfg, clip(1))[0]
    over = cfg.decoder.max_seq_len // per + 1
    rep = _bench(lnv_bundle, [("frames", 1), ("frames", 16), ("frames", over)], repeats=3, warmup=1, out=tmp_path)
    one, many, big = rep["results"]
    for r, n in ((one, 1), (many, 16)):
        assert "error" not in r, r
        assert r["vision_inputs"] == n and r["image_rows"] == frame_rows(cfg, clip(n))[0] == n * per
        assert r["input"] == f"{n} frame{'s' * (n > 1)}" and r["image_size"] is None
    assert many["vision_ms"] > one["vision_ms"] and many["prompt_rows"] - one["prompt_rows"] == 15 * per
    assert big["error"].startswith(f"a clip of {over} frames takes") and "\n" not in big["error"]
    j = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in j["results"]] == ["fp32 1 frame", "fp32 16 frames", f"fp32 {over} frames"]
    assert j["settings"]["inputs"] == ["1 frame", "16 frames", f"{over} frames"]
    with open(tmp_path / "bench.csv") as f:
        assert [r["vision_inputs"] for r in csv.DictReader(f)] == ["1", "16", ""]


def test_bad_sweep_values_are_one_line():
    from click.testing import CliRunner
    from edgemm.cli import main
    for args, what in ((["--images", "336"], "give sizes as WxH"), (["--images", "0x5"], "not a size"),
                       (["--frames", "two"], "give frame counts"), (["--frames", "0"], "not a frame count")):
        r = CliRunner().invoke(main, ["bench", "some-bundle", *args])
        assert r.exit_code == 2 and what in r.output and len(r.output.strip().splitlines()) == 1, r.output
