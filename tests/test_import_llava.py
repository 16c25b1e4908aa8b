"""edgemm import of transformers' LlavaForConditionalGeneration: logits within 1e-4 of transformers' forward."""
import pytest
import torch

from edgemm.checkpoint import load_checkpoint
from edgemm.importers import import_checkpoint

from .test_import import write_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

IMAGE_TOKEN = 3          # <image> in the test tokenizer


def _tiny_llava(kv_heads=2, seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    text = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                              image_size=16, patch_size=4, hidden_act="quick_gelu", projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    return away_from_init(LlavaForConditionalGeneration(cfg).eval(), seed)


def away_from_init(model, seed=0):
    """Weights well away from init, so a comparison with transformers means something."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits_and_cached_steps_match(m, segs, ids, hf_logits, steps=3, tol=1e-4):
    """edgemm's full forward over the prompt's segments, then `steps` cached greedy steps, equal transformers' full
    forward within tol (hf_logits(ids) -> logits [T, vocab] on the prompt ids, the image's pixels bound)."""
    from edgemm.model import KVCache
    ids = list(ids)
    with torch.no_grad():
        ref, full = hf_logits(ids), m.forward_full(segs)[0]
        assert full.shape == ref.shape and (full - ref).abs().max().item() <= tol
        cache, pos = KVCache.empty(m.cfg.decoder, 1, len(ids) + steps + 1), 0
        for k, x in segs:
            logits, pos = m.forward_segment(k, x, cache, pos)
        for _ in range(steps):                          # cached greedy steps against transformers' full forward
            ids.append(int(logits[0, -1].argmax()))
            logits, pos = m.forward_segment("text", torch.tensor([ids[-1:]]), cache, pos)
            assert (logits[0, -1] - hf_logits(ids)[-1]).abs().max().item() <= tol


def greedy_ids(hf_logits, ids, eos, n=4) -> list:
    """transformers' greedy answer ids (up to n, stopping before an eos id) after the prompt ids."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            t = int(hf_logits(ids)[-1].argmax())
            if t in eos:
                break
            out.append(t)
            ids.append(t)
    return out


def exports_validate(ck, d, gguf_says: str | None) -> None:
    """`edgemm export --model ck` to onnx fp32 / int8 and trt fp16 (--no-build) under d: each exits 0 and every stage
    of its manifest's validation is ok; `--target gguf` exits 2 saying `gguf_says` and naming onnx and trt (None: a
    family gguf exports, tested on its own)."""
    import json
    from click.testing import CliRunner
    from edgemm.cli import main
    for target, prec in (("onnx", "fp32"), ("onnx", "int8"), ("trt", "fp16")):
        r = CliRunner().invoke(main, ["export", "--model", str(ck), "--target", target, "--precision", prec,
                                      "-o", str(d / f"{target}-{prec}")] + (["--no-build"] if target == "trt" else []))
        assert r.exit_code == 0, r.output
        man = json.loads((d / f"{target}-{prec}" / "edgemm.json").read_text())
        assert all(s["ok"] for s in man["validation"]["stages"].values()), man["validation"]
    if gguf_says is None:
        return
    r = CliRunner().invoke(main, ["export", "--model", str(ck), "--target", "gguf", "-o", str(d / "gguf")])
    assert r.exit_code == 2 and gguf_says in r.output and "onnx, trt" in r.output, r.output


def gguf_exports(ck, d, precisions=("f32", "q8_0")) -> dict:
    """`edgemm export --target gguf` of ck at each precision under d/gguf-PREC: each exits 0. -> {precision: (bundle
    dir, manifest, output)}."""
    import json
    from click.testing import CliRunner
    from edgemm.cli import main
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
    out = {}
    for prec in precisions:
        b = d / f"gguf-{prec}"
        r = CliRunner().invoke(main, ["export", "--model", str(ck), "--target", "gguf", "--precision", prec, "-o",
                                      str(b)])
        assert r.exit_code == 0, r.output
        out[prec] = (b, json.loads((b / "edgemm.json").read_text()), r.output)
    return out


def import_with_processor(d, src, hf, proc, template: str) -> dict:
    """Save the processor's image processor and the chat template beside a saved tiny model in src, `edgemm import`
    it to d / "ck" -> the dict the family tests share (hf, proc, src, ck, dir, import_log)."""
    from click.testing import CliRunner
    from edgemm.cli import main
    proc.image_processor.save_pretrained(src)
    (src / "chat_template.jinja").write_text(template)
    r = CliRunner().invoke(main, ["import", str(src), "-o", str(d / "ck")])
    assert r.exit_code == 0, r.output
    return {"hf": hf, "proc": proc, "src": src, "ck": d / "ck", "dir": d, "import_log": r.output}


def record_answers(monkeypatch) -> list:
    """The ids of every answer ChatSession generates from now on (an answer's text may end mid-character)."""
    from edgemm.generation import ChatSession
    got, real = [], ChatSession._generate

    def recording(self, *a, **k):
        ans = real(self, *a, **k)
        got.append(ans.ids)
        return ans
    monkeypatch.setattr(ChatSession, "_generate", recording)
    return got


def gguf_bundles_answer(monkeypatch, bundles: dict, image, question, want) -> None:
    """`edgemm run --image` on the f32 and q8_0 gguf bundles (gguf_exports) with edgemm's llamacpp backend: both
    answer, the f32 one `want`'s ids (4 new tokens at most)."""
    from click.testing import CliRunner
    from edgemm.cli import main
    got = record_answers(monkeypatch)
    for prec in ("f32", "q8_0"):
        r = CliRunner().invoke(main, ["run", "--bundle", str(bundles[prec][0]), "--backend", "llamacpp", "--image",
                                      str(image), "--max-new-tokens", "4", question])
        assert r.exit_code == 0, r.output
    assert got[0] == want and want and len(got) == 2, (got, want)


def bundles_answer(monkeypatch, d, image, question, want, bundles=(("onnx-fp32", "ort"), ("trt-fp16", "trt"))):
    """`edgemm run --image` on each (bundle under d, backend) (trt: its Q/DQ graphs on the CPU) answers `want`'s
    ids, 4 new tokens at most."""
    from click.testing import CliRunner
    from edgemm.cli import main
    got = record_answers(monkeypatch)
    for bundle, backend in bundles:
        r = CliRunner().invoke(main, ["run", "--bundle", str(d / bundle), "--backend", backend, "--device", "cpu",
                                      "--image", str(image), "--max-new-tokens", "4", question])
        assert r.exit_code == 0, r.output
    assert got == [want] * len(bundles), (got, want)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_llava_import_matches_transformers(kv_heads, tmp_path):
    model = _tiny_llava(kv_heads)
    src = tmp_path / "llava-tiny-hf"
    model.save_pretrained(src, safe_serialization=True)
    write_tokenizer(src)
    out = tmp_path / "llava-edgemm"
    summary = import_checkpoint(src, out, log=None)
    assert summary["family"] == "llava"
    assert ("grouped-query attention" in summary["variants"]) == (kv_heads != 4)
    m, _ = load_checkpoint(out)
    from edgemm.info import checkpoint_param_counts
    assert checkpoint_param_counts(out) == m.param_counts()     # `edgemm info`'s count, from the file headers
    n_img = m.cfg.n_image_rows
    assert n_img == 16
    g = torch.Generator().manual_seed(5)
    px = torch.randn(1, 3, 16, 16, generator=g)
    pre, post = torch.randint(4, 500, (1, 5), generator=g), torch.randint(4, 500, (1, 6), generator=g)
    ids = torch.cat([pre, torch.full((1, n_img), IMAGE_TOKEN), post], 1)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits[0]
        got = m.forward_full([("text", pre), ("image", m.encode_image(px)), ("text", post)])[0]
        from edgemm.model import KVCache
        cache, pos = KVCache.empty(m.cfg.decoder, max_len=64), 0
        for kind, data in (("text", pre), ("image", m.encode_image(px)), ("text", post)):
            lg, pos = m.forward_segment(kind, data, cache, pos)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    assert (lg[0, -1] - ref[-1]).abs().max().item() <= 1e-4


def test_llava_onnx_export_validates(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from edgemm.export.onnx import export_onnx
    model = _tiny_llava(2)
    src = tmp_path / "llava-tiny-hf"
    model.save_pretrained(src, safe_serialization=True)
    write_tokenizer(src)
    import_checkpoint(src, tmp_path / "ck", log=None)
    export_onnx(str(tmp_path / "ck"), tmp_path / "bundle", precision="fp32", log=lambda *_: None)
    assert (tmp_path / "bundle" / "edgemm.json").is_file()


LLAVA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: "
                  "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
                  "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %} "
                  "{% else %}ASSISTANT: {% for p in m['content'] %}{{ p['text'] }}{% endfor %}</s>{% endif %}"
                  "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _chat_tokenizer(d):
    """A word-level tokenizer that knows the template's words and the test questions."""
    import json
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["USER", "ASSISTANT", ":", "what", "color", "is", "the", "circle", "?", "red", "how", "many", "shapes",
             "are", "there", "three"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<image>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAVA_TEMPLATE, "bos_token": "<s>",
                                                         "eos_token": "</s>", "pad_token": "<pad>"}))


def test_chat_template_prompt_ids_equal_the_llava_processor(tmp_path):
    """The server's prompt for an imported LLaVA comes from the checkpoint's own chat template (rendered in the
    sandbox, split at <image>): the same ids as transformers' LlavaProcessor.apply_chat_template + tokenization,
    the image placeholder expanded to the image rows."""
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    from edgemm.serve.prompt import build_segments
    from edgemm.tokenizer import Tokenizer
    model = _tiny_llava(2)
    src = tmp_path / "llava-tiny-hf"
    model.save_pretrained(src, safe_serialization=True)
    _chat_tokenizer(src)
    out = tmp_path / "ck"
    import_checkpoint(src, out, log=None)
    template = (out / "chat_template.jinja").read_text()
    assert template == LLAVA_TEMPLATE                       # the importer kept the source's template
    from edgemm.export.onnx import export_onnx
    from edgemm.runtimes import load_backend
    from edgemm.chat_template import chat_template_of
    export_onnx(str(out), tmp_path / "bundle", precision="fp32", log=None)
    assert chat_template_of(load_backend("ort", bundle=str(tmp_path / "bundle"), device="cpu")) == LLAVA_TEMPLATE
    m, _ = load_checkpoint(out)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                             crop_size={"height": 16, "width": 16}),
                          tokenizer=hf_tok, chat_template=LLAVA_TEMPLATE, patch_size=4,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)      # the CLS row, as llava-1.5-7b-hf sets it
    from PIL import Image
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    convs = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many shapes are there ?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "three"}]},
         {"role": "user", "content": [{"type": "text", "text": "what color is the circle ?"}]}]]
    ours_tok = Tokenizer.load(out / "tokenizer.json")
    for conv in convs:
        text = proc.apply_chat_template(conv, add_generation_prompt=True)
        want = proc(images=[img], text=text, return_tensors="pt")["input_ids"][0].tolist()
        openai_msgs = [{"role": c["role"], "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,x"}} if p["type"] == "image"
            else {"type": "text", "text": p["text"]} for p in c["content"]]} for c in conv]
        segs, urls = build_segments(ours_tok, template, openai_msgs)
        got = [t for k, d in segs for t in (d if k == "text" else [IMAGE_TOKEN] * m.cfg.n_image_rows)]
        assert got == want, f"{got} != {want}"
        assert len(urls) == 1
        assert want.count(IMAGE_TOKEN) == m.cfg.n_image_rows == 16


def test_chat_session_prompts_an_imported_model_through_its_template(tmp_path):
    """edgemm chat/run on an imported LLaVA: the first prompt is the processor's ids (image rows in place of
    the placeholder); the next turn feeds only what the re-rendered conversation adds to the cache."""
    import numpy as np
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes import load_backend
    model = _tiny_llava(2)
    src = tmp_path / "llava-tiny-hf"
    model.save_pretrained(src, safe_serialization=True)
    _chat_tokenizer(src)
    import_checkpoint(src, tmp_path / "ck", log=None)
    b = load_backend("torch", model=str(tmp_path / "ck"), device="cpu")
    fed = []
    real_text, real_image = b.text, b.image
    b.text = lambda st, ids: (fed.append(list(ids)), real_text(st, ids))[1]
    b.image = lambda st, rows: (fed.append(["image"]), real_image(st, rows))[1]
    s = ChatSession(b, GenerationConfig(max_new_tokens=3))
    assert s.template == LLAVA_TEMPLATE
    img = np.full((16, 16, 3), 120, np.uint8)
    s.set_image(img)
    s.ask("what color is the circle ?")
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                             crop_size={"height": 16, "width": 16}),
                          tokenizer=hf_tok, chat_template=LLAVA_TEMPLATE, patch_size=4,
                          vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]}]
    from PIL import Image
    want = proc(images=[Image.fromarray(img)], text=proc.apply_chat_template(conv, add_generation_prompt=True),
                return_tensors="pt")["input_ids"][0].tolist()
    n = b.cfg.n_image_rows
    prompt = [t for call in fed[:3] for t in (call if call != ["image"] else [IMAGE_TOKEN] * n)]
    assert prompt == want
    before = len(fed)
    s.ask("how many shapes are there ?")
    second = [t for call in fed[before:] for t in call]
    assert "image" not in second and len(second) < len(want)       # the image and the first turn stay cached
    full = s._template_items(s.turns[:1], "how many shapes are there ?")
    assert s.fed[:len(full)] == full                               # the cache holds the re-rendered conversation
