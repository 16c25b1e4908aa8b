"""The reference model as a composition of registered blocks (edgemm.blocks): every config kind has its block, an
unknown one is an error that lists what is registered, and the split changed no parameter name or shape."""
from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from edgemm.blocks import registry
from edgemm.checkpoint import DEMO_DIR
from edgemm.config import ModelConfig, get_preset
from edgemm.errors import EdgemmError
from edgemm.model import EdgeMM

from tests.conftest import requires_demo

# Configs of every block kind, as the existing tests build them (tiny-shapes with one family's settings).
LLAVA = {"vision": {"arch": "clip", "feature_layer": 2, "gelu": "quick"},
         "adapter": {"kind": "mlp", "gelu": "erf"}, "decoder": {"single_branch": True, "n_kv_heads": 2}}
VARIANTS = {
    "gqa": {"decoder": {"n_kv_heads": 2}},
    "qkv-bias-cogvlm": {"decoder": {"qkv_bias": True, "position_rule": "cogvlm", "eoi_branch": "text"}},
    "libra-down-ratio-bridge": {"decoder": {"vision_down_ratio": 4, "per_modality_norms": True,
                                            "cross_modal_bridge": 4}},
    "low-rank": {"decoder": {"vision_rank": 8, "per_modality_norms": True, "n_kv_heads": 2}},
    "single": {"decoder": {"single_branch": True, "n_kv_heads": 2}},
    "tied": {"decoder": {"single_branch": True, "tie_embeddings": True}},
    "mplug-owl2": {"decoder": {"per_modality_kv": True, "per_modality_norms": True, "qkv_bias": True}},
    "qwen3": {"decoder": {"single_branch": True, "qk_norm": True, "attn_head_dim": 32}},
    "moe": {"decoder": {"single_branch": True, "n_experts": 4, "experts_top_k": 2, "moe_every": 2,
                        "expert_ffn_dim": 128, "moe_dense_layers": [2]}},
    "llava": LLAVA,
    "llava-cls": {**LLAVA, "vision": {**LLAVA["vision"], "keep_cls": True, "feature_layer": None}},
    "llava-next": {**LLAVA, "vision": {**LLAVA["vision"], "grid_pinpoints": [[48, 96], [96, 48]]},
                   "adapter": {**LLAVA["adapter"], "image_newline": True, "bias": False}},
    "blip2": {"vision": {"arch": "blip"},
              "adapter": {"kind": "qformer", "query_tokens": 6, "qformer_width": 64, "qformer_layers": 3,
                          "qformer_heads": 4, "qformer_ffn": 96, "cross_attention_frequency": 2},
              "decoder": {"single_branch": True}},
    "instructblip": {"vision": {"arch": "blip"},
                     "adapter": {"kind": "qformer", "query_tokens": 4, "qformer_width": 64, "qformer_layers": 2,
                                 "qformer_heads": 4, "qformer_ffn": 96, "qformer_text": True, "qformer_vocab": 50,
                                 "qformer_positions": 16},
                     "decoder": {"single_branch": True}},
    "libra": {"vision": {"arch": "none"},
              "adapter": {"kind": "libra", "codebooks": 2, "vision_vocab": 40, "signal_size": 12,
                          "position_embedding": 20},
              "decoder": {"vision_down_ratio": 2, "per_modality_norms": True, "cross_modal_bridge": 4}},
    "libra-added-signal": {"vision": {"arch": "none"},
                           "adapter": {"kind": "libra", "codebooks": 4, "vision_vocab": 40, "signal_size": 12,
                                       "concat_signals": False},
                           "decoder": {"vision_rank": 8, "per_modality_norms": True}},
    "idefics": {"adapter": {"kind": "perceiver", "perceiver_latents": 5, "perceiver_depth": 2,
                            "perceiver_heads": 2, "perceiver_head_dim": 16},
                "decoder": {"single_branch": True, "cross_attn_every": 2, "cross_attn_image_token": 7,
                            "cross_attn_image_wrap": 8}},
    "idefics-norms": {"vision": {"width": 128},
                      "adapter": {"kind": "perceiver", "perceiver_latents": 3, "perceiver_depth": 1,
                                  "perceiver_heads": 2, "perceiver_head_dim": 8, "perceiver_qk_norms": True,
                                  "perceiver_ffn": 64},
                      "decoder": {"single_branch": True, "cross_attn_every": 1, "cross_attn_kv_dim": 128,
                                  "cross_attn_qk_norms": True, "cross_attn_alpha": "vector",
                                  "cross_attn_image_token": 7}},
}
PRESET_NAMES = ("tiny-shapes", "bench-0.5b", "cogvlm-17b")

# sha256 of the ordered (name, shape) list of EdgeMM(cfg).state_dict(), recorded from the model before it was
# split into blocks (edgemm.model at 9d08ea2): checkpoints, exporters and GGUF writers read these names.
STATE_DICT_DIGESTS = {
    "tiny-shapes": "189472add5c9d1abd7dfc804d8f969793efecf3fa4465d9fdc7e760d3f6b3a99",
    "bench-0.5b": "9aabd63b4fbbddc67833e53b3cd2a83a0c55254f5ecdc93ddca22bd653772e53",
    "cogvlm-17b": "e13d4ef2459086205f77bd7c64ef5e7881f04a302ebfc0792ddb0cdd9eae29cd",
    "gqa": "2762f930a30f776fb333d120aac5baf4b1209882e91ff07789dc8448efc4b70e",
    "qkv-bias-cogvlm": "f5805d6153c7eb90f3898d3b9b3c013d9255718646361f8afd33ae274f507f4f",
    "libra-down-ratio-bridge": "d9c86f9996e1f9c161c468b2e0f062bc00a29a1facb554a40dce17fdebc9fa2d",
    "low-rank": "4505be6749e6dd56b541e7576ceafbcf5504b5b27456402d876199d4ade8a7ed",
    "single": "d5b98e3b082bc93d539322346343fd271d3ebb40ce58c96c5fb63eda1481e3b3",
    "tied": "77c2ba761cc2c6e3969a92b6980a42da2c7cf2a042d07b025e9608aa0574eb1c",
    "mplug-owl2": "49a277ca376767e6c6f24b06d93bb8831ce9e0b83ac31e0d31d275a4a2178df8",
    "qwen3": "f46ba6ea8e18a1fc86babcc2b8bba60683d674ee80d3fb3b75824787bfe57e35",
    "moe": "d9cc65c2455a515ce0e8ea462ac34a37b2de3616ef223e683587fc632bebec99",
    "llava": "36c49a4965b120f5beb2638ff7de045558bf32b91fa59b2e5d3e5c16005d244b",
    "llava-cls": "8c94938c9e275c985ac7567e22e3de4a8a0e11e2160c39324d41cfdba3b4445d",
    "llava-next": "7b17f0d60b5e398d41a72b06ad1b8050b3948a70c25bd38c342ff424c0b5a90e",
    "blip2": "ec0c1056e974b03b5a83734ef83d936f3b2e9bc4346f16efb8ead3076227d8be",
    "instructblip": "77f732301cad68bd38b12ebe60892dc814b1d0cd5cf133cba572fc2c87acc3c2",
    "libra": "b15b37bde44a24cb758a649f7addb31f6f5d937a0b2842b0243826df68536e2a",
    "libra-added-signal": "f89a4c011506bb491bcd6a2b66e6256994cd77c202c6b1f95e6cc77b878358a3",
    "idefics": "501131507059b0c4f512dae1184eba27d1fb844d36a16e4c1d9291c0bf2d668d",
    "idefics-norms": "88328f1324dded02e68b1ce81e356a9233b79fd16a3081b9e916a76fcb825613",
}


def variant(name: str) -> ModelConfig:
    d = get_preset("tiny-shapes").to_dict()
    for part, fields in VARIANTS[name].items():
        d[part].update(copy.deepcopy(fields))
    d["name"] = name
    return ModelConfig.from_dict(d)


def configs() -> dict[str, ModelConfig]:
    return {**{n: get_preset(n) for n in PRESET_NAMES}, **{n: variant(n) for n in VARIANTS}}


def state_dict_shapes(cfg: ModelConfig) -> list[tuple[str, tuple]]:
    """(name, shape) of every state-dict entry, in order; built on the meta device (cogvlm-17b too)."""
    with torch.device("meta"):
        model = EdgeMM(cfg)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def digest(entries) -> str:
    return hashlib.sha256("\n".join(f"{k} {s}" for k, s in entries).encode()).hexdigest()


def test_every_config_kind_has_a_registered_block():
    """Every vision.arch / adapter.kind that validate() accepts (in any of the configs above) is registered, and
    every config above builds its tower and connector from the registry."""
    cfgs = configs()
    candidates = {"vision": {"eva", "clip", "blip", "none", "siglip", "dinov2", "intern_vit", "anyres", "x"},
                  "connector": {"glu", "mlp", "qformer", "perceiver", "libra", "resampler", "pixel_shuffle", "x"}}
    for role, part, field in (("vision", "vision", "arch"), ("connector", "adapter", "kind")):
        for kind in sorted(candidates[role] | set(registry.kinds(role))):
            accepted = False
            for cfg in cfgs.values():
                d = cfg.to_dict()
                d[part][field] = kind
                try:
                    ModelConfig.from_dict(d)
                    accepted = True
                    break
                except EdgemmError:
                    pass
            if accepted:
                assert kind in registry.kinds(role), f"config accepts {part}.{field} {kind!r}: no {role} block"
    for name, cfg in cfgs.items():
        with torch.device("meta"):
            m = EdgeMM(cfg)
        assert type(m.vision) is registry.get("vision", cfg.vision.arch), name
        assert type(m.adapter) is registry.get("connector", cfg.adapter.kind), name
        assert m.vision.kind == cfg.vision.arch and m.adapter.kind == cfg.adapter.kind


def test_unknown_kind_is_an_error_listing_the_registered_ones():
    import edgemm.model  # noqa: F401  (registers the built-in blocks)
    for role in registry.ROLES:
        with pytest.raises(EdgemmError) as e:
            registry.get(role, "no-such-block")
        assert "no-such-block" in str(e.value)
        kinds = registry.kinds(role)
        assert kinds and all(k in str(e.value) for k in kinds), str(e.value)
    with pytest.raises(EdgemmError, match="roles: vision, connector, layer"):
        registry.get("tower", "eva")


def test_registered_blocks_say_what_they_are():
    """Each block class: a docstring, its `kind` as registered; the layer kinds cover the decoder's variants."""
    import edgemm.model  # noqa: F401
    for role in registry.ROLES:
        for kind in registry.kinds(role):
            cls = registry.get(role, kind)
            assert cls.kind == kind and (cls.__doc__ or "").strip(), (role, kind)
    assert {"routed", "low-rank", "per-modality-kv", "single", "moe", "gated-cross-attention"} <= \
        set(registry.kinds("layer"))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("vision", "eva")(type("Other", (), {}))


@requires_demo
def test_tiny_shapes_state_dict_is_the_shipped_checkpoints():
    from safetensors import safe_open
    with safe_open(str(DEMO_DIR / "model.safetensors"), framework="pt") as f:
        on_disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    cfg = ModelConfig.load(DEMO_DIR / "config.json")
    assert dict(state_dict_shapes(cfg)) == on_disk


@pytest.mark.parametrize("name", [*PRESET_NAMES, *VARIANTS])
def test_state_dict_names_and_shapes_unchanged(name):
    entries = state_dict_shapes(configs()[name])
    want = STATE_DICT_DIGESTS[name]
    assert digest(entries) == want, f"{name}: state dict changed; now:\n" + "\n".join(f"{k} {s}" for k, s in entries)
