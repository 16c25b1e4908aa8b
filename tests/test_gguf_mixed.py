"""ONNX vision beside a GGUF decoder: where llama.cpp computes the decoder but not the vision side (BLIP-2's
Q-Former; LLaVA exported with vision="onnx" while llama.cpp's llava graph misorders CLIP's CLS row), `export --target
gguf` writes the decoder GGUF + vision.onnx under one manifest. Checked: stock llama-cpp-python (low-level API, no
edgemm code on that side) fed the ONNX stage's rows (run here with onnxruntime directly) gives transformers' greedy
tokens; `edgemm run --bundle` answers; a corrupt vision.onnx is refused in one line; the backend's ONNX Runtime
session does not spin."""
from __future__ import annotations

import ctypes
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from edgemm.errors import EdgemmError

pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
STEPS = 4


def _quiet(*a, **k):
    pass


def _source(d, hf, tokenizer):
    from edgemm.importers import import_checkpoint
    hf.save_pretrained(d / "src", safe_serialization=True)
    tokenizer.save(d / "src" / "tokenizer.json")           # byte-level BPE: llama.cpp's gpt2 tokenizer reads it
    import_checkpoint(d / "src", d / "ck", log=None)
    return d / "ck"


@pytest.fixture(scope="module")
def blip2(tmp_path_factory, tokenizer):
    """A tiny random BLIP-2 (BLIP tower, 3-layer Q-Former, LLaMA with 2 KV heads), imported and exported with the
    CLI at f32: the support matrix gives it the ONNX vision stage."""
    from click.testing import CliRunner
    from edgemm.cli import main
    from .test_qformer import _tiny
    d = tmp_path_factory.mktemp("blip2-mixed")
    hf = _tiny(kv_heads=2)
    ck = _source(d, hf, tokenizer)
    r = CliRunner().invoke(main, ["export", "--target", "gguf", "--model", str(ck), "--precision", "f32", "-o",
                                  str(d / "b"), "--threads", "2"])
    assert r.exit_code == 0, r.output
    g = torch.Generator().manual_seed(5)
    return {"hf": hf, "ck": ck, "bundle": d / "b", "n_img": hf.config.num_query_tokens,
            "px": torch.randn(1, 3, 16, 16, generator=g), "dir": d}


@pytest.fixture(scope="module")
def llava(tmp_path_factory, tokenizer):
    """A tiny random LLaVA (CLIP tower, MLP projector, LLaMA with 2 KV heads) exported with vision="onnx"."""
    from edgemm.export.gguf import export_gguf
    from .test_import_llava import _tiny_llava
    d = tmp_path_factory.mktemp("llava-mixed")
    hf = _tiny_llava(kv_heads=2)
    ck = _source(d, hf, tokenizer)
    export_gguf(model=str(ck), out=d / "b", precision="f32", log=_quiet, threads=2, vision="onnx")
    g = torch.Generator().manual_seed(6)
    return {"hf": hf, "ck": ck, "bundle": d / "b", "n_img": hf.config.vision_config.image_size ** 2 // 16,
            "px": torch.randn(1, 3, 16, 16, generator=g), "dir": d}


def _stock_greedy(decoder, pre, rows, post, steps):
    """Greedy tokens from stock llama-cpp-python's low-level API: pre ids, then the image rows as one embedding
    batch (llama_batch.embd), then post ids; f32 KV cache, flash attention off."""
    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()                       # registers llama.cpp's CPU variant (a GGML_BACKEND_DL build needs it)
    import llama_cpp as L
    model = L.llama_model_load_from_file(str(decoder).encode(), L.llama_model_default_params())
    assert model
    n_embd, n_vocab = L.llama_model_n_embd(model), L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 256, 256, 256, 2, 2
    cp.type_k = cp.type_v = L.GGML_TYPE_F32
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cp)
    pos = 0

    def decode(ids=None, emb=None):
        nonlocal pos
        n = len(ids) if ids is not None else emb.shape[0]
        b = L.llama_batch_init(n, 0 if ids is not None else n_embd, 1)
        try:
            if emb is not None:
                emb = np.ascontiguousarray(emb, np.float32)
                ctypes.memmove(b.embd, emb.ctypes.data, emb.nbytes)
            for i in range(n):
                if ids is not None:
                    b.token[i] = int(ids[i])
                b.pos[i], b.n_seq_id[i], b.logits[i] = pos + i, 1, int(i == n - 1)
                b.seq_id[i][0] = 0
            b.n_tokens = n
            assert L.llama_decode(ctx, b) == 0
        finally:
            L.llama_batch_free(b)
        pos += n
        return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()

    try:
        decode(ids=pre)
        decode(emb=rows)
        logits, out = decode(ids=post), []
        for _ in range(steps):
            out.append(int(logits.argmax()))
            logits = decode(ids=[out[-1]])
        return out
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)


def _hf_greedy(hf, ids, px, steps):
    """transformers' own forward (image tokens in the ids, pixel_values) greedy for `steps` tokens."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            t = int(hf(input_ids=ids, pixel_values=px).logits[0, -1].argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out


# --------------------------------------------------------------------------- the files
@needs_llama
@pytest.mark.parametrize("name", ["blip2", "llava"])
def test_export_writes_decoder_gguf_and_vision_onnx(name, request):
    m = request.getfixturevalue(name)
    man = json.loads((m["bundle"] / "edgemm.json").read_text())
    st = man["stages"]
    assert sorted(p.name for p in m["bundle"].iterdir()) == sorted(
        ["decoder-f32.gguf", "vision.onnx", "edgemm.json", "tokenizer.json", "chat_template.jinja"])
    assert st["vision"]["file"] == "vision.onnx" and st["vision"]["format"] == "onnx"
    assert st["vision"]["precision"] == man["precision"]["vision"] == "fp32"
    assert st["decoder"]["format"] == "gguf (arch llama)"
    v = man["validation"]
    assert v["passed"] and v["vision_onnx"]["ok"] and v["vision_rows_max_abs"] < 1e-4
    assert v["text_max_abs"] < 1e-4 and v["image_max_abs"] < 1e-4 and v["image_mtmd_max_abs"] < 1e-4


# --------------------------------------------------------------------------- stock llama.cpp + onnxruntime
@needs_llama
@pytest.mark.parametrize("name", ["blip2", "llava"])
def test_stock_llama_cpp_fed_onnx_rows_gives_transformers_greedy_tokens(name, request):
    """The bundle's files outside edgemm: vision.onnx in onnxruntime, the decoder GGUF in stock llama-cpp-python fed
    those rows as an embedding batch -> the same greedy tokens as transformers' model on the same pixels."""
    m = request.getfixturevalue(name)
    from .test_import_llava import IMAGE_TOKEN
    sess = ort.InferenceSession(str(m["bundle"] / "vision.onnx"), providers=["CPUExecutionProvider"])
    rows = sess.run(["image_rows"], {"pixels": m["px"].numpy()})[0]
    assert rows.shape == (1, m["n_img"], 32)
    g = torch.Generator().manual_seed(7)
    pre = [1] + torch.randint(4, 500, (4,), generator=g).tolist()
    post = torch.randint(4, 500, (6,), generator=g).tolist()
    want = _hf_greedy(m["hf"], torch.tensor([pre + [IMAGE_TOKEN] * m["n_img"] + post]), m["px"], STEPS)
    got = _stock_greedy(m["bundle"] / "decoder-f32.gguf", pre, rows[0], post, STEPS)
    assert got == want


# --------------------------------------------------------------------------- edgemm's llamacpp backend
@needs_llama
def test_backend_runs_the_onnx_stage_without_spinning(blip2):
    """The llamacpp backend opens vision.onnx in ONNX Runtime (CPU provider, intra-op threads = the backend's,
    spinning off), its rows equal the reference's, and it answers as the torch reference does (greedy)."""
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes import load_backend
    ref = load_backend("torch", model=str(blip2["ck"]), device="cpu")
    b = load_backend("llamacpp", bundle=str(blip2["bundle"]), threads=2)
    ov = b._onnx_vision
    assert ov.sess.get_providers() == ["CPUExecutionProvider"]
    so = ov.options
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == b.threads == 2 and so.inter_op_num_threads == 1
    px = blip2["px"].numpy()
    assert np.abs(b.vision(px) - ref.vision(px)).max() < 1e-4
    assert b.vision_source == "onnx (vision.onnx)" and "vision rows from onnx" in b.describe()
    from edgemm.bench import decode_weight_bytes
    assert decode_weight_bytes(blip2["bundle"]) > 0                 # edgemm bench reads the decoder GGUF only
    img = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    answers = []
    for be in (ref, b):
        s = ChatSession(be, GenerationConfig(max_new_tokens=4))
        s.set_image(img)
        answers.append([s.ask("what color is the circle?"), s.ask("how many shapes are there?")])
    assert answers[0] == answers[1]
    b.close()


@needs_llama
def test_run_cli_answers(blip2):
    from click.testing import CliRunner
    from PIL import Image
    from edgemm.cli import main
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        blip2["dir"] / "img.png")
    r = CliRunner().invoke(main, ["run", "--bundle", str(blip2["bundle"]), "--image", str(blip2["dir"] / "img.png"),
                                  "--threads", "2", "--max-new-tokens", "3", "what color is the circle?"])
    assert r.exit_code == 0, r.output
    assert r.output.strip()
    r = CliRunner().invoke(main, ["info", "--bundle", str(blip2["bundle"])])
    assert r.exit_code == 0, r.output
    assert "vision.onnx" in r.output and "image rows: vision.onnx in ONNX Runtime" in r.output


# --------------------------------------------------------------------------- refusals
@needs_llama
def test_corrupt_vision_onnx_is_refused_in_one_line(blip2, tmp_path):
    """A vision.onnx that is not what the manifest hashed, and one re-hashed (hostile) that ONNX Runtime cannot
    parse: each refused in one line by the loader (no traceback, exit 2)."""
    from click.testing import CliRunner
    from edgemm.bundle import read_manifest, write_manifest
    from edgemm.cli import main
    from edgemm.runtimes import load_backend
    for hostile in (False, True):
        b = tmp_path / f"b{int(hostile)}"
        shutil.copytree(blip2["bundle"], b)
        f = b / "vision.onnx"
        data = bytearray(f.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
        f.write_bytes(bytes(data[: len(data) // 2 + 64]))
        if hostile:
            write_manifest(b, read_manifest(b))                   # hashes the corrupt file
        want = "ONNX Runtime could not load the vision stage" if hostile else "vision.onnx does not match its sha256"
        with pytest.raises(EdgemmError, match=want) as e:
            load_backend("llamacpp", bundle=str(b), threads=2)
        assert "\n" not in str(e.value)
        r = CliRunner().invoke(main, ["run", "--bundle", str(b), "--threads", "2", "hi"])
        errors = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1 and want in errors[0] and "Traceback" not in r.output


@needs_llama
def test_export_check_refuses_a_wrong_vision_stage(blip2, tmp_path, monkeypatch):
    """The export's ONNX-rows check fails a vision graph off the reference (a weight sign-flipped): one line naming
    vision.onnx, and no bundle."""
    from onnx import numpy_helper
    from edgemm.export import graph
    from edgemm.export.gguf import export_gguf
    real = graph.vision_graph

    def broken(*a, **k):
        g, n = real(*a, **k)
        t = next(t for t in g.graph.initializer if len(t.dims) >= 2)
        t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
        return g, n
    monkeypatch.setattr(graph, "vision_graph", broken)
    with pytest.raises(EdgemmError, match=r"GGUF validation failed for vision \(vision.onnx: the ONNX vision") as e:
        export_gguf(model=str(blip2["ck"]), out=tmp_path / "b", precision="f32", log=_quiet, threads=2)
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()


def test_support_matrix_routes_and_refusals(blip2, tmp_path):
    """BLIP-2 gets llama.cpp's llama decoder + the ONNX vision stage, LLaVA the mmproj by default; the families
    table marks the ONNX route; decoders llama.cpp cannot compute stay refused; --gguf-vision is checked."""
    from click.testing import CliRunner
    from edgemm import families
    from edgemm.blocks import support
    from edgemm.cli import main
    from edgemm.config import ModelConfig, get_preset
    from edgemm.errors import UnsupportedVariant
    from edgemm.export.gguf import check_supported, decoder_arch, vision_stage
    cfg = ModelConfig.load(blip2["ck"] / "config.json")
    assert vision_stage(cfg) == "onnx" and decoder_arch(cfg) == "llama" and support.refusal(cfg, "gguf") is None
    rows = {r["family"]: r["targets"] for r in families.table()}
    for fam in ("blip2", "instructblip"):
        assert "gguf (" in rows[fam] and "vision stage in ONNX" in rows[fam]
    assert "vision stage in ONNX" not in rows["llava"] and "gguf" not in rows["idefics"]
    with pytest.raises(EdgemmError, match="--gguf-vision mmproj: llama.cpp's clip/mtmd has no graph"):
        vision_stage(cfg, "mmproj")
    routed = get_preset("tiny-shapes")                 # edgemm's own family with a feature llama.cpp's cogvlm lacks
    routed.decoder.per_modality_norms = True
    for vision in ("auto", "onnx"):
        with pytest.raises(UnsupportedVariant, match="per-modality norms"):
            check_supported(routed, log=None, vision=vision)
    r = CliRunner().invoke(main, ["export", "--target", "onnx", "--gguf-vision", "onnx", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--gguf-vision applies to --target gguf" in r.output


@needs_llama
def test_instructblip_question_reaches_the_onnx_stage(tmp_path, tokenizer, monkeypatch):
    """InstructBLIP: the ONNX vision stage of its gguf bundle reads the question's Q-Former ids; `edgemm run` feeds
    llama.cpp the rows transformers computes from its own processor's qformer_input_ids; the Q-Former tokenizer is
    in the bundle."""
    from click.testing import CliRunner
    from PIL import Image
    from transformers import InstructBlipProcessor
    from edgemm.cli import main
    from edgemm.export.gguf import export_gguf
    from edgemm.importers import import_checkpoint
    from edgemm.runtimes.llamacpp_backend import LlamaCppBackend
    from .test_qformer import N_QUERY, _recording, _save_processor, _tiny
    hf = _tiny(instruct=True)
    src = tmp_path / "src"
    hf.save_pretrained(src, safe_serialization=True)
    tokenizer.save(src / "tokenizer.json")
    _save_processor(src)
    import_checkpoint(src, tmp_path / "ck", log=None)
    man = export_gguf(model=str(tmp_path / "ck"), out=tmp_path / "b", precision="f32", log=_quiet, threads=2)
    assert man["stages"]["vision"]["format"] == "onnx" and man["qformer_tokenizer"] in man["files"]
    assert [i["name"] for i in man["stages"]["vision"]["inputs"]] == ["pixels", "qformer_input_ids",
                                                                      "qformer_attention_mask"]
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(img)
    proc = InstructBlipProcessor.from_pretrained(src)
    fed = _recording(monkeypatch, LlamaCppBackend)
    got = []
    for q in ("What is in the image?", "How many red shapes are there?"):
        enc = proc(images=Image.open(img), text=q, return_tensors="pt")
        with torch.no_grad():
            want = hf.get_image_features(enc["pixel_values"], enc["qformer_input_ids"], enc["qformer_attention_mask"],
                                         return_dict=True).pooler_output.numpy()
        fed.clear()
        r = CliRunner().invoke(main, ["run", "--bundle", str(tmp_path / "b"), "--image", str(img), "--threads", "2",
                                      "--max-new-tokens", "2", q])
        assert r.exit_code == 0, r.output
        assert len(fed) == 1 and fed[0].shape == (1, N_QUERY, 32) and np.abs(fed[0] - want).max() <= 1e-4
        got.append(fed[0])
    assert np.abs(got[0] - got[1]).max() > 1e-3


@needs_llama
def test_quantized_bundle_writes_an_int8_weight_only_vision_stage(blip2, tmp_path):
    """--precision q8_0: the decoder quantized by llama.cpp, the ONNX vision stage int8 weight-only (MatMulNBits, no
    calibration), judged by the onnx int8-wo bound; the backend's rows stay near the reference's."""
    from edgemm.export.gguf import export_gguf
    from edgemm.runtimes import load_backend
    man = export_gguf(model=str(blip2["ck"]), out=tmp_path / "q8", precision="q8_0", log=_quiet, threads=2)
    st = man["stages"]["vision"]
    assert st["precision"] == "int8-wo" and st["quantization"] and man["stages"]["decoder"]["precision"] == "q8_0"
    assert man["validation"]["vision_onnx"]["ok"] and man["validation"]["vision_onnx"]["bound"] == "cosine >= 0.995"
    b = load_backend("llamacpp", bundle=str(tmp_path / "q8"), threads=2)
    ref = load_backend("torch", model=str(blip2["ck"]), device="cpu")
    px = blip2["px"].numpy()
    from edgemm.export.validate import compare
    assert compare(ref.vision(px), b.vision(px))[1] > 0.995
    b.close()


@needs_llama
def test_llava_next_tiles_run_through_the_onnx_stage(tmp_path, tokenizer):
    """LLaVA-NeXT with --gguf-vision onnx: the export checks the tiles' ONNX rows packed on the host; the backend
    tiles a wide image, runs the tiles through vision.onnx, packs them with the manifest's newline row, and its rows
    and next-token logits equal the torch reference's."""
    from edgemm.export.gguf import export_gguf
    from edgemm.runtimes import load_backend
    from edgemm.tilings import image_rows
    from .test_anyres import _tiny_llava_next
    ck = _source(tmp_path, _tiny_llava_next(), tokenizer)
    man = export_gguf(model=str(ck), out=tmp_path / "b", precision="f32", log=_quiet, threads=2, vision="onnx")
    assert man["stages"]["vision"]["format"] == "onnx" and man["anyres"]["image_newline"]
    assert man["validation"]["vision_onnx"]["ok"] and man["validation"]["image_mtmd_max_abs"] < 1e-4
    ref = load_backend("torch", model=str(ck), device="cpu")
    b = load_backend("llamacpp", bundle=str(tmp_path / "b"), threads=2)
    img = np.random.default_rng(7).integers(0, 256, (12, 32, 3), dtype=np.uint8)        # 2 tiles + the overview
    rows_ref, rows = image_rows(ref, img), image_rows(b, img)
    assert rows.shape == rows_ref.shape and rows.shape[1] > ref.cfg.vision.n_patches
    assert np.abs(rows - rows_ref).max() < 1e-4
    sr, sb = ref.new_state(), b.new_state()
    for be, st in ((ref, sr), (b, sb)):
        be.text(st, [be.tokenizer.bos_id])
        be.image(st, rows)
    ids = ref.tokenizer.user_turn("what color is the circle?", True)
    assert np.abs(ref.text(sr, ids) - b.text(sb, ids)).max() < 1e-4
    b.close()
