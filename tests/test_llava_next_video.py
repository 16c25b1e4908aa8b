"""LLaVA-NeXT-Video checkpoints (the first family added as a plug-in: edgemm/families/llava_next_video.py):
imported from transformers' own LlavaNextVideoForConditionalGeneration, checked against it on images of two
aspect ratios (image rows and logits), and exported to onnx."""
import pytest
import torch

from edgemm.checkpoint import load_checkpoint
from edgemm.importers import import_checkpoint

from .test_anyres import PINPOINTS, S, _image, _processor
from .test_import import write_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
IMAGE_TOKEN, VIDEO_TOKEN = 3, 4


def _tiny(seed=0):
    from transformers import (CLIPVisionConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration,
                              Qwen2Config)
    text = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                              image_size=S, patch_size=4, hidden_act="quick_gelu", projection_dim=16)
    cfg = LlavaNextVideoConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                               video_token_index=VIDEO_TOKEN, vision_feature_layer=-2,
                               vision_feature_select_strategy="default", projector_hidden_act="gelu",
                               image_grid_pinpoints=PINPOINTS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(cfg).eval()
    with torch.no_grad():                 # every weight (the newline row, the zero QKV biases) away from its init
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava-next-video")
    model = _tiny()
    model.save_pretrained(d / "hf", safe_serialization=True)
    _processor().save_pretrained(d / "hf")
    write_tokenizer(d / "hf")
    summary = import_checkpoint(d / "hf", d / "ck", log=None)          # the family read from config.json
    return model, summary, d / "ck"


def test_import_matches_transformers_on_images(imported):
    from PIL import Image
    from edgemm.anyres import preprocess_tiles
    model, summary, ck = imported
    assert summary["family"] == "llava_next_video"
    assert any(n.startswith("video: 8 frames") for n in summary["notes"])      # (tests/test_video.py checks it)
    assert {"any-resolution tiling", "qkv bias"} <= set(summary["variants"])        # Qwen2 language model
    m, _ = load_checkpoint(ck)
    proc = _processor()
    for i, (w, h) in enumerate([(40, 20), (20, 44)]):
        img = _image(w, h, i)
        hf = proc(images=[Image.fromarray(img)], return_tensors="pt")
        px, _ = preprocess_tiles(img, m.cfg.vision)
        with torch.no_grad():
            want = model.model.get_image_features(pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"],
                                                  ).pooler_output[0]
            got = m.encode_image_tiled(torch.from_numpy(px), h, w)[0]
        assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4
        g = torch.Generator().manual_seed(i)
        pre, post = torch.randint(5, 500, (1, 4), generator=g), torch.randint(5, 500, (1, 5), generator=g)
        ids = torch.cat([pre, torch.full((1, want.shape[0]), IMAGE_TOKEN), post], 1)
        with torch.no_grad():
            ref = model(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"]).logits[0]
            lg = m.forward_full([("text", pre), ("image", got[None]), ("text", post)])[0]
        assert lg.shape == ref.shape and (lg - ref).abs().max().item() <= 1e-4


def test_onnx_export_validates(imported, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from edgemm.export.onnx import export_onnx
    _, _, ck = imported
    man = export_onnx(str(ck), tmp_path / "b", precision="fp32", log=None)
    assert all(s["ok"] for s in man["validation"]["stages"].values())
