"""Libra from pixels (issue 28 item 2): Libra's image tokenizer as edgemm's `libra_vq` vision tower.

The independent reference is a re-computation written here from the released code's equations
(YifanXu74/Libra: image_tokenizer.py ImageTokenizer.encode, taming/models/vqgan.py VQModel.encode,
clip_encoder.py CLIPVisionTower.feature_select, lookup_free_quantization.py LFQ.forward), over transformers' own
CLIPVisionModel; the decoder side is tests/test_import.py's libra_reference (LibraForCausalLM's forward)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgemm.config import ModelConfig
from edgemm.errors import EdgemmError
from tests.test_import import LIBRA_CONFIG, _text_ids, libra_reference, libra_tensors

W, LAYERS, S, P, SEL, EMBED, CB, BITS = 32, 3, 28, 7, [-2, -1], 12, 2, 4
CFG = dict(LIBRA_CONFIG, vision_vocab_size=2 ** BITS + 2, contiguous_signal_size=W * len(SEL),
           image_feature_resolution=S // P, max_vision_token_length=(S // P) ** 2 + 2)


def clip_model(seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    m = CLIPVisionModel(CLIPVisionConfig(hidden_size=W, intermediate_size=2 * W, num_hidden_layers=LAYERS,
                                         num_attention_heads=2, image_size=S, patch_size=P,
                                         hidden_act="quick_gelu")).eval()
    with torch.no_grad():                       # LayerNorms start at 1 / 0: randomise them
        for name, p in m.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return m


def quantizer(seed=1):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(W * len(SEL), EMBED, 1)
    proj = torch.nn.Linear(EMBED, CB * BITS)
    with torch.no_grad():
        for p in (*conv.parameters(), *proj.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return conv, proj


def reference_tokens(clip, conv, proj, pixels):
    """The released encode: CLIP hidden states of select_layer concatenated, CLS dropped, as a square map; the 1 x 1
    quant_conv; LFQ (project_in, x > 0 per codebook, indices = sum(bit * 2^(bits-1-j))); boi / eoi around the codes
    (the vision vocabulary's last two ids) and the signal zero there."""
    out = clip(pixel_values=pixels, output_hidden_states=True)
    feat = torch.cat([out.hidden_states[i] for i in SEL], -1)[:, 1:]            # [B, P*P, W*k]
    B, N, C = feat.shape
    side = int(N ** 0.5)
    h = conv(feat.view(B, side, side, C).permute(0, 3, 1, 2))                     # [B, E, side, side]
    x = proj(h.permute(0, 2, 3, 1).reshape(B, N, EMBED)).view(B, N, CB, BITS)
    mask = 2 ** torch.arange(BITS - 1, -1, -1)
    idx = ((x > 0).int() * mask.int()).sum(-1)                                   # [B, N, CB]
    V = CFG["vision_vocab_size"]
    codes = torch.cat([torch.full((B, 1, CB), V - 2), idx.long(), torch.full((B, 1, CB), V - 1)], 1)
    signal = torch.cat([torch.zeros(B, 1, C), feat, torch.zeros(B, 1, C)], 1)
    return codes, signal


def pixel_model(clip, conv, proj):
    """edgemm's Libra with the libra_vq tower, its weights mapped through the importer's own plan helpers."""
    from edgemm.families.base import Plan, _clip_vision
    from edgemm.families.libra import map_libra
    from edgemm.model import EdgeMM

    class Src:                                   # the decoder checkpoint's names only (map_libra reads none)
        path = Path("/nonexistent/libra-pixels")          # no tokenizer config: the decoder's plan only
        where = {}
    plan = map_libra(CFG, Src())
    cfg = plan.cfg
    cfg.vision = type(cfg.vision)(image_size=S, patch_size=P, width=W, layers=LAYERS, heads=2, mlp_dim=2 * W,
                                  eps=1e-5, gelu="quick", arch="libra_vq",
                                  tokenizer={"feature_layers": SEL, "embed_dim": EMBED})
    cfg.validate()
    clip_plan = Plan(cfg)
    _clip_vision(clip_plan, "", max(LAYERS + 1 + i for i in SEL), "", dst="vision.clip.")
    hf = clip.state_dict()
    sd = {e.name: e.build([hf[s] for s in e.sources]) for e in clip_plan.entries}
    t = libra_tensors(CFG)
    sd.update({e.name: e.build([t[s] for s in e.sources]) for e in plan.entries})
    sd["vision.quant_conv.weight"], sd["vision.quant_conv.bias"] = conv.weight[:, :, 0, 0], conv.bias
    sd["vision.project_in.weight"], sd["vision.project_in.bias"] = proj.weight, proj.bias
    m = EdgeMM(cfg).eval()
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith("decoder.rope")], missing
    return m, t


def images(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, S, S, generator=g)


@pytest.fixture(scope="module")
def parts():
    clip = clip_model()
    conv, proj = quantizer()
    m, t = pixel_model(clip, conv, proj)
    return clip, conv, proj, m, t


def test_tokens_equal_the_released_encode_exactly(parts):
    clip, conv, proj, m, _ = parts
    px = images()
    with torch.no_grad():
        want_codes, want_signal = reference_tokens(clip, conv, proj, px)
        codes, signal = m.vision(px)
    assert codes.dtype == torch.int64
    assert codes.shape == want_codes.shape == (4, (S // P) ** 2 + 2, CB)
    assert torch.equal(codes, want_codes)                        # exact codes, every image and codebook
    assert len(torch.unique(codes[:, 1:-1])) > 4                 # the images use many codes (the test can fail)
    assert (signal - want_signal).abs().max().item() < 1e-5


def test_whole_model_from_pixels_matches_libra_forward(parts):
    """Pixels -> edgemm's image rows -> logits equal LibraForCausalLM's forward (libra_reference) fed the released
    tokenizer's codes and signal."""
    clip, conv, proj, m, t = parts
    px = images(1, seed=5)
    pre, post = _text_ids(3, 4), _text_ids(4, 6)
    with torch.no_grad():
        codes, signal = reference_tokens(clip, conv, proj, px)
        ref, vf = libra_reference(t, CFG, pre, codes, signal, post)
        rows = m.encode_image(px)
        got = m.forward_full([("text", pre), ("image", rows), ("text", post)])[0][~vf]
    assert rows.shape == (1, m.cfg.n_image_rows, CFG["hidden_size"])
    assert (got - ref).abs().max().item() <= 1e-5


def test_onnx_vision_stage_matches_ort(parts, tmp_path):
    """The vision stage traces to standard ops (the comparison and bit sum included) and ONNX Runtime gives the
    reference's image rows."""
    import onnxruntime as ort
    from edgemm.export.graph import vision_graph
    _, _, _, m, _ = parts
    g, _ = vision_graph(m)
    sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    px = images(3, seed=9)
    with torch.no_grad():
        want = m.encode_image(px).numpy()
    got = sess.run(None, {"pixels": px.numpy()})[0]
    assert np.abs(got - want).max() < 1e-4


def test_config_refusals_are_one_line():
    base = ModelConfig.from_dict({"vision": {"arch": "libra_vq", "image_size": S, "patch_size": P, "width": W,
                                             "layers": LAYERS, "heads": 2,
                                             "tokenizer": {"feature_layers": SEL, "embed_dim": EMBED}},
                                  "adapter": {"kind": "libra", "codebooks": CB, "vision_vocab": 2 ** BITS + 2,
                                              "signal_size": W * len(SEL)}})
    base.validate()
    assert base.input_stage == "vision" and "libra image tokenizer (pixels)" in base.variants()
    for change in ({"adapter": {"vision_vocab": 20}}, {"adapter": {"signal_size": W}},
                   {"vision": {"tokenizer": {"feature_layers": [LAYERS + 2], "embed_dim": EMBED}}},
                   {"adapter": {"kind": "mlp"}}):
        d = base.to_dict()
        for k, v in change.items():
            d[k].update(v)
        with pytest.raises(EdgemmError, match="libra_vq"):
            ModelConfig.from_dict(d).validate()


# --------------------------------------------------------------------------- the released layout
def write_release(d, clip, conv, proj, encoder_in_ckpt=True, encoder_name="openai-clip-tiny"):
    """A tiny Libra checkpoint as the release lays it out: the decoder's HF files, vision_tokenizer_config.yaml,
    the VQModel's Lightning checkpoint vqgan.ckpt and the CLIP folder."""
    import json
    import yaml
    from tests.test_import import write_hf
    write_hf(d, CFG, libra_tensors(CFG))
    clip.save_pretrained(d / "openai-clip-tiny")
    (d / "openai-clip-tiny" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "crop_size": {"height": S, "width": S}, "size": {"shortest_edge": S}}))
    g = torch.Generator().manual_seed(4)
    sd = {"quant_conv.weight": conv.weight.detach(), "quant_conv.bias": conv.bias.detach(),
          "quantize.project_in.weight": proj.weight.detach(), "quantize.project_in.bias": proj.bias.detach(),
          "quantize.project_out.weight": torch.randn(EMBED, CB * BITS, generator=g),
          "quantize.project_out.bias": torch.zeros(EMBED), "post_quant_conv.weight": torch.randn(4, EMBED, 1, 1),
          "decoder.conv_in.weight": torch.randn(8, 4, 3, 3, generator=g)}
    if encoder_in_ckpt:     # the frozen CLIP inside the VQModel (transformers 4's CLIPVisionModel names)
        sd.update({"encoder.vision_tower.vision_model." + k: v for k, v in clip.state_dict().items()})
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1000, "hyper_parameters": {"lr": 1e-4}},
               d / "vqgan.ckpt")
    (d / "vision_tokenizer_config.yaml").write_text(yaml.safe_dump({
        "max_vision_token_length": CFG["max_vision_token_length"], "freeze": True,
        "params": {"embed_dim": EMBED, "codebook_size": 2 ** BITS, "num_codebook": CB, "ckpt_path": "vqgan.ckpt",
                   "ddconfig": {"encoder_name": encoder_name, "select_layer": SEL, "z_channels": 4}}}))
    return d


@pytest.fixture(scope="module")
def imported(parts, tmp_path_factory):
    from edgemm.importers import import_checkpoint
    clip, conv, proj, _, _ = parts
    d = tmp_path_factory.mktemp("libra-pixels")
    src = write_release(d / "libra-tiny", clip, conv, proj)
    summary = import_checkpoint(src, d / "ck", allow_bin=True, log=None)
    return {"dir": d, "src": src, "ck": d / "ck", "summary": summary}


@pytest.mark.parametrize("encoder_in_ckpt", [True, False])
def test_release_layout_imports_the_tokenizer(parts, imported, tmp_path, encoder_in_ckpt):
    """Both places the release may keep the CLIP weights (inside vqgan.ckpt, or only in the CLIP folder) give the
    released encode's codes exactly."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.importers import import_checkpoint
    clip, conv, proj, _, _ = parts
    ck = imported["ck"]
    if not encoder_in_ckpt:
        src = write_release(tmp_path / "libra-tiny", clip, conv, proj, encoder_in_ckpt=False)
        ck = tmp_path / "ck"
        import_checkpoint(src, ck, allow_bin=True, log=None)
    m, _ = load_checkpoint(ck)
    assert m.cfg.vision.arch == "libra_vq" and m.cfg.vision.pad_square and m.cfg.input_stage == "vision"
    px = images(2, seed=11)
    with torch.no_grad():
        want, _ = reference_tokens(clip, conv, proj, px)
        got, _ = m.vision(px)
    assert torch.equal(got, want)
    assert "libra image tokenizer (pixels)" in imported["summary"]["variants"]


def test_release_layout_refusals(parts, tmp_path):
    """The pickled tokenizer needs --allow-bin; a convolutional VQGAN encoder is refused by name; nothing is
    written either way."""
    from edgemm.errors import UnsupportedVariant
    from edgemm.importers import import_checkpoint
    clip, conv, proj, _, _ = parts
    src = write_release(tmp_path / "a", clip, conv, proj)
    with pytest.raises(EdgemmError, match="--allow-bin"):
        import_checkpoint(src, tmp_path / "out", log=None)
    src = write_release(tmp_path / "b", clip, conv, proj, encoder_name="vqgan_f16")
    with pytest.raises(UnsupportedVariant, match="convolutional VQGAN"):
        import_checkpoint(src, tmp_path / "out", allow_bin=True, log=None)
    assert not (tmp_path / "out").exists()


def test_exports_validate_and_run_answers_from_an_image(imported):
    """onnx fp32, onnx int8 (per-modality calibration: the vision stage calibrates on images through the
    tokenizer) and trt fp16 (Q/DQ graphs, --no-build) bundles pass their export check, gguf is refused naming a
    routed variant; `edgemm run --image` answers on the onnx bundle."""
    from PIL import Image
    from click.testing import CliRunner
    from edgemm.cli import main
    from tests.test_import_llava import exports_validate
    d, ck = imported["dir"], imported["ck"]
    exports_validate(ck, d, "low-rank vision branches")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 36, 3), dtype=np.uint8)).save(d / "img.png")
    r = CliRunner().invoke(main, ["run", "--bundle", str(d / "onnx-fp32"), "--image", str(d / "img.png"),
                                  "--max-new-tokens", "3", "describe"])
    assert r.exit_code == 0 and r.output.strip(), r.output
