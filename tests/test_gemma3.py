"""Gemma 3 (transformers' Gemma3ForConditionalGeneration): a tiny random instance with Gemma's special tokens,
imported by `edgemm import`, against transformers: the projector's rows, the processor's pixels and prompt ids,
logits over a prompt with an image and cached decode steps (sliding-window and full layers with their own RoPE bases,
linear RoPE scaling, the image's rows attending both ways; final_logit_softcapping set, which the class does not
apply), the onnx / trt exports validated and `edgemm run --image` on them."""
import json

import numpy as np
import pytest
import torch

from .test_import_llava import (away_from_init, exports_validate, greedy_ids, import_with_processor,
                                logits_and_cached_steps_match, record_answers)
from .test_tokenizers import GEMMA_TEMPLATE, _sentencepiece

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

S, PATCH, TOKENS = 16, 4, 4         # 16 px images, a 4 x 4 patch grid pooled 2 x 2 to 4 rows
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
            "<end_of_image>", "<image_soft_token>"]
TEMPLATE = GEMMA_TEMPLATE.replace("'<image>'", "'<start_of_image>'")       # Gemma 3's: <start_of_image> per image
QUESTION = "what color is the circle?"


def _tiny(tok, seed=0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    ids = tok.token_to_id
    text = Gemma3TextConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
        final_logit_softcapping=3.0, max_position_embeddings=512, rms_norm_eps=1e-6,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                image_size=S, patch_size=PATCH, layer_norm_eps=1e-6)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=TOKENS,
                       boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                       image_token_index=ids("<image_soft_token>"), tie_word_embeddings=True)
    torch.manual_seed(seed)
    return away_from_init(Gemma3ForConditionalGeneration(cfg).eval(), seed)   # norms (zeros in Gemma's form) too


def _image(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _hf_processor(src):
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor
    ip = Gemma3ImageProcessorPil(size={"height": S, "width": S}, image_mean=MEAN, image_std=STD, resample=2)
    return Gemma3Processor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(src),
                           image_seq_length=TOKENS, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny Gemma 3 saved as transformers saves it, with a Gemma-style tokenizer carrying its image tokens, the
    image processor's settings and chat template; imported by `edgemm import`."""
    d = tmp_path_factory.mktemp("gemma3")
    tok = _sentencepiece(SPECIALS, 512, False, "<unk>", "<bos>")
    hf, src = _tiny(tok), d / "src"
    hf.save_pretrained(src, safe_serialization=True)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "tokenizer_class": "PreTrainedTokenizerFast", "extra_special_tokens": {
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}}))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 5],
                                                            "pad_token_id": 0}))
    return import_with_processor(d, src, hf, _hf_processor(src), TEMPLATE)


def _messages(openai=False, two=False):
    """One user turn with an image, or (two) a multi-turn chat with an image in each user turn."""
    img = {"type": "image_url", "image_url": {"url": "x"}} if openai else {"type": "image"}
    out = [{"role": "user", "content": [img, {"type": "text", "text": QUESTION}]}]
    if two:
        out += [{"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
                {"role": "user", "content": [img, {"type": "text", "text": "and this one?"}]}]
    return out


def _reference(hf, proc, *imgs):
    """transformers' prompt inputs (ids, pixels, token_type_ids) for the chat prompt around the image(s)."""
    text = proc.apply_chat_template(_messages(two=len(imgs) > 1), add_generation_prompt=True)
    return proc(text=text, images=list(imgs), add_special_tokens=False, return_tensors="pt")


def _logits(hf, hf_in):
    """ids -> transformers' logits [T, vocab] with the image's pixels and its token types (generated ids: text)."""
    def run(ids):
        tt = torch.zeros(1, len(ids), dtype=torch.long)
        n = hf_in["token_type_ids"].shape[1]
        tt[0, :n] = hf_in["token_type_ids"][0]
        return hf(input_ids=torch.tensor([ids]), pixel_values=hf_in["pixel_values"], token_type_ids=tt).logits[0]
    return run


def test_import_reads_the_family(imported):
    from edgemm.config import ModelConfig
    cfg = ModelConfig.load(imported["ck"] / "config.json")
    d = cfg.decoder
    assert "as gemma3" in imported["import_log"]
    assert (cfg.vision.arch, cfg.adapter.kind, cfg.adapter.pool_tokens, cfg.n_image_rows) == ("siglip", "gemma3", 4, 6)
    assert (d.sliding_layers, d.sliding_window, d.rope_linear_factor, d.rope_local_theta, d.query_scale,
            d.embed_scale) == ([0, 2], 5, 2.0, 500.0, 24.0, 32 ** 0.5)
    assert {"sliding-window attention", "bidirectional attention among an image's rows",
            "gemma3 projector (avg pool, rmsnorm, linear)"} <= set(cfg.variants())


def test_processor_and_prompt_match_transformers(imported):
    """Pixels equal Gemma3ImageProcessor's (bilinear resize to the tower's size) for several aspect ratios; the
    prompt ids edgemm writes (text segments around the image's boi, rows, eoi) equal Gemma3Processor's."""
    from PIL import Image
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.checkpoint import load_checkpoint
    from edgemm.tilings import preprocess_image
    m, tok = load_checkpoint(imported["ck"])
    proc, template = imported["proc"], (imported["ck"] / "chat_template.jinja").read_text()
    ids_of = proc.tokenizer.convert_tokens_to_ids
    for i, (w, h) in enumerate([(40, 20), (16, 16), (9, 31)]):
        img = Image.fromarray(_image(w, h, i))
        want = _reference(imported["hf"], proc, img)
        px = preprocess_image(img, m.cfg.vision)
        assert np.abs(px - want["pixel_values"].numpy()).max() <= 1e-5
        segs = segments_template(tok, template, normalize_messages(_messages(True)))
        image = [ids_of("<start_of_image>")] + [ids_of("<image_soft_token>")] * TOKENS + [ids_of("<end_of_image>")]
        got = [t for k, x in segs for t in (x if k == "text" else image)]
        assert got == want["input_ids"][0].tolist()


def test_import_matches_transformers(imported):
    """The image rows (boi, the pooled rows, eoi) equal the embeddings transformers' language model reads there; the
    prompt's logits and 3 cached greedy steps equal Gemma3ForConditionalGeneration's within 1e-4."""
    from PIL import Image
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.checkpoint import load_checkpoint
    from edgemm.tilings import image_rows
    from runtimes.torch_backend import TorchBackend
    hf, proc = imported["hf"], imported["proc"]
    m, tok = load_checkpoint(imported["ck"])
    b = TorchBackend.open(model=str(imported["ck"]), device="cpu")
    template = (imported["ck"] / "chat_template.jinja").read_text()
    img = Image.fromarray(_image(40, 20, 3))
    hf_in = _reference(hf, proc, img)
    ids = hf_in["input_ids"][0].tolist()
    rows = torch.from_numpy(np.asarray(image_rows(b, img), np.float32))
    with torch.no_grad():
        emb = hf.model.get_input_embeddings()(hf_in["input_ids"])
        feats = hf.model.get_image_features(pixel_values=hf_in["pixel_values"]).pooler_output
        emb[hf_in["input_ids"] == hf.config.image_token_id] = feats.reshape(-1, feats.shape[-1])
    k0 = ids.index(hf.config.boi_token_id)
    assert (rows[0] - emb[0, k0:k0 + TOKENS + 2]).abs().max().item() <= 1e-4
    segs = [(k, torch.tensor([x]) if k == "text" else rows)
            for k, x in segments_template(tok, template, normalize_messages(_messages(True)))]
    logits_and_cached_steps_match(m, segs, ids, _logits(hf, hf_in))


def test_two_images_multi_turn_match_transformers(imported):
    """A multi-turn prompt with two images (each its own block of rows attending both ways): logits and 3 cached
    greedy steps equal transformers' within 1e-4."""
    from PIL import Image
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.checkpoint import load_checkpoint
    from edgemm.tilings import image_rows
    from runtimes.torch_backend import TorchBackend
    hf, proc = imported["hf"], imported["proc"]
    m, tok = load_checkpoint(imported["ck"])
    b = TorchBackend.open(model=str(imported["ck"]), device="cpu")
    imgs = [Image.fromarray(_image(40, 20, 4)), Image.fromarray(_image(12, 30, 5))]
    hf_in = _reference(hf, proc, *imgs)
    rows = iter([torch.from_numpy(np.asarray(image_rows(b, im), np.float32)) for im in imgs])
    segs = [(k, torch.tensor([x]) if k == "text" else next(rows)) for k, x in segments_template(
        tok, (imported["ck"] / "chat_template.jinja").read_text(), normalize_messages(_messages(True, two=True)))]
    assert [k for k, _ in segs].count("image") == 2
    logits_and_cached_steps_match(m, segs, hf_in["input_ids"][0].tolist(), _logits(hf, hf_in))


def test_exports_validate_and_answer(imported, monkeypatch):
    """`edgemm export --target onnx` (fp32, int8) and `--target trt --no-build` (fp16) validate against the reference
    (sliding layers, the image's rows both ways in decoder_image); `edgemm run --image`
    on the onnx fp32 bundle, the trt one (its graphs on the CPU) and the torch reference answers transformers'
    greedy ids."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from PIL import Image
    from click.testing import CliRunner
    from edgemm.cli import main
    d, ck, hf, proc = imported["dir"], imported["ck"], imported["hf"], imported["proc"]
    exports_validate(ck, d, None)
    Image.fromarray(_image(40, 20, 7)).save(d / "img.png")
    hf_in = _reference(hf, proc, Image.open(d / "img.png"))
    eos = set(json.loads((ck / "config.json").read_text())["tokens"]["eos"])
    want = greedy_ids(_logits(hf, hf_in), hf_in["input_ids"][0].tolist(), eos)
    got = record_answers(monkeypatch)
    for where, backend in ((["--bundle", str(d / "onnx-fp32")], "ort"), (["--bundle", str(d / "trt-fp16")], "trt"),
                           (["--model", str(ck)], "torch")):
        r = CliRunner().invoke(main, ["run", *where, "--backend", backend, "--device", "cpu", "--image",
                                      str(d / "img.png"), "--max-new-tokens", "4", QUESTION])
        assert r.exit_code == 0, r.output
    assert got == [want] * 3 and want, (got, want)
    from .test_smolvlm import _served_answer                # `edgemm serve` of the onnx bundle: the same answer
    _served_answer(d / "onnx-fp32", d / "img.png", len(hf_in["input_ids"][0]), want,
                   json.loads((ck / "config.json").read_text())["tokens"], question=QUESTION)


def test_released_config_form():
    """gemma-3-4b-it's config.json form (transformers 4.50: rope_scaling, rope_local_base_freq,
    sliding_window_pattern, no layer_types) reads as transformers 5.24 reads it: every 6th layer full, linear
    scaling 8 on those, base 10000 on the sliding ones; attention logit soft-capping is refused in one line."""
    from transformers import Gemma3TextConfig
    from edgemm.errors import EdgemmError
    from edgemm.families.gemma3 import gemma3_decoder
    tc = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
          "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208, "query_pre_attn_scalar": 256,
          "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
          "rope_local_base_freq": 10000.0, "sliding_window": 1024, "sliding_window_pattern": 6,
          "final_logit_softcapping": None, "attn_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh"}
    hf = Gemma3TextConfig(**tc)
    d = gemma3_decoder({}, tc, "text_config")
    assert d.sliding_layers == [i for i, t in enumerate(hf.layer_types) if t == "sliding_attention"]
    assert len(d.sliding_layers) == 34 - 5 and 5 not in d.sliding_layers and d.sliding_window == 1024
    full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    assert (d.rope_theta, d.rope_linear_factor, d.rope_local_theta) == (full["rope_theta"], full["factor"],
                                                                         local["rope_theta"])
    assert (d.attn_head_dim, d.kv_heads, d.query_scale, d.tie_embeddings) == (256, 4, 256.0, True)
    with pytest.raises(EdgemmError, match="attn_logit_softcapping"):
        gemma3_decoder({}, {**tc, "attn_logit_softcapping": 50.0}, "text_config")


# --------------------------------------------------------------------------- gguf (llama.cpp's gemma3 + mtmd)
def _png_url(img) -> str:
    import base64
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def gguf_bundles(imported):
    """`edgemm export --target gguf` at f32 and q8_0."""
    from .test_import_llava import gguf_exports
    return gguf_exports(imported["ck"], imported["dir"])


def test_gguf_files_are_llama_cpps_gemma3(imported, gguf_bundles):
    """The decoder as llama.cpp's gemma3 (the sliding pattern per layer, the local RoPE base, linear scaling, head_dim
    as key length, no soft-capping key; (1 + w) norms; query_pre_attn_scalar 24 folded into attn_q_norm against
    llama.cpp's 1/sqrt(head_dim)); the mmproj as the converter's Gemma3VisionModel writes it (projector gemma3,
    scale factor 2, mm.input_projection [W, D]); the f32 export validates within 1e-4 on the decoder and the q8_0
    one within its bounds."""
    from gguf import GGUFReader
    hf = imported["hf"]
    d, man, _ = gguf_bundles["f32"]
    r = GGUFReader(str(d / man["stages"]["decoder"]["file"]))
    f = r.fields
    val = lambda k: f[k].contents()                                      # noqa: E731
    assert val("general.architecture") == "gemma3" and val("gemma3.attention.sliding_window") == 5
    assert val("gemma3.attention.sliding_window_pattern") == [True, False, True]
    assert (val("gemma3.rope.freq_base_swa"), val("gemma3.rope.freq_base"), val("gemma3.rope.scaling.factor"),
            val("gemma3.attention.key_length")) == (500.0, 10000.0, 2.0, 16)
    assert "gemma3.final_logit_softcapping" not in f
    assert "<start_of_image>" in val("tokenizer.chat_template")
    t = {x.name: np.asarray(x.data).reshape([int(s) for s in reversed(x.shape)]) for x in r.tensors}
    lm = hf.model.language_model.layers[1]
    qn = (lm.self_attn.q_norm.weight.detach().numpy() + 1) * np.sqrt(16 / 24)
    assert np.abs(t["blk.1.attn_q_norm.weight"] - qn).max() < 1e-6
    assert np.abs(t["blk.1.post_ffw_norm.weight"] - lm.post_feedforward_layernorm.weight.detach().numpy() - 1).max() \
        < 1e-6
    v = GGUFReader(str(d / man["stages"]["vision"]["file"]))
    assert v.fields["clip.projector_type"].contents() == "gemma3"
    assert v.fields["clip.vision.projector.scale_factor"].contents() == 2
    tv = {x.name: np.asarray(x.data).reshape([int(s) for s in reversed(x.shape)]) for x in v.tensors}
    assert np.array_equal(tv["mm.input_projection.weight"],
                          hf.model.multi_modal_projector.mm_input_projection_weight.detach().numpy())
    assert {"v.post_ln.weight", "v.blk.1.attn_q.bias", "mm.soft_emb_norm.weight"} <= set(tv)
    val_f32 = man["validation"]                 # (ggml's fp16-table GELU: 1e-3, test_gguf_stock_llama_cpp_...)
    assert val_f32["passed"] and val_f32["tokenization_equal"] and val_f32["vision_rows_cosine"] > 0.9999
    assert val_f32["text_max_abs"] < 1e-3 and val_f32["image_max_abs"] < 1e-3, val_f32
    assert gguf_bundles["q8_0"][1]["validation"]["passed"]


def test_gguf_stock_llama_cpp_agrees_with_transformers(imported, gguf_bundles):
    """The f32 files in stock llama-cpp-python (Llama + its MTMDChatHandler with the file's chat template; no edgemm
    code on that side) against Gemma3ForConditionalGeneration on an image prompt: the text around the image
    tokenizes as transformers' tokenizer does, transformers fed the stock prompt ids (the image's soft tokens where
    mtmd put its rows, token types marking them) gives logits within 1e-3 of llama.cpp's and the same greedy
    tokens (ggml's CPU GELU reads an fp16 table: the logits are not closer).

    Where the vendored llama.cpp differs from transformers' processing (so the comparison uses a 16 x 16 image, the
    tower's size): mtmd resizes an image of another size keeping its aspect ratio and pads it with black (clip.cpp:
    Gemma 3's image_resize_pad PAD_CEIL) where Gemma3ImageProcessor stretches it to the square, and mtmd's prompt has
    no "\\n\\n" around <start_of_image> ... <end_of_image> where Gemma3Processor puts them (edgemm's template
    does, as transformers)."""
    from transformers import AutoTokenizer
    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    hf, proc = imported["hf"], imported["proc"]
    d, man, _ = gguf_bundles["f32"]
    img = _image(S, S, 11)
    llm = Llama(model_path=str(d / man["stages"]["decoder"]["file"]), n_ctx=256, n_threads=2, logits_all=True,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False,
                chat_handler=MTMDChatHandler(clip_model_path=str(d / man["stages"]["vision"]["file"]),
                                             verbose=False, use_gpu=False))
    r = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png_url(img)}}, {"type": "text", "text": QUESTION}]}],
        max_tokens=4, temperature=0.0, repeat_penalty=1.0)
    n = r["usage"]["prompt_tokens"]
    stock = np.asarray(llm.scores[n - 1], np.float32)
    ids = [int(t) for t in llm.input_ids[:n]]
    c = r["usage"]["completion_tokens"]         # (the last sampled token is not evaluated: its id from the scores)
    answer = [int(t) for t in llm.input_ids[n:n + c - 1]] + [int(np.argmax(llm.scores[n + c - 2]))]
    hf_tok = AutoTokenizer.from_pretrained(imported["src"])
    boi, eoi, soft = (hf_tok.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>",
                                                                  "<image_soft_token>"))
    k = ids.index(boi) + 1
    assert ids[k + TOKENS] == eoi
    ids[k:k + TOKENS] = [soft] * TOKENS
    text = proc.apply_chat_template(_messages(), add_generation_prompt=True)
    before, after = text.split("<start_of_image>")
    assert ids[:k] == [hf_tok.bos_token_id] * (k - 1 - len(hf_tok(before, add_special_tokens=False)["input_ids"])) \
        + hf_tok(before, add_special_tokens=False)["input_ids"] + [boi]
    assert ids[k + TOKENS:] == hf_tok("<end_of_image>" + after, add_special_tokens=False)["input_ids"]
    px = proc.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    tt = (torch.tensor([ids]) == soft).long()

    def hf_logits(seq):
        t = torch.cat([tt, torch.zeros(1, len(seq) - len(ids), dtype=torch.long)], 1)
        with torch.no_grad():
            return hf(input_ids=torch.tensor([seq]), pixel_values=px, token_type_ids=t).logits[0]
    want = hf_logits(ids)[-1].numpy()
    assert stock.argmax() == want.argmax() and np.abs(stock - want).max() < 1e-3
    eos = set(json.loads((imported["ck"] / "config.json").read_text())["tokens"]["eos"])
    assert answer == greedy_ids(hf_logits, ids, eos, len(answer)) and answer
    llm.close()


def test_gguf_run_image_answers_as_transformers(imported, gguf_bundles, monkeypatch):
    """`edgemm run --image` on the f32 gguf bundle (edgemm's llamacpp backend: its processing, the rows from mtmd
    between the boi / eoi token rows, decoded both ways) answers transformers' greedy ids on a wide image (resized
    by edgemm as Gemma3ImageProcessor does, mtmd then taking the tower-sized image as it is); the q8_0 bundle
    answers too."""
    from PIL import Image
    from .test_import_llava import gguf_bundles_answer
    d, ck, hf, proc = imported["dir"], imported["ck"], imported["hf"], imported["proc"]
    Image.fromarray(_image(40, 20, 7)).save(d / "img-gguf.png")
    hf_in = _reference(hf, proc, Image.open(d / "img-gguf.png"))
    eos = set(json.loads((ck / "config.json").read_text())["tokens"]["eos"])
    want = greedy_ids(_logits(hf, hf_in), hf_in["input_ids"][0].tolist(), eos)
    gguf_bundles_answer(monkeypatch, gguf_bundles, d / "img-gguf.png", QUESTION, want)
