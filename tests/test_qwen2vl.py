"""Qwen2-VL and Qwen2.5-VL (transformers' Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration):
the image processing and prompt expansion against Qwen2VLImageProcessorPil and Qwen2VLProcessor for several aspect
ratios; the imported families against the whole models on tiny random instances (image rows, logits on a
multi-turn prompt with two images at M-RoPE positions, cached greedy steps); exports to onnx / trt validated and
answering transformers' greedy ids."""
import json

import numpy as np
import pytest
import torch

from .test_import_llava import (away_from_init, bundles_answer, exports_validate, greedy_ids,
                                import_with_processor)

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

PATCH, MERGE = 4, 2                     # 8 px cells: one image row each
MIN_PX, MAX_PX = 8 * 8 * 4, 8 * 8 * 30  # 4 to 30 rows an image
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
# Qwen2-VL-2B-Instruct's chat template (chat_template.json)
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
QUESTION = "what color is the circle?"
SIZES = [(40, 20), (20, 44), (64, 14), (31, 30), (9, 12), (200, 90)]       # (width, height)


def _tiny(v25: bool, tok, seed=0, patch=PATCH, text_over=None, **vision_over):
    """vision_over: vision_config settings over the defaults below (the gguf tests' real-sized patches, 2.5's
    112 px windows)."""
    ids = tok.token_to_id
    text = dict(vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 1, 1]})
    text.update(text_over or {})
    common = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    if v25:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model
        vision = dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                      patch_size=patch, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[1])
    else:
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model
        vision = dict(depth=2, embed_dim=16, mlp_ratio=2, num_heads=2, hidden_size=32, patch_size=patch,
                      spatial_merge_size=MERGE, temporal_patch_size=2, hidden_act="quick_gelu")
    vision.update(vision_over)
    torch.manual_seed(seed)
    return away_from_init(Model(Config(text_config=text, vision_config=vision, **common)).eval(), seed)


def _image(w, h, seed):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_processor(src, patch=PATCH):
    """min / max pixels: 4 to 30 rows an image at any patch size."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class Processor(Qwen2VLProcessor):          # no torchvision here: no video processor, whose class check fails
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)
    cell = (patch * MERGE) ** 2
    ip = Qwen2VLImageProcessorPil(min_pixels=4 * cell, max_pixels=30 * cell, patch_size=patch, merge_size=MERGE,
                                  temporal_patch_size=2, image_mean=MEAN, image_std=STD)
    return Processor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(src), video_processor=object(),
                     chat_template=TEMPLATE)


def _save(d, v25: bool, patch=PATCH, text_over=None, **vision_over):
    """A tiny Qwen2(.5)-VL saved as transformers saves it, with a byte-level tokenizer carrying Qwen's special
    tokens, its processor settings and chat template; imported by `edgemm import`."""
    from .test_tokenizers import QWEN2_SPLIT, _byte_level
    tok = _byte_level(QWEN2_SPLIT, SPECIALS, 300, False, False, None)
    hf = _tiny(v25, tok, patch=patch, text_over=text_over, **vision_over)
    src = d / "src"
    hf.save_pretrained(src, safe_serialization=True)
    save_tokenizer(tok, src)
    return import_with_processor(d, src, hf, _hf_processor(src, patch), TEMPLATE)


def save_tokenizer(tok, src):
    """The tokenizer as Qwen2-VL ships it: tokenizer.json, tokenizer_config.json (no bos; eos <|im_end|>) and
    generation_config.json's eos ids (benchmarks/bench_family_shapes.py writes its checkpoint with this too)."""
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "tokenizer_class": "Qwen2TokenizerFast"}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|im_end|>"),
                                                                             tok.token_to_id("<|endoftext|>")]}))


@pytest.fixture(scope="module", params=[False, True], ids=["qwen2-vl", "qwen2.5-vl"])
def imported(request, tmp_path_factory):
    return _save(tmp_path_factory.mktemp("qwen2vl"), request.param)


def _messages(n_images=1, openai=False):
    img = {"type": "image_url", "image_url": {"url": "x"}} if openai else {"type": "image"}
    if n_images == 1:
        return [{"role": "user", "content": [img, {"type": "text", "text": QUESTION}]}]
    return [{"role": "user", "content": [img, {"type": "text", "text": "describe it"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
            {"role": "user", "content": [img, {"type": "text", "text": QUESTION}]}]


def _segments(tok, template, rows, n_images):
    """The chat prompt around the images (edgemm's path): segments with each image's rows."""
    from edgemm.chat_template import normalize_messages, segments_template
    return [(k, torch.tensor([x]) if k == "text" else rows[x]) for k, x in
            segments_template(tok, template, normalize_messages(_messages(n_images, True)))]


def test_import_reads_the_family(imported):
    from edgemm.config import ModelConfig
    cfg = ModelConfig.load(imported["ck"] / "config.json")
    v = cfg.vision
    assert "as qwen2vl" in imported["import_log"]
    assert (v.arch, v.tiling, v.min_pixels, v.max_pixels, cfg.adapter.kind) == ("qwen2vl", "qwen2vl", MIN_PX, MAX_PX,
                                                                              "qwen2vl_merger")
    assert cfg.decoder.mrope_section == [2, 1, 1] and cfg.decoder.qkv_bias and list(v.image_mean) == MEAN
    assert ("window attention (qwen2.5-vl)" in cfg.variants()) == bool(v.window_px)
    assert "<image>" in (imported["ck"] / "chat_template.jinja").read_text()


def test_processor_matches_transformers(imported):
    """Pixels (flattened as the processor does), grid and prompt ids equal Qwen2VLImageProcessorPil's and
    Qwen2VLProcessor's for several aspect ratios (min_pixels / max_pixels both binding among them)."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.qwen2vl_pixels import patches
    from edgemm.tilings import preprocess_image
    m, tok = load_checkpoint(imported["ck"])
    proc, template = imported["proc"], (imported["ck"] / "chat_template.jinja").read_text()
    for i, (w, h) in enumerate(SIZES):
        img = _image(w, h, i)
        want = proc(text=proc.apply_chat_template(_messages(), add_generation_prompt=True), images=[img],
                    return_tensors="pt")
        px = preprocess_image(img, m.cfg.vision)
        f = PATCH * MERGE
        assert [1, px.shape[2] // PATCH, px.shape[3] // PATCH] == want["image_grid_thw"][0].tolist()
        assert np.abs(patches(px, m.cfg.vision) - want["pixel_values"].numpy()).max() <= 1e-5
        n = (px.shape[2] // f) * (px.shape[3] // f)
        assert n == m.cfg.image_rows_for(w, h)
        image_id = tok.tok.token_to_id("<|image_pad|>")
        segs = _segments(tok, template, [None], 1)
        got = [t for k, x in segs for t in (x[0].tolist() if k == "text" else [image_id] * n)]
        assert got == want["input_ids"][0].tolist()


def _reference(hf, proc, imgs, n_images):
    hf_in = proc(text=proc.apply_chat_template(_messages(n_images), add_generation_prompt=True), images=imgs,
                 return_tensors="pt")
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=hf_in["pixel_values"],
                                            image_grid_thw=hf_in["image_grid_thw"]).pooler_output
    return hf_in, list(feats)


def _logits(hf, hf_in):
    """ids -> transformers' logits [T, vocab] with the images' pixels (M-RoPE positions from get_rope_index)."""
    image_id = hf.config.image_token_id

    def run(ids):
        ids = torch.tensor([ids])
        return hf(input_ids=ids, pixel_values=hf_in["pixel_values"], image_grid_thw=hf_in["image_grid_thw"],
                  mm_token_type_ids=(ids == image_id).int()).logits[0]
    return run


def test_import_matches_transformers(imported):
    """Image rows of two images (the host's path), the logits of a multi-turn prompt with both and 3 cached greedy
    steps equal transformers' within 1e-4 (M-RoPE: rows at 3-D positions, the text after each image at max + 1)."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.tilings import image_rows
    from runtimes.torch_backend import TorchBackend
    from .test_import_llava import logits_and_cached_steps_match
    hf, proc = imported["hf"], imported["proc"]
    m, tok = load_checkpoint(imported["ck"])
    b = TorchBackend.open(model=str(imported["ck"]), device="cpu")
    template = (imported["ck"] / "chat_template.jinja").read_text()
    imgs = [_image(40, 20, 1), _image(20, 44, 2)]            # a wide and a tall image: 3 x 5 and 5 x 3 cells
    hf_in, feats = _reference(hf, proc, imgs, 2)
    rows = []
    for img, want in zip(imgs, feats):
        r = image_rows(b, img)
        assert r.grid[1] != r.grid[2] and (torch.from_numpy(np.asarray(r))[0] - want).abs().max().item() <= 1e-4
        t = torch.from_numpy(np.asarray(r))
        t.grid = r.grid
        rows.append(t)
    segs = _segments(tok, template, rows, 2)
    image_id = hf.config.image_token_id
    ids = hf_in["input_ids"][0].tolist()
    assert [t for k, x in segs for t in (x[0].tolist() if k == "text" else [image_id] * x.shape[1])] == ids
    logits_and_cached_steps_match(m, segs, ids, _logits(hf, hf_in))


def test_exports_validate_and_answer(imported, monkeypatch):
    """`edgemm export --target onnx` (fp32, int8) and `--target trt --no-build` validate against the reference;
    `edgemm run --image` on the onnx and trt bundles answers transformers' greedy ids (gguf: tests/test_qwen2vl_gguf.py)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    d, ck, hf, proc = imported["dir"], imported["ck"], imported["hf"], imported["proc"]
    exports_validate(ck, d, None)
    _image(40, 20, 7).save(d / "img.png")
    from PIL import Image
    hf_in, _ = _reference(hf, proc, [Image.open(d / "img.png")], 1)
    eos = set(json.loads((ck / "config.json").read_text())["tokens"]["eos"])
    want = greedy_ids(_logits(hf, hf_in), hf_in["input_ids"][0].tolist(), eos)
    assert want
    bundles_answer(monkeypatch, d, d / "img.png", QUESTION, want)
    from .test_smolvlm import _served_answer
    _served_answer(d / "onnx-fp32", d / "img.png", len(hf_in["input_ids"][0]), want,
                   json.loads((ck / "config.json").read_text())["tokens"], QUESTION)
    from runtimes import load_backend
    for b in (load_backend("torch", model=str(ck), device="cpu"),
              load_backend("ort", bundle=str(d / "onnx-fp32"), device="cpu")):
        _chunked_image_matches(b)


def test_text_after_an_image_at_a_head_size_the_op_rotates(tmp_path):
    """At head sizes that are multiples of 16 GroupQueryAttention could rotate q and k itself, at each row's cache
    row; under M-RoPE the text after an image sits at p + max(grid rows, cols) instead, so decoder_text rotates from
    its positions input (at Qwen2-VL-2B's head size 128 the op's rotary put decoder_text 0.044 off). Head size 16:
    the fp32 export's own check (ONNX Runtime against the reference) holds, and the reference is transformers'."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from edgemm.checkpoint import load_model
    from edgemm.export.decoder_graph import gqa_rotary
    from edgemm.export.onnx import export_onnx
    rp = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}
    out = _save(tmp_path, False, text_over=dict(num_attention_heads=2, num_key_value_heads=2, rope_parameters=rp))
    m, _ = load_model(str(out["ck"]))
    assert m.cfg.decoder.head_dim == 16 and m.cfg.decoder.mrope_section == [4, 2, 2] and not gqa_rotary(m.cfg.decoder)
    man = export_onnx(model=str(out["ck"]), out=tmp_path / "b", precision="fp32", threads=1, log=None)
    assert man["validation"]["stages"]["decoder_text"]["max_abs_err"] <= 1e-4


def _chunked_image_matches(b):
    """An image appended in pieces of 4 rows (serve --prefill-chunk) leaves the logits, the next text position and
    the step after it that one piece does: each piece reads its rows' own 3-D positions."""
    from edgemm.tilings import image_rows
    from runtimes.base import last
    rows = image_rows(b, _image(40, 20, 3))                 # 2 x 5 cells: 10 rows, pieces of 4, 4, 2
    out = []
    for chunk in (None, 4):
        st = b.new_state(max_len=64)
        b.text(st, [1, 2, 3])
        got = last(b.prefill(st, "image", rows, chunk))
        out.append((got, st.pos, st.length, b.text(st, [4])))
    (a, pa, la, sa), (c, pc, lc, sc) = out
    assert (pa, la) == (pc, lc) == (3 + 5, 3 + 10) and np.abs(a - c).max() <= 1e-4 and np.abs(sa - sc).max() <= 1e-4


def test_released_config_form(imported, tmp_path):
    """The releases' config.json form (Qwen2-VL-2B-Instruct's: the text settings at the top, rope_scaling {"type":
    "mrope"}, rope_theta; a vision_config without rope_parameters) imports to the same checkpoint as transformers
    5.x's form (whose save_pretrained writes the releases' tensor names: model., visual., lm_head);
    a RoPE scaling edgemm does not compute is refused naming it."""
    import shutil
    from click.testing import CliRunner
    from safetensors.numpy import load_file
    from edgemm.cli import main
    src = tmp_path / "src"
    shutil.copytree(imported["src"], src)
    hf = json.loads((src / "config.json").read_text())
    tc = hf.pop("text_config")
    rp = tc.pop("rope_parameters")
    hf.update({k: v for k, v in tc.items() if k not in ("model_type", "layer_types")},
              rope_theta=rp["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rp["mrope_section"]})
    hf["vision_config"].pop("rope_parameters", None)
    (src / "config.json").write_text(json.dumps(hf))
    r = CliRunner().invoke(main, ["import", str(src), "-o", str(tmp_path / "ck")])
    assert r.exit_code == 0 and "as qwen2vl" in r.output, r.output
    want, got = (json.loads((d / "config.json").read_text()) for d in (imported["ck"], tmp_path / "ck"))
    assert {k: got[k] for k in ("vision", "adapter", "decoder")} == {k: want[k] for k in ("vision", "adapter", "decoder")}
    a, b = (load_file(str(next(d.glob("*.safetensors")))) for d in (imported["ck"], tmp_path / "ck"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    hf["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (src / "config.json").write_text(json.dumps(hf))
    r = CliRunner().invoke(main, ["import", str(src), "-o", str(tmp_path / "ck2")])
    assert r.exit_code == 2 and "RoPE 'yarn'" in r.output, r.output
