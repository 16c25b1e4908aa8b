"""tiny-shapes-outliers (edgemm.outliers) and the int8-shared recipe (issue 33)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import requires_demo

torch = pytest.importorskip("torch")


def _logits(m, tok, items):
    """Per item (image, question): logits of every image row and every question row, the reference's segments."""
    from edgemm.model import KVCache
    from edgemm.tilings import preprocess_image
    out = []
    with torch.inference_mode():
        for img, q in items:
            rows = m.encode_image(torch.from_numpy(np.asarray(preprocess_image(img, m.cfg.vision))))
            c = KVCache.empty(m.cfg.decoder, 1, 128)
            _, pos = m.forward_segment("text", torch.tensor([tok.prefix_ids()]), c, 0, last_only=False)
            li, pos = m.forward_segment("image", rows, c, pos, last_only=False)
            lt, _ = m.forward_segment("text", torch.tensor([tok.user_turn(q.question, first=True)]), c, pos,
                                      last_only=False)
            out.append(torch.cat([li, lt], 1))
    return out


@pytest.fixture(scope="module")
def models():
    from edgemm.checkpoint import load_model
    return load_model("tiny-shapes"), load_model("tiny-shapes-outliers")


# factors that are not powers of two: the products are rounded, the function must still hold to 1e-4
# (and weight outliers beside them, the partner channels' activations divided by t)
ODD = {"norm": (4, 13.0, 5.0), "attn": (2, 7.0, 3.0), "ffn": {"text": (4, 11.0, 6.0), "vision": (4, 70.0, 9.0)},
       "spread": 32}


@requires_demo
@pytest.mark.parametrize("spec", [None, ODD, "kquant"], ids=["preset", "odd-factors", "kquant"])
def test_transform_keeps_the_logits(models, spec):
    from edgemm import shapes
    from edgemm.outliers import add_outliers
    from edgemm.outliers import SPECS
    (m0, tok), (m1, _) = models
    if spec is not None:
        from edgemm.checkpoint import load_model
        spec = SPECS[spec] if isinstance(spec, str) else spec
        m1, _ = load_model("tiny-shapes")
        add_outliers(m1, spec)
    assert m1.cfg.name == "tiny-shapes-outliers" or spec is not None
    ratio = m1.decoder.layers[0].attn_norm.weight / m0.decoder.layers[0].attn_norm.weight
    assert ratio.max() > 10                                                       # not a no-op
    assert (ratio.min() < 0.25) == (spec is not None)                             # weight outliers: their gain / t
    items = [(img, q) for img, q in shapes.make_split("val", 4)]
    for a, b in zip(_logits(m0, tok, items), _logits(m1, tok, items)):
        assert a.abs().max() > 1
        assert (a - b).abs().max() < 1e-4


@pytest.fixture(scope="module")
def stats(models):
    from edgemm.calib.stats import collect_stats
    (m0, tok), (m1, _) = models
    kw = dict(n=8, cache=False, progress=False, log=None)
    return (collect_stats((m0, tok), None, model_digest="base", **kw),
            collect_stats((m1, tok), None, model_digest="outliers", **kw))


@requires_demo
def test_outlier_statistics_per_modality(models, stats):
    """The calibration statistics show the designed channels and factors, per modality: the per-channel |x| max of
    each decoder linear's input is the plain model's times the site's factor on its channels, unchanged elsewhere."""
    from edgemm.outliers import SPEC, add_outliers, format_outliers
    from edgemm.checkpoint import load_model
    s0, s1 = stats
    chosen = add_outliers(load_model("tiny-shapes")[0])
    site_of = {"qkv": "norm:qkv", "gate": "norm:gate", "up": "norm:gate", "o": "attn"}
    seen = set()
    for key, v in s1.layers.items():
        if v.branch not in ("text", "vision"):
            continue
        layer, kind = int(v.module.split(".")[2]), v.module.split(".")[-1]
        site = site_of.get(kind, f"ffn:{v.branch}")
        factor = SPEC[site.split(":")[0]] if site != f"ffn:{v.branch}" else SPEC["ffn"][v.branch]
        want = np.ones(v.in_features)
        want[chosen[layer][site]] = factor[1]
        if site + ":w" in chosen[layer]:            # weight outliers: activations divided by t
            want[chosen[layer][site + ":w"]] = 1 / factor[2]
            # each sits in the same run of 32 inputs (a q4_K sub-block) as one activation outlier
            assert sorted(c // 32 for c in chosen[layer][site + ":w"]) == sorted(c // 32 for c in chosen[layer][site])
        np.testing.assert_allclose(v.chan_absmax / s0.layers[key].chan_absmax, want, rtol=1e-4)
        seen.add((kind, v.branch))
    assert len(seen) == 10
    # image rows' FFN outliers are larger than text rows' and on other channels
    for i in range(len(chosen)):
        assert not set(chosen[i]["ffn:text"] + chosen[i].get("ffn:text:w", [])) & set(chosen[i]["ffn:vision"])
        t = s1.layers[f"decoder_text/decoder.layers.{i}.text.down"]
        v = s1.layers[f"decoder_image/decoder.layers.{i}.vision.down"]
        assert set(np.argsort(-v.chan_absmax)[:4]) <= set(chosen[i]["ffn:vision"]) or i == len(chosen) - 1
        assert v.absmax > 10 * t.absmax or i == len(chosen) - 1    # (the last layer's image FFN feeds nothing)
    table = format_outliers(s1)
    assert "0.down" in table and "image max/median" in table


def _act_scales(onnx_path) -> dict:
    """{MatMul node name: the scale of the DequantizeLinear that feeds its activation input}, from the graph."""
    import onnx
    from onnx import numpy_helper
    g = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    return {n.name: float(inits[dq[n.input[0]].input[1]]) for n in g.node
            if n.op_type in ("MatMul", "Gemm") and n.input[0] in dq}


@requires_demo
def test_shared_recipe_uses_one_scale_for_both_branches(models, stats, tmp_path):
    """int8-shared: every routed layer's activation scale is the same in the text and the image stage (read from the
    exported Q/DQ graphs); the default int8 has two. On the outlier model the shared scale costs fidelity."""
    from edgemm.bundle import read_manifest
    from edgemm.bench import fidelity, reference_logits
    from edgemm.export.onnx import export_onnx
    from edgemm.runtimes import load_backend
    _, (m1, tok) = models
    kl, pairs, ref_logits = {}, {}, reference_logits("tiny-shapes-outliers", 8, progress=False)
    for recipe in ("int8", "int8-shared"):
        out = tmp_path / recipe
        export_onnx(model=(m1, tok), out=out, precision={"vision": "fp32", "decoder": "int8"}, stats=stats[1],
                    recipes={"decoder": recipe}, log=None)
        man = read_manifest(out)
        assert man["calibration"]["mode"] == ("shared" if recipe == "int8-shared" else "per-modality")
        scales, ref = {}, stats[1].shared() if recipe == "int8-shared" else stats[1]
        for stage in ("decoder_text", "decoder_image"):
            st = man["stages"][stage]
            assert st["quantization"]["recipe"]["name"] == recipe
            by_node = _act_scales(out / st["file"])
            for rec in st["quantization"]["layers"]:
                if rec.get("layer") and rec["node"] in by_node:
                    mod = rec["layer"].split("/")[1].replace(".text.", ".X.").replace(".vision.", ".X.")
                    scales.setdefault(mod, {})[stage] = by_node[rec["node"]]
                    # the scale is the layer's own branch's threshold (int8), both branches' pooled (int8-shared)
                    want = ref.layers[rec["layer"]].amax("percentile") / 127
                    assert by_node[rec["node"]] == pytest.approx(want, rel=1e-5)
        pairs[recipe] = {k: v for k, v in scales.items() if len(v) == 2}
        assert len(pairs[recipe]) == 16                    # 3 layers x 5 linears + the lm_head
        b = load_backend("ort", bundle=out, device="cpu", threads=1)
        kl[recipe] = fidelity(b, ref_logits)["mean_kl"]
    assert all(v["decoder_text"] == v["decoder_image"] for v in pairs["int8-shared"].values())
    # (layer 0's o input peaks alike in both: every row's attention reads the bos row's V, its outlier channels)
    assert sum(v["decoder_text"] != v["decoder_image"] for v in pairs["int8"].values()) >= 14
    assert kl["int8-shared"] > 5 * kl["int8"], kl         # mean KL to the fp32 reference


def test_awq_in_onnxruntime_matmulnbits(tmp_path):
    """int4-awq: ONNX Runtime's own MatMulNBits behind the Mul by 1/s computes (x / s) @ Q(diag(s) W) (numpy
    re-computation), the recipe is recorded, and on inputs with outlier channels AWQ's error is below RTN's."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper
    from edgemm.calib.quantize import quant_blockwise, quantize_stage
    from edgemm.calib.recipes import get_recipe
    from edgemm.calib.stats import Stats
    from tests.test_calib import _mm_model, _run
    rng = np.random.default_rng(0)
    K, N = 256, 64
    W = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    x = rng.standard_normal((1, 32, K)).astype(np.float32)
    W[:6] /= 30                                       # outlier channels (the product unchanged)
    x[..., :6] *= 30
    onnx.save(_mm_model(W), tmp_path / "in.onnx")
    stats = Stats.of_matrix(W, x, rng)
    err = {}
    for recipe in ("int4", "int4-awq"):
        rec = quantize_stage(tmp_path / "in.onnx", tmp_path / "q.onnx", "decoder_text", "int4", stats=stats,
                             log=None, recipe=get_recipe(recipe).with_options(accuracy_level=0))   # fp32 compute
        m = onnx.load(tmp_path / "q.onnx")
        got = _run(m, {"x": x})
        inv = [numpy_helper.to_array(t) for t in m.graph.initializer if "smooth_inv" in t.name]
        assert rec["recipe"]["awq"] == (recipe == "int4-awq") and len(inv) == (recipe == "int4-awq")
        s = 1 / inv[0] if inv else np.ones(K, np.float32)
        if inv:
            assert s.max() / s.min() > 2                  # the outlier channels are scaled
        want = (x / s) @ quant_blockwise(W * s[:, None], 4, 128)[2]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        err[recipe] = np.linalg.norm(got - x @ W) / np.linalg.norm(x @ W)
    assert err["int4-awq"] < 0.8 * err["int4"], err


def _gptq_recurrence(W, H, bits, block, act_order=False, percdamp=0.01):
    """GPTQ from the paper's equations, unbatched (Frantar et al. 2022, eq. 2-3, the OBQ update in a fixed order):
    round row i, spread its error over the rows not yet rounded with H^-1's row i, remove i from H^-1 by Gaussian
    elimination. In input order a block's scales are taken when its first row is reached; act_order: rows by
    decreasing H_jj, scales from the original weights."""
    K, N = W.shape
    W, Hi = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    Hi[np.diag_indices(K)] += percdamp * np.mean(np.diag(Hi))
    Hi = np.linalg.inv(Hi)
    scale = lambda w: np.where(w.max(0) > 0, np.abs(w).max(0) / (2 ** (bits - 1) - 1), 1.0)  # noqa: E731
    scales = {b: scale(np.abs(W[b:b + block])).astype(np.float32).astype(np.float64) for b in range(0, K, block)}
    order = np.argsort(-np.diag(H), kind="stable") if act_order else range(K)
    out, left = np.zeros_like(W), np.ones(K, bool)
    for i in order:
        if not act_order and i % block == 0:
            scales[i] = scale(np.abs(W[i:i + block])).astype(np.float32).astype(np.float64)
        s = scales[i // block * block]
        out[i] = np.clip(np.round(W[i] / s), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * s
        left[i] = False
        err = (W[i] - out[i]) / Hi[i, i]
        W[left] -= np.outer(Hi[left, i], err)
        Hi -= np.outer(Hi[:, i], Hi[i]) / Hi[i, i]
    return out


def test_gptq_in_onnxruntime_matmulnbits(tmp_path):
    """int4-gptq / int4-awq-gptq: gptq_blockwise equals the paper's unbatched recurrence (in input order and
    act-order); ONNX Runtime's own MatMulNBits with the packed codes computes (x / s) @ (the dequantized weights);
    the recipe is recorded; on the layer's calibration rows (correlated inputs with outlier channels) their output
    error is below round-to-nearest's."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper
    from edgemm.calib.quantize import gptq_blockwise, quant_blockwise, quantize_stage
    from edgemm.calib.recipes import get_recipe
    from edgemm.calib.stats import Stats
    from tests.test_calib import _mm_model, _run
    rng = np.random.default_rng(1)
    K, N = 256, 48
    W = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    mix = np.eye(K) + 0.5 * rng.standard_normal((K, K)) / np.sqrt(K)          # correlated input channels
    x = (rng.standard_normal((1, 96, K)) @ mix).astype(np.float32)
    x[..., :6] *= 20
    H = 2 / 96 * x[0].astype(np.float64).T @ x[0]
    np.testing.assert_allclose(gptq_blockwise(W, H, 4, 128)[2], _gptq_recurrence(W, H, 4, 128), atol=1e-5)
    got = gptq_blockwise(W, H, 4, 128, act_order=True)[2]              # the recipe's: act-order, static blocks
    np.testing.assert_allclose(got, _gptq_recurrence(W, H, 4, 128, act_order=True), atol=1e-5)
    onnx.save(_mm_model(W), tmp_path / "in.onnx")
    stats = Stats.of_matrix(W, x, rng, hessian=True)
    np.testing.assert_allclose(stats.layers["decoder_text/l"].hessian, H, rtol=1e-5)
    err = {}
    for recipe in ("int4", "int4-gptq", "int4-awq-gptq"):
        rec = quantize_stage(tmp_path / "in.onnx", tmp_path / "q.onnx", "decoder_text", "int4", stats=stats,
                             log=None, recipe=get_recipe(recipe).with_options(accuracy_level=0))   # fp32 compute
        mq = onnx.load(tmp_path / "q.onnx")
        y = _run(mq, {"x": x})
        inv = [numpy_helper.to_array(t) for t in mq.graph.initializer if "smooth_inv" in t.name]
        assert len(inv) == (recipe == "int4-awq-gptq")
        s = 1 / inv[0] if inv else np.ones(K, np.float32)                  # AWQ's scales (the Mul by 1/s)
        deq = {"int4": quant_blockwise(W, 4, 128)[2], "int4-gptq": got,
               "int4-awq-gptq": gptq_blockwise(W * s[:, None], H / np.outer(s, s), 4, 128, act_order=True)[2]}[recipe]
        np.testing.assert_allclose(y, (x / s) @ deq, rtol=1e-4, atol=1e-4)
        assert rec["recipe"]["gptq"] == (recipe != "int4")
        assert rec["layers"][0].get("gptq", False) == ("act-order" if recipe != "int4" else False)
        err[recipe] = np.linalg.norm(y - x @ W) / np.linalg.norm(x @ W)
    assert err["int4-gptq"] < 0.7 * err["int4"] and err["int4-awq-gptq"] < 0.7 * err["int4"], err
    with pytest.raises(Exception, match="Hessian"):                        # statistics without hessian=True
        stats.layers["decoder_text/l"].xtx = None
        quantize_stage(tmp_path / "in.onnx", tmp_path / "q.onnx", "decoder_text", "int4", stats=stats, log=None,
                       recipe="int4-gptq")


def test_calibrated_default_recipe(tmp_path):
    """--precision int4 with calibration statistics (or --calib) gets CALIBRATED_RECIPE's recipe, recorded in the
    stage's manifest entry; without a calibration set it stays round-to-nearest; an explicit recipe wins."""
    onnx = pytest.importorskip("onnx")
    from edgemm.calib.apply import quantize_bundle_stages
    from edgemm.calib.recipes import CALIBRATED_RECIPE, RECIPES
    from edgemm.calib.stats import Stats
    from tests.test_calib import _mm_model
    rng = np.random.default_rng(2)
    K, N = 128, 32
    W = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    stats = Stats.of_matrix(W, rng.standard_normal((64, K)).astype(np.float32), rng, hessian=True)
    assert CALIBRATED_RECIPE["int4"] in RECIPES and RECIPES[CALIBRATED_RECIPE["int4"]].weights == "int4"
    for st, recipes, want in ((stats, None, CALIBRATED_RECIPE["int4"]), (None, None, "int4"),
                              (stats, {"decoder": "int4"}, "int4")):
        onnx.save(_mm_model(W), tmp_path / "decoder_text.onnx")
        stages = {"decoder_text": {"file": "decoder_text.onnx"}}
        quantize_bundle_stages(tmp_path, stages, {"decoder": "int4"}, None, None, stats=st, recipes=recipes, log=None)
        assert stages["decoder_text"]["quantization"]["recipe"]["name"] == want
    # int8: the decoders' calibrated default is SmoothQuant's (a {group: recipe} entry); vision stages keep int8
    assert CALIBRATED_RECIPE["int8"] == {"decoder": "int8-sq"} and RECIPES["int8-sq"].smoothquant
    for recipes, want in ((None, "int8-sq"), ({"decoder": "int8"}, "int8")):
        onnx.save(_mm_model(W), tmp_path / "decoder_text.onnx")
        stages = {"decoder_text": {"file": "decoder_text.onnx"}}
        quantize_bundle_stages(tmp_path, stages, {"decoder": "int8"}, None, None, stats=stats, recipes=recipes,
                               log=None)
        assert stages["decoder_text"]["quantization"]["recipe"]["name"] == want
    seen = {}
    import edgemm.calib.quantize as qz
    orig = qz.quantize_stage

    def spy(f, tmp, stage, p, recipe=None, **kw):         # which recipe each stage is given
        seen[stage] = recipe
        raise RuntimeError("stop")
    qz.quantize_stage = spy
    try:
        with pytest.raises(RuntimeError, match="stop"):
            quantize_bundle_stages(tmp_path, {"vision": {"file": "vision.onnx"}}, {"vision": "int8"}, None, None,
                                   stats=stats, log=None)
    finally:
        qz.quantize_stage = orig
    assert seen == {"vision": None}            # no calibrated recipe for a vision stage: --precision int8's own
    if RECIPES[CALIBRATED_RECIPE["int4"]].gptq:           # statistics without Hessians: AWQ instead, said
        stats.layers["decoder_text/l"].xtx, said = None, []
        onnx.save(_mm_model(W), tmp_path / "decoder_text.onnx")
        stages = {"decoder_text": {"file": "decoder_text.onnx"}}
        quantize_bundle_stages(tmp_path, stages, {"decoder": "int4"}, None, None, stats=stats, log=said.append)
        assert stages["decoder_text"]["quantization"]["recipe"]["name"] == "int4-awq"
        assert any("no Hessians" in x for x in said)


def test_gptq_layers_wider_than_the_kept_hessians_fall_back(tmp_path):
    """A layer with more inputs than XTX_MAX_IN (Qwen2.5-0.5B's FFN down: 4864) has no X^T X in hessian=True
    statistics; int4-awq-gptq quantizes it as int4-awq (recorded, said once) instead of refusing the export,
    while a layer within the limit but without its Hessian is still refused."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from edgemm.calib.quantize import quantize_stage
    from edgemm.calib.recipes import get_recipe
    from edgemm.calib.stats import XTX_MAX_IN, Stats
    from tests.test_calib import _mm_model, _run
    rng = np.random.default_rng(3)
    K, N = XTX_MAX_IN + 128, 8
    W = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    x = rng.standard_normal((1, 16, K)).astype(np.float32)
    x[..., :4] *= 30
    onnx.save(_mm_model(W), tmp_path / "in.onnx")
    stats = Stats.of_matrix(W, x, rng)                  # (collect_stats keeps no X^T X past XTX_MAX_IN inputs)
    said, y = [], {}
    for recipe in ("int4-awq", "int4-awq-gptq"):
        rec = quantize_stage(tmp_path / "in.onnx", tmp_path / f"{recipe}.onnx", "decoder_text", "int4", stats=stats,
                             log=said.append, recipe=get_recipe(recipe).with_options(accuracy_level=0))
        y[recipe] = _run(onnx.load(tmp_path / f"{recipe}.onnx"), {"x": x})
    assert rec["quantized"] == 1 and rec["layers"][0]["gptq"].startswith(f"none ({K} inputs")
    assert sum("no X^T X is kept" in s for s in said) == 1
    np.testing.assert_allclose(y["int4-awq-gptq"], y["int4-awq"], rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(y["int4-awq"] - x @ W) < 0.2 * np.linalg.norm(x @ W)
    Ws = W[:256]
    onnx.save(_mm_model(Ws), tmp_path / "narrow.onnx")
    with pytest.raises(Exception, match="Hessian"):
        quantize_stage(tmp_path / "narrow.onnx", tmp_path / "q.onnx", "decoder_text", "int4",
                       stats=Stats.of_matrix(Ws, x[..., :256], rng), log=None, recipe="int4-awq-gptq")
