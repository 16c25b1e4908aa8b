"""fp16 compute onnx bundles for the CUDA provider (`export --precision fp16 --device cuda`): fp16 weights,
activations, GroupQueryAttention and KV cache, checked on the CPU (ONNX Runtime runs them there too) against the
reference; the CUDA placement check runs where onnxruntime has a CUDA provider and a GPU."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from edgemm.config import ModelConfig, get_preset  # noqa: E402
from edgemm.errors import EdgemmError  # noqa: E402
from edgemm.model import EdgeMM  # noqa: E402

F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def half(random_ckpt, tmp_path_factory):
    from edgemm.export.onnx import export_onnx
    out = tmp_path_factory.mktemp("b") / "fp16-cuda"
    man = export_onnx(model=str(random_ckpt), out=out, precision="fp16", device="cuda", threads=1, log=None)
    return out, man


def _types(m) -> dict:
    """value name -> element type, propagated through the graph: a Cast's `to`, a Gather's data, else the type of
    an op's first typed input (what ONNX's and the contrib ops' type rules give for the ops used here; ONNX shape
    inference stops at contrib ops)."""
    ty = {t.name: t.data_type for t in m.graph.initializer}
    ty.update({v.name: v.type.tensor_type.elem_type for v in m.graph.input})
    for n in m.graph.node:                              # (nodes are in topological order)
        if n.op_type == "Cast":
            t = next(a.i for a in n.attribute if a.name == "to")
        elif n.op_type in ("Shape", "Range"):
            t = onnx.TensorProto.INT64
        else:
            t = next((ty[i] for i in n.input if ty.get(i) in (F16, F32)), ty.get(n.input[0]))
        for o in n.output:
            ty[o] = t
    return ty


def test_decoder_graphs_compute_in_fp16(half):
    out, man = half
    for stage in ("decoder_text", "decoder_image"):
        st = man["stages"][stage]
        assert st["compute"] == "fp16" and st["kv_cache"]["dtype"] == "float16"
        m = onnx.load(str(out / st["file"]))
        floats = [t for t in m.graph.initializer if t.data_type in (F16, F32) and t.dims]   # (fp32 scalars: the
        # RMSNorm statistics' eps and exponent)
        assert floats and all(t.data_type == F16 for t in floats), \
            [t.name for t in floats if t.data_type != F16][:4]       # every weight (and the rotary tables) in fp16
        inits = {t.name for t in m.graph.initializer}
        assert not [n for n in m.graph.node if n.op_type == "Cast" and n.input[0] in inits]   # no weight cast back
        ty = {i.name: i.type.tensor_type.elem_type for i in [*m.graph.input, *m.graph.output]}
        assert ty["past_key.0"] == ty["present_value.0"] == F16 and ty["logits"] == F32
        types = _types(m)
        ops = [n for n in m.graph.node
               if n.op_type in ("GroupQueryAttention", "MatMul", "SkipSimplifiedLayerNormalization")]
        assert len(ops) > 8 and all(types[n.input[0]] == F16 for n in ops), \
            [n.name for n in ops if types[n.input[0]] != F16][:4]
    assert man["device"] == "cuda"
    from edgemm.info import describe_bundle
    info = "\n".join(describe_bundle(str(out)))
    assert "for the CUDA provider" in info and "decoder_text.onnx" in info and "fp16 (fp16 compute)" in info
    v = onnx.load(str(out / man["stages"]["vision"]["file"]))          # the traced vision stage, from fp16
    assert man["stages"]["vision"]["compute"] == "fp16"
    assert all(t.data_type == F16 for t in v.graph.initializer if t.data_type in (F16, F32) and len(t.dims) >= 2)
    assert [i.type.tensor_type.elem_type for i in [*v.graph.input, *v.graph.output]] == [F32, F32]


def test_runs_on_the_cpu_against_the_reference(half, random_ckpt):
    """The ort backend on the CPU: fp16 KV buffers, logits of a text + image + text prompt and 6 greedy decode
    steps within fp16 error of the reference's (an fp32 bundle: 1e-4)."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.export.validate import TorchReference
    from edgemm.runtimes import load_backend
    out, _ = half
    notes = []
    b = load_backend("ort", bundle=str(out), device="cpu", threads=1, log=notes.append)
    assert any("compute in fp16 for the CUDA provider" in n for n in notes)
    model, _ = load_checkpoint(random_ckpt)
    model = model.float().eval()
    ref = TorchReference(model, 64)
    st = b.new_state(max_len=64)
    assert all(a.dtype == np.float16 for a in st.cache["arrays"])
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size, generator=g).numpy()
    rows = b.vision(pixels)                                              # the fp16 compute vision stage
    want_rows = ref.input_stage({"pixels": torch.from_numpy(pixels)})
    assert np.abs(rows - want_rows).max() < 2e-2 * max(1.0, float(np.abs(want_rows).max()))
    errs, agree = [], 0
    for kind, data in (("text", [1, 5, 9, 22]), ("image", rows), ("text", [40, 41, 7])):
        got = b.text(st, data) if kind == "text" else b.image(st, data)
        want = ref.segment(kind, data)
        errs.append(float(np.abs(got - want).max()))
    tok = int(np.argmax(want))
    for _ in range(6):
        got, want = b.text(st, [tok]), ref.segment("text", [tok])
        errs.append(float(np.abs(got - want).max()))
        agree += int(np.argmax(got) == np.argmax(want))
        tok = int(np.argmax(want))
    scale = float(np.abs(want).max())
    assert max(errs) < 2e-2 * max(1.0, scale), errs
    assert agree >= 5
    assert st.cache["arrays"][0][0, :, :st.length].any()                # the fp16 cache holds the rows


def test_answers_as_the_cpu_bundle(half, random_ckpt, tmp_path):
    """Greedy answers on images: the fp16 compute bundle as the fp32 one (random tiny weights: close logits, the
    same top-1 over 12 tokens)."""
    from edgemm import shapes
    from edgemm.export.onnx import export_onnx
    from edgemm.generation import GenerationConfig, answer
    from edgemm.runtimes import load_backend
    export_onnx(model=str(random_ckpt), out=tmp_path / "fp32", precision="fp32", threads=1, log=None)
    a = load_backend("ort", bundle=str(tmp_path / "fp32"), device="cpu", threads=1)
    h = load_backend("ort", bundle=str(half[0]), device="cpu", threads=1)
    rng = np.random.default_rng(3)
    for _ in range(2):
        img = shapes.render(shapes.sample_scene(rng))
        gen = GenerationConfig(max_new_tokens=12)
        assert answer(h, img, "What color is the circle?", gen) == answer(a, img, "What color is the circle?", gen)


def test_variants_validate(tokenizer, tmp_path):
    """The cogvlm position rule (RoPE from `positions`, cast to fp16), CogVLM's eoi row through the text branch
    (`input_rows` cast in), grouped-query attention and a QKV bias: the fp16 compute export validates."""
    from edgemm.export.onnx import export_onnx
    d = get_preset("tiny-shapes").to_dict()
    d["decoder"].update(n_layers=2, n_kv_heads=2, qkv_bias=True, position_rule="cogvlm", eoi_branch="text")
    model = EdgeMM(ModelConfig.from_dict(d)).init_weights(seed=5)
    with torch.no_grad():
        for layer in model.decoder.layers:
            for br in (layer.text, layer.vision):
                br.qkv.bias.normal_(0, 0.1)
    m = export_onnx(model=(model, tokenizer), out=tmp_path / "v", precision="fp16", device="cuda", threads=1, log=None)
    assert all(f["ok"] for f in m["validation"]["stages"].values())
    g = onnx.load(str(tmp_path / "v" / "decoder_text.onnx"))
    assert {i.name for i in g.graph.input} >= {"positions", "input_rows"}
    assert not any(a.name == "do_rotary" and a.i for n in g.graph.node for a in n.attribute)   # external RoPE


def test_refusals(random_ckpt, tmp_path):
    from edgemm.cli import main
    from edgemm.export.onnx import _half_for, export_onnx
    with pytest.raises(EdgemmError, match="fp16 compute decoders.*--precision fp16"):
        export_onnx(model=str(random_ckpt), out=tmp_path / "x", precision="int4", device="cuda", threads=1, log=None)
    assert not (tmp_path / "x").exists()
    assert _half_for("cpu", {"vision": "fp16", "decoder": "fp16"}) is False
    with pytest.raises(EdgemmError, match="the onnx exporter writes bundles for cpu, cuda"):
        _half_for("tpu", {"vision": "fp16", "decoder": "fp16"})
    r = CliRunner().invoke(main, ["export", "--target", "gguf", "--device", "cuda", "-o", str(tmp_path / "g")])
    assert r.exit_code != 0 and "--device applies to --target onnx" in r.output
    assert not (tmp_path / "g").exists()


def test_bench_counts_fp16_reads_on_cuda_fp32_on_the_cpu(half, random_ckpt, tmp_path):
    from edgemm.bench import decode_weight_bytes
    from edgemm.export.onnx import export_onnx
    export_onnx(model=str(random_ckpt), out=tmp_path / "fp32", precision="fp32", threads=1, log=None)
    f32 = decode_weight_bytes(tmp_path / "fp32")
    on_gpu, on_cpu = decode_weight_bytes(half[0]), decode_weight_bytes(half[0], cpu=True)
    assert abs(on_gpu - f32 / 2) < 0.01 * f32                      # 2 bytes a weight where it computes in fp16
    assert on_gpu < on_cpu < f32 and on_cpu > 0.9 * f32             # the CPU folds the MatMul weights to fp32


def _cuda() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA GPU")
def test_on_cuda_every_decoder_node_on_the_gpu(half):
    from edgemm.runtimes import load_backend
    from edgemm.runtimes.ort_backend import off_provider_nodes
    out, _ = half
    b = load_backend("ort", bundle=str(out), device="cuda", threads=1)
    assert b.provider == "CUDAExecutionProvider"
    for s in ("decoder_text", "decoder_image"):
        off = off_provider_nodes(b.sess[s].get_provider_graph_assignment_info(), b.provider)
        assert not off.get("GroupQueryAttention") and not off.get("MatMul"), off
    c = load_backend("ort", bundle=str(out), device="cpu", threads=1)
    sg, sc = b.new_state(max_len=32), c.new_state(max_len=32)
    for ids in ([1, 5, 9], [4], [7]):
        assert np.abs(b.text(sg, ids) - c.text(sc, ids)).max() < 2e-2


@pytest.mark.parametrize("family", ["instructblip", "libra", "moe"])
def test_imported_families_validate(family, tmp_path):
    """InstructBLIP (the Q-Former reads the question: an additive mask in the rows' type traces to fp16), Libra
    (the image_tokens input stage, the cross-modal bridge, low-rank branches) and MoE-LLaVA (com.microsoft MoE,
    and the dense standard-op form): fp16 compute exports validate."""
    from edgemm.export.onnx import export_onnx
    from edgemm.importers import import_checkpoint
    forms = [None]
    if family == "moe":
        from .test_import import write_tokenizer
        from .test_moe import _tiny_moe_llava
        _tiny_moe_llava().save_pretrained(tmp_path / "hf", safe_serialization=True)
        write_tokenizer(tmp_path / "hf")
        ck, forms = tmp_path / "ck", ["ort-moe", "dense"]
        import_checkpoint(tmp_path / "hf", ck, log=None)
    elif family == "instructblip":
        from .test_qformer import _imported
        ck = _imported(tmp_path, instruct=True)[-1]
    else:
        from .test_import_export import LIBRA_CONFIG, libra_tensors, write_hf
        ck = tmp_path / "ck"
        import_checkpoint(write_hf(tmp_path / "hf", LIBRA_CONFIG, libra_tensors(), shards=2), ck, log=None)
    for form in forms:
        m = export_onnx(model=str(ck), out=tmp_path / f"b{form}", precision="fp16", device="cuda", threads=1,
                        log=None, moe_form=form)
        assert all(f["ok"] for f in m["validation"]["stages"].values())
        assert {s["compute"] for s in m["stages"].values()} == {"fp16"}
        if form:
            assert m["stages"]["decoder_text"]["moe"]["form"] == form
