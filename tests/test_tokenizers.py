"""Real checkpoints' tokenizers (issue 32, item 9): Qwen2-, Llama 3-, Gemma- and Mistral-style tokenizers, built here
with the `tokenizers` library under their real special-token names, with tokenizer_config.json and
generation_config.json as the real ones have them, on tiny LLaVA checkpoints made by transformers'
LlavaForConditionalGeneration. The special tokens are read from the source (bos may be absent, eos a list, the chat
template's end of turn a stop token, pad absent), nothing is added past the embedding (Qwen2 and Mistral here have no
spare rows), and each model imports, exports to onnx and gguf, and answers as transformers does; stock
llama-cpp-python tokenizes their prompts as transformers does."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from edgemm.errors import EdgemmError

from .test_import_llava import away_from_init

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                               reason="onnxruntime is not installed (pip install edgemm[cpu])")

QUESTION = "what color is the circle?"
MAX_NEW = 4

# The chat templates, in the form of the real ones (newlines as expressions: HF renders with trim_blocks)
QWEN_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "{{ '<image>\\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}{% elif c['type'] == 'text' %}"
    "{{ c['text'] | trim }}{% endif %}{% endfor %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}{% endfor %}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' }}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{{ ' [/INST]' }}{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}")


# The Split regexes of Qwen2's and Llama 3's tokenizer.json (their pre-tokenizers)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def _corpus() -> list[str]:
    from edgemm import shapes
    lines = shapes.corpus_lines()
    words = ["system", "user", "assistant", "model", "You are a helpful assistant.", "what color is the circle?"]
    return ([f"Q: {x}\nA:" for x in lines] + [f" {x}" for x in lines] + words) * 2


def _byte_level(split: str, specials: list[str], n_bpe: int, nfc: bool, ignore_merges: bool, bos: str | None):
    """A byte-level BPE in Qwen2's / Llama 3's tokenizer.json form: [NFC,] Split(regex, Isolated) then ByteLevel
    without its own regex; the special tokens after the BPE vocabulary; a post-processor that prepends bos or not."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=n_bpe, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(specials)
    bl = processors.ByteLevel(trim_offsets=False)
    tok.post_processor = bl if bos is None else processors.Sequence([bl, processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])])
    if ignore_merges:
        d = json.loads(tok.to_str())
        d["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(d))
    return tok


def _sentencepiece(specials: list[str], n: int, prepend: bool, unk: str, bos: str):
    """A byte-fallback BPE in SentencePiece form (LLaMA/Mistral: "▁" prepended and for spaces; Gemma: for spaces
    only), special tokens first, then <0x00>..<0xFF>, then the trained pieces; the post-processor prepends bos."""
    from tokenizers import Tokenizer, models, normalizers, processors, trainers
    base = Tokenizer(models.BPE())
    space = normalizers.Replace(" ", "▁")
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), space]) if prepend else space
    base.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=n - len(specials) - 256, show_progress=False))
    d = json.loads(base.to_str())
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    d["model"].update(vocab=vocab, byte_fallback=True, unk_token=unk, fuse_unk=True)
    d["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(specials)]
    d["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
        + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prepend else [])}
    tok = Tokenizer.from_str(json.dumps(d))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _style(name: str) -> dict:
    """-> tokenizer, tokenizer_config, generation_config, language model type, spare embedding rows, and the
    special tokens the import must find (by name)."""
    if name == "qwen2":         # Qwen2-Instruct: no bos, eos <|im_end|>, pad <|endoftext|>, both eos in generation
        tok = _byte_level(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], 300, True, False,
                          None)
        ids = tok.token_to_id
        tcfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_prefix_space": False,
                "chat_template": QWEN_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
        gcfg = {"bos_token_id": ids("<|endoftext|>"), "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
                "pad_token_id": ids("<|endoftext|>")}
        want = {"bos": None, "add_bos": False, "eos": ["<|im_end|>", "<|endoftext|>"], "pad": "<|endoftext|>"}
        return dict(tok=tok, tcfg=tcfg, gcfg=gcfg, lm="qwen2", spare=0, want=want, pre="qwen2")
    if name == "llama3":        # Llama 3 Instruct: the post-processor adds bos; eos <|eot_id|>; no pad
        tok = _byte_level(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                         "<|end_header_id|>", "<|eot_id|>", "<image>"], 300, False, True,
                          "<|begin_of_text|>")
        ids = tok.token_to_id
        tcfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast"}
        gcfg = {"bos_token_id": ids("<|begin_of_text|>"), "eos_token_id": [ids("<|end_of_text|>"), ids("<|eot_id|>")]}
        want = {"bos": "<|begin_of_text|>", "add_bos": True, "eos": ["<|eot_id|>", "<|end_of_text|>"], "pad": None}
        return dict(tok=tok, tcfg=tcfg, gcfg=gcfg, lm="llama", spare=10, want=want, pre="llama-bpe")
    if name == "gemma":         # Gemma: <pad> <eos> <bos> <unk> first, no "▁" prepended; <end_of_turn> stops a turn
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<image>"]
        tok = _sentencepiece(specials, 512, False, "<unk>", "<bos>")
        bos = {"__type": "AddedToken", "content": "<bos>", "lstrip": False, "normalized": False, "rstrip": False,
               "single_word": False, "special": True}          # the AddedToken form some configs have
        tcfg = {"bos_token": bos, "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False, "chat_template": GEMMA_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast"}
        gcfg = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
        want = {"bos": "<bos>", "add_bos": True, "eos": ["<eos>", "<end_of_turn>"], "pad": "<pad>"}
        return dict(tok=tok, tcfg=tcfg, gcfg=gcfg, lm="llama", spare=6, want=want, pre="default")
    assert name == "mistral"    # Mistral v0.3: <s> </s> [INST] [/INST] control tokens, no pad
    tok = _sentencepiece(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<image>"], 480, True, "<unk>", "<s>")
    tcfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "add_bos_token": True,
            "add_eos_token": False, "chat_template": MISTRAL_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
    gcfg = {"bos_token_id": 1, "eos_token_id": 2}
    want = {"bos": "<s>", "add_bos": True, "eos": ["</s>"], "pad": None}
    return dict(tok=tok, tcfg=tcfg, gcfg=gcfg, lm="mistral", spare=0, want=want, pre="default")


STYLES = ("qwen2", "llama3", "gemma", "mistral")


def _tiny_llava(lm: str, vocab: int, image_token: int, seed: int = 0):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              MistralConfig, Qwen2Config)
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    text = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[lm](**kw)
    if lm == "mistral":
        text.sliding_window = None
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, hidden_act="quick_gelu", projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return away_from_init(LlavaForConditionalGeneration(cfg).eval(), seed)


@pytest.fixture(scope="module", params=STYLES)
def style(request, tmp_path_factory):
    """A tiny LLaVA of each style saved by transformers with its tokenizer files, and imported."""
    from edgemm.importers import import_checkpoint
    s = _style(request.param)
    d = tmp_path_factory.mktemp(f"tok-{request.param}")
    tok = s["tok"]
    n = tok.get_vocab_size(with_added_tokens=True)
    hf = _tiny_llava(s["lm"], n + s["spare"], tok.token_to_id("<image>"))
    src = d / "src"
    hf.save_pretrained(src, safe_serialization=True)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps(s["tcfg"]))
    (src / "generation_config.json").write_text(json.dumps(s["gcfg"]))     # over the one save_pretrained wrote
    notes = []
    import_checkpoint(src, d / "ck", log=notes.append)
    return {**s, "name": request.param, "hf": hf, "src": src, "ck": d / "ck", "dir": d, "n_tokens": n, "notes": notes}


def _ids_of(tok, names):
    return [tok.token_to_id(x) for x in names] if isinstance(names, list) else \
        (tok.token_to_id(names) if names else None)


def test_special_tokens_read_from_the_source(style):
    """config.json records the tokens the source names (bos absent for Qwen2; eos from tokenizer_config,
    generation_config and the template's end of turn; pad absent for Llama 3 and Mistral); the tokenizer is copied
    as it is: no <pad> added past the embedding."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.tokenizer import Tokenizer
    tok, want = style["tok"], style["want"]
    cfg = json.loads((style["ck"] / "config.json").read_text())
    assert cfg["tokens"] == {"bos": _ids_of(tok, want["bos"]), "add_bos": want["add_bos"],
                             "eos": _ids_of(tok, want["eos"]), "pad": _ids_of(tok, want["pad"]), "stop": []}
    ours = Tokenizer.load(style["ck"] / "tokenizer.json", tokens=cfg["tokens"])
    assert ours.vocab_size == style["n_tokens"] and ours.tok.token_to_id("<pad>") == tok.token_to_id("<pad>")
    assert ours.prefix_ids() == ([tok.token_to_id(want["bos"])] if want["add_bos"] else [])
    assert all(ours.is_eos(i) for i in _ids_of(tok, want["eos"])) and not ours.is_eos(tok.token_to_id("<image>"))
    assert ours.pad_id == (_ids_of(tok, want["pad"]) if want["pad"] else ours.eos_id)  # padding needs no token
    _, t2 = load_checkpoint(style["ck"])
    assert t2.eos_ids == ours.eos_ids and t2.bos_id == ours.bos_id


def _rendered(style, msgs, bos=True) -> str:
    from edgemm.chat_template import render_template
    from edgemm.tokenizer import Tokenizer
    ours = Tokenizer.load(style["ck"] / "tokenizer.json",
                          tokens=json.loads((style["ck"] / "config.json").read_text())["tokens"])
    return render_template(style["tcfg"]["chat_template"], msgs, ours.bos_token if bos else "", ours.eos_token)


def _msgs(q=QUESTION):
    return [{"role": "user", "text": q, "images": ["x"]}]


@needs_ort
@needs_llama
def test_exports_and_answers_as_transformers(style, monkeypatch):
    """The imported model exports to onnx and gguf (both validated against the reference), its prompt is the ids
    transformers' tokenizer gives the rendered template, and torch, ort and llama.cpp answer as transformers'
    LlavaForConditionalGeneration does (greedy, stopping on any of the model's eos)."""
    from transformers import AutoTokenizer
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.export.gguf import export_gguf
    from edgemm.export.onnx import export_onnx
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.processor import preprocess
    from edgemm.runtimes import load_backend
    d = style["dir"]
    export_onnx(str(style["ck"]), d / "onnx", precision="fp32", log=None)
    man = json.loads((d / "onnx" / "edgemm.json").read_text())
    assert man["model"]["tokens"] == json.loads((style["ck"] / "config.json").read_text())["tokens"]
    gman = export_gguf(model=str(style["ck"]), out=d / "gguf", precision="f32", log=lambda *_: None)
    v = gman["validation"]
    assert v["passed"] and v["tokenization_equal"] and v["text_max_abs"] < 1e-3 and v["image_max_abs"] < 1e-3

    ref = load_backend("torch", model=str(style["ck"]), device="cpu")
    tok, P = ref.tokenizer, ref.cfg.n_image_rows
    img = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    # the prompt: transformers' tokenizer on the rendered template (its bos, where it has one, from the template)
    hf_tok = AutoTokenizer.from_pretrained(str(style["src"]))
    text = _rendered(style, _msgs())
    before, after = text.split("<image>")
    want = hf_tok(before, add_special_tokens=False)["input_ids"]
    want = want + [tok.tok.token_to_id("<image>")] * P + hf_tok(after, add_special_tokens=False)["input_ids"]
    openai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                           {"type": "text", "text": QUESTION}]}]
    segs = segments_template(tok, style["tcfg"]["chat_template"], normalize_messages(openai))
    got = [t for k, x in segs for t in (x if k == "text" else [tok.tok.token_to_id("<image>")] * P)]
    assert got == want
    # transformers' greedy answer
    px = torch.from_numpy(preprocess(img, ref.cfg.vision))
    ids, out = list(want), []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            t = int(style["hf"](input_ids=torch.tensor([ids]), pixel_values=px).logits[0, -1].argmax())
            if tok.is_eos(t):
                break
            out.append(t)
            ids.append(t)
    answers, generated = {}, {}
    real = ChatSession._generate

    def recording(self, *a, **k):                   # the answer's token ids (its text may end mid-character)
        ans = real(self, *a, **k)
        generated[name] = ans.ids
        return ans
    monkeypatch.setattr(ChatSession, "_generate", recording)
    for name, b in (("torch", ref), ("ort", load_backend("ort", bundle=str(d / "onnx"), device="cpu")),
                    ("llamacpp", load_backend("llamacpp", bundle=str(d / "gguf"), threads=2))):
        s = ChatSession(b, GenerationConfig(max_new_tokens=MAX_NEW))
        assert s.template == style["tcfg"]["chat_template"]
        s.set_image(img)
        answers[name] = s.ask(QUESTION)
        if hasattr(b, "close"):
            b.close()
    assert generated == {k: out for k in generated}, (generated, out)
    assert len(set(answers.values())) == 1


@needs_llama
def test_stock_llama_cpp_tokenizes_as_transformers(style):
    """The GGUF's tokenizer in stock llama-cpp-python (vocab only): prompts tokenized with the model's own bos rule
    and special tokens parsed are transformers' ids; the file names the pre-tokenizer, bos/eos/eot/pad and
    add_bos_token as llama.cpp reads them."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer
    from edgemm.export.gguf import export_gguf
    d = style["dir"]
    if not (d / "gguf" / "edgemm.json").is_file():
        export_gguf(model=str(style["ck"]), out=d / "gguf", precision="f32", log=lambda *_: None)
    man = json.loads((d / "gguf" / "edgemm.json").read_text())
    path = str(d / "gguf" / man["stages"]["decoder"]["file"])
    tok, want = style["tok"], style["want"]
    f = GGUFReader(path).fields
    val = lambda k: f[k].contents() if k in f else None        # noqa: E731
    assert val("tokenizer.ggml.pre") == style["pre"]
    assert bool(val("tokenizer.ggml.add_bos_token")) == want["add_bos"]
    assert val("tokenizer.ggml.eos_token_id") == _ids_of(tok, want["eos"])[0]
    eot = tok.token_to_id("<end_of_turn>") if style["name"] == "gemma" else None    # the template's, not eos
    assert val("tokenizer.ggml.eot_token_id") == eot
    assert val("tokenizer.ggml.padding_token_id") == _ids_of(tok, want["pad"])
    if want["bos"]:
        assert val("tokenizer.ggml.bos_token_id") == _ids_of(tok, want["bos"])

    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()
    from llama_cpp import Llama
    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    hf_tok = AutoTokenizer.from_pretrained(str(style["src"]))
    two = [{"role": "user", "text": "how many shapes are there?", "images": ["x"]},
           {"role": "assistant", "text": "three", "images": []}, {"role": "user", "text": QUESTION, "images": []}]
    texts = [_rendered(style, _msgs(), bos=False), _rendered(style, two, bos=False),
             "Q: WHAT colour?? is  it\n\nA:", " 3 shapes.", "\tunicode é ünïcödé 123456", "red</s> <|im_end|>"]
    for t in texts:
        assert llm.tokenize(t.encode(), add_bos=True, special=True) == hf_tok(t)["input_ids"], t
    assert llm.token_bos() == (_ids_of(tok, want["bos"]) if want["bos"] else _ids_of(tok, want["eos"])[0])
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in _ids_of(tok, want["eos"]))   # stops on every eos
    assert not llama_cpp.llama_vocab_is_eog(vocab, tok.token_to_id("<image>"))


def test_literal_tokens_without_a_record(tokenizer, tmp_path):
    """edgemm's own tokenizers and checkpoints imported before the tokens were recorded: <s>, </s>, <pad> by name,
    as before; a config.json without `tokens` loads; a tokenizer with neither a record nor <s>/</s> is refused."""
    from tokenizers import Tokenizer as HFTokenizer, models
    from edgemm.config import ModelConfig, get_preset
    from edgemm.tokenizer import Tokenizer
    t = Tokenizer(tokenizer.tok)
    assert (t.bos_id, t.eos_ids, t.pad_id) == (tokenizer.tok.token_to_id("<s>"), [tokenizer.tok.token_to_id("</s>")],
                                               tokenizer.tok.token_to_id("<pad>"))
    assert t.prefix_ids() == [t.bos_id] and t.has_pad and t.is_eos(t.eos_id)
    d = get_preset("tiny-shapes").to_dict()
    d.pop("tokens")
    assert not ModelConfig.from_dict(d).tokens.eos
    assert Tokenizer(tokenizer.tok, ModelConfig.from_dict(d).tokens).bos_id == t.bos_id
    wl = HFTokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>"))
    with pytest.raises(EdgemmError, match="lacks the special tokens <s> and </s>"):
        Tokenizer(wl)
    assert Tokenizer(wl, {"bos": None, "eos": [0], "pad": None}).prefix_ids() == []


def test_import_refuses_a_tokenizer_without_eos(tmp_path):
    """No eos anywhere (tokenizer_config, generation_config, the template, the literal </s>): refused, naming where
    eos is read from; a generation_config eos past the embedding rows is dropped with a note."""
    from tokenizers import Tokenizer as HFTokenizer, models
    from edgemm.importers.tokenizer import special_tokens
    wl = HFTokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2}, unk_token="<|endoftext|>"))
    with pytest.raises(EdgemmError, match="eos_token or generation_config.json's eos_token_id"):
        special_tokens(wl, {"bos_token": None}, {}, None, 3, "src", lambda *_: None)
    notes = []
    got = special_tokens(wl, {"eos_token": "<|endoftext|>"}, {"eos_token_id": [0, 7]}, None, 3, "src", notes.append)
    assert got["eos"] == [0] and got["pad"] is None and got["bos"] is None and not got["add_bos"]
    assert any("[7]" in n for n in notes)
