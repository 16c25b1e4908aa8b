"""Calibration sets, statistics per modality branch, quantization numerics and recipes (small and CPU-fast)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgemm.errors import EdgemmError


# --------------------------------------------------------------------------- calibration folders
def _png(path):
    from PIL import Image
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_calib_dir_ok(tmp_path):
    from edgemm.calib.sets import load_calib_dir
    _png(tmp_path / "a.png")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "What color?"}) + "\n\n"
                                            + json.dumps({"image": "a.png", "question": "Shape?", "answer": "x"})
                                            + "\n" + json.dumps({"image": "a.png", "prompt": "Where?"}))
    s = load_calib_dir(tmp_path)
    assert len(s) == 2 and len(s.held_out) == 1                     # one of three held out for the export check
    both = {x.prompt: x for x in s.samples + s.held_out}
    assert set(both) == {"What color?", "Shape?", "Where?"} and both["Shape?"].answer == "x"
    assert both["Shape?"].id == "prompts.jsonl:3 (a.png)"
    assert len(s.digest()) == 64 and s.digest() == load_calib_dir(tmp_path).digest()


def test_calib_dir_held_out_part_is_disjoint_and_chosen_by_content(tmp_path):
    """The held-out part of a folder: chosen by content (the same items whatever the file's order), max(1, N // 8)
    of them (at most 16), never equal to a calibration item (a duplicated line falls on one side), and left out of
    the calibration part (its digest, what statistics are fitted on); a folder of one distinct item is refused."""
    from edgemm.calib.sets import load_calib_dir
    _png(tmp_path / "a.png")
    rows = [{"image": "a.png", "prompt": f"q{i}"} for i in range(40)] + [{"image": "a.png", "prompt": "q3"}] * 2
    (tmp_path / "prompts.jsonl").write_text("\n".join(map(json.dumps, rows)))
    s = load_calib_dir(tmp_path)
    held, calib = [x.prompt for x in s.held_out], [x.prompt for x in s.samples]
    assert len(set(held)) == 5 and len(calib) + len(held) == 42 and not set(held) & set(calib)
    assert not {x.key() for x in s.held_out} & {x.key() for x in s.samples}
    (tmp_path / "prompts.jsonl").write_text("\n".join(map(json.dumps, rows[::-1])))
    r = load_calib_dir(tmp_path)
    assert sorted(x.prompt for x in r.held_out) == sorted(held) and r.digest() != s.digest()
    assert [x.prompt for x in load_calib_dir(tmp_path, limit=3).samples] == [x.prompt for x in r.samples[:3]]
    (tmp_path / "prompts.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]))
    with pytest.raises(EdgemmError, match="holds 2 sample.*1 distinct.*at least two different"):
        load_calib_dir(tmp_path)


def test_calib_dir_missing_image(tmp_path):
    from edgemm.calib.sets import load_calib_dir
    _png(tmp_path / "a.png")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "q"}) + "\n"
                                            + json.dumps({"image": "nope.png", "prompt": "q"}) + "\n")
    with pytest.raises(EdgemmError, match=r"prompts.jsonl:2: image 'nope.png' not found"):
        load_calib_dir(tmp_path)


def test_calib_dir_bad_line(tmp_path):
    from edgemm.calib.sets import load_calib_dir
    _png(tmp_path / "a.png")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "q"}) + "\n{not json\n")
    with pytest.raises(EdgemmError, match=r"prompts.jsonl:2: not valid JSON"):
        load_calib_dir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": "a.png"}) + "\n")
    with pytest.raises(EdgemmError, match=r"prompts.jsonl:1: .*prompt"):
        load_calib_dir(tmp_path)


def test_calib_dir_zero_samples_and_missing_file(tmp_path):
    from edgemm.calib.sets import load_calib_dir
    with pytest.raises(EdgemmError, match="prompts.jsonl is missing"):
        load_calib_dir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("\n  \n")
    with pytest.raises(EdgemmError, match="no samples"):
        load_calib_dir(tmp_path)
    with pytest.raises(EdgemmError, match="not a directory"):
        load_calib_dir(tmp_path / "missing")


def test_bundled_set_is_the_calib_split_disjoint_from_test():
    from edgemm import shapes
    from edgemm.calib.sets import bundled_set
    s = bundled_set(8)
    assert s.name.startswith("shapes-calib") and len(s) == 8
    test = {shapes.scene_at("test", i).signature() for i in range(200)}
    assert not any(shapes.scene_at("calib", i).signature() in test for i in range(8))


def test_bundled_set_holds_out_items_no_calibration_set_reaches():
    """The bundled set's held-out part (the export checks' prompts): the calib split from HOLDOUT_START on, the
    same items whatever the calibration size, no one equal to a calibration item, every question type."""
    from edgemm.calib.sets import HOLDOUT_BUNDLED, HOLDOUT_START, bundled_set
    s, big = bundled_set(8), bundled_set(64)
    assert [x.id for x in s.held_out] == [x.id for x in big.held_out] == \
        [f"shapes-calib#{HOLDOUT_START + i}" for i in range(HOLDOUT_BUNDLED)]
    assert [x.id for x in big.samples] == [f"shapes-calib#{i}" for i in range(64)]
    assert not {x.key() for x in big.held_out} & {x.key() for x in big.samples}
    assert len({x.prompt.split()[0] + x.prompt.split()[1] for x in big.held_out}) >= 4
    with pytest.raises(EdgemmError, match="reaches the held-out items"):
        bundled_set(HOLDOUT_START)


# --------------------------------------------------------------------------- statistics
def test_histogram_range_doubling_is_exact_and_methods():
    from edgemm.calib.stats import LayerStats
    rng = np.random.default_rng(0)
    st = LayerStats("k", "decoder_text", "m", "text", 16)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    st.add(x[:200] * 0.1, rng)
    st.add(x[200:], rng)                      # forces the range to double several times
    assert st.hist.sum() == 400 * 16 and st.count == 400
    assert st.absmax == pytest.approx(float(np.abs(np.r_[x[:200] * 0.1, x[200:]]).max()))
    assert st.amax("percentile", 99.0) < st.amax("max")
    ent = st.amax("entropy")
    assert 0.3 * st.absmax < ent <= st.absmax       # clips the tail, not the bulk
    with pytest.raises(EdgemmError, match="unknown calibration method"):
        st.amax("mse")


def test_collect_stats_per_modality_and_cache(random_ckpt, tmp_path):
    from edgemm.calib.sets import bundled_set
    from edgemm.calib.stats import collect_stats
    logs = []
    st = collect_stats(str(random_ckpt), bundled_set(2), cache=tmp_path, progress=False, log=logs.append)
    keys = set(st.layers)
    assert "decoder_text/decoder.layers.0.text.qkv" in keys
    assert "decoder_image/decoder.layers.0.vision.qkv" in keys
    assert "vision/adapter.down" in keys and "decoder_text/decoder.lm_head" in keys
    # routing: image rows never reach a text-branch layer and vice versa
    assert not any(".text." in k for k in keys if k.startswith("decoder_image/"))
    assert not any(".vision." in k for k in keys if k.startswith("decoder_text/"))
    n_img = st.layers["decoder_image/decoder.layers.0.vision.qkv"].count
    from edgemm.config import get_preset
    assert n_img == 2 * get_preset("tiny-shapes").n_image_rows
    again = collect_stats(str(random_ckpt), bundled_set(2), cache=tmp_path, progress=False, log=logs.append)
    assert "reusing" in logs[-1] and set(again.layers) == keys
    a, b = st.layers["vision/vision.blocks.0.fc1"], again.layers["vision/vision.blocks.0.fc1"]
    assert np.array_equal(a.hist, b.hist) and a.absmax == b.absmax
    sh = st.shared()
    t = sh.layers["decoder_text/decoder.layers.1.text.qkv"]
    assert t.count == st.layers["decoder_text/decoder.layers.1.text.qkv"].count + \
        st.layers["decoder_image/decoder.layers.1.vision.qkv"].count


# --------------------------------------------------------------------------- numerics in ONNX Runtime
def _run(model, feeds, disable_qdq=False):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if disable_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _mm_model(W, opset=17):
    from onnx import TensorProto, helper, numpy_helper
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", W.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("precision,storage", [("int8", "s8s8"), ("int8", "u8u8"), ("fp8", "s8s8"),
                                               ("int8-wo", "s8s8"), ("int4", "s8s8"), ("int4-b32", "s8s8")],
                         ids=["int8", "int8-u8u8", "fp8", "int8-wo", "int4", "int4-b32"])
def test_quantize_stage_numerics(tmp_path, precision, storage):
    """Every precision against its numpy fake-quant reference. int8 s8s8 is exact only where ONNX Runtime's
    u8s8 kernels do not saturate (VNNI, ARM): skipped elsewhere; u8u8 must be exact on every CPU."""
    pytest.importorskip("onnxruntime")
    import onnx
    from edgemm.calib.quantize import fake_quant_act, quant_blockwise, quant_weight_per_channel, quantize_stage
    from edgemm.calib.recipes import get_recipe
    from edgemm.calib.stats import LayerStats, Stats
    recipe = get_recipe(precision)                   # int4-b32: the int4 precision with a recipe of its own
    precision = recipe.weights if precision == "int4-b32" else precision
    rng = np.random.default_rng(0)
    K, N = 64, 48
    W = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    x = rng.standard_normal((1, 5, K)).astype(np.float32)
    onnx.save(_mm_model(W), tmp_path / "in.onnx")
    ls = LayerStats("decoder_text/l", "decoder_text", "l", "text", K, wsig=W[:2].copy(),
                    weight_absmax=np.abs(W).max(1))
    ls.add(x, rng)
    stats = Stats({"decoder_text/l": ls}, {"digest": "t"})
    from edgemm.cpu import s8s8_int8_exact
    if precision == "int8" and storage == "s8s8" and not s8s8_int8_exact():
        pytest.skip("this CPU has no VNNI: ONNX Runtime's u8s8 kernels saturate s8s8 graphs (the ort backend runs "
                    "them dequantized; test_portability checks both storages under an emulated AVX2 CPU)")
    rec = quantize_stage(tmp_path / "in.onnx", tmp_path / "out.onnx", "decoder_text", precision, stats=stats,
                         log=None, method="max", int8_storage=storage, recipe=recipe.name)
    assert rec["quantized"] == 1 and rec["layers"][0]["layer"] == "decoder_text/l"
    m = onnx.load(tmp_path / "out.onnx")
    if precision == "int8":
        want_type = onnx.TensorProto.UINT8 if storage == "u8u8" else onnx.TensorProto.INT8
        wq = [t for t in m.graph.initializer if ".weight_q." in t.name]
        assert wq and all(t.data_type == want_type for t in wq) and rec["int8_storage"] == storage
    ops = {n.op_type for n in m.graph.node}
    got = _run(m, {"x": x}, disable_qdq=precision == "fp8")
    if precision in ("int8", "fp8"):
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        _, _, deq = quant_weight_per_channel(W, precision)
        want = fake_quant_act(x, float(np.abs(x).max()), precision) @ deq
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        if precision == "fp8":
            assert max(o.version for o in m.opset_import if o.domain == "") >= 19
    else:
        assert "MatMulNBits" in ops
        assert [a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "block_size"] == [recipe.block_size]
        _, _, deq = quant_blockwise(W, 8 if precision == "int8-wo" else 4, recipe.block_size)
        np.testing.assert_allclose(got, x @ deq, rtol=0.05, atol=0.02)   # accuracy_level 4: int8 activations
    assert np.linalg.norm(got - x @ W) / np.linalg.norm(x @ W) < (0.2 if precision == "int4" else 0.08)


def test_quantize_stage_keep_sensitive_and_needs_stats(tmp_path):
    import onnx
    from edgemm.calib.quantize import quantize_stage
    W = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    onnx.save(_mm_model(W), tmp_path / "in.onnx")
    with pytest.raises(EdgemmError, match="needs calibration statistics"):
        quantize_stage(tmp_path / "in.onnx", tmp_path / "o.onnx", "vision", "int8", log=None)
    rec = quantize_stage(tmp_path / "in.onnx", tmp_path / "o.onnx", "vision", "int4", keep_sensitive=1e-6, log=None)
    assert rec["kept"] == 1 and rec["layers"][0]["got"].startswith("original (kept")
    assert {n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node} == {"MatMul"}
    with pytest.raises(EdgemmError, match="precision"):
        quantize_stage(tmp_path / "in.onnx", tmp_path / "o.onnx", "vision", "q4_k_m", log=None)


def test_recipes_registry():
    from edgemm.calib.recipes import RECIPES, get_recipe
    assert {"int8", "int8-wo", "int4", "fp8"} <= set(RECIPES)
    assert get_recipe("int4").block_size == 128 and get_recipe("int4-b32").block_size == 32
    assert get_recipe("int8").activations == "int8"
    assert "SmoothQuant" in str(RECIPES["int8-sq"])
    assert get_recipe("int4").with_options(block_size=64).block_size == 64
    with pytest.raises(EdgemmError, match="power of 2"):
        get_recipe("int4").with_options(block_size=48)
    with pytest.raises(EdgemmError, match="unknown quantization recipe"):
        get_recipe("int3")


def test_list_recipes_cli():
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["export", "--list-recipes"])
    assert r.exit_code == 0 and "int4" in r.output and "MatMulNBits" in r.output


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm-bias"])
def test_int8_dyn_in_onnxruntime_matches_its_equations(tmp_path, gemm):
    """int8-dyn (the int4 precision's many-row stages): ONNX Runtime's DynamicQuantizeMatMul computes
    (u8(x) - zp) * sx @ (q * s) with x quantized per tensor at run time (ONNX's DynamicQuantizeLinear: over
    [min(x, 0), max(x, 0)], zero point rounded half to even) and 7-bit weights per column, re-computed here in numpy;
    exact on every x86 CPU (the 7 bits keep the u8 x s8 kernels' 16-bit pair sums from saturating without VNNI),
    on inputs that are large and mostly positive (the saturating case)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    from edgemm.calib.quantize import quantize_stage
    rng = np.random.default_rng(1)
    K, N = 256, 48
    W = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    x = (np.abs(rng.standard_normal((1, 40, K))) * 4 - 0.2).astype(np.float32)
    if gemm:                                                  # Gemm transB with a bias, 2-D input
        g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="mm", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(W.T.copy(), "w"), numpy_helper.from_array(bias, "b")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        x = x[0]
    else:
        m = _mm_model(W)
    onnx.save(m, tmp_path / "in.onnx")
    rec = quantize_stage(tmp_path / "in.onnx", tmp_path / "q.onnx", "vision", "int4", log=None, recipe="int8-dyn")
    q = onnx.load(tmp_path / "q.onnx")
    assert [n.op_type for n in q.graph.node] == ["DynamicQuantizeMatMul"] and rec["quantized"] == 1
    wq = next(numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == TensorProto.INT8)
    assert wq.shape == (K, N) and np.abs(wq).max() == 63
    got = _run(q, {"x": x})
    s = np.abs(W).max(0) / 63                                  # the equations, independently of edgemm's code
    Wd = np.clip(np.round(W / s), -63, 63) * s
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    sx = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / sx), 0, 255)
    xd = (np.clip(np.round(x / sx) + zp, 0, 255) - zp) * sx
    want = xd.astype(np.float64) @ Wd + (bias if gemm else 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("storage", ["s8s8", "u8u8"])
def test_static_int8_gemm_becomes_a_matmul_onnxruntime_fuses(tmp_path, storage):
    """A Gemm (transB, bias, 2-D input: Qwen2-VL's tower exports its Linears so) quantized W8A8 is written as Q/DQ
    around a MatMul + the bias Add: ONNX Runtime, as the ort backend opens such a stage (MatMulAddFusion off: it would
    make the Gemm again), fuses that into its int8 kernel (no float MatMul or Gemm left in the session's optimized
    graph), where Q/DQ around the Gemm ran as an fp32 Gemm that
    dequantized its weights each call; the outputs equal the Q/DQ equations re-computed in numpy."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    from edgemm.calib.quantize import quantize_stage
    from edgemm.calib.stats import Stats
    rng = np.random.default_rng(2)
    K, N = 128, 48
    W = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((40, K)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="mm", transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W.T.copy(), "w"), numpy_helper.from_array(bias, "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "in.onnx")
    stats = Stats.of_matrix(W, x, np.random.default_rng(0))
    rec = quantize_stage(tmp_path / "in.onnx", tmp_path / "q.onnx", "decoder_text", "int8", stats=stats, log=None,
                         recipe="int8", int8_storage=storage)
    q = onnx.load(tmp_path / "q.onnx")
    ops = [n.op_type for n in q.graph.node]
    assert rec["quantized"] == 1 and "Gemm" not in ops and ops.count("MatMul") == 1 and ops[-1] == "Add", ops
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    from edgemm.runtimes.ort_backend import QDQ_DISABLED            # as the ort backend opens Q/DQ stages
    got = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"],
                               disabled_optimizers=QDQ_DISABLED).run(None, {"x": x})[0]
    opt = onnx.load(tmp_path / "opt.onnx")
    float_mm = [n for n in opt.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert not float_mm and any("Integer" in n.op_type or n.op_type.startswith("QLinear") for n in opt.graph.node), \
        [n.op_type for n in opt.graph.node]
    amax = rec["layers"][0]["act_amax"]                     # the equations, independently of edgemm's code
    sx, sw = np.float32(amax / 127), np.abs(W).max(0) / 127
    xd = np.clip(np.round(x / sx), -127 if storage == "s8s8" else -128, 127) * sx
    want = xd.astype(np.float64) @ (np.clip(np.round(W / sw), -127, 127) * sw) + bias
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 * np.abs(want).max())
