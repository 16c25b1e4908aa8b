"""edgemm bench on small random-weight bundles: figures, files, Pareto front, table."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")


def test_pareto():
    from edgemm.bench import pareto
    pts = [(10, 0.9), (5, 0.8), (20, 0.95), (12, 0.85), (5, 0.7)]
    assert pareto(pts) == [1, 0, 2]


@pytest.fixture(scope="module")
def bundles(random_ckpt, tmp_path_factory):
    from edgemm.export.onnx import export_onnx
    d = tmp_path_factory.mktemp("bench")
    out = []
    for p in ("fp32", "int4"):
        export_onnx(model=str(random_ckpt), out=d / p, precision=p, threads=1, log=None)
        out.append(str(d / p))
    return out


def test_bench_end_to_end(bundles, tmp_path):
    pytest.importorskip("matplotlib")
    from edgemm.bench import bench, format_table
    rep = bench(bundles, limit=4, repeats=1, warmup=0, decode_steps=2, threads=1, out=tmp_path, fidelity_n=2,
                progress=False, log=None, isolate=False)
    rows = {r["name"]: r for r in rep["results"]}
    assert set(rows) == {"fp32", "int4"}
    for r in rows.values():
        assert "error" not in r, r
        for k in ("size_mb", "peak_rss_mb", "vision_ms", "ttft_ms", "decode_tok_s", "accuracy", "top1_agreement",
                  "mean_kl", "roofline_tok_s", "roofline_fraction", "weight_bytes_per_step"):
            assert r[k] is not None, k
    assert rows["fp32"]["mean_kl"] < 1e-6 and rows["fp32"]["top1_agreement"] == 1.0
    # the KV cache a decode step reads (fp32, K and V of every layer) at the decode's mean context: bos, the image
    # rows, the question, then half of the 2 timed steps
    from edgemm import shapes
    from edgemm.bundle import load_tokenizer, read_manifest
    from edgemm.config import ModelConfig
    man = read_manifest(bundles[0])
    c = ModelConfig.from_dict(man["model"])
    q = shapes.make_split("val", 1)[0][1].question
    n_q = len(load_tokenizer(bundles[0], man, True).user_turn(q, first=True))
    ctx = 1 + c.n_image_rows + n_q + 1
    d = c.decoder
    for r in rows.values():
        assert r["kv_bytes_per_step"] == 2 * d.n_layers * (d.n_kv_heads or d.n_heads) * (d.d_model // d.n_heads) \
            * ctx * 4
        assert r["roofline_kv_fraction"] > r["roofline_fraction"]
    assert rows["int4"]["weight_bytes_per_step"] < rows["fp32"]["weight_bytes_per_step"] / 3
    assert rows["int4"]["size_mb"] < rows["fp32"]["size_mb"]
    for f in ("bench.json", "bench.csv", "bench.png"):
        assert (tmp_path / f).stat().st_size > 0
    j = json.loads((tmp_path / "bench.json").read_text())
    assert j["machine"]["threads"] == 1 and "onnxruntime" in j["machine"]["versions"]
    doc = j["machine"]["doctor"]                       # the `edgemm doctor` facts
    assert doc["cpu"]["flags"] and "llama_cpp" in doc and doc["onnxruntime"]["installed"]
    assert j["bandwidth_gb_s"] > 0
    t = format_table(rep)
    assert "int4" in t and "decode tok/s" in t and "recipe" in t
    assert rows["int4"]["recipe"] == "int4/int8-dyn (vision int8-dyn)" and rows["fp32"]["recipe"] == "fp32"


def test_bundle_recipe_from_the_manifest():
    from edgemm.bench import bundle_recipe
    q = lambda name: {"precision": "int4", "quantization": {"recipe": {"name": name}}}  # noqa: E731
    assert bundle_recipe({"target": "onnx", "stages": {"vision": q("int4"), "decoder_text": q("int4-gptq"),
                                                       "decoder_image": q("int4-gptq")}}) == "int4-gptq (vision int4)"
    assert bundle_recipe({"target": "onnx", "stages": {"vision": {"precision": "fp32"},
                                                       "decoder_text": {"precision": "fp32"}}}) == "fp32"
    gg = {"target": "gguf", "stages": {"decoder": {"precision": "q4_k_m", "imatrix": {"file": "imatrix.gguf"}}}}
    assert bundle_recipe(gg) == "q4_k_m+imatrix"
    gg["stages"]["decoder"]["imatrix"] = None
    assert bundle_recipe(gg) == "q4_k_m"


def test_bench_cli_needs_bundles():
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["bench"])
    assert r.exit_code == 2 and "bundle" in r.output


def _text_step_params(ckpt) -> int:
    """Parameters one text decode step reads, counted on the reference: the text branch, the shared norms and
    LM head, and one row of the token embedding table."""
    from edgemm.checkpoint import load_checkpoint
    m, _ = load_checkpoint(ckpt)
    n = 0
    for name, p in m.decoder.named_parameters():
        if ".vision." in name or "vision_" in name.split(".")[-2:][0]:
            continue
        n += p.shape[1] if name == "tok_embeddings.weight" else p.numel()
    return n


def test_decode_bytes_per_step_match_the_reference(bundles, random_ckpt, tmp_path):
    from edgemm.bench import decode_weight_bytes
    want = 4 * _text_step_params(random_ckpt)
    got = decode_weight_bytes(bundles[0])                                   # the fp32 onnx bundle
    assert want <= got <= want * 1.01 + 4096, (got, want)                   # + the graph's few small constants
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: the gguf half of this check needs it")
    from edgemm.export.gguf import export_gguf
    export_gguf(model=str(random_ckpt), out=tmp_path / "g", precision={"vision": "f32", "decoder": "f32"}, log=None)
    assert decode_weight_bytes(tmp_path / "g") == want                       # no vis_* tensor counted


def test_fp16_bundles_count_the_fp32_bytes_onnx_runtime_reads(random_ckpt, tmp_path):
    """fp16 bundles store fp16 matrices behind a Cast that ONNX Runtime folds to fp32 at load: half the disk,
    the same bytes read per decode step as fp32 (bench says so instead of counting 2 bytes a weight)."""
    from edgemm.bench import decode_weight_bytes, dir_size
    from edgemm.export.onnx import export_onnx
    for p in ("fp32", "fp16"):
        export_onnx(model=str(random_ckpt), out=tmp_path / p, precision=p, threads=1, log=None)
    assert decode_weight_bytes(tmp_path / "fp16") == decode_weight_bytes(tmp_path / "fp32")
    assert dir_size(tmp_path / "fp16") < 0.6 * dir_size(tmp_path / "fp32")


def _results(accuracy: bool) -> list:
    rs = [{"name": n, "backend": "ort", "decode_ms_per_token": d, "ttft_ms": t}
          for n, d, t in (("fp32", 20.0, 90.0), ("int8", 12.0, 60.0), ("int4", 9.0, 50.0), ("q4_k_m", 9.1, 49.0))]
    rs.append({"name": "broken", "backend": "ort", "error": "did not open"})
    if accuracy:
        for r, a in zip(rs, (0.95, 0.94, 0.80, 0.93)):
            r["accuracy"] = a
    return rs


def test_bench_plot_without_accuracy_draws_latency_alone():
    """--limit 0: no accuracy axis, no point at accuracy 0.0; a latency bar per bundle, each named on the axis."""
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer
    from edgemm.bench import figure
    fig = figure(_results(accuracy=False))
    assert "accuracy not measured" in fig._suptitle.get_text()
    names = ["fp32 (ort)", "int8 (ort)", "int4 (ort)", "q4_k_m (ort)"]
    for ax, key in zip(fig.axes, ("decode_ms_per_token", "ttft_ms")):
        assert "accuracy" not in ax.get_ylabel() and not [c for c in ax.collections if isinstance(c, PathCollection)]
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == 1
        assert [round(p.get_width(), 3) for p in bars[0].patches] == [r[key] for r in _results(False)[:4]]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == names      # one tick label per bar: no overlap
    assert not fig.axes[0].texts                                                 # no free-floating annotations


def test_bench_plot_with_accuracy_draws_each_bundle_once_named_in_a_legend():
    pytest.importorskip("matplotlib")
    from edgemm.bench import figure
    rs = _results(accuracy=True)
    fig = figure(rs)
    assert fig._suptitle.get_text() == "edgemm bench: latency vs accuracy" and len(fig.axes) == 2
    for r, mb in zip(rs, (20.0, 6.0, 3.5, 3.4)):        # with the bundles' sizes: a third panel, size vs accuracy
        r["size_mb"] = mb
    fig = figure(rs)
    assert fig._suptitle.get_text() == "edgemm bench: latency and size vs accuracy" and len(fig.axes) == 3
    for ax, key in zip(fig.axes, ("decode_ms_per_token", "ttft_ms", "size_mb")):
        assert ax.get_ylabel() == "accuracy (shapes test split)" and not ax.texts
        pts = [tuple(c.get_offsets()[0]) for c in ax.collections if c.get_label() in {f"{r['name']} (ort)" for r in rs}]
        assert pts == [(r[key], r["accuracy"]) for r in rs[:4]]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["fp32 (ort)", "int8 (ort)", "int4 (ort)", "q4_k_m (ort)", "Pareto front"]
    # one bundle without its accuracy (its evaluation failed): left out of the plot, and named as such
    del rs[2]["accuracy"]
    fig = figure(rs)
    assert "not plotted, accuracy not measured: int4 (ort)" in fig._suptitle.get_text()
    assert "int4 (ort)" not in [t.get_text() for t in fig.legends[0].get_texts()]
