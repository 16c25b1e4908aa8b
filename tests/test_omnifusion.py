"""OmniFusion (arXiv 2404.06212, AIRI-Institute/OmniFusion): the DINOv2 tower against transformers' Dinov2Model /
Dinov2WithRegistersModel; the transformer adapter against torch's TransformerEncoderLayer (the release's class) and
the merged-encoder MLP against the paper's equations; the whole model, imported from the release's layout (a
pickled adapter, special embeddings, a Hugging Face Mistral and CLIP tower) and from a config naming CLIP + DINOv2,
against a plain composition of transformers' towers, the adapter and MistralForCausalLM fed the same rows; exports."""
import json

import pytest
import torch
import torch.nn as nn

from .test_import_llava import away_from_init
from .test_tokenizers import _style

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

S, PATCH, W, D = 24, 4, 32, 64              # image side, patch, tower width, LLM width


def _dino(registers=0, image_size=16, seed=0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    kw = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=image_size,
              patch_size=PATCH, hidden_act="gelu", layer_norm_eps=1e-6)
    torch.manual_seed(seed)
    m = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)) if registers \
        else Dinov2Model(Dinov2Config(**kw))
    return away_from_init(m.eval(), seed)               # LayerScale's lambda1 (1.0 at init), CLS, registers too


OLD_NAMES = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
             ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}


def _dino_tower(hf, used=None, old_names=False):
    from edgemm.blocks.dinov2 import Dinov2Tower
    from edgemm.config import ModelConfig, VisionConfig
    from edgemm.families.base import Plan
    from edgemm.families.omnifusion import _dinov2
    dc = hf.config.to_dict()
    L = dc["num_hidden_layers"]
    plan = Plan(ModelConfig())
    sd = hf.state_dict()
    if old_names:                           # the released facebook/dinov2-* checkpoints' (transformers 4) names
        for a, b in OLD_NAMES.items():
            sd = {k.replace(a, b): v for k, v in sd.items()}
    fields = _dinov2(plan, "", dc, used or L, set(sd), S // PATCH)
    fields.pop("image_mean"), fields.pop("image_std")
    tower = Dinov2Tower(VisionConfig(image_size=S, patch_size=PATCH, arch="dinov2", **fields))
    tower.load_state_dict({e.name[len("vision.dino."):]: e.build([sd[s] for s in e.sources]) for e in plan.entries})
    return tower


@pytest.mark.parametrize("registers, used, old_names", [(0, None, False), (3, None, False), (2, 1, False),
                                                     (0, None, True)])
def test_dinov2_tower_matches_transformers(registers, used, old_names):
    """The "dinov2" tower (its checkpoint's 4 x 4 position grid interpolated to the 6 x 6 tower grid at import) gives
    Dinov2(WithRegisters)Model's last_hidden_state (or hidden_states[used]) on 24 px images, CLS and registers
    dropped; the checkpoint in transformers 5's names or the released checkpoints' older ones."""
    hf = _dino(registers)
    tower = _dino_tower(hf, used, old_names)
    px = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf(pixel_values=px, output_hidden_states=True)
        want = (out.last_hidden_state if used is None else out.hidden_states[used])[:, 1 + registers:]
        got = tower(px)
    assert got.shape == want.shape == (2, (S // PATCH) ** 2, 24)
    assert (got - want).abs().max().item() <= 1e-4


class VisualToGPTMapping(nn.Module):
    """The release's adapter class (its models.py), as its projection.pt pickles it: torch's TransformerEncoderLayer
    (post-norm, ReLU) then `linear`."""

    def __init__(self, visual_emb_dim, gpt_emb_dim, num_gpt_embs, num_heads):
        super().__init__()
        self.transformer_layer = nn.TransformerEncoderLayer(d_model=visual_emb_dim, nhead=num_heads, batch_first=True,
                                                            norm_first=False, dim_feedforward=40)
        self.linear = nn.Linear(visual_emb_dim, gpt_emb_dim)
        self.n_embeddings, self.embedding_dim = num_gpt_embs, gpt_emb_dim

    def forward(self, visual_embs):
        return self.linear(self.transformer_layer(visual_embs)).view(-1, self.n_embeddings, self.embedding_dim)


def _mistral(vocab, seed=0):
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=vocab, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, sliding_window=None)
    torch.manual_seed(seed)
    return away_from_init(MistralForCausalLM(cfg).eval(), seed)


def _clip(seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=W, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=S, patch_size=PATCH, hidden_act="quick_gelu", projection_dim=16)
    torch.manual_seed(seed)
    return away_from_init(CLIPVisionModel(cfg).eval(), seed)


def _tokenizer(d):
    s = _style("mistral")
    d.mkdir(parents=True, exist_ok=True)
    s["tok"].save(str(d / "tokenizer.json"))
    tcfg = {k: v for k, v in s["tcfg"].items() if k != "chat_template"}     # Mistral-7B-v0.1's: no template
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return s["tok"]


def _rows(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """OmniFusion's release layout, tiny: tuned-model/, tokenizer/, projection.pt (a pickled VisualToGPTMapping),
    special_embeddings.pt, and the CLIP tower in clip/; imported."""
    from edgemm.importers import import_checkpoint
    d = tmp_path_factory.mktemp("omnifusion")
    src = d / "OmniMistral-tiny"
    tok = _tokenizer(src / "tokenizer")
    lm, clip = _mistral(tok.get_vocab_size()), _clip()
    lm.save_pretrained(src / "tuned-model", safe_serialization=True)
    clip.save_pretrained(src / "clip", safe_serialization=True)
    torch.manual_seed(1)
    proj = away_from_init(VisualToGPTMapping(W, D, (S // PATCH) ** 2, 4).eval(), 2)
    torch.save(proj, src / "projection.pt")
    special = {k: _rows(1, i)[0].requires_grad_() for i, k in enumerate(("SOI", "EOI", "USER", "BOT"))}
    torch.save(special, src / "special_embeddings.pt")
    notes = []
    import_checkpoint(src, d / "ck", log=notes.append, allow_bin=True)
    return {"src": src, "ck": d / "ck", "dir": d, "lm": lm, "clip": clip, "proj": proj, "special": special,
            "tok": tok, "notes": notes}


def test_release_import_reads_the_adapter(release):
    """The pickled adapter is read without running its class (4 heads, eps from its attributes); SOI / EOI become the
    begin/end-of-image rows; USER / BOT are listed as not imported."""
    from edgemm.checkpoint import load_checkpoint
    m, _ = load_checkpoint(release["ck"])
    assert m.cfg.adapter.kind == "omni_transformer" and m.cfg.adapter.attn_heads == 4
    assert m.cfg.vision.arch == "clip" and m.cfg.vision.feature_layer == 2          # hidden_states[-2] of 3 layers
    assert torch.equal(m.adapter.boi[0, 0], release["special"]["SOI"].detach())
    from edgemm.chat_template import segments_template
    from edgemm.tokenizer import Tokenizer
    tok = Tokenizer.load(release["ck"] / "tokenizer.json", tokens=m.cfg.tokens.__dict__)
    segs = segments_template(tok, (release["ck"] / "chat_template.jinja").read_text(),
                             [{"role": "user", "text": "what is it", "images": ["x"]}])
    assert [k for k, _ in segs] == ["text", "image", "text"]                  # the release's prompt, then the image
    assert tok.decode(segs[0][1]).strip() == "This is a dialog with AI assistant." and segs[1][1] == 0
    summary = json.loads((release["ck"] / "edgemm-import.json").read_text())
    assert set(summary["not_imported"]) >= {"special_embeddings.USER", "special_embeddings.BOT"}


def test_transformer_adapter_matches_torch_encoder_layer(release):
    """The omni_transformer connector equals the release's VisualToGPTMapping (torch's TransformerEncoderLayer +
    linear) on random tower rows, wrapped in SOI / EOI."""
    from edgemm.checkpoint import load_checkpoint
    m, _ = load_checkpoint(release["ck"])
    x = torch.randn(2, (S // PATCH) ** 2, W, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = m.adapter(x), release["proj"](x)
    assert (got[:, 1:-1] - want).abs().max().item() <= 1e-5
    assert torch.equal(got[:, -1], release["special"]["EOI"].detach().expand(2, -1))


def _whole_model_matches(m, lm, rows_fn, tok):
    """edgemm's logits over text, image, text equal MistralForCausalLM's fed the same rows (inputs_embeds)."""
    px = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(7))
    a, b = tok.encode("what is it", add_special_tokens=False).ids, tok.encode(" a red circle").ids
    with torch.no_grad():
        rows = m.encode_image(px)
        want_rows = rows_fn(px)
        assert (rows - want_rows).abs().max().item() <= 1e-4
        ta, tb = torch.tensor([a]), torch.tensor([b])
        emb = lm.get_input_embeddings()
        want = lm(inputs_embeds=torch.cat([emb(ta), want_rows, emb(tb)], 1)).logits[0]
        got = m.forward_full([("text", ta), ("image", rows), ("text", tb)])[0]
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4


def test_release_model_matches_transformers(release):
    from edgemm.checkpoint import load_checkpoint
    m, _ = load_checkpoint(release["ck"])
    sp = release["special"]

    def rows(px):
        feats = release["clip"](pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        return torch.cat([sp["SOI"][None, None], release["proj"](feats), sp["EOI"][None, None]], 1)
    _whole_model_matches(m, release["lm"], rows, release["tok"])


@pytest.fixture(scope="module")
def two_tower(tmp_path_factory):
    """A config.json naming a CLIP and a DINOv2-with-registers tower by their Hugging Face layouts, the MLP adapter
    (per-encoder first layers, one output layer), the rows and a Mistral; imported."""
    from safetensors.torch import save_file
    from edgemm.importers import import_checkpoint
    d = tmp_path_factory.mktemp("omnifusion2")
    src = d / "src"
    tok = _tokenizer(src)
    lm, clip, dino = _mistral(tok.get_vocab_size(), 3), _clip(4), _dino(registers=2, seed=5)
    g = torch.Generator().manual_seed(9)
    F_ = 40
    mlp = {"in_proj.0.weight": torch.randn(F_, W, generator=g) * 0.2, "in_proj.0.bias": torch.randn(F_, generator=g),
           "in_proj.1.weight": torch.randn(F_, 24, generator=g) * 0.2, "in_proj.1.bias": torch.randn(F_, generator=g),
           "out_proj.weight": torch.randn(D, F_, generator=g) * 0.2, "out_proj.bias": torch.randn(D, generator=g)}
    special = {"SOI": _rows(1, 11)[0], "EOI": _rows(1, 12)[0], "USER": _rows(1, 13)[0], "BOT": _rows(1, 14)[0]}
    tensors = {**{"language_model." + k: v for k, v in lm.state_dict().items()},
               **{"vision_tower." + k: v for k, v in clip.state_dict().items()},
               **{"dinov2." + k: v for k, v in dino.state_dict().items()},
               **{"projection." + k: v for k, v in mlp.items()},
               **{"special_embeddings." + k: v for k, v in special.items()}}
    tensors = {k: v.contiguous() for k, v in tensors.items() if "position_ids" not in k}
    save_file(tensors, str(src / "model.safetensors"), {"format": "pt"})
    cfg = {"model_type": "omnifusion", "text_config": lm.config.to_dict(), "vision_config": clip.config.to_dict(),
           "dinov2_config": dino.config.to_dict(), "vision_feature_layer": -2, "dinov2_feature_layer": -1,
           "adapter_type": "mlp"}
    (src / "config.json").write_text(json.dumps(cfg))
    import_checkpoint(src, d / "ck", log=None)
    return {"ck": d / "ck", "dir": d, "lm": lm, "clip": clip, "dino": dino, "mlp": mlp, "special": special,
            "tok": tok}


def test_two_tower_model_matches_transformers(two_tower):
    """The merged encoders: out_proj(GELU(in_proj_clip(CLIP rows) + in_proj_dino(DINOv2 rows))) between SOI and EOI,
    DINOv2 reading the image renormalised from CLIP's mean/std to its own, then Mistral: the paper's equations over
    transformers' CLIPVisionModel, Dinov2WithRegistersModel and MistralForCausalLM."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.families.base import CLIP_MEAN, CLIP_STD
    from edgemm.families.omnifusion import DINO_MEAN, DINO_STD
    m, _ = load_checkpoint(two_tower["ck"])
    assert m.cfg.vision.arch == "clip+dinov2" and m.cfg.adapter.kind == "omni_mlp"
    t, p, sp = two_tower, two_tower["mlp"], two_tower["special"]

    def chan(v):
        return torch.tensor(v).view(1, 3, 1, 1)

    def rows(px):
        c = t["clip"](pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        raw = px * chan(CLIP_STD) + chan(CLIP_MEAN)                     # the image in [0, 1]
        dn = t["dino"](pixel_values=(raw - chan(DINO_MEAN)) / chan(DINO_STD)).last_hidden_state[:, 1 + 2:]
        h = c @ p["in_proj.0.weight"].T + p["in_proj.0.bias"] + dn @ p["in_proj.1.weight"].T + p["in_proj.1.bias"]
        out = torch.nn.functional.gelu(h) @ p["out_proj.weight"].T + p["out_proj.bias"]
        return torch.cat([sp["SOI"][None, None], out, sp["EOI"][None, None]], 1)
    _whole_model_matches(m, t["lm"], rows, t["tok"])


def _export(ck, out, target, prec):
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["export", "--model", str(ck), "--target", target, "--precision", prec, "-o", str(out)]
                           + (["--no-build"] if target == "trt" else []))
    assert r.exit_code == 0, r.output
    man = json.loads((out / "edgemm.json").read_text())
    assert all(s["ok"] for s in man["validation"]["stages"].values()), man["validation"]
    return r.output


def _run(bundle, image, backend="ort"):
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["run", "--bundle", str(bundle), "--backend", backend, "--image", str(image),
                                  "--max-new-tokens", "3", "what is it?"])
    assert r.exit_code == 0, r.output
    return r.output


def _red(d):
    from PIL import Image
    Image.new("RGB", (30, 20), (200, 40, 40)).save(d / "red.png")
    return d / "red.png"


def _gguf(ck, out):
    """`edgemm export --target gguf`: llama.cpp's decoder GGUF beside the vision stage as ONNX (OmniFusion's towers
    and adapter have no llama.cpp graph), its ONNX rows and its decoder validated."""
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["export", "--model", str(ck), "--target", "gguf", "--precision", "f32", "-o",
                                  str(out)])
    assert r.exit_code == 0, r.output
    man = json.loads((out / "edgemm.json").read_text())
    assert man["stages"]["vision"]["format"] == "onnx" and man["validation"]["vision_onnx"]["ok"], man
    assert man["validation"]["passed"], man["validation"]


def test_two_tower_exports_validate_and_run(two_tower, tmp_path):
    """The merged encoders export to onnx fp32 / int8, trt fp16 / int8 (--no-build; int8 calibrated per stage and
    modality) and gguf (the vision stage in ONNX beside the decoder GGUF), each validated against the reference;
    `edgemm run --image` answers from the int8 onnx bundle and from the gguf one in the llamacpp backend."""
    for target, prec in (("onnx", "fp32"), ("onnx", "int8"), ("trt", "fp16"), ("trt", "int8")):
        _export(two_tower["ck"], tmp_path / f"{target}-{prec}", target, prec)
    _gguf(two_tower["ck"], tmp_path / "gguf")
    _run(tmp_path / "onnx-int8", _red(tmp_path))
    _run(tmp_path / "gguf", _red(tmp_path), backend="llamacpp")


def test_release_exports_and_runs(release, tmp_path):
    """The release's import (the transformer adapter) exports to onnx and gguf (vision stage in ONNX), both
    validated, and each runs an image."""
    _export(release["ck"], tmp_path / "onnx", "onnx", "fp32")
    _run(tmp_path / "onnx", _red(tmp_path))
    _gguf(release["ck"], tmp_path / "gguf")
    _run(tmp_path / "gguf", _red(tmp_path), backend="llamacpp")


def test_broken_release_is_refused_in_one_line(release, tmp_path):
    """A release folder without its CLIP tower, read without --allow-bin (its adapter is a pickle), or with a
    projection.pt that is not a torch.save file, is refused with an EdgemmError naming what is wrong; nothing is
    written."""
    from edgemm.errors import EdgemmError
    from edgemm.importers import import_checkpoint
    src = tmp_path / "rel"
    src.mkdir()
    for f in ("tuned-model", "tokenizer", "special_embeddings.pt", "projection.pt"):
        (src / f).symlink_to(release["src"] / f)
    with pytest.raises(EdgemmError, match="needs clip/"):
        import_checkpoint(src, tmp_path / "out", log=None, allow_bin=True)
    (src / "clip").symlink_to(release["src"] / "clip")
    with pytest.raises(EdgemmError, match="are pickles; pass --allow-bin"):
        import_checkpoint(src, tmp_path / "out", log=None)
    (src / "projection.pt").unlink()
    (src / "projection.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(EdgemmError, match="projection.pt cannot be read as a torch.save file"):
        import_checkpoint(src, tmp_path / "out", log=None, allow_bin=True)
    assert not (tmp_path / "out").exists()


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_hostile_projection_pickle_runs_nothing(release, tmp_path):
    """A projection.pt whose pickle calls os.system is refused (weights_only's unpickler, the globals it names mapped
    to an inert stand-in) without running anything."""
    from edgemm.errors import EdgemmError
    from edgemm.importers import import_checkpoint
    src = tmp_path / "rel"
    src.mkdir()
    for f in ("tuned-model", "tokenizer", "special_embeddings.pt", "clip"):
        (src / f).symlink_to(release["src"] / f)
    torch.save({"transformer_layer": _Hostile(tmp_path / "ran")}, src / "projection.pt")
    with pytest.raises(EdgemmError, match="projection.pt"):
        import_checkpoint(src, tmp_path / "out", log=None, allow_bin=True)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()
