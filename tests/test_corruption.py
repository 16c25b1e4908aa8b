"""Every export check shown to fail: one weight or scale of one stage of an exported bundle broken in a way that
matters, the bundle checked again as its export checked it, and the check fails naming that stage and no other
(issue 32, item 3). onnx fp32 / int8 / int4, trt fp16 / int8 / fp8 (the Q/DQ graphs on ONNX Runtime's CPU
provider: what `export --target trt` checks where no engine is built), gguf q8_0 (llama.cpp).

The shipped tiny-shapes model: a corruption "matters" where its answers change. Accuracy on 150 test questions,
measured once for each corruption (clean 0.96 at every precision): the projector's last matrix sign-flipped or its
int8 weight scale zeroed 0.21-0.23; a layer's text-branch attention output sign-flipped 0.15; the first layer's
text qkv weights inverted (int4 nibbles) or its int8 activation scale set 100x 0.00; the vision branch's first qkv
weight scale sign-flipped 0.43-0.45; its attention output sign-flipped (fp32) 0.86. Each corrupted copy differs
from its clean bundle in that one initializer only, and the clean bundle passes the same check.

Where the checks did not see such corruptions before (fixed with these tests): an int8 / fp8 decoder_text whose
attention output was sign-flipped passed at cosine 0.995 (a trained model's logits sit far from 0, which held the
plain cosine up; the check's cosine is now of the mean-removed vectors: 0.93); a broken decoder_image also failed
decoder_text (its text rows read the image's KV cache), and a broken decoder_text decoder_image: the check now
runs each segment again on the reference's cache rows and names the other stage as following; a q8_0 mmproj was
never judged (its rows were compared only at f32). What they still pass: one int8 projection broken where it
costs 1-14 points of accuracy (a scale zeroed, negated or set 100x in one FFN or attention projection), the one
held-out prompt still answered right. Every case here is named right on each of the 16 held-out prompts (seeds
0-15; fp32 / fp16: seeds 0-3).
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from edgemm.checkpoint import DEMO_DIR  # noqa: E402
from edgemm.errors import EdgemmError  # noqa: E402
from tests.conftest import requires_demo  # noqa: E402

pytestmark = requires_demo
STAGES = ("vision", "decoder_text", "decoder_image")
I4 = {"vision": "fp16", "decoder": "int4"}        # int4 is a decoder precision (the vision stage fp16)


def neg(a):
    return -a


def zero(a):
    return a * 0


def times100(a):
    return a * 100


def invert_nibbles(a):
    """int4 packed two to a byte: every nibble q -> 15 - q (zero point 8: the weight's sign flipped, off by one)."""
    return a ^ np.uint8(0xFF)


LAST_MATMUL = "last MatMul"     # the vision stage's last weight matrix (the projector's down projection)
# (target, precision, stage, initializer: regex or LAST_MATMUL, corruption)
CASES = [
    ("onnx", "fp32", "vision", LAST_MATMUL, neg),
    ("onnx", "fp32", "decoder_text", r"^layers\.1\.text\.o\.weight", neg),
    ("onnx", "fp32", "decoder_image", r"^layers\.1\.vision\.o\.weight", neg),
    ("onnx", "int8", "vision", r"adapter_down_MatMul\.weight_scale", zero),
    ("onnx", "int8", "decoder_text", r"^layers\.1\.text\.o\.weight_scale", neg),
    ("onnx", "int8", "decoder_image", r"^layers\.0\.vision\.qkv\.weight_scale", neg),
    ("onnx", I4, "decoder_text", r"^layers\.0\.text\.qkv\.weight_nbits", invert_nibbles),
    ("onnx", I4, "decoder_image", r"^layers\.0\.vision\.qkv\.weight_scale", neg),   # (int8-dyn there)
    ("trt", "fp16", "vision", LAST_MATMUL, neg),
    ("trt", "fp16", "decoder_text", r"^layers\.1\.text\.o\.weight", neg),
    ("trt", "fp16", "decoder_image", r"^layers\.1\.vision\.o\.weight", neg),
    ("trt", "int8", "vision", r"adapter_down_MatMul\.weight_scale", zero),
    ("trt", "int8", "decoder_text", r"^layers\.0\.text\.qkv\.act_scale", times100),
    ("trt", "int8", "decoder_image", r"^layers\.0\.vision\.qkv\.weight_scale", neg),
    ("trt", "fp8", "vision", r"adapter_down_MatMul\.weight_scale", zero),
    ("trt", "fp8", "decoder_text", r"^layers\.1\.text\.o\.weight_scale", neg),
    ("trt", "fp8", "decoder_image", r"^layers\.0\.vision\.qkv\.weight_scale", neg),
]


def _name(p):
    return p if isinstance(p, str) else "vision-{vision}.decoder-{decoder}".format(**p)


def _id(case):
    target, p, stage, _, fn = case
    return f"{target}-{_name(p)}-{stage}-{fn.__name__}"


@pytest.fixture(scope="module")
def model():
    from edgemm.checkpoint import load_model
    torch.set_num_threads(1)
    m, tok = load_model(str(DEMO_DIR))
    return m.float().eval(), tok


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """bundle(target, precision) -> the directory of a bundle exported once for the module."""
    from edgemm.calib.sets import bundled_set
    from edgemm.calib.stats import collect_stats
    from edgemm.export.onnx import export_onnx
    from edgemm.export.trt import export_trt
    made, stats = {}, []

    def get(target, precision):
        key = (target, _name(precision))
        if key not in made:
            out = tmp_path_factory.mktemp("b") / "-".join(key)
            if target == "onnx":
                if not stats:
                    stats.append(collect_stats(str(DEMO_DIR), bundled_set(4), cache=False, progress=False,
                                               log=None))
                export_onnx(model=str(DEMO_DIR), out=out, precision=precision, threads=1, stats=stats[0], log=None)
            else:
                export_trt(model=str(DEMO_DIR), out=out, precision=precision, threads=1, calib_size=4, log=None,
                           no_build=True)
            made[key] = out
        return made[key]
    return get


def check(target, path, model):
    """The bundle's check, as its export ran it (export_onnx / export_trt): the graphs in ONNX Runtime against the
    reference, a quantized bundle on a held-out prompt; raises EdgemmError naming the stage to blame."""
    from edgemm.calib.recipes import QUANTIZED
    from edgemm.export.onnx import validate_bundle
    from edgemm.export.trt import validate_graphs
    from edgemm.export.validate import check_items, raise_failure
    m, tok = model
    prec = json.loads((path / "edgemm.json").read_text())["precision"]
    items = check_items(m, tok) if set(prec.values()) & set(QUANTIZED) else None
    figures = (validate_bundle if target == "onnx" else validate_graphs)(m, path, prec, seed=0, threads=1,
                                                                        calib_items=items)
    raise_failure(figures)
    return figures


def _initializer(g, pattern):
    if pattern == LAST_MATMUL:
        inits = {t.name for t in g.graph.initializer}
        name = next(n.input[1] for n in reversed(g.graph.node) if n.op_type == "MatMul" and n.input[1] in inits)
        return next(t for t in g.graph.initializer if t.name == name)
    found = [t for t in g.graph.initializer if re.search(pattern, t.name)]
    assert len(found) == 1, (pattern, [t.name for t in found])
    return found[0]


def corrupt(path, pattern, fn) -> str:
    """One initializer of the ONNX file at `path` rewritten as fn(its values), in place. -> its name."""
    from onnx import numpy_helper
    g = onnx.load(str(path), load_external_data=False)
    t = _initializer(g, pattern)
    assert t.data_location == onnx.TensorProto.DEFAULT, f"{t.name} is stored as external data"
    a = numpy_helper.to_array(t)
    b = np.asarray(fn(a), dtype=a.dtype)
    assert b.shape == a.shape and not np.array_equal(a, b)
    t.CopyFrom(numpy_helper.from_array(b, t.name))
    onnx.save(g, str(path))
    return t.name


def _differing(a, b) -> list:
    from onnx import numpy_helper
    ga, gb = onnx.load(str(a)), onnx.load(str(b))
    bb = {t.name: numpy_helper.to_array(t) for t in gb.graph.initializer}
    return [t.name for t in ga.graph.initializer if not np.array_equal(numpy_helper.to_array(t), bb[t.name])]


def blamed(msg: str) -> list:
    """The stages a check's one-line failure blames: those after 'failed for', before any '; X is off only after'."""
    head = msg.split("; ")[0] if "failed for" in msg else ""
    return [s for s in re.findall(r"(?:failed for |\), )(\w+) \(", head)]


@pytest.mark.parametrize("target,precision", [("onnx", "fp32"), ("onnx", "int8"), ("onnx", I4), ("trt", "fp16"),
                                              ("trt", "int8"), ("trt", "fp8")],
                         ids=lambda v: _name(v))
def test_clean_bundle_passes(target, precision, bundle, model):
    figures = check(target, bundle(target, precision), model)
    assert all(figures[s]["ok"] for s in STAGES), figures


@pytest.mark.parametrize("target,precision,stage,pattern,fn", CASES, ids=[_id(c) for c in CASES])
def test_corrupted_stage_fails_named(target, precision, stage, pattern, fn, bundle, model, tmp_path):
    src = bundle(target, precision)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    name = corrupt(bad / f"{stage}.onnx", pattern, fn)
    assert _differing(src / f"{stage}.onnx", bad / f"{stage}.onnx") == [name]
    with pytest.raises(EdgemmError) as e:
        check(target, bad, model)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("validation failed for ")
    who = [s for s in blamed(msg) if s != "decoder_batch"]      # decoder_batch: decoder_text's batched step
    assert who == [stage], msg
    assert not any(f"{s} (" in msg.split("; ")[0] for s in STAGES if s != stage), msg


def test_follower_is_named_as_following(bundle, model, tmp_path):
    """A broken decoder_image breaks the text rows after the image (they read its KV cache): the check runs each
    segment again on the reference's cache rows, says decoder_text is off only after decoder_image's rows, and
    blames decoder_image alone."""
    src = bundle("onnx", "fp32")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    corrupt(bad / "decoder_image.onnx", r"^layers\.1\.vision\.o\.weight", neg)
    from edgemm.export.validate import failure, format_validation
    from edgemm.export.onnx import validate_bundle
    m, _ = model
    figures = validate_bundle(m, bad, {"vision": "fp32", "decoder": "fp32"}, seed=0, threads=1)
    dt, di = figures["decoder_text"], figures["decoder_image"]
    assert not dt["ok"] and dt["follows"] == "decoder_image"
    assert not di["ok"] and "follows" not in di and figures["vision"]["ok"]
    msg = failure(figures)
    assert blamed(msg) == ["decoder_image"]
    assert "decoder_text is off only after decoder_image's rows in the KV cache" in msg
    table = format_validation(figures)
    assert re.search(r"^decoder_text .* after decoder_image ", table, re.M), table
    assert re.search(r"^decoder_image .* FAIL ", table, re.M), table


# --------------------------------------------------------------------------- gguf (llama.cpp)
@pytest.fixture(scope="module")
def gguf_bundle(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from edgemm.export.gguf import export_gguf
    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()
    out = tmp_path_factory.mktemp("gguf") / "q8_0"
    man = export_gguf(model=str(DEMO_DIR), out=out, precision="q8_0", log=None, threads=1)
    return out, man


def gguf_check(path, man, model, decoder=None, mmproj=None):
    """The GGUF bundle's check as its export ran it (edgemm.export.gguf.validate)."""
    from edgemm.export.gguf import validate
    m, tok = model
    prec = {"decoder": man["precision"]["decoder"], "vision": man["precision"]["vision"]}
    return validate(m, tok, decoder or path / man["stages"]["decoder"]["file"],
                    mmproj or path / man["stages"]["vision"]["file"], prec, 1, log=lambda s: None)


def flip_q8_0_signs(path, name):
    """Every block of a q8_0 tensor (an fp16 scale, then 32 int8) with its scale's sign bit flipped."""
    from gguf import GGUFReader
    r = GGUFReader(str(path), "r+")
    t = next(t for t in r.tensors if t.name == name)
    assert t.tensor_type.name == "Q8_0"
    blocks = t.data.view(np.uint8).reshape(-1, 34)
    blocks[:, 1] ^= 0x80
    r.data.flush()
    del r


def test_gguf_clean_bundle_passes(gguf_bundle, model):
    out, man = gguf_bundle
    assert man["precision"]["decoder"] == man["precision"]["vision"] == "q8_0"
    v = gguf_check(out, man, model)
    assert v["passed"] and v["vision_rows_cosine"] > 0.999


@pytest.mark.parametrize("stage,tensor", [("decoder", "blk.1.attn_output.weight"), ("vision", "mm.down.weight")])
def test_gguf_corrupted_stage_fails_named(stage, tensor, gguf_bundle, model, tmp_path):
    """q8_0 decoder: the text branch's attention output of layer 1 sign-flipped (accuracy 0.96 -> 0.15 in the onnx
    bundles); q8_0 mmproj: the projector's down matrix sign-flipped, which the check passed before it judged a
    quantized mmproj's rows (only f32 ones had a bound)."""
    out, man = gguf_bundle
    src = out / man["stages"][stage]["file"]
    bad = tmp_path / src.name
    shutil.copy(src, bad)
    flip_q8_0_signs(bad, tensor)
    with pytest.raises(EdgemmError) as e:
        gguf_check(out, man, model, **{"decoder" if stage == "decoder" else "mmproj": bad})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("GGUF validation failed for ")
    assert blamed(msg.replace("GGUF validation", "validation")) == [stage], msg
    assert f"{stage} ({bad.name}: " in msg
    assert f"{'vision' if stage == 'decoder' else 'decoder'} (" not in msg, msg
