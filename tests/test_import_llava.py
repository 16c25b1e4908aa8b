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
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():                 # weights well away from init, so the comparison means something
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


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
