"""LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration: SigLIP tower, anyres_max tiling, Qwen2):
the SigLIP tower block against transformers' SiglipVisionModel; the import checked against transformers' own model
and processor on tiny random instances saved in the transformers layout."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")


def _siglip(layers=3, seed=0):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    cfg = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=2,
                             image_size=16, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                             vision_use_head=True)
    torch.manual_seed(seed)
    model = SiglipVisionModel(cfg).eval()
    with torch.no_grad():                 # every weight (norm gains, biases) away from its init
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("feature_layer, post_norm", [(-1, False), (-2, False), (None, True)])
def test_siglip_tower_matches_transformers(feature_layer, post_norm):
    """The "siglip" tower, its weights mapped by the families' SigLIP plan, gives SiglipVisionModel's
    hidden_states[feature_layer] (before post_layernorm: LLaVA-OneVision's -1) or its last_hidden_state (after it:
    SmolVLM's and Gemma 3's)."""
    from edgemm.blocks.vision import SiglipVisionTower
    from edgemm.config import ModelConfig, VisionConfig
    from edgemm.families.base import Plan, _siglip_vision
    hf = _siglip()
    L = hf.config.num_hidden_layers
    used = L if feature_layer is None else L + 1 + feature_layer
    v = VisionConfig(image_size=16, patch_size=4, width=24, layers=L, heads=2, mlp_dim=48, gelu="tanh", eps=1e-6,
                     arch="siglip", feature_layer=used, post_norm=post_norm)
    plan = Plan(ModelConfig(vision=v))
    sd = hf.state_dict()
    _siglip_vision(plan, "", used, post_norm, sd)             # (transformers 5 keeps no vision_model.)
    placed = set(plan.ignored) | {s for e in plan.entries for s in e.sources}
    assert placed - {"embeddings.position_ids"} == set(sd)                    # every tensor placed (a buffer aside)
    tower = SiglipVisionTower(v)
    tower.load_state_dict({e.name[len("vision."):]: e.build([sd[s] for s in e.sources]) for e in plan.entries})
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
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
