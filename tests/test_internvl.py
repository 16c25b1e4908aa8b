"""InternVL (transformers' InternVLForConditionalGeneration, Qwen2 language model): the InternViT tower and the
pixel-shuffle connector checked against transformers' own modules (LayerScale, q/k norm, RMSNorm and bias variants,
weights away from their init), the dynamic tiles against its GotOcr2 image processor and InternVLProcessor, and the
imported family against the whole model (image rows, logits, cached decode steps), exported to onnx and run."""
import pytest
import torch

from .test_import_llava import away_from_init

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
