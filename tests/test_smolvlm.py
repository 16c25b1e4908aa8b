"""SmolVLM / Idefics3 (transformers' SmolVLMForConditionalGeneration and Idefics3ForConditionalGeneration, Llama
language model): the connector's pixel shuffle against transformers' own, the tile grid and prompt expansion against
its Idefics3 image processor and SmolVLMProcessor, and the imported family against the whole model (image rows with
the tile markers, logits, cached decode steps), exported to onnx and run."""
import json

import numpy as np
import pytest
import torch

from .test_import_llava import away_from_init, greedy_ids, logits_and_cached_steps_match, bundles_answer, exports_validate

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

S, PATCH, SCALE = 16, 4, 2      # tiles of 16 px, 4 x 4 patches, 2 x 2 rows per tile after the pixel shuffle
ROWS_PER_TILE = 4
LONGEST = 32                    # the first resize's longest edge: grids up to 2 x 2 tiles
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
GRID = 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>",
            "<image>"] + [f"<row_{i}_col_{j}>" for i in range(1, GRID + 1) for j in range(1, GRID + 1)]
# SmolVLM-256M-Instruct's chat template (SmolVLMProcessor's, without its video branch)
TEMPLATE = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is "
            "string %}{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}"
            "{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
            "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
            "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
QUESTION = "what color is the circle?"
SIZES = [(40, 20), (30, 30)]    # (width, height): a 1 x 2 grid + the whole image; 2 x 2 + the whole image


def _tiny(vocab=300, image_token=3, seed=0, tie=False, idefics3=False):
    from transformers import LlamaConfig
    if idefics3:
        from transformers import Idefics3Config as Config, Idefics3ForConditionalGeneration as Model
        from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig as VisionConfig
    else:
        from transformers import SmolVLMConfig as Config, SmolVLMForConditionalGeneration as Model
        from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig as VisionConfig
    text = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                       tie_word_embeddings=tie)
    vision = VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                          image_size=S, patch_size=PATCH, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    cfg = Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=SCALE,
                 image_token_id=image_token, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return away_from_init(Model(cfg).eval(), seed)     # every weight away from its init (norms, positions)


def test_pixel_shuffle_matches_transformers():
    """The shared pixel shuffle equals Idefics3Connector.pixel_shuffle (and so InternVL's steps, the same ones)."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    from edgemm.blocks.connectors import pixel_shuffle
    x = torch.randn(3, 36, 8, generator=torch.Generator().manual_seed(0))
    for r in (2, 3):
        want = Idefics3Connector.pixel_shuffle(None, x, r)
        assert torch.equal(pixel_shuffle(x, 6, r), want)


def test_tower_positions_match_transformers():
    """The SigLIP tower with the import's gathered position rows equals SmolVLMVisionTransformer's last_hidden_state
    on full tiles where the bucketed position ids are not the identity (19 patches a side: 37 rows move)."""
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer
    import edgemm.model  # noqa: F401 (registers the blocks)
    from edgemm.blocks import registry
    from edgemm.config import VisionConfig
    from edgemm.families.smolvlm import _positions

    class Cfg:
        vision = VisionConfig(image_size=38, patch_size=2, width=24, layers=1, heads=2, mlp_dim=48, eps=1e-6,
                              arch="siglip", feature_layer=1, post_norm=True)
    torch.manual_seed(0)
    hf = away_from_init(SmolVLMVisionTransformer(SmolVLMVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=38,
        patch_size=2, layer_norm_eps=1e-6)).eval())
    sd = hf.state_dict()
    tower = registry.get("vision", "siglip").from_config(Cfg).eval()
    mine = {"pos": _positions([sd["embeddings.position_embedding.weight"]]),
            "post_norm.weight": sd["post_layernorm.weight"], "post_norm.bias": sd["post_layernorm.bias"]}
    for n in ("weight", "bias"):
        mine[f"patch_embed.{n}"] = sd[f"embeddings.patch_embedding.{n}"]
        s = "encoder.layers.0."
        mine[f"blocks.0.qkv.{n}"] = torch.cat([sd[s + f"self_attn.{x}_proj.{n}"] for x in "qkv"])
        for ours, theirs in (("proj", "self_attn.out_proj"), ("ln1", "layer_norm1"), ("ln2", "layer_norm2"),
                             ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            mine[f"blocks.0.{ours}.{n}"] = sd[s + f"{theirs}.{n}"]
    tower.load_state_dict(mine, strict=True)
    px = torch.randn(2, 3, 38, 38, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(pixel_values=px).last_hidden_state, tower(px)
    assert (got - want).abs().max().item() <= 1e-5
    pos = _positions([torch.arange(19 * 19.0)[:, None]])[0, :, 0]
    assert (pos != torch.arange(19 * 19.0)).sum() == 37       # (the plain table would not do)


# --------------------------------------------------------------------------- the family: import, processor, export
def _image(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


class _NoVideo:                 # SmolVLMProcessor reads its video processor's defaults even for images
    num_frames, fps = None, None


def _hf_processor(src, idefics3=False, splitting=True):
    """transformers' SmolVLMProcessor (or Idefics3Processor) over the saved tokenizer and the PIL image processor."""
    from transformers import AutoTokenizer
    ip_kw = dict(size={"longest_edge": LONGEST}, max_image_size={"longest_edge": S}, image_mean=MEAN, image_std=STD,
                 do_image_splitting=splitting)
    tok = AutoTokenizer.from_pretrained(src)
    if idefics3:
        from transformers import Idefics3ImageProcessorPil, Idefics3Processor
        return Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**ip_kw), tokenizer=tok,
                                 image_seq_len=ROWS_PER_TILE, chat_template=TEMPLATE)
    import transformers.models.smolvlm.processing_smolvlm as psm
    from transformers import SmolVLMImageProcessorPil, SmolVLMProcessor
    psm.num2words = psm.num2words or str                # (videos only; not installed here)

    class Processor(SmolVLMProcessor):          # no torchvision here: no video processor, whose class check fails
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)
    return Processor(image_processor=SmolVLMImageProcessorPil(**ip_kw), tokenizer=tok, video_processor=_NoVideo(),
                     image_seq_len=ROWS_PER_TILE, chat_template=TEMPLATE)


def save_tokenizer(tok, src):
    """The tokenizer as SmolVLM ships it: tokenizer.json, tokenizer_config.json with its special tokens, and
    generation_config.json's eos / pad (benchmarks/bench_family_shapes.py writes its checkpoint with this too)."""
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "extra_special_tokens": {
            "fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
            "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"}}))
    ids = tok.token_to_id
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids("<end_of_utterance>")],
                                                            "pad_token_id": ids("<|endoftext|>")}))


def _double_newline(tok):
    """The tokenizer with "\\n\\n" as one token (Ċ Ċ, in the last merge's place), as SmolVLM's (GPT-2's) has it:
    llama.cpp's mtmd looks that token up for the idefics3 prompt and has no other way to write it."""
    from tokenizers import Tokenizer
    d = json.loads(tok.to_str())
    vocab, merges = d["model"]["vocab"], d["model"]["merges"]
    last = "".join(merges.pop())                # the last merge's token gives its id to "ĊĊ"
    vocab["ĊĊ"] = vocab.pop(last)
    merges.append(["Ċ", "Ċ"])
    return Tokenizer.from_str(json.dumps(d))


def _save(d, idefics3=False, splitting=True, tie=False, newlines=False):
    """A tiny SmolVLM (or Idefics3) saved as transformers saves it, with a byte-level tokenizer carrying its special
    tokens (newlines: and "\\n\\n", _double_newline), its processor settings and chat template; imported by
    `edgemm import`."""
    from click.testing import CliRunner
    from edgemm.cli import main
    from .test_tokenizers import QWEN2_SPLIT, _byte_level
    tok = _byte_level(QWEN2_SPLIT, SPECIALS, 300, False, False, None)
    tok = _double_newline(tok) if newlines else tok
    hf = _tiny(vocab=tok.get_vocab_size(with_added_tokens=True), image_token=tok.token_to_id("<image>"), tie=tie,
               idefics3=idefics3)
    src = d / "src"
    hf.save_pretrained(src, safe_serialization=True)
    save_tokenizer(tok, src)
    proc = _hf_processor(src, idefics3, splitting)
    proc.image_processor.save_pretrained(src)
    (src / "processor_config.json").write_text(json.dumps({"image_seq_len": ROWS_PER_TILE}))
    (src / "chat_template.jinja").write_text(TEMPLATE)
    r = CliRunner().invoke(main, ["import", str(src), "-o", str(d / "ck")])
    assert r.exit_code == 0, r.output
    return {"hf": hf, "proc": proc, "src": src, "ck": d / "ck", "dir": d, "import_log": r.output}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("smolvlm"))


def _messages(openai=False):
    img = {"type": "image_url", "image_url": {"url": "x"}} if openai else {"type": "image"}
    return [{"role": "user", "content": [img, {"type": "text", "text": QUESTION}]}]


def _segments(tok, template, rows):
    """The chat prompt around one image (edgemm's path): segments with the image's rows."""
    from edgemm.chat_template import normalize_messages, segments_template
    return [(k, torch.tensor([x]) if k == "text" else rows) for k, x in
            segments_template(tok, template, normalize_messages(_messages(True)))]


def test_import_reads_the_family(imported):
    from edgemm.config import ModelConfig
    cfg = ModelConfig.load(imported["ck"] / "config.json")
    v = cfg.vision
    assert "as smolvlm" in imported["import_log"]
    assert (v.arch, v.tiling, v.post_norm, v.longest_edge, v.image_splitting) == ("siglip", "smolvlm", True, LONGEST,
                                                                                  True)
    assert list(v.image_mean) == MEAN and cfg.adapter.kind == "pixel_shuffle_linear"
    assert {"siglip vision tower", "pixel-shuffle linear projector", "tile grid (smolvlm)",
            "grouped-query attention"} <= set(cfg.variants())
    t = cfg.vision.tile_text            # the largest grid: 2 x 2 tiles, each after its markers, then the whole image
    assert cfg.n_image_rows == sum(map(len, t["tile"])) + 4 * 4 + len(t["global_split"]) + 4 + len(t["end"])
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["info", "--model", str(imported["ck"])])
    assert r.exit_code == 0 and "vision: SigLIP 16px/4" in r.output, r.output


@pytest.mark.parametrize("name,change,says", [
    ("preprocessor_config.json", {"resample": 3}, "resample"),
    ("preprocessor_config.json", {"max_image_size": {"longest_edge": 2 * S}}, "max_image_size"),
    ("processor_config.json", {"image_seq_len": 9}, "image_seq_len 9")])
def test_import_refuses_other_processing(imported, tmp_path, name, change, says):
    """A processor setting edgemm does not compute (another resample filter, tiles of another size than the tower's,
    an image_seq_len that is not the tile's rows) is refused at import, naming it."""
    import shutil
    from click.testing import CliRunner
    from edgemm.cli import main
    src = tmp_path / "src"
    shutil.copytree(imported["src"], src)
    (src / name).write_text(json.dumps({**json.loads((src / name).read_text()), **change}))
    r = CliRunner().invoke(main, ["import", str(src), "-o", str(tmp_path / "ck")])
    assert r.exit_code == 2 and says in r.output, r.output


def test_processor_matches_transformers(imported):
    """Tiles (pixels, count and grid) equal the Idefics3 image processor's for several aspect ratios, and the prompt
    ids equal SmolVLMProcessor's on the rendered chat template (the tile markers around each tile's <image> run)."""
    from PIL import Image
    from edgemm.tilings import preprocess_image
    from edgemm.checkpoint import load_checkpoint
    from edgemm.smolvlm_tiles import row_index
    m, tok = load_checkpoint(imported["ck"])
    proc, template = imported["proc"], (imported["ck"] / "chat_template.jinja").read_text()
    for i, (w, h) in enumerate(SIZES + [(20, 44), (64, 14), (31, 30), (12, 9)]):
        img = Image.fromarray(_image(w, h, i))
        want = proc.image_processor(images=[img], return_row_col_info=True, return_tensors="pt")
        px = preprocess_image(img, m.cfg.vision)             # the host's image path
        assert (want["rows"][0][0], want["cols"][0][0]) == px.grid
        assert px.shape == want["pixel_values"].shape[1:] and np.abs(px - want["pixel_values"][0].numpy()).max() <= 1e-5
        assert bool(want["pixel_attention_mask"].all())
        ids = proc(text=proc.apply_chat_template(_messages(), add_generation_prompt=True), images=[img],
                   return_tensors="pt")["input_ids"][0].tolist()
        N, R = px.shape[0], ROWS_PER_TILE
        image_id = tok.tok.token_to_id("<image>")
        rows = [image_id if j < N * R else m.cfg.adapter.marker_ids[j - N * R] for j in row_index(m.cfg, *px.grid)]
        segs = _segments(tok, template, None)
        got = [t for k, x in segs for t in (x[0].tolist() if k == "text" else rows)]
        assert got == ids and ids.count(image_id) == N * R and len(rows) == m.cfg.image_rows_for(w, h)


def test_tiles_at_smolvlm_256m_settings():
    """At SmolVLM-256M's processor settings (longest edge 2048, 512 px tiles, LANCZOS) the tiles and grids equal the
    image processor's: a 3 x 4 grid and a 4 x 1 one."""
    from PIL import Image
    from transformers import SmolVLMImageProcessorPil
    from edgemm.config import VisionConfig
    from edgemm.smolvlm_tiles import preprocess
    ip = SmolVLMImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}, resample=1)
    v = VisionConfig(image_size=512, patch_size=16, arch="siglip", tiling="smolvlm", longest_edge=2048)
    for i, (w, h, grid) in enumerate([(1000, 700, (3, 4)), (300, 1600, (4, 1))]):
        img = Image.fromarray(_image(w, h, i))
        want = ip(images=[img], return_row_col_info=True, return_tensors="np")
        px = preprocess(img, v)
        assert px.grid == (want["rows"][0][0], want["cols"][0][0]) == grid
        assert px.shape == want["pixel_values"].shape[1:] and np.abs(px - want["pixel_values"][0]).max() <= 1e-5


def _reference(hf, proc, img):
    """transformers' prompt ids, pixel values and the rows its language model reads at the image's span."""
    hf_in = proc(text=proc.apply_chat_template(_messages(), add_generation_prompt=True), images=[img],
                 return_tensors="pt")
    ids = hf_in["input_ids"]
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=hf_in["pixel_values"]).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        emb = hf.model.get_input_embeddings()(ids)
        emb[ids == hf.config.image_token_id] = feats
    return hf_in, emb


def _logits(hf, hf_in):
    """ids -> transformers' logits [T, vocab] with the image's pixels."""
    return lambda ids: hf(input_ids=torch.tensor([ids]), pixel_values=hf_in["pixel_values"]).logits[0]


def _check_family(imported, sizes):
    """Image rows (tile rows and the markers between them), the prompt's logits and cached greedy decode steps equal
    transformers' within 1e-4."""
    from PIL import Image
    from edgemm.tilings import image_rows
    from edgemm.checkpoint import load_checkpoint
    from runtimes.torch_backend import TorchBackend
    hf, proc = imported["hf"], imported["proc"]
    m, tok = load_checkpoint(imported["ck"])
    b = TorchBackend.open(model=str(imported["ck"]), device="cpu")
    template = (imported["ck"] / "chat_template.jinja").read_text()
    for i, (w, h) in enumerate(sizes):
        img = Image.fromarray(_image(w, h, i))
        hf_in, emb = _reference(hf, proc, img)
        with torch.no_grad():
            rows = torch.from_numpy(np.asarray(image_rows(b, img), np.float32))      # the host's image path
        segs = _segments(tok, template, rows)
        ids, k0 = hf_in["input_ids"][0].tolist(), len(segs[0][1][0])
        assert segs[0][0] == "text" and segs[1][0] == "image" and rows.shape[1] == m.cfg.image_rows_for(w, h)
        assert (rows[0] - emb[0, k0:k0 + rows.shape[1]]).abs().max().item() <= 1e-4
        assert [t for k, x in segs if k == "text" for t in x[0].tolist()] == ids[:k0] + ids[k0 + rows.shape[1]:]
        logits_and_cached_steps_match(m, segs, ids, _logits(hf, hf_in))


def test_import_matches_transformers(imported):
    """SmolVLMForConditionalGeneration: a 1 x 2 grid and a 2 x 2 grid (+ the whole image each)."""
    _check_family(imported, SIZES)


def test_idefics3_import_matches_transformers(tmp_path):
    """Idefics3ForConditionalGeneration with tied embeddings and do_image_splitting off: the whole image alone."""
    d = _save(tmp_path, idefics3=True, splitting=False, tie=True)
    assert "as smolvlm" in d["import_log"]
    _check_family(d, [(40, 20)])


def test_exports_validate_and_answer(imported, monkeypatch):
    """`edgemm export --target onnx` (fp32 and int8) and `--target trt --no-build` (fp16 Q/DQ graphs) validate
    against the reference; `edgemm run --image` on the onnx fp32 bundle and the trt one (its graphs on the CPU)
    answers transformers' greedy ids (a 1 x 2 grid + the whole image: three tiles, their markers between them);
    gguf: the test_gguf_* tests."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from PIL import Image
    d, ck, hf, proc = imported["dir"], imported["ck"], imported["hf"], imported["proc"]
    exports_validate(ck, d, None)
    w, h = SIZES[0]
    Image.fromarray(_image(w, h, 7)).save(d / "img.png")
    hf_in, _ = _reference(hf, proc, Image.open(d / "img.png"))
    eos = set(json.loads((ck / "config.json").read_text())["tokens"]["eos"])
    want = greedy_ids(_logits(hf, hf_in), hf_in["input_ids"][0].tolist(), eos)
    bundles_answer(monkeypatch, d, d / "img.png", QUESTION, want)
    _served_answer(d / "onnx-fp32", d / "img.png", len(hf_in["input_ids"][0]), want,
                   json.loads((ck / "config.json").read_text())["tokens"])


def _served_answer(bundle, image, prompt_tokens, want, tokens, question=QUESTION):
    """`edgemm serve` of the bundle answers the image question with transformers' greedy tokens, counting the
    prompt's tokens as transformers' processor does (the tile markers included; test_fuyu's: its newline rows)."""
    from edgemm.generation import TextStream
    from edgemm.tokenizer import Tokenizer
    from .test_serve import served_reply
    r = served_reply(bundle, image, question, 4)
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == len(want)
    text = TextStream(Tokenizer.load(bundle / "tokenizer.json", tokens=tokens))    # want's text as a stream shows
    for t in want:                  # it (a random model's byte tokens may form no whole character, where a
        text.add(t)                 # decode of all ids at once can differ from the pieces a stream sent)
    text.finish()
    assert r.choices[0].message.content.strip() == text.text.strip()


# --------------------------------------------------------------------------- gguf (llama.cpp's llama + idefics3)
@pytest.fixture(scope="module")
def gguf_bundles(imported):
    """`edgemm export --target gguf` at f32 and q8_0."""
    from .test_import_llava import gguf_exports
    return gguf_exports(imported["ck"], imported["dir"])


def test_gguf_files_are_llama_cpps_idefics3(imported, gguf_bundles):
    """The decoder as llama.cpp's llama, the mmproj as the converter's SmolVLMModel writes it (projector idefics3,
    scale factor 2, preproc_image_size = longest_edge, mm.model.fc); the f32 export validates (the decoder on the
    reference's rows within 1e-4; the mmproj's weights through the reference code, as the backend runs the host's
    tiles, within 1e-5) and so does q8_0."""
    from gguf import GGUFReader
    hf = imported["hf"]
    d, man, _ = gguf_bundles["f32"]
    assert man["stages"]["decoder"]["format"] == "gguf (arch llama)"
    v = GGUFReader(str(d / man["stages"]["vision"]["file"]))
    f = v.fields
    assert (f["clip.projector_type"].contents(), f["clip.vision.projector.scale_factor"].contents(),
            f["clip.vision.preproc_image_size"].contents()) == ("idefics3", SCALE, LONGEST)
    tv = {x.name: np.asarray(x.data).reshape([int(s) for s in reversed(x.shape)]) for x in v.tensors}
    assert np.array_equal(tv["mm.model.fc.weight"], hf.model.connector.modality_projection.proj.weight.detach().numpy())
    val = man["validation"]
    assert val["passed"] and val["tokenization_equal"], val
    assert val["text_max_abs"] < 1e-4 and val["image_max_abs"] < 1e-4, val
    assert val["vision_rows_reference_code_max_abs"] < 1e-5, val
    assert gguf_bundles["q8_0"][1]["validation"]["passed"]


def test_gguf_run_image_answers_as_transformers(imported, gguf_bundles, monkeypatch):
    """`edgemm run --image` on the f32 and q8_0 gguf bundles (edgemm's llamacpp backend: the host's tiles through
    the mmproj's weights, the marker rows from the decoder's token_embd) answers transformers' greedy ids on a
    wide image (a 1 x 2 grid + the whole image) at f32."""
    from PIL import Image
    from .test_import_llava import gguf_bundles_answer
    d, ck, hf, proc = imported["dir"], imported["ck"], imported["hf"], imported["proc"]
    Image.fromarray(_image(40, 20, 7)).save(d / "img-gguf.png")
    hf_in, _ = _reference(hf, proc, Image.open(d / "img-gguf.png"))
    eos = set(json.loads((ck / "config.json").read_text())["tokens"]["eos"])
    want = greedy_ids(_logits(hf, hf_in), hf_in["input_ids"][0].tolist(), eos)
    gguf_bundles_answer(monkeypatch, gguf_bundles, d / "img-gguf.png", QUESTION, want)


def _stock_mtmd(decoder, mmproj, text: str, png: bytes, steps: int):
    """Stock llama-cpp-python's low-level API (no edgemm code): the prompt `text` (its image as mtmd's media marker)
    tokenized by mtmd_tokenize with the image, evaluated by mtmd_helper_eval_chunks (f32 KV cache, flash attention
    off), then `steps` greedy tokens. -> (prompt ids, the image's rows as None each, last prompt logits, tokens)."""
    import ctypes
    import llama_cpp
    from llama_cpp import Llama, mtmd_cpp as m
    llm = Llama(model_path=str(decoder), n_ctx=256, n_threads=2, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False)
    p = m.mtmd_context_params_default()
    p.use_gpu, p.print_timings, p.n_threads, p.warmup = False, False, 2, False
    p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = m.mtmd_init_from_file(str(mmproj).encode(), llm.model, p)
    buf = (ctypes.c_uint8 * len(png)).from_buffer(bytearray(png))
    bmp = m.mtmd_helper_bitmap_init_from_buf(ctx, buf, len(png), False)
    chunks = m.mtmd_input_chunks_init()
    try:
        marker = m.mtmd_default_marker().decode()
        raw = text.replace("<image>", marker).encode()
        t = m.mtmd_input_text()
        t.text, t.text_len, t.add_special, t.parse_special = raw, len(raw), False, True
        assert m.mtmd_tokenize(ctx, chunks, ctypes.byref(t), (m.mtmd_bitmap_p_ctypes * 1)(bmp), 1) == 0
        ids = []
        for i in range(m.mtmd_input_chunks_size(chunks)):
            ch = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(ch) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                tp = m.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                ids += [int(tp[j]) for j in range(n.value)]
            else:
                ids += [None] * m.mtmd_input_chunk_get_n_tokens(ch)
        n_past = llama_cpp.llama_pos(0)
        assert m.mtmd_helper_eval_chunks(ctx, llm._ctx.ctx, chunks, 0, 0, 256, True, ctypes.byref(n_past)) == 0
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                       shape=(llm.n_vocab(),)).astype(np.float32)
        llm.n_tokens, out, z = n_past.value, [], logits
        for _ in range(steps):
            out.append(int(z.argmax()))
            llm.eval([out[-1]])
            z = np.asarray(llm.scores[llm.n_tokens - 1], np.float32)
        return ids, logits, out
    finally:
        m.mtmd_input_chunks_free(chunks)
        m.mtmd_bitmap_free(bmp)
        m.mtmd_free(ctx)
        llm.close()


def test_gguf_stock_llama_cpp_agrees_with_transformers(tmp_path):
    """The f32 files in stock llama-cpp-python's low-level mtmd API (mtmd tiles the image itself: 1 x 2 tiles + the
    overview here, with its idefics3 markers) on transformers' own chat prompt against
    SmolVLMForConditionalGeneration: the same prompt ids (the image's rows where transformers puts <image>), logits
    within 1e-3 (ggml's fp16-table GELU) and the same greedy tokens. Its tokenizer has "\\n\\n" as one token
    (_double_newline): mtmd writes the overview's "\\n\\n" as that token, and a vocabulary without it gets a
    null token there (llama_decode fails). (llama-cpp-python's MTMDChatHandler renders an image part as a text part,
    so SmolVLM's template then writes "User: " where transformers writes "User:" before the image.)"""
    import io
    from PIL import Image
    from click.testing import CliRunner
    from edgemm.cli import main
    from edgemm.llamacpp import load_llama_cpp
    imported = _save(tmp_path, newlines=True)
    hf, proc, d = imported["hf"], imported["proc"], tmp_path / "gguf"
    r = CliRunner().invoke(main, ["export", "--model", str(imported["ck"]), "--target", "gguf", "--precision", "f32",
                                  "-o", str(d)])
    assert r.exit_code == 0, r.output
    man = json.loads((d / "edgemm.json").read_text())
    img = _image(40, 20, 7)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    load_llama_cpp()
    hf_in, _ = _reference(hf, proc, Image.fromarray(img))
    want_ids = hf_in["input_ids"][0].tolist()
    ids, stock, answer = _stock_mtmd(d / man["stages"]["decoder"]["file"], d / man["stages"]["vision"]["file"],
                                     proc.apply_chat_template(_messages(), add_generation_prompt=True),
                                     buf.getvalue(), 3)
    image = hf.config.image_token_id
    assert [image if t is None else t for t in ids] == want_ids
    logits = _logits(hf, hf_in)
    eos = set(json.loads((imported["ck"] / "config.json").read_text())["tokens"]["eos"])
    with torch.no_grad():
        want = logits(want_ids)[-1].numpy()
        assert stock.argmax() == want.argmax() and np.abs(stock - want).max() < 1e-3
        greedy = greedy_ids(logits, want_ids, eos, 3)
    assert answer[:len(greedy)] == greedy and greedy
