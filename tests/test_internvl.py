"""InternVL (transformers' InternVLForConditionalGeneration, Qwen2 language model): the InternViT tower and the
pixel-shuffle connector checked against transformers' own modules (LayerScale, q/k norm, RMSNorm and bias variants,
weights away from their init), the dynamic tiles against its GotOcr2 image processor and InternVLProcessor, and the
imported family against the whole model (image rows, logits, cached decode steps), exported to onnx and run."""
import pytest
import torch

from .test_import_llava import away_from_init, exports_validate

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

S, PATCH = 16, 4                # tiles of 16 px, 4 x 4 patches, 2 x 2 rows per tile after the pixel shuffle
ROWS_PER_TILE = 4


def _vision_config(qk_norm=False, norm="layer_norm", bias=True, mean_pooling=True, layers=2):
    from transformers import InternVLVisionConfig
    return InternVLVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=2,
                                image_size=S, patch_size=PATCH, use_qk_norm=qk_norm, norm_type=norm,
                                attention_bias=bias, use_mean_pooling=mean_pooling, hidden_act="gelu",
                                layer_norm_eps=1e-6)


def _tiny(vocab=512, image_token=3, seed=0, tie=False, **vision):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    text = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                       tie_word_embeddings=tie)
    cfg = InternVLConfig(vision_config=_vision_config(**vision), text_config=text, image_token_id=image_token,
                         downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=tie)
    torch.manual_seed(seed)
    # every weight away from its init: LayerScale (lambda_1/2 start at 0.1), the q/k norms, the zero CLS/positions
    return away_from_init(InternVLForConditionalGeneration(cfg).eval(), seed)


def _edgemm_vision(hf_model, qk_norm, norm, bias, final_norm):
    """edgemm's tower + connector with transformers' weights copied by hand (the block test; the importer's own
    plan is checked by the family tests below)."""
    import edgemm.model  # noqa: F401 (registers the blocks)
    from edgemm.blocks import registry
    from edgemm.config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
    vc = hf_model.config.vision_config
    cfg = ModelConfig(vision=VisionConfig(image_size=S, patch_size=PATCH, width=24, layers=vc.num_hidden_layers,
                                          heads=2, mlp_dim=48, eps=1e-6, gelu="erf", arch="internvit",
                                          norm="layer" if norm == "layer_norm" else "rms", qkv_bias=bias,
                                          qk_norm=qk_norm, final_norm=final_norm),
                      adapter=AdapterConfig(kind="pixel_shuffle", gelu="erf", downsample_ratio=0.5),
                      decoder=DecoderConfig(vocab_size=512, d_model=32, n_heads=4, single_branch=True)).validate()
    tower = registry.get("vision", "internvit").from_config(cfg).eval()
    conn = registry.get("connector", "pixel_shuffle").from_config(cfg).eval()
    sd = {k: v.detach() for k, v in hf_model.model.state_dict().items()}
    vt, mine = "vision_tower.", {}
    mine["patch_embed.weight"] = sd[vt + "embeddings.patch_embeddings.projection.weight"]
    mine["patch_embed.bias"] = sd[vt + "embeddings.patch_embeddings.projection.bias"]
    mine["cls"], mine["pos"] = sd[vt + "embeddings.cls_token"], sd[vt + "embeddings.position_embeddings"]
    for i in range(vc.num_hidden_layers):
        s, e = f"{vt}encoder.layer.{i}.", f"blocks.{i}."
        a = s + "attention."
        mine[e + "qkv.weight"] = torch.cat([sd[a + f"{n}_proj.weight"] for n in "qkv"])
        if bias:
            mine[e + "qkv.bias"] = torch.cat([sd[a + f"{n}_proj.bias"] for n in "qkv"])
        for ours, theirs in (("proj", "attention.projection_layer"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"),
                             ("ln1", "layernorm_before"), ("ln2", "layernorm_after"),
                             *((("q_norm", "attention.q_norm"), ("k_norm", "attention.k_norm")) if qk_norm else ())):
            for n in ("weight", "bias"):
                if s + f"{theirs}.{n}" in sd:
                    mine[e + f"{ours}.{n}"] = sd[s + f"{theirs}.{n}"]
        mine[e + "ls1"], mine[e + "ls2"] = sd[s + "lambda_1"], sd[s + "lambda_2"]
    if final_norm:
        mine["final_norm.weight"], mine["final_norm.bias"] = sd[vt + "layernorm.weight"], sd[vt + "layernorm.bias"]
    tower.load_state_dict(mine, strict=True)
    conn.load_state_dict({k.removeprefix("multi_modal_projector."): v for k, v in sd.items()
                          if k.startswith("multi_modal_projector.")}, strict=True)
    return tower, conn


@pytest.mark.parametrize("qk_norm,norm,bias,mean_pooling", [(False, "layer_norm", True, True),
                                                            (True, "rms_norm", False, False)])
def test_tower_and_connector_match_transformers(qk_norm, norm, bias, mean_pooling):
    """InternViT (LayerScale randomised; q/k RMSNorm, RMSNorm blocks, no q/k/v bias and the final LayerNorm in the
    second case) and the pixel shuffle + projector equal transformers' get_image_features on a batch of tiles."""
    hf = _tiny(qk_norm=qk_norm, norm=norm, bias=bias, mean_pooling=mean_pooling)
    assert not torch.allclose(hf.model.vision_tower.encoder.layer[0].lambda_1, torch.tensor(0.1))
    tower, conn = _edgemm_vision(hf, qk_norm, norm, bias, final_norm=not mean_pooling)
    px = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf.model.get_image_features(pixel_values=px).pooler_output            # [3, 4, D]
        got = conn(tower(px))                                                       # [1, 12, D]
    assert want.shape == (3, ROWS_PER_TILE, 32) and got.shape == (1, 3 * ROWS_PER_TILE, 32)
    assert (got[0] - want.reshape(-1, 32)).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- the family: import, processor, export
import json  # noqa: E402

import numpy as np  # noqa: E402

MAX_TILES = 6
SIZES = [(16, 16), (40, 20)]        # (width, height): one tile; a 2 x 1 grid + the thumbnail
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
# InternVL3-hf's chat template (transformers' convert_internvl_weights_to_hf.py)
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
            "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
            "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}")
QUESTION = "what color is the circle?"
ASK = "describe the image"          # (where the tiny model's greedy answers differ with the tiles it sees)


def _image(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _hf_processor(src):
    """transformers' InternVLProcessor over the saved tokenizer and a GotOcr2 image processor (PIL backend)."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLProcessor

    class Processor(InternVLProcessor):         # no torchvision here: no video processor, whose class check fails
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)
    ip = GotOcr2ImageProcessorPil(size={"height": S, "width": S}, min_patches=1, max_patches=MAX_TILES,
                                  image_mean=MEAN, image_std=STD)
    return Processor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(src), video_processor=None,
                     image_seq_length=ROWS_PER_TILE, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return build_imported(tmp_path_factory.mktemp("internvl"))


def build_imported(d):
    """A tiny InternVL (Qwen2 LM with tied embeddings, q/k norm, q/k/v bias) saved as transformers saves it, with a
    Qwen-style tokenizer carrying InternVL's image tokens, its processor settings and chat template; imported by
    `edgemm import` (tests/test_video.py builds one too)."""
    from click.testing import CliRunner
    from edgemm.cli import main
    from .test_tokenizers import QWEN2_SPLIT, _byte_level
    tok = _byte_level(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                                    "<video>"], 300, True, False, None)
    hf = _tiny(vocab=tok.get_vocab_size(with_added_tokens=True), image_token=tok.token_to_id("<IMG_CONTEXT>"),
               qk_norm=True, tie=True)                 # tied as InternVLConfig's default (and InternVL3-1B's LM)
    src = d / "src"
    hf.save_pretrained(src, safe_serialization=True)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "extra_special_tokens": IMAGE_TOKENS}))
    ids = tok.token_to_id
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
                                                            "pad_token_id": ids("<|endoftext|>")}))
    proc = _hf_processor(src)
    proc.image_processor.save_pretrained(src)
    (src / "processor_config.json").write_text(json.dumps({"image_seq_length": ROWS_PER_TILE,
                                                           "processor_class": "InternVLProcessor"}))
    (src / "chat_template.jinja").write_text(TEMPLATE)
    r = CliRunner().invoke(main, ["import", str(src), "-o", str(d / "ck")])
    assert r.exit_code == 0, r.output
    return {"hf": hf, "proc": proc, "src": src, "ck": d / "ck", "dir": d, "import_log": r.output}


def test_import_reads_the_family(imported):
    from edgemm.config import ModelConfig
    cfg = ModelConfig.load(imported["ck"] / "config.json")
    v = cfg.vision
    assert "as internvl" in imported["import_log"]
    assert (v.arch, v.tiling, v.min_tiles, v.max_tiles, v.qk_norm, v.qkv_bias) == ("internvit", "internvl", 1,
                                                                                      MAX_TILES, True, True)
    assert list(v.image_mean) == MEAN and list(v.image_std) == STD and cfg.adapter.kind == "pixel_shuffle"
    assert {"internvit vision tower", "pixel-shuffle projector", "dynamic tiles (internvl)", "qkv bias",
            "grouped-query attention"} <= set(cfg.variants())
    assert cfg.n_image_rows == (MAX_TILES + 1) * ROWS_PER_TILE
    assert "<img><image></img>" in (imported["ck"] / "chat_template.jinja").read_text()
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["info", "--model", str(imported["ck"])])
    assert r.exit_code == 0 and "vision: InternViT 16px/4" in r.output, r.output
    assert "at most 28 rows (7 tiles)" in r.output, r.output


def test_processor_matches_transformers(imported):
    """Tiles (pixels and count) equal the GotOcr2 image processor's for several aspect ratios, and the prompt ids
    equal InternVLProcessor's on the rendered chat template, <img> + <IMG_CONTEXT> x rows + </img>."""
    from PIL import Image
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.checkpoint import load_checkpoint
    from edgemm.tilings import preprocess_image
    m, tok = load_checkpoint(imported["ck"])
    proc, template = imported["proc"], (imported["ck"] / "chat_template.jinja").read_text()
    ctx = tok.tok.token_to_id("<IMG_CONTEXT>")
    for i, (w, h) in enumerate(SIZES + [(20, 44), (64, 14), (30, 31)]):
        img = _image(w, h, i)
        want = proc.image_processor(images=[Image.fromarray(img)], crop_to_patches=True, return_tensors="pt")
        px = preprocess_image(img, m.cfg.vision)             # the host's image path
        assert px.shape[0] == want["num_patches"][0] == proc.image_processor.get_number_of_image_patches(h, w, {
            "crop_to_patches": True}) == m.cfg.image_rows_for(w, h) // ROWS_PER_TILE
        assert np.abs(px - want["pixel_values"].numpy()).max() <= 1e-5
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        ids = proc(text=proc.apply_chat_template(msgs, add_generation_prompt=True), images=[Image.fromarray(img)],
                   return_tensors="pt")["input_ids"][0].tolist()
        openai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                               {"type": "text", "text": QUESTION}]}]
        segs = segments_template(tok, template, normalize_messages(openai))
        got = [t for k, x in segs for t in (x if k == "text" else [ctx] * m.cfg.image_rows_for(w, h))]
        assert got == ids and ids.count(ctx) == px.shape[0] * ROWS_PER_TILE


def _prompt(tok, template, rows):
    """The chat prompt around one image: segments with the image's rows."""
    from edgemm.chat_template import normalize_messages, segments_template
    openai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                           {"type": "text", "text": QUESTION}]}]
    return [(k, torch.tensor([x]) if k == "text" else rows) for k, x in
            segments_template(tok, template, normalize_messages(openai))]


def test_import_matches_transformers(imported):
    """Image rows, the prompt's logits (one tile; a 2 x 1 grid + thumbnail) and cached greedy decode steps equal
    transformers' InternVLForConditionalGeneration within 1e-4."""
    from PIL import Image
    from edgemm.checkpoint import load_checkpoint
    from edgemm.model import KVCache
    from edgemm.tilings import preprocess_image
    hf, proc = imported["hf"], imported["proc"]
    m, tok = load_checkpoint(imported["ck"])
    template = (imported["ck"] / "chat_template.jinja").read_text()
    ctx = tok.tok.token_to_id("<IMG_CONTEXT>")
    for i, (w, h) in enumerate(SIZES):
        img = _image(w, h, i)
        hf_in = proc(text=proc.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": QUESTION}]}], add_generation_prompt=True),
            images=[Image.fromarray(img)], return_tensors="pt")
        with torch.no_grad():
            want_rows = hf.model.get_image_features(pixel_values=hf_in["pixel_values"]).pooler_output.reshape(1, -1, 32)
            rows = m.encode_image(torch.from_numpy(preprocess_image(img, m.cfg.vision)))
        assert rows.shape == want_rows.shape == (1, m.cfg.image_rows_for(w, h), 32)
        assert (rows - want_rows).abs().max().item() <= 1e-4
        segs = _prompt(tok, template, rows)
        ids = [t for k, x in segs for t in (x[0].tolist() if k == "text" else [ctx] * x.shape[1])]
        assert ids == hf_in["input_ids"][0].tolist()
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids]), pixel_values=hf_in["pixel_values"]).logits[0]
            full = m.forward_full(segs)[0]
            assert full.shape == ref.shape and (full - ref).abs().max().item() <= 1e-4
            cache, pos = KVCache.empty(m.cfg.decoder, 1, len(ids) + 4), 0
            for k, x in segs:
                logits, pos = m.forward_segment(k, x, cache, pos)
            for _ in range(3):                          # cached greedy steps against transformers' full forward
                t = int(logits[0, -1].argmax())
                ids.append(t)
                ref = hf(input_ids=torch.tensor([ids]), pixel_values=hf_in["pixel_values"]).logits[0, -1]
                logits, pos = m.forward_segment("text", torch.tensor([[t]]), cache, pos)
                assert (logits[0, -1] - ref).abs().max().item() <= 1e-4


def test_exports_validate_and_answer(imported, monkeypatch):
    """`edgemm export --target onnx` (fp32 and int8) and `--target trt --no-build` (fp16 Q/DQ graphs) validate against
    the reference; `edgemm run --image` on the onnx fp32 bundle and the trt one (its graphs on the CPU) answers, the
    answer's ids being transformers' greedy ones (a 2 x 1 grid + thumbnail: three tiles through the vision stage);
    `--target gguf` writes the decoder for llama.cpp with the vision stage in ONNX (llama.cpp's internvl mmproj graph
    misorders positions: tests/test_internvl_gguf.py), and `edgemm run` on it gives the same ids."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from PIL import Image
    from click.testing import CliRunner
    from edgemm.cli import main
    from edgemm.generation import ChatSession
    d, ck, hf, proc = imported["dir"], imported["ck"], imported["hf"], imported["proc"]
    exports_validate(ck, d, None)
    from .test_import_llava import gguf_exports
    b, man, _ = gguf_exports(ck, d, ("f32",))["f32"]
    assert man["stages"]["vision"]["format"] == "onnx" and man["validation"]["passed"], man["validation"]
    w, h = SIZES[1]
    Image.fromarray(_image(w, h, 1)).save(d / "img.png")
    hf_in = proc(text=proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": ASK}]}], add_generation_prompt=True),
        images=[Image.open(d / "img.png")], return_tensors="pt")
    eos = set(json.loads((ck / "config.json").read_text())["tokens"]["eos"])

    def greedy(hf_in):
        ids, out = hf_in["input_ids"][0].tolist(), []
        with torch.no_grad():
            for _ in range(4):
                t = int(hf(input_ids=torch.tensor([ids]), pixel_values=hf_in["pixel_values"]).logits[0, -1].argmax())
                if t in eos:
                    break
                out.append(t)
                ids.append(t)
        return out
    want = greedy(hf_in)
    got, real = [], ChatSession._generate

    def recording(self, *a, **k):                   # the answer's ids (its text may end mid-character)
        ans = real(self, *a, **k)
        got.append(ans.ids)
        return ans
    monkeypatch.setattr(ChatSession, "_generate", recording)
    run = ["run", "--image", str(d / "img.png"), "--max-new-tokens", "4", "--device", "cpu"]
    for bundle, backend in (("onnx-fp32", "ort"), ("trt-fp16", "trt"), ("gguf-f32", "llamacpp")):
        r = CliRunner().invoke(main, run + ["--bundle", str(d / bundle), "--backend", backend, ASK])
        assert r.exit_code == 0, r.output
    assert got == [want, want, want], (got, want)
    from .test_smolvlm import _served_answer                # `edgemm serve` of the onnx bundle: the same answer
    _served_answer(d / "onnx-fp32", d / "img.png", len(hf_in["input_ids"][0]), want,
                   json.loads((ck / "config.json").read_text())["tokens"], question=ASK)
    # --max-tiles 1: one tile, as the processor with max_patches 1; a trt bundle refuses more tiles than its profiles
    r = CliRunner().invoke(main, run + ["--bundle", str(d / "onnx-fp32"), "--max-tiles", "1", ASK])
    assert r.exit_code == 0, r.output
    one = proc(text=proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": ASK}]}], add_generation_prompt=True),
        images=[Image.open(d / "img.png")], max_patches=1, return_tensors="pt")
    assert one["pixel_values"].shape[0] == 1 and got[-1] == greedy(one) != want, (got[-1], greedy(one), want)
    r = CliRunner().invoke(main, run + ["--bundle", str(d / "trt-fp16"), "--backend", "trt", "--max-tiles",
                                        str(MAX_TILES + 1), ASK])
    assert r.exit_code == 2 and f"profiles stop at {MAX_TILES + 1}" in r.output, r.output
