"""LLaVA to GGUF: an imported LlavaForConditionalGeneration (GQA) -> llama.cpp's `llama` decoder + an `mlp` mmproj,
checked in stock llama-cpp-python against transformers, and run by edgemm's llamacpp backend."""
from __future__ import annotations

import base64
import importlib.util
import io
import json

import numpy as np
import pytest
import torch

from edgemm.errors import EdgemmError, UnsupportedVariant

from .test_import_llava import IMAGE_TOKEN, LLAVA_TEMPLATE, _tiny_llava

pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
QUESTION = "what color is the circle?"


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def llava(tmp_path_factory, tokenizer):
    """A tiny random LLaVA (4 heads, 2 KV heads) saved by transformers with a byte-level BPE tokenizer and a
    LLaVA chat template, and imported."""
    from edgemm.importers import import_checkpoint
    d = tmp_path_factory.mktemp("llava-gguf")
    hf = _tiny_llava(kv_heads=2)
    src = d / "src"
    hf.save_pretrained(src, safe_serialization=True)
    tokenizer.save(src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAVA_TEMPLATE, "bos_token": "<s>",
                                                           "eos_token": "</s>", "pad_token": "<pad>"}))
    import_checkpoint(src, d / "ck", log=None)
    return {"hf": hf, "src": src, "ck": d / "ck", "dir": d}


@pytest.fixture(scope="module")
def bundle(llava):
    from edgemm.export.gguf import export_gguf
    lines = []
    man = export_gguf(model=str(llava["ck"]), out=llava["dir"] / "f32", precision="f32", log=lines.append)
    return llava["dir"] / "f32", man, lines


def _image(seed=3, h=16, w=16):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pixels(img):
    return torch.from_numpy(((img.astype(np.float32) / 255 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)[None].copy())


# --------------------------------------------------------------------------- no llama.cpp needed
def test_layout_and_rope_permutation(llava, tmp_path):
    """llama-architecture names and shapes; Q/K rows permuted to llama.cpp's rope order, V as it is; the mmproj
    keys clip.cpp reads, with the blocks LLaVA uses (vision_feature_layer -2 of 3: 2 blocks)."""
    from gguf import GGUFReader
    from edgemm.checkpoint import load_checkpoint
    from edgemm.export.gguf import rope_permute, write_decoder_gguf, write_llava_mmproj_gguf
    m, tok = load_checkpoint(llava["ck"])
    write_decoder_gguf(m, tok, tmp_path / "d.gguf", "t")
    write_llava_mmproj_gguf(m, tmp_path / "v.gguf", "t", "f32")
    r = GGUFReader(str(tmp_path / "d.gguf"))
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(r.fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    t = {x.name: np.asarray(x.data).reshape([int(s) for s in reversed(x.shape)]) for x in r.tensors}
    hf_attn = llava["hf"].model.language_model.layers[1].self_attn
    q, k, v = (getattr(hf_attn, f"{n}_proj").weight.detach().numpy() for n in "qkv")
    assert t["blk.1.attn_q.weight"].shape == (32, 32) and t["blk.1.attn_k.weight"].shape == (16, 32)
    assert np.array_equal(t["blk.1.attn_q.weight"], rope_permute(q, 4))
    assert np.array_equal(t["blk.1.attn_k.weight"], rope_permute(k, 2))
    assert not np.array_equal(t["blk.1.attn_k.weight"], k)          # the permutation does something
    assert np.array_equal(t["blk.1.attn_v.weight"], v)
    # the permutation interleaves each head's rotary halves: row (h, i, half) -> (h, 2i + half)
    assert np.array_equal(rope_permute(np.arange(8.0)[:, None], 1)[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])
    rv = GGUFReader(str(tmp_path / "v.gguf"))
    f = rv.fields
    assert bytes(f["clip.projector_type"].parts[-1]).decode() == "mlp"
    assert not bool(f["clip.use_gelu"].parts[-1][0])                 # quick_gelu tower
    assert int(f["clip.vision.block_count"].parts[-1][0]) == 2
    assert list(f["clip.vision.feature_layer"].contents()) == [2]
    names = {x.name for x in rv.tensors}
    assert {"v.class_embd", "v.pre_ln.weight", "v.blk.1.attn_q.bias", "mm.0.weight", "mm.2.bias"} <= names
    assert not any(n.startswith("v.blk.2.") for n in names)


def test_refusals_name_the_targets_that_can(llava, tmp_path):
    """What llama.cpp cannot run is refused before anything is written, naming the variant and who can run it."""
    from edgemm.config import ModelConfig, get_preset
    from edgemm.export.gguf import export_gguf, tokenizer_fields
    from edgemm.tokenizer import Tokenizer
    cfg = ModelConfig.load(llava["ck"] / "config.json")
    libra = get_preset("tiny-shapes")
    libra.vision.arch, libra.adapter.kind = "none", "libra"
    libra.adapter.codebooks, libra.adapter.vision_vocab = 2, 16
    cls_kept = ModelConfig.from_dict(cfg.to_dict())
    cls_kept.vision.keep_cls = True
    windowed = ModelConfig.from_dict(cfg.to_dict())         # LLaVA with Gemma 3's sliding window (llama.cpp's llama
    windowed.decoder.sliding_window, windowed.decoder.sliding_layers = 4, [0]   # graph has none: support.py)
    for c, name in ((libra, "libra image tokens"), (cls_kept, "CLS row kept"), (windowed, "sliding-window attention")):
        d = tmp_path / name.split()[0]
        d.mkdir()
        c.save(d / "config.json")
        with pytest.raises(UnsupportedVariant) as e:
            export_gguf(model=str(d), out=tmp_path / "out", precision="f32", log=_quiet)
        assert name in str(e.value) and "gguf" in str(e.value) and "targets that can:" in str(e.value)
        assert not (tmp_path / "out").exists()
    # a tokenizer llama.cpp's gpt2 model cannot represent: refused with what is supported
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    wl = HFTokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<pad>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(EdgemmError, match="WordLevel model.*byte-level BPE"):
        tokenizer_fields(Tokenizer(wl), 64)


# --------------------------------------------------------------------------- llama.cpp
@needs_llama
def test_export_validates(bundle):
    out, man, lines = bundle
    v = man["validation"]
    assert v["passed"] and v["tokenization_equal"] and v["kv_cache"] == "f32"
    # the decoder fed the reference's image rows: f32 llama.cpp vs the reference
    assert v["text_max_abs"] < 1e-4 and v["image_max_abs"] < 1e-4
    assert man["stages"]["decoder"]["format"] == "gguf (arch llama)"
    assert "projector mlp" in man["stages"]["vision"]["format"]
    assert (out / "chat_template.jinja").read_text() == LLAVA_TEMPLATE
    if v["mtmd_cls_order_defect"]:
        assert v["vision_rows_reference_code_max_abs"] < 1e-5
        assert any("llama.cpp#25814" in s for s in lines)
    else:
        assert v["vision_rows_max_abs"] < 5e-3


def _stock_prompt_ids(hf_tok, handler_cls, url):
    """The ids Llava15ChatHandler's template gives (rendered as it renders it), <image> rows in place of the url."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    text = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        handler_cls.CHAT_FORMAT).render(messages=[
            {"role": "system", "content": handler_cls.DEFAULT_SYSTEM_MESSAGE},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}], add_generation_prompt=True)
    before, after = (hf_tok(t, add_special_tokens=False)["input_ids"] for t in text.split(url))
    return [hf_tok.bos_token_id] + before, after


@needs_llama
def test_stock_llama_cpp_python_agrees_with_transformers(llava, bundle):
    """The decoder + mmproj in stock llama-cpp-python (Llama + Llava15ChatHandler, f32 KV cache, flash attention
    off; no edgemm code on that side) against transformers' LlavaForConditionalGeneration on an image + text
    prompt: the same prompt ids, the same next-token top-1, logits close. While this llama.cpp has the llava
    CLS-order defect (ggml-org/llama.cpp#25814) the stock path is compared with transformers fed the rows that
    defect computes, and the comparison with transformers' own image rows is an expected failure."""
    from PIL import Image
    from transformers import PreTrainedTokenizerFast
    from edgemm.checkpoint import load_checkpoint
    from edgemm.export.gguf import llava_rows_cls_last
    out, man, _ = bundle
    img = _image()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()       # registers llama.cpp's CPU variant (a GGML_BACKEND_DL build needs it; see test_gguf.py)
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler
    llm = Llama(model_path=str(out / man["stages"]["decoder"]["file"]), n_ctx=256, n_threads=2, logits_all=True,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False,
                chat_handler=Llava15ChatHandler(clip_model_path=str(out / man["stages"]["vision"]["file"]),
                                                verbose=False))
    r = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}],
        max_tokens=1, temperature=0.0, repeat_penalty=1.0)
    n = llm.n_tokens
    stock = np.asarray(llm.scores[n - 1], np.float32)
    stock_ids = list(llm.input_ids[:n])

    hf = llava["hf"]
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(llava["src"] / "tokenizer.json"), bos_token="<s>")
    m, _ = load_checkpoint(llava["ck"])
    P = m.cfg.n_image_rows
    pre, post = _stock_prompt_ids(hf_tok, Llava15ChatHandler, url)
    assert n == len(pre) + P + len(post)
    assert stock_ids[:len(pre)] == pre and stock_ids[len(pre) + P:] == post       # same tokenization
    ids = torch.tensor([pre + [IMAGE_TOKEN] * P + post])
    px = _pixels(img)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px).logits[0, -1].numpy()
        # transformers' decoder on the rows llama.cpp's present llava graph computes (edgemm's simulation of it)
        emb = hf.get_input_embeddings()(ids)
        emb[0, len(pre):len(pre) + P] = llava_rows_cls_last(m.vision, m.adapter, px)[0]
        want_defect = hf(inputs_embeds=emb).logits[0, -1].numpy()
    assert r["choices"][0]["message"]["content"] == hf_tok.decode([int(stock.argmax())])
    defect = man["validation"]["mtmd_cls_order_defect"]
    target = want_defect if defect else want
    # mtmd's image rows: ggml's fp16-table GELU and the tanh-form projector GELU (measured 4.8e-5)
    assert stock.argmax() == target.argmax()
    assert np.abs(stock - target).max() < 1e-3
    if defect:
        pytest.xfail("llama.cpp's llava graph misorders CLIP's CLS row (ggml-org/llama.cpp#25814): the stock "
                     f"path is off transformers' own image rows by {np.abs(stock - want).max():.2e}")


@needs_llama
def test_backend_chat_matches_torch(llava, bundle):
    """edgemm's llamacpp backend runs the bundle through the imported model's chat template and answers as the torch
    reference does (greedy), with the reference's image rows."""
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes import load_backend
    out, _, _ = bundle
    ref = load_backend("torch", model=str(llava["ck"]), device="cpu")
    b = load_backend("llamacpp", bundle=str(out), threads=2)
    img = _image(5)
    from edgemm.processor import preprocess
    px = preprocess(img, ref.cfg.vision)
    assert np.abs(b.vision(px) - ref.vision(px)).max() < 1e-3
    answers = []
    for be in (ref, b):
        s = ChatSession(be, GenerationConfig(max_new_tokens=4))
        assert s.template == LLAVA_TEMPLATE
        s.set_image(img)
        answers.append([s.ask(QUESTION), s.ask("how many shapes are there?")])
    assert answers[0] == answers[1]


@needs_llama
def test_qwen2_llava_exports_as_qwen2(tmp_path, tokenizer):
    """A Qwen2 language model (QKV bias, NEOX rope: not permuted) with tied embeddings, a bias-free projector, all
    CLIP blocks used and mlp_dim == width (the case clip.cpp's up/down-swap test cannot tell apart) -> arch qwen2,
    validated against the reference."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config
    from edgemm.export.gguf import export_gguf
    from edgemm.importers import import_checkpoint
    text = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                       tie_word_embeddings=True)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, hidden_act="quick_gelu", projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                      projector_hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                      multimodal_projector_bias=False)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    tokenizer.save(tmp_path / "src" / "tokenizer.json")
    s = import_checkpoint(tmp_path / "src", tmp_path / "ck", log=None)
    assert "qkv bias" in s["variants"]
    man = export_gguf(model=str(tmp_path / "ck"), out=tmp_path / "b", precision="f32", log=_quiet)
    v = man["validation"]
    assert man["stages"]["decoder"]["format"] == "gguf (arch qwen2)"
    assert v["passed"] and v["text_max_abs"] < 1e-4 and v["image_max_abs"] < 1e-4
    assert v["vision_rows_max_abs"] < 5e-3 or v["mtmd_cls_order_defect"]


@needs_llama
def test_llava_next_bundle(tmp_path, tokenizer):
    """LLaVA-NeXT: the mmproj carries image_grid_pinpoints, spatial_unpad and the newline row; the export validates
    the decoder on the tiled rows of the reference; the backend tiles and packs on the host and matches the torch
    reference on a wide image (rows and logits); stock llama-cpp-python loads the files and answers."""
    from gguf import GGUFReader
    from edgemm.tilings import image_rows
    from edgemm.export.gguf import export_gguf
    from edgemm.importers import import_checkpoint
    from edgemm.runtimes import load_backend
    from .test_anyres import PINPOINTS, _tiny_llava_next
    hf = _tiny_llava_next()
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    tokenizer.save(tmp_path / "src" / "tokenizer.json")
    import_checkpoint(tmp_path / "src", tmp_path / "ck", log=None)
    man = export_gguf(model=str(tmp_path / "ck"), out=tmp_path / "b", precision="f32", log=_quiet)
    v = man["validation"]
    assert v["passed"] and v["image_max_abs"] < 1e-4 and v["vision_rows_reference_code_max_abs"] < 1e-5
    f = GGUFReader(str(tmp_path / "b" / man["stages"]["vision"]["file"])).fields
    assert list(f["clip.vision.image_grid_pinpoints"].contents()) == [x for p in PINPOINTS for x in p]
    assert bytes(f["clip.vision.mm_patch_merge_type"].parts[-1]).decode() == "spatial_unpad"
    ref = load_backend("torch", model=str(tmp_path / "ck"), device="cpu")
    b = load_backend("llamacpp", bundle=str(tmp_path / "b"), threads=2)
    img = _image(7, 12, 32)                                              # a wide image: 2 tiles + the overview
    rows_ref, rows = image_rows(ref, img), image_rows(b, img)
    assert rows.shape == rows_ref.shape and rows.shape[1] > ref.cfg.vision.n_patches
    assert np.abs(rows - rows_ref).max() < 1e-5
    sr, sb = ref.new_state(), b.new_state()
    ids = ref.tokenizer.user_turn(QUESTION, True)
    for be, st in ((ref, sr), (b, sb)):
        be.text(st, [be.tokenizer.bos_id])
        be.image(st, rows_ref)
    assert np.abs(ref.text(sr, ids) - b.text(sb, ids)).max() < 1e-4
    b.close()
    # stock llama-cpp-python: the LLaVA-NeXT files load and answer through its LLaVA chat handler
    from PIL import Image
    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    llm = Llama(model_path=str(tmp_path / "b" / man["stages"]["decoder"]["file"]), n_ctx=512, n_threads=2,
                verbose=False, chat_handler=Llava15ChatHandler(
                    clip_model_path=str(tmp_path / "b" / man["stages"]["vision"]["file"]), verbose=False))
    r = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}],
        max_tokens=2, temperature=0.0)
    assert r["usage"]["prompt_tokens"] > rows.shape[1] and r["usage"]["completion_tokens"] >= 1


def _llama_style_tokenizer(vocab_size=512):
    """A tiny tokenizer of LLaMA's tokenizer.json form: BPE with byte fallback (<0x00>..<0xFF> in the vocab),
    "▁" prepended and for spaces by the normalizer, <unk> <s> </s> <pad> special; trained on the shapes corpus."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, trainers
    from edgemm import shapes
    lines = shapes.corpus_lines()
    base = HFTokenizer(models.BPE())
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    base.train_from_iterator([f"Q: {x}\nA:" for x in lines] + [f" {x}" for x in lines],
                             trainers.BpeTrainer(vocab_size=vocab_size - len(specials) - 256, show_progress=False))
    d = json.loads(base.to_str())
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    d["model"].update(vocab=vocab, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    d["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(specials)]
    d["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return HFTokenizer.from_str(json.dumps(d))


@needs_llama
def test_llama_sentencepiece_tokenizer(tmp_path):
    """LLaMA's tokenizer.json form (byte-fallback BPE with "▁") goes in as llama.cpp's `llama` tokenizer: scores from
    the merge ranks, byte tokens typed BYTE; llama.cpp tokenizes as transformers' tokenizers does. Another
    normalizer on a byte-fallback BPE is refused."""
    from edgemm import shapes
    from edgemm.export.gguf import export_gguf, tokenizer_fields
    from edgemm.importers import import_checkpoint
    from edgemm.runtimes.llamacpp_runner import LlamaRunner
    from edgemm.tokenizer import Tokenizer
    hf_tok = _llama_style_tokenizer()
    _tiny_llava(kv_heads=2).save_pretrained(tmp_path / "src", safe_serialization=True)
    hf_tok.save(str(tmp_path / "src" / "tokenizer.json"))
    import_checkpoint(tmp_path / "src", tmp_path / "ck", log=None)
    man = export_gguf(model=str(tmp_path / "ck"), out=tmp_path / "b", precision="f32", log=_quiet)
    assert man["validation"]["passed"] and man["validation"]["tokenization_equal"]
    tok = Tokenizer.load(tmp_path / "b" / "tokenizer.json")
    run = LlamaRunner(tmp_path / "b" / man["stages"]["decoder"]["file"], 64, threads=1)
    texts = ["Q: WHAT colour?? is  it\n\nA:", " 3 shapes.", "\tunicode é ünïcödé", "USER: hi</s> ASSISTANT:"]
    for _, q in shapes.make_split("test", 40):
        texts += [f"Q: {q.question}\nA:", f"\nQ: {q.question}\nA:", f" {q.answer}"]
    for t in texts:
        assert run.tokenize(t, parse_special=True) == tok.encode(t), t
    assert any("<0x" in tok.tok.id_to_token(i) for t in texts for i in tok.encode(t))      # byte fallback used
    run.close()
    d = json.loads(hf_tok.to_str())
    d["normalizer"] = {"type": "Lowercase"}
    from tokenizers import Tokenizer as HFTokenizer
    with pytest.raises(EdgemmError, match="not LLaMA's SentencePiece form"):
        tokenizer_fields(Tokenizer(HFTokenizer.from_str(json.dumps(d))), 512)
