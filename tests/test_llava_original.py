"""LLaVA's original repository layout (haotian-liu/LLaVA: LLaVA v1's single Linear, LLaVA-1.5's mlp2x_gelu) and
Yi-VL's (01-ai/Yi VL: mlp2x_gelu_Norm, the tower in vit/): tiny checkpoints written in those layouts here, imported,
checked against transformers' LlavaForConditionalGeneration built from the same weights (Yi-VL's projector: the
released builder's nn.Sequential put in its place), exported to gguf and run in stock llama-cpp-python, and
answered by `edgemm run --image` from an onnx bundle."""
from __future__ import annotations

import base64
import importlib.util
import io
import json

import numpy as np
import pytest
import torch

from edgemm.errors import EdgemmError

from .test_gguf_llava import QUESTION, _image, _pixels, _stock_prompt_ids
from .test_import_llava import LLAVA_TEMPLATE, away_from_init

pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
IMAGE_TOKEN = 3
YI_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
YI_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}"
               "{% if p['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% for p in m['content'] %}"
               "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# the three layouts: (mm_projector_type, where the tower's weights are, mm_vision_tower, family)
LAYOUTS = {"v1": ("linear", "checkpoint", "openai/clip-tiny", "llava_v1"),
           "v15": ("mlp2x_gelu", "folder", "openai/clip-tiny", "llava_original"),
           "yi": ("mlp2x_gelu_Norm", "folder", "./vit/clip-vit-H-14-tiny-yi-vl", "yi_vl")}


def yi_projector(W: int, D: int) -> torch.nn.Sequential:
    """01-ai/Yi's build_vision_projector for 'mlp2x_gelu_Norm' (VL/llava/model/multimodal_projector/builder.py)."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(W, D), nn.LayerNorm(D), nn.GELU(), nn.Linear(D, D), nn.LayerNorm(D))


def _tiny_hf(layout: str, seed: int = 0):
    """transformers' LLaVA (Llama with GQA, a quick_gelu CLIP tower) whose projector computes the layout's:
    v1's single Linear as linear_1 -> identity -> linear_2 = I (zero bias), Yi's as the released nn.Sequential."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    text = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, rope_theta=5e6 if layout == "yi" else 1e4)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                              image_size=16, patch_size=4, hidden_act="quick_gelu", projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=-1 if layout == "yi" else -2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration(cfg).eval()
    if layout == "yi":
        hf.model.multi_modal_projector = yi_projector(24, 32)
    hf = away_from_init(hf, seed)           # LayerNorm weights and biases too, well away from 1 and 0
    if layout == "v1":
        pj = hf.model.multi_modal_projector
        pj.act = torch.nn.Identity()
        with torch.no_grad():
            pj.linear_2.weight.copy_(torch.eye(32))
            pj.linear_2.bias.zero_()
    return hf


def _projector_tensors(hf, layout: str) -> dict:
    pj = hf.model.multi_modal_projector
    if layout == "v1":
        return {"model.mm_projector.weight": pj.linear_1.weight, "model.mm_projector.bias": pj.linear_1.bias}
    if layout == "v15":
        return {f"model.mm_projector.{i}.{n}": getattr(getattr(pj, m), n)
                for i, m in ((0, "linear_1"), (2, "linear_2")) for n in ("weight", "bias")}
    return {f"model.mm_projector.{k}": v for k, v in pj.state_dict().items()}


def write_original(hf, layout: str, d, yi_tokenizer: bool = False, start_end: bool = False):
    """The checkpoint as the released code saves it: flat Llama config.json with the mm_* keys, model.* + lm_head,
    model.mm_projector.*, the tower's weights in the checkpoint (model.vision_tower.vision_tower.vision_model.*,
    beside a folder with its config.json) or in its own folder (CLIPVisionModel.save_pretrained)."""
    from safetensors.torch import save_file
    pt, where, tower, _ = LAYOUTS[layout]
    tc = hf.config.text_config
    sd = {}
    for k, v in hf.state_dict().items():
        if k.startswith("model.language_model."):
            sd["model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            sd[k] = v
        elif k.startswith("model.vision_tower.") and where == "checkpoint":
            sd["model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower."):]] = v
    sd.update(_projector_tensors(hf, layout))
    d.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    folder = d / (tower[2:] if tower.startswith("./") else tower)
    folder.mkdir(parents=True)
    hf.config.vision_config.to_json_file(folder / "config.json")
    if where == "folder":                                   # as the hub's CLIP checkpoints name them
        save_file({"vision_model." + k: v.detach().contiguous() for k, v in hf.model.vision_tower.state_dict().items()},
                  str(folder / "model.safetensors"))
    cfg = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu",
           "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
           "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads,
           "num_key_value_heads": tc.num_key_value_heads, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 5e6 if layout == "yi" else 1e4, "tie_word_embeddings": False, "attention_bias": False,
           "mm_vision_tower": tower, "mm_hidden_size": 24, "mm_projector_type": pt,
           "mm_vision_select_layer": hf.config.vision_feature_layer, "mm_vision_select_feature": "patch",
           "mm_use_im_start_end": start_end, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
           "use_mm_proj": True}
    (d / "config.json").write_text(json.dumps(cfg))
    _write_tokenizer(d, yi_tokenizer, start_end)
    return d


def _write_tokenizer(d, yi: bool, start_end: bool) -> None:
    """A byte-level BPE with LLaMA's <s> / </s> (LLaVA v1, the USER/ASSISTANT template) or with Yi's
    <|startoftext|> / <|endoftext|> / <|im_start|> / <|im_end|> (a ChatML template)."""
    from edgemm import shapes
    from edgemm.tokenizer import train_tokenizer
    extra = YI_SPECIALS if yi else ["<im_start>", "<im_end>"] if start_end else []
    tok = train_tokenizer(shapes.corpus_lines(), 512 - len(extra))
    tok.add_special_tokens(extra)
    tok.save(str(d / "tokenizer.json"))
    tc = {"chat_template": YI_TEMPLATE, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
          "pad_token": "<pad>"} if yi else {"chat_template": LLAVA_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>",
                                           "pad_token": "<pad>"}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def imported(request, tmp_path_factory):
    from edgemm.importers import import_checkpoint
    layout = request.param
    d = tmp_path_factory.mktemp(f"orig-{layout}")
    hf = _tiny_hf(layout)
    src = write_original(hf, layout, d / "src", yi_tokenizer=layout == "yi")
    summary = import_checkpoint(src, d / "ck", log=None)
    return {"layout": layout, "hf": hf, "src": src, "ck": d / "ck", "dir": d, "summary": summary}


# --------------------------------------------------------------------------- blocks
def test_projectors_equal_the_released_equations():
    """LinearProjector and MlpNormProjector against the released builders' modules (nn.Linear; Yi's nn.Sequential
    of Linear, LayerNorm, GELU, Linear, LayerNorm) loaded with the same random weights."""
    from edgemm.blocks.connectors import LinearProjector, MlpNormProjector
    from edgemm.config import AdapterConfig
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g)
    lin = torch.nn.Linear(24, 32)
    ours = LinearProjector(AdapterConfig(kind="linear"), 24, 32)
    ours.load_state_dict({"linear.weight": lin.weight, "linear.bias": lin.bias})
    yi = away_from_init(yi_projector(24, 32))
    mine = MlpNormProjector(AdapterConfig(kind="mlp_norm", gelu="erf"), 24, 32)
    mine.load_state_dict({f"{m}.{n}": yi.state_dict()[f"{i}.{n}"] for i, m in
                          ((0, "linear_1"), (1, "norm_1"), (3, "linear_2"), (4, "norm_2")) for n in ("weight", "bias")})
    with torch.no_grad():
        assert (ours(x) - lin(x)).abs().max() <= 1e-6
        assert (mine(x) - yi(x)).abs().max() <= 1e-5
        assert (yi[1].weight - 1).abs().min() > 0                  # the norms' weights are not at their init


# --------------------------------------------------------------------------- import
def test_import_matches_transformers(imported):
    """The imported model's logits (full forward and cached steps) against transformers' LLaVA over the same weights
    (tower, projector, Llama with GQA), an image between text; the family and projector as the layout says."""
    from edgemm.checkpoint import load_checkpoint
    from .test_import_llava import logits_and_cached_steps_match
    layout, hf = imported["layout"], imported["hf"]
    pt, where, _, family = LAYOUTS[layout]
    assert imported["summary"]["family"] == family
    m, _ = load_checkpoint(imported["ck"])
    assert m.cfg.adapter.kind == {"linear": "linear", "mlp2x_gelu": "mlp", "mlp2x_gelu_Norm": "mlp_norm"}[pt]
    assert m.cfg.vision.feature_layer == (3 if layout == "yi" else 2) and m.cfg.n_image_rows == 16
    assert m.cfg.decoder.rope_theta == (5e6 if layout == "yi" else 1e4)
    if where == "folder":
        assert "vision_model.post_layernorm.weight" in imported["summary"]["not_imported"]      # the folder's
    from edgemm.info import checkpoint_param_counts
    assert checkpoint_param_counts(imported["ck"]) == m.param_counts()
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["info", "--model", str(imported["ck"])])
    assert r.exit_code == 0 and "-> 16 image rows\n" in r.output and "targets: onnx, trt, gguf\n" in r.output, r.output
    g = torch.Generator().manual_seed(5)
    px = torch.randn(1, 3, 16, 16, generator=g)
    pre, post = [1] + torch.randint(10, 500, (4,), generator=g).tolist(), torch.randint(10, 500, (5,), generator=g)
    ids = pre + [IMAGE_TOKEN] * 16 + post.tolist()
    with torch.no_grad():
        rows = m.encode_image(px)

    def hf_logits(ids_):
        with torch.no_grad():
            return hf(input_ids=torch.tensor([ids_]), pixel_values=px).logits[0]
    segs = [("text", torch.tensor([pre])), ("image", rows), ("text", post[None])]
    logits_and_cached_steps_match(m, segs, ids, hf_logits)


def test_pad_preprocessing_equals_the_released(imported):
    """image_aspect_ratio 'pad': edgemm's pixels for a wide and a tall image equal the released process_images path
    (expand2square with the processor's mean colour, then CLIPImageProcessor), re-computed here."""
    from PIL import Image
    from transformers import CLIPImageProcessor
    from edgemm.config import ModelConfig
    from edgemm.processor import preprocess
    v = ModelConfig.load(imported["ck"] / "config.json").vision
    assert v.pad_square
    proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                              image_mean=list(v.image_mean), image_std=list(v.image_std))
    for h, w in ((12, 20), (30, 9)):
        img = Image.fromarray(_image(6, h, w))
        side = max(img.size)                            # llava/mm_utils.py's expand2square
        sq = Image.new("RGB", (side, side), tuple(int(x * 255) for x in proc.image_mean))
        sq.paste(img, ((side - img.size[0]) // 2, (side - img.size[1]) // 2))
        want = proc(sq, return_tensors="np")["pixel_values"]
        assert np.abs(preprocess(img, v) - want).max() < 1e-5


def _released_prompt(style: str, system: str, turns: list) -> str:
    """Conversation.get_prompt of the released code, re-computed: haotian-liu/LLaVA's SeparatorStyle.TWO (sep " ",
    sep2 "</s>", roles USER / ASSISTANT) and Yi's SINGLE (system + "\\n\\n### ", role + ": " + message + "\\n### ");
    turns: (role, message or None), the image as "<image>\\n" before the first question."""
    if style == "two":
        ret, seps = system + " ", [" ", "</s>"]
        for i, (role, msg) in enumerate(turns):
            ret += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
        return ret
    ret = system + "\n\n### "
    for role, msg in turns:
        ret += f"{role}: {msg}\n### " if msg else f"{role}:"
    return ret


def test_released_chat_formats(tmp_path):
    """The checkpoints ship no chat template: the import installs the released format (LLaVA's conv_llava_v1, Yi's
    mm_default), which renders what the released get_prompt builds for a two-turn chat with an image; a system
    message replaces the default system text; mm_use_im_start_end wraps the image."""
    from edgemm.chat_template import render_template
    from edgemm.families.llava_original import LLAVA_V1_TEMPLATE, YI_VL_TEMPLATE
    from edgemm.importers import import_checkpoint
    msgs = [{"role": "user", "text": "what color?", "images": [0]}, {"role": "assistant", "text": "red", "images": []},
            {"role": "user", "text": "how many?", "images": []}]
    llava_system = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the human's questions.")           # conv_llava_v1
    yi_system = ("This is a chat between an inquisitive human and an AI assistant. Assume the role of the AI "
                 "assistant. Read all the images carefully, and respond to the human's questions with informative, "
                 "helpful, detailed and polite answers. 这是一个好奇的人类和一个人工智能助手之间的对话。假设你扮演这个AI助手的角色。"
                 "仔细阅读所有的图像，并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。")          # mm_default_conv
    for template, style, roles, bos, system in (
            (LLAVA_V1_TEMPLATE, "two", ("USER", "ASSISTANT"), "<s>", llava_system),
            (YI_VL_TEMPLATE, "single", ("Human", "Assistant"), "", yi_system)):
        want = _released_prompt(style, system, [(roles[0], "<image>\nwhat color?"), (roles[1], "red"),
                                                (roles[0], "how many?"), (roles[1], None)])
        assert render_template(template, msgs, bos, "</s>") == bos + want
        one = [(roles[0], "<image>\nwhat color?"), (roles[1], None)]
        assert render_template(template, [{"role": "system", "text": "Be brief.", "images": []}] + msgs[:1], bos,
                               "</s>") == bos + _released_prompt(style, "Be brief.", one)
    for layout, start_end, want in (("yi", False, YI_VL_TEMPLATE), ("v1", True, None)):
        src = write_original(_tiny_hf(layout), layout, tmp_path / layout, yi_tokenizer=layout == "yi",
                             start_end=start_end)
        tc = json.loads((src / "tokenizer_config.json").read_text())
        del tc["chat_template"]
        (src / "tokenizer_config.json").write_text(json.dumps(tc))
        import_checkpoint(src, tmp_path / f"ck-{layout}", log=None)
        got = (tmp_path / f"ck-{layout}" / "chat_template.jinja").read_text()
        assert got == (want or LLAVA_V1_TEMPLATE.replace("<image>", "<im_start><image><im_end>"))


def test_template_and_tokens(tmp_path):
    """mm_use_im_start_end: the template's <image> is wrapped in <im_start> / <im_end> (run_llava.py's prompt); Yi's
    special tokens: <|startoftext|> begins, <|endoftext|> and the template's <|im_end|> end a turn."""
    from edgemm.importers import import_checkpoint
    hf = _tiny_hf("v1")
    import_checkpoint(write_original(hf, "v1", tmp_path / "a", start_end=True), tmp_path / "ca", log=None)
    assert "<im_start><image><im_end>" in (tmp_path / "ca" / "chat_template.jinja").read_text()
    import_checkpoint(write_original(_tiny_hf("yi"), "yi", tmp_path / "b", yi_tokenizer=True), tmp_path / "cb",
                      log=None)
    from edgemm.config import ModelConfig
    from edgemm.tokenizer import Tokenizer
    tok = Tokenizer.load(tmp_path / "cb" / "tokenizer.json")
    t = ModelConfig.load(tmp_path / "cb" / "config.json").tokens
    names = {tok.tok.id_to_token(i) for i in t.eos}
    assert tok.tok.id_to_token(t.bos) == "<|startoftext|>" and names == {"<|endoftext|>", "<|im_end|>"}
    # Yi-VL's released stop string: recorded in the tokens; an answer that spells it ends before it
    assert t.stop == ["###"] and ModelConfig.load(tmp_path / "ca" / "config.json").tokens.stop == []
    from edgemm.generation import AnswerStream, GenerationConfig
    tok = Tokenizer.load(tmp_path / "cb" / "tokenizer.json", tokens=t)
    ids = tok.tok.encode("red\n### Human:", add_special_tokens=False).ids
    ans, done = AnswerStream(tok, GenerationConfig(max_new_tokens=len(ids) + 1)), False
    for i in ids:
        logits = np.full(512, -1e9, np.float32)
        logits[i] = 0.0
        _, done = ans.push(logits)
        if done:
            break
    assert done and ans.finish_reason == "stop" and ans.text == "red\n"


def test_refusals(tmp_path):
    """One line each: an unknown projector type, a tower folder that is missing or outside the checkpoint, and a
    tower whose width is not mm_hidden_size; nothing is written."""
    from edgemm.importers import import_checkpoint
    src = write_original(_tiny_hf("v15"), "v15", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    for change, says in (({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type 'mlp3x_gelu' is not supported"),
                         ({"mm_vision_tower": "openai/other"}, "downloads nothing"),
                         ({"mm_vision_tower": "../../etc"}, "no folder with its config.json"),
                         ({"mm_hidden_size": 16}, "differs from the tower's hidden_size"),
                         ({"mm_patch_merge_type": "spatial_unpad"}, "is not supported")):
        (src / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(EdgemmError, match=says) as e:
            import_checkpoint(src, tmp_path / "out", log=None)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists()
    (src / "config.json").write_text(json.dumps(cfg))
    (src / LAYOUTS["v15"][2] / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5}))
    with pytest.raises(EdgemmError, match="image_mean must be three numbers"):
        import_checkpoint(src, tmp_path / "out", log=None)


def test_tower_folder_of_pickled_weights(tmp_path):
    """Yi-VL's vit/ folder as a pytorch_model.bin: refused in one line without --allow-bin, read with
    torch.load(weights_only=True) with it, the same model as from safetensors."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.importers import import_checkpoint
    hf = _tiny_hf("yi")
    src = write_original(hf, "yi", tmp_path / "src", yi_tokenizer=True)
    vit = src / LAYOUTS["yi"][2][2:]
    from safetensors.torch import load_file
    torch.save(load_file(str(vit / "model.safetensors")), vit / "pytorch_model.bin")
    (vit / "model.safetensors").unlink()
    with pytest.raises(EdgemmError, match="pytorch_model.bin.*--allow-bin"):
        import_checkpoint(src, tmp_path / "ck", log=None)
    import_checkpoint(src, tmp_path / "ck", log=None, allow_bin=True)
    m, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(m.vision.blocks[0].qkv.weight[:24], hf.model.vision_tower.state_dict()[
            "encoder.layers.0.self_attn.q_proj.weight"])


def test_tower_folder_of_a_whole_clip_model(tmp_path):
    """The hub's openai/clip-vit-* folders hold a whole CLIPModel (config.json's vision_config, text_model.*,
    projections, logit_scale): the vision model is imported, the text side listed as not imported, and the model
    is the one the tower's own folder gives."""
    from transformers import CLIPConfig, CLIPModel
    from edgemm.checkpoint import load_checkpoint
    from edgemm.importers import import_checkpoint
    hf = _tiny_hf("v15")
    src = write_original(hf, "v15", tmp_path / "src")
    folder = src / LAYOUTS["v15"][2]
    clip = CLIPModel(CLIPConfig(vision_config=hf.config.vision_config.to_dict(), projection_dim=16,
                                text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "vocab_size": 64}))
    clip.vision_model.load_state_dict(hf.model.vision_tower.state_dict())
    clip.save_pretrained(folder, safe_serialization=True)
    summary = import_checkpoint(src, tmp_path / "ck", log=None)
    skipped = summary["not_imported"]
    assert any(k.startswith("text_model.") for k in skipped) and "logit_scale" in skipped
    m, _ = load_checkpoint(tmp_path / "ck")
    px = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = hf.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        want = hf.model.multi_modal_projector(feats)
        assert (m.encode_image(px) - want).abs().max() <= 1e-5


# --------------------------------------------------------------------------- gguf
def test_mmproj_projector_tensors_round_trip(imported, tmp_path):
    """The mmproj's projector tensors (llama.cpp's names: mm.0 / mm.2, Yi's mm.0 / mm.1 / mm.3 / mm.4) read back
    into the projector give the reference's rows; v1's Linear written as mm.0 = [W; -W], mm.2 = [I, -I] computes
    W x + b through the graph's GELU: GELU(h) - GELU(-h) = h (checked here with both GELU forms)."""
    from gguf import GGUFReader
    from edgemm.checkpoint import load_checkpoint
    from edgemm.export.gguf import write_llava_mmproj_gguf
    from edgemm.runtimes.gguf_vision import reference_vision_from_mmproj
    m, _ = load_checkpoint(imported["ck"])
    write_llava_mmproj_gguf(m, tmp_path / "v.gguf", "t", "f32")
    names = {t.name for t in GGUFReader(str(tmp_path / "v.gguf")).tensors}
    want = {"v1": {"mm.0.weight", "mm.2.weight"}, "v15": {"mm.0.weight", "mm.2.weight"},
            "yi": {"mm.0.weight", "mm.1.weight", "mm.3.weight", "mm.4.bias"}}[imported["layout"]]
    assert want <= names and ("mm.3.weight" in names) == (imported["layout"] == "yi")
    tower, proj = reference_vision_from_mmproj(tmp_path / "v.gguf", m.cfg)
    px = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (proj(tower(px)) - m.encode_image(px)).abs().max() <= 1e-5
        if imported["layout"] == "v1":
            t = {x.name: torch.from_numpy(np.array(x.data).reshape([int(s) for s in reversed(x.shape)]))
                 for x in GGUFReader(str(tmp_path / "v.gguf")).tensors if x.name.startswith("mm.")}
            feats = tower(px)
            for approximate in ("none", "tanh"):
                h = torch.nn.functional.gelu(feats @ t["mm.0.weight"].T + t["mm.0.bias"], approximate=approximate)
                assert (h @ t["mm.2.weight"].T + t["mm.2.bias"] - m.adapter(feats)).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def gguf_bundle(imported):
    from edgemm.export.gguf import export_gguf
    lines = []
    man = export_gguf(model=str(imported["ck"]), out=imported["dir"] / "gguf", precision="f32", log=lines.append)
    return imported["dir"] / "gguf", man, lines


@needs_llama
def test_gguf_export_validates(gguf_bundle):
    """The export runs its files in llama.cpp: the decoder on the reference's image rows within 1e-4, mtmd's image
    rows (the mmproj's projector as llama.cpp computes it) within the f32 bound or the known CLS-order defect."""
    _, man, _ = gguf_bundle
    v = man["validation"]
    assert v["passed"] and v["text_max_abs"] < 1e-4 and v["image_max_abs"] < 1e-4
    assert man["stages"]["decoder"]["format"] == "gguf (arch llama)"
    assert v["vision_rows_reference_code_max_abs"] < 1e-5
    assert v["mtmd_cls_order_defect"] or v["vision_rows_max_abs"] < 5e-3


@needs_llama
def test_stock_llama_cpp_python_agrees_with_transformers(imported, gguf_bundle):
    """The decoder + mmproj in stock llama-cpp-python (Llama + Llava15ChatHandler, f32 KV cache; no edgemm code on
    that side) against transformers' LLaVA over the same weights on an image + text prompt: the same prompt ids,
    next-token top-1 and logits within 1e-3. While llama.cpp's llava graph has the CLS-order defect
    (ggml-org/llama.cpp#25814) transformers is fed the rows that defect computes (edgemm's simulation)."""
    from PIL import Image
    from transformers import PreTrainedTokenizerFast
    from edgemm.checkpoint import load_checkpoint
    from edgemm.export.gguf import llava_rows_cls_last
    from edgemm.llamacpp import load_llama_cpp
    out, man, _ = gguf_bundle
    img = _image()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    load_llama_cpp()
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler
    llm = Llama(model_path=str(out / man["stages"]["decoder"]["file"]), n_ctx=256, n_threads=2, logits_all=True,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False,
                chat_handler=Llava15ChatHandler(clip_model_path=str(out / man["stages"]["vision"]["file"]),
                                                verbose=False))
    llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}],
        max_tokens=1, temperature=0.0, repeat_penalty=1.0)
    n = llm.n_tokens
    stock = np.asarray(llm.scores[n - 1], np.float32)
    bos = "<|startoftext|>" if imported["layout"] == "yi" else "<s>"
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(imported["src"] / "tokenizer.json"), bos_token=bos)
    m, _ = load_checkpoint(imported["ck"])
    pre, post = _stock_prompt_ids(hf_tok, Llava15ChatHandler, url)
    assert n == len(pre) + 16 + len(post)
    ids = list(llm.input_ids[:n])
    assert ids[:len(pre)] == pre and ids[len(pre) + 16:] == post
    hf, px = imported["hf"], _pixels(img)
    ids = torch.tensor([pre + [IMAGE_TOKEN] * 16 + post])
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px).logits[0, -1].numpy()
        if man["validation"]["mtmd_cls_order_defect"]:      # transformers' decoder on the defect's rows
            emb = hf.get_input_embeddings()(ids)
            emb[0, len(pre):len(pre) + 16] = llava_rows_cls_last(m.vision, m.adapter, px)[0]
            want = hf(inputs_embeds=emb).logits[0, -1].numpy()
    assert stock.argmax() == want.argmax()
    assert np.abs(stock - want).max() < 1e-3


@needs_llama
def test_gguf_bundle_answers_as_torch(imported, gguf_bundle):
    """edgemm's llamacpp backend on the gguf bundle: image rows (mtmd, or the mmproj's weights through the reference
    code while llama.cpp's CLS-order defect stands: the projector read back from mm.*) and greedy answers as the
    torch reference; `edgemm run --image` on the bundle exits 0."""
    from click.testing import CliRunner
    from PIL import Image
    from edgemm.cli import main
    from edgemm.generation import GenerationConfig, answer
    from edgemm.processor import preprocess
    from edgemm.runtimes import load_backend
    out, _, _ = gguf_bundle
    ref = load_backend("torch", model=str(imported["ck"]))
    b = load_backend("llamacpp", bundle=str(out), threads=2)
    px = preprocess(_image(5), ref.cfg.vision)
    assert np.abs(b.vision(px) - ref.vision(px)).max() < 1e-3
    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    assert answer(b, _image(5), QUESTION, gen) == answer(ref, _image(5), QUESTION, gen)
    b.close()
    Image.fromarray(_image(5)).save(imported["dir"] / "q.png")
    r = CliRunner().invoke(main, ["run", "--bundle", str(out), "--image", str(imported["dir"] / "q.png"),
                                  "--max-new-tokens", "2", QUESTION])
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------- onnx + edgemm run
def test_onnx_bundle_and_edgemm_run(imported):
    """The import exports to onnx fp32 / int8 and trt int8 Q/DQ (every stage validated against the reference; trt
    without building engines) and `edgemm run --image` answers from the onnx bundle as the torch reference does
    (greedy)."""
    from click.testing import CliRunner
    from PIL import Image
    from edgemm.cli import main
    from edgemm.export.onnx import export_onnx
    if imported["layout"] == "v15":
        pytest.skip("the mlp projector's onnx path is test_import_llava's")
    d = imported["dir"]
    man = export_onnx(str(imported["ck"]), d / "onnx", precision="fp32", log=None)
    assert all(s["ok"] for s in man["validation"]["stages"].values())
    from edgemm.export.trt import export_trt                # the quantized graphs calibrate Yi's LayerNorms too
    for m8 in () if imported["layout"] != "yi" else (
            export_onnx(str(imported["ck"]), d / "onnx-int8", precision="int8", log=None),
            export_trt(str(imported["ck"]), d / "trt", precision="int8", no_build=True, log=None)):
        assert all(s["ok"] for s in m8["validation"]["stages"].values()), m8["validation"]
    Image.fromarray(_image(4)).save(d / "img.png")
    got = []
    for opts in (["--bundle", str(d / "onnx"), "--backend", "ort", "--device", "cpu"],
                 ["--model", str(imported["ck"])]):
        r = CliRunner().invoke(main, ["run", *opts, "--image", str(d / "img.png"), "--max-new-tokens", "3",
                                      QUESTION])
        assert r.exit_code == 0, r.output
        got.append(r.stdout)
    assert got[0] == got[1]
    from edgemm.generation import GenerationConfig, answer
    from edgemm.runtimes import load_backend
    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True)           # four tokens whatever the random weights say
    ort = load_backend("ort", bundle=str(d / "onnx"), device="cpu")
    ref = load_backend("torch", model=str(imported["ck"]))
    assert answer(ort, _image(4), QUESTION, gen) == answer(ref, _image(4), QUESTION, gen)
