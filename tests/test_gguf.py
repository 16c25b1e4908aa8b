"""GGUF export (cogvlm decoder + mmproj) and the llama.cpp backend."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from edgemm.checkpoint import DEMO_DIR
from edgemm.errors import EdgemmError, UnsupportedVariant

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
needs_demo = pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").exists(),
                                reason="the trained tiny-shapes weights are not in edgemm/data/tiny-shapes yet")
QUESTIONS = ["what color is the circle?", "how many shapes are there?", "where is the red square?",
             "what shape is at the top left?"]


def _quiet(*a, **k):
    pass


# --------------------------------------------------------------------------- no llama.cpp needed
VARIANTS = [("n_kv_heads", 2, "grouped-query attention"), ("qkv_bias", True, "qkv bias"),
            ("per_modality_norms", True, "per-modality norms"), ("vision_rank", 16, "low-rank vision branches"),
            ("cross_modal_bridge", 8, "cross-modal K/V bridge"),
            ("position_rule", "cogvlm", "collapsed image positions"), ("eoi_branch", "text", "eoi through the text"),
            ("per_modality_kv", True, "per-modality")]           # (with its per-modality norms)


@pytest.mark.parametrize("field,value,name", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_refuses_variants(tmp_path, field, value, name):
    from edgemm.config import get_preset
    from edgemm.export.gguf import export_gguf
    cfg = get_preset("tiny-shapes")
    setattr(cfg.decoder, field, value)
    if field == "per_modality_kv":                 # mPLUG-Owl2's module has both
        cfg.decoder.per_modality_norms = True
    d = tmp_path / "m"
    d.mkdir()
    cfg.save(d / "config.json")
    with pytest.raises(UnsupportedVariant) as e:
        export_gguf(model=str(d), out=tmp_path / "out", precision={"vision": "f32", "decoder": "f32"}, log=_quiet)
    msg = str(e.value)
    assert name in msg and "gguf" in msg and "targets that can:" in msg     # names the variant and who can run it
    assert not (tmp_path / "out").exists()


def test_gguf_files_layout(tmp_path, random_ckpt):
    """Tensor names, shapes and metadata keys llama.cpp's cogvlm loaders ask for."""
    from gguf import GGUFReader
    from edgemm.checkpoint import load_checkpoint
    from edgemm.export.gguf import write_decoder_gguf, write_mmproj_gguf
    m, tok = load_checkpoint(random_ckpt)
    c = m.cfg
    write_decoder_gguf(m, tok, tmp_path / "d.gguf", "t")
    write_mmproj_gguf(m, tmp_path / "v.gguf", "t", "q8_0")
    r = GGUFReader(str(tmp_path / "d.gguf"))
    names = {t.name: [int(s) for s in t.shape] for t in r.tensors}
    D, F = c.decoder.d_model, c.decoder.ffn_dim
    for i in range(c.decoder.n_layers):
        assert names[f"blk.{i}.attn_qkv.weight"] == names[f"blk.{i}.vis_attn_qkv.weight"] == [D, 3 * D]
        assert names[f"blk.{i}.vis_attn_output.weight"] == [D, D]
        for n in ("ffn_gate", "ffn_up", "vis_gate", "vis_up"):
            assert names[f"blk.{i}.{n}.weight"] == [D, F]
        assert names[f"blk.{i}.vis_down.weight"] == [F, D]
    assert names["token_embd.weight"] == [D, c.decoder.vocab_size]
    f = r.fields
    assert bytes(f["general.architecture"].parts[-1]).decode() == "cogvlm"
    assert bytes(f["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert bytes(f["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    assert int(f["tokenizer.ggml.bos_token_id"].parts[-1][0]) == tok.bos_id
    assert bool(f["tokenizer.ggml.add_bos_token"].parts[-1][0])          # llama.cpp puts <s> first
    assert "tokenizer.ggml.merges" in f and "tokenizer.chat_template" in f
    rv = GGUFReader(str(tmp_path / "v.gguf"))
    vnames = {t.name for t in rv.tensors}
    assert {"v.class_embd", "v.position_embd.weight", "v.patch_embd.bias", "mm.model.fc.weight", "v.boi", "v.eoi",
            "mm.post_fc_norm.bias", "mm.up.weight", "mm.gate.weight", "mm.down.weight"} <= vnames
    assert bytes(rv.fields["clip.projector_type"].parts[-1]).decode() == "cogvlm"
    assert bool(rv.fields["clip.use_gelu"].parts[-1][0])


def test_gguf_chat_template_renders_the_prompt_format(tokenizer):
    """The GGUF's chat template, rendered the way llama-cpp-python's MTMD handler renders it (trim_blocks, the
    image part turned into the media marker), gives exactly edgemm's prompt pieces."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from edgemm.export.gguf import GGUF_CHAT_TEMPLATE
    t = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(GGUF_CHAT_TEMPLATE)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "<__media__>"}, {"type": "text", "text": "q one"}]},
            {"role": "assistant", "content": "red"}, {"role": "user", "content": "q two"}]
    text = t.render(messages=msgs, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    assert text == "<__media__>Q: q one\nA: red</s>\nQ: q two\nA:"       # <s> comes from add_bos_token
    before, after = text.split("<__media__>")
    tok = tokenizer
    assert before == ""
    want = tok.user_turn("q one", True) + tok.answer("red") + tok.user_turn("q two", False)
    assert tok.tok.encode(after, add_special_tokens=True).ids == want


def test_mmproj_weights_reload(tmp_path, random_ckpt):
    """The mmproj's weights (f32) drive the reference vision code to the same rows."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.export.gguf import validation_image, write_mmproj_gguf
    from edgemm.processor import preprocess
    from edgemm.runtimes.gguf_vision import reference_vision_from_mmproj
    m, _ = load_checkpoint(random_ckpt)
    write_mmproj_gguf(m, tmp_path / "v.gguf", "t", "f32")
    px = torch.from_numpy(preprocess(validation_image(m.cfg), m.cfg.vision))
    tower, adapter = reference_vision_from_mmproj(tmp_path / "v.gguf", m.cfg)
    with torch.no_grad():
        assert torch.equal(adapter(tower(px)), m.encode_image(px))


# --------------------------------------------------------------------------- llama.cpp
@pytest.fixture(scope="module")
def f32_bundle(tmp_path_factory, random_ckpt):
    if not HAVE_LLAMA:
        pytest.skip("llama-cpp-python is not installed")
    from edgemm.export.gguf import export_gguf
    out = tmp_path_factory.mktemp("gguf") / "f32"
    lines = []
    man = export_gguf(model=str(random_ckpt), out=out, precision={"vision": "f32", "decoder": "f32"},
                      log=lines.append)
    assert any("validate:" in s for s in lines)
    return out, man


@needs_llama
def test_f32_export_validates(f32_bundle):
    out, man = f32_bundle
    v = man["validation"]
    assert v["passed"] and v["kv_cache"] == "f32"
    assert v["text_max_abs"] < 1e-3 and v["image_max_abs"] < 1e-3
    assert v["vision_rows_max_abs"] < 1e-3 and v["image_mtmd_max_abs"] < 1e-3
    assert v["tokenization_equal"]
    assert man["target"] == "gguf" and set(man["stages"]) == {"vision", "decoder"}
    from edgemm.bundle import verify_bundle
    verify_bundle(out)


def _prompts(tok, rows):
    return {"text": [("text", [tok.bos_id] + tok.user_turn(QUESTIONS[0], True))],
            "image": [("text", [tok.bos_id]), ("image", rows), ("text", tok.user_turn(QUESTIONS[1], True))]}


@needs_llama
def test_backend_logits_match_reference(f32_bundle, random_ckpt):
    """Text-only and image prompts through the backend protocol: f32 logits within 1e-3 of the reference."""
    from edgemm.export.gguf import validation_image
    from edgemm.processor import preprocess
    from edgemm.runtimes import load_backend
    out, _ = f32_bundle
    ref = load_backend("torch", model=str(random_ckpt))
    b = load_backend("llamacpp", bundle=str(out), threads=2)
    px = preprocess(validation_image(ref.cfg), ref.cfg.vision)
    rows_ref = ref.vision(px)
    rows = b.vision(px)
    assert b.vision_source == "mtmd (mmproj)"
    assert np.abs(rows - rows_ref).max() < 1e-3
    for name, segs in _prompts(ref.tokenizer, rows_ref).items():
        sr, sl = ref.new_state(), b.new_state()
        for kind, data in segs:
            lr = getattr(ref, kind)(sr, data)
            ll = getattr(b, kind)(sl, data)
        assert ll.dtype == np.float32 and ll.shape == lr.shape
        assert np.abs(ll - lr).max() < 1e-3, name
        assert (sl.length, sl.pos) == (sr.length, sr.pos)
    # a rewind (state.length set back) drops the cached rows past it: same logits as before
    st = b.new_state()
    b.text(st, [ref.tokenizer.bos_id])
    b.image(st, rows)
    first = b.text(st, ref.tokenizer.user_turn(QUESTIONS[2], True))
    b.text(st, ref.tokenizer.answer("red"))
    st.length = st.pos = 1 + ref.cfg.n_image_rows
    again = b.text(st, ref.tokenizer.user_turn(QUESTIONS[2], True))
    assert np.abs(first - again).max() < 1e-5
    # pixels that are not an 8-bit image: rows from the mmproj weights through the reference code
    px2 = px + 1e-3
    rows2 = b.vision(px2)
    assert b.vision_source.startswith("reference")
    assert np.abs(rows2 - ref.vision(px2)).max() < 1e-4


@needs_llama
def test_generation_through_backend(f32_bundle, random_ckpt):
    """The shared generation layer on the llamacpp backend answers as the torch backend does (greedy)."""
    from edgemm.export.gguf import validation_image
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes import load_backend
    out, _ = f32_bundle
    answers = []
    for b in (load_backend("torch", model=str(random_ckpt)), load_backend("llamacpp", bundle=str(out))):
        s = ChatSession(b, GenerationConfig(max_new_tokens=6))
        s.set_image(validation_image(b.cfg))
        answers.append([s.ask(q) for q in QUESTIONS[:2]])
    assert answers[0] == answers[1]


@needs_llama
def test_llama_tokenization_equals_edgemm(f32_bundle):
    from edgemm import shapes
    from edgemm.runtimes.llamacpp_runner import LlamaRunner
    from edgemm.tokenizer import Tokenizer
    out, man = f32_bundle
    tok = Tokenizer.load(out / "tokenizer.json")
    run = LlamaRunner(out / man["stages"]["decoder"]["file"], 64, threads=1)
    texts = []
    for _, q in shapes.make_split("test", 60):
        texts += [f"Q: {q.question}\nA:", f"\nQ: {q.question}\nA:", f" {q.answer}"]
    texts += ["Q: WHAT colour?? is  it\n\nA:", " 3 shapes.", "\tunicode é ünïcödé", ""]
    for t in texts:
        assert run.tokenize(t) == tok.encode(t), t
    # special tokens: parsed when asked, like the chat template's <s>
    assert run.tokenize("<s>Q: hi\nA:", parse_special=True) == [tok.bos_id] + tok.encode("Q: hi\nA:")
    run.close()


@needs_llama
def test_q8_0_export(tmp_path, random_ckpt):
    from edgemm.export.gguf import export_gguf, gguf_tensor_table
    from edgemm.info import describe
    from edgemm.runtimes import load_backend, pick_backend
    out = tmp_path / "q8"
    man = export_gguf(model=str(random_ckpt), out=out, precision={"vision": "q8_0", "decoder": "q8_0"}, log=_quiet)
    v = man["validation"]
    assert v["passed"] and v["text_max_abs"] < 0.1 and v["image_max_abs"] < 0.1
    types = {t["name"]: t["type"] for t in gguf_tensor_table(out / man["stages"]["decoder"]["file"])}
    assert types["blk.0.attn_qkv.weight"] == "q8_0" and types["blk.0.vis_attn_qkv.weight"] == "q8_0"
    assert types["blk.0.attn_norm.weight"] == "f32"
    assert pick_backend(str(out), "auto")[0] == "llamacpp"
    b = load_backend("llamacpp", bundle=str(out))
    st = b.new_state()
    assert np.isfinite(b.text(st, [b.tokenizer.bos_id, 5, 6])).all()
    text = describe(bundle=str(out))
    assert "GGUF tensors by branch" in text and "vision branch" in text and "q8_0" in text
    with pytest.raises(EdgemmError, match="already exists"):
        export_gguf(model=str(random_ckpt), out=out, precision={"vision": "q8_0", "decoder": "q8_0"}, log=_quiet)


@needs_llama
def test_q4_k_m_export(tmp_path, random_ckpt):
    from edgemm.export.gguf import export_gguf, gguf_tensor_table
    out = tmp_path / "q4km"
    msgs = []
    man = export_gguf(model=str(random_ckpt), out=out, precision={"vision": "q4_k_m", "decoder": "q4_k_m"},
                      log=msgs.append)
    assert man["precision"]["vision"] == "q8_0" and any("vision stage is written as q8_0" in s for s in msgs)
    types = {t["type"] for t in gguf_tensor_table(out / man["stages"]["decoder"]["file"])}
    assert types & {"q4_k", "q5_0", "q6_k"}


@needs_llama
@needs_demo
def test_broken_q4_k_m_fails_fidelity(tmp_path):
    """A quantized decoder is checked for fidelity (KL, top-1), not only for finite values: the trained model's
    q4_k_m passes and records its figures; the same file with one tensor's blocks (scales and all) zeroed fails."""
    from gguf import GGUFReader
    from edgemm.checkpoint import load_model
    from edgemm.export.gguf import FIDELITY_KL, export_gguf, validate
    out = tmp_path / "q4km"
    man = export_gguf(model="tiny-shapes", out=out, precision={"vision": "f32", "decoder": "q4_k_m"}, log=_quiet)
    fid = man["validation"]["fidelity"]
    assert fid["mean_kl"] < FIDELITY_KL["q4_k_m"] and fid["top1_confident"] >= 0.9 and fid["confident_positions"] > 5
    dec, mm = out / man["stages"]["decoder"]["file"], out / man["stages"]["vision"]["file"]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(dec.read_bytes())
    r = GGUFReader(str(broken), "r+")
    t = next(t for t in r.tensors if t.name == "blk.0.attn_qkv.weight")
    assert t.tensor_type.name in ("Q4_K", "Q5_0", "Q6_K", "Q8_0", "Q5_K", "Q4_0")
    t.data[...] = 0                      # every block's scale (d, dmin) and quants: the tensor computes zeros
    r.data.flush()
    del r
    m, tok = load_model("tiny-shapes")
    with pytest.raises(EdgemmError, match="mean KL|top-1 agreement"):
        validate(m, tok, broken, mm, {"decoder": "q4_k_m", "vision": "f32"}, 2, log=_quiet)


@needs_demo
def test_fidelity_asks_the_scene_its_own_questions_and_stops_at_the_answer_end():
    """On a shapes model the fidelity prompts are the questions the model was trained to ask of the validation scene
    (not a yes/no question or a shape the scene lacks), and no position past the reference's end of answer counts:
    a runner that is the reference itself gives KL 0 at exactly those positions."""
    import torch
    from edgemm import shapes
    from edgemm.checkpoint import load_model
    from edgemm.export.gguf_validate import (FIDELITY_QUESTIONS, FIDELITY_STEPS, fidelity, fidelity_questions,
                                             validation_image)
    from edgemm.model import KVCache
    from edgemm.tilings import preprocess_image
    m, tok = load_model("tiny-shapes")
    qs = fidelity_questions(m.cfg)
    scene = shapes.scene_at("test", 0)
    assert set(qs) == {q.question for q in shapes.all_questions(scene)} and not set(qs) & set(FIDELITY_QUESTIONS)
    kinds = {q.qtype for q in shapes.all_questions(scene)}
    assert kinds == {"shape", "position", "count"} | ({"color"} if any(
        sum(o.shape == x.shape for x in scene.objects) == 1 for o in scene.objects) else set())

    class SelfRun:                                  # the calls fidelity() makes of a LlamaRunner, on the reference
        def clear(self):
            self.cache = KVCache.empty(m.cfg.decoder, 1)

        def decode_tokens(self, ids, pos):
            with torch.inference_mode():
                return m.forward_segment("text", torch.tensor([list(ids)]), self.cache, pos)[0][0, -1].numpy()

        def decode_embd(self, a, pos, bidirectional=False, positions=None):
            with torch.inference_mode():
                m.forward_segment("image", torch.from_numpy(np.asarray(a))[None], self.cache, pos)
    with torch.inference_mode():
        rows = m.encode_image(torch.from_numpy(np.asarray(preprocess_image(validation_image(m.cfg), m.cfg.vision))))
    r = fidelity(m, tok, SelfRun(), rows)
    want = 0                                        # greedy answers, each to its end (at most FIDELITY_STEPS + 1)
    for q in qs:
        ids = tok.prefix_ids() + tok.user_turn(q, first=True)
        with torch.inference_mode():
            cache = KVCache.empty(m.cfg.decoder, 1)
            _, pos = m.forward_segment("text", torch.tensor([tok.prefix_ids()]), cache, 0)
            _, pos = m.forward_segment("image", rows, cache, pos)
            lg, pos = m.forward_segment("text", torch.tensor([tok.user_turn(q, first=True)]), cache, pos)
            for step in range(FIDELITY_STEPS + 1):
                want += 1
                t = int(lg[0, -1].argmax())
                if tok.is_eos(t) or step == FIDELITY_STEPS:
                    break
                lg, pos = m.forward_segment("text", torch.tensor([[t]]), cache, pos)
        assert ids
    assert r["prompts"] == len(qs) and r["positions"] == want < len(qs) * (FIDELITY_STEPS + 1)
    assert r["mean_kl"] < 1e-9 and r["top1"] == 1.0


# --------------------------------------------------------------------------- stock llama-cpp-python, trained weights
@needs_llama
@needs_demo
def test_stock_llama_cpp_python_answers(tmp_path):
    """The exported decoder + mmproj in llama-cpp-python's Llama with its MTMD chat handler, no edgemm code in the
    loop: it answers shapes test questions as the reference does, correctly."""
    import base64
    import io
    from PIL import Image
    from edgemm import shapes
    from edgemm.export.gguf import export_gguf
    out = tmp_path / "demo-f32"
    man = export_gguf(model="tiny-shapes", out=out, precision={"vision": "f32", "decoder": "f32"}, log=_quiet)
    dec, mm = str(out / man["stages"]["decoder"]["file"]), str(out / man["stages"]["vision"]["file"])
    items = [(img, q) for img, q in shapes.make_split("test", 8)]
    from edgemm.generation import GenerationConfig, answer
    from edgemm.runtimes.torch_backend import TorchBackend
    ref_b = TorchBackend.open(model="tiny-shapes", device="cpu")
    ref = [answer(ref_b, img, q.question, GenerationConfig(max_new_tokens=8)).lower() for img, q in items]

    # -- from here on only llama-cpp-python (the one call before: register llama.cpp's CPU variant, which a
    #    GGML_BACKEND_DL build needs and llama-cpp-python does not do; llama.cpp's own tools call
    #    ggml_backend_load_all the same way)
    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    # logits_all: llama.cpp's cogvlm graph does not select output rows (no inp_out_ids), so a prompt batch that
    # asks for the last row's logits gets the first row's; asking for every row's logits sidesteps it
    llm = Llama(model_path=dec, chat_handler=MTMDChatHandler(clip_model_path=mm, verbose=False), n_ctx=256,
                n_threads=2, logits_all=True, verbose=False)
    right = agree = 0
    for (img, q), want in zip(items, ref):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        r = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": q.question}]}],
            temperature=0.0, repeat_penalty=1.0, max_tokens=8)
        got = r["choices"][0]["message"]["content"].strip().lower()
        right += got == q.answer.lower()
        agree += got == want
    ref_right = sum(w == q.answer.lower() for w, (_, q) in zip(ref, items))
    # the stock path answers as the reference does (its mmproj runs ggml's fp16-table GELU, so allow one flip)
    assert agree >= len(items) - 1, f"{agree}/{len(items)} answers equal the reference's"
    assert right >= ref_right - 1 and right >= len(items) // 2, f"{right}/{len(items)} right (reference {ref_right})"
