"""LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration) -> edgemm, for image input.

A SigLIP tower (edgemm.blocks.vision.SiglipVisionTower; vision_feature_layer -1: the last layer's output before
post_layernorm, every row: strategy "full"), LLaVA's MLP projector, a Qwen2 language model (llava.decoder_config /
decoder_plan), and LLaVA-NeXT's any-resolution tiling with anyres_max (edgemm.anyres: the unpadded feature map is
downscaled, bilinear, past `vision_aspect_ratio` "anyres_max_N" tiles' worth) and the newline row.

Video (edgemm.video): each frame stretched to the tower's size, through the tower and the projector, its feature map
downscaled 2x (bilinear, sides rounded up, on the host), the frames' rows then one newline row where the template
puts `<video>`.
Not computed: transformers' several-images-in-one-prompt mode (each image then its overview alone, padded to a
square: edgemm tiles every image as a one-image prompt does).
"""
from __future__ import annotations

import re

from ..config import AdapterConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError
from ..importers.tokenizer import _read_json
from ..video import video_settings
from . import register
from .base import CLIP_MEAN, CLIP_STD, Plan, _act, _req, _siglip_vision
from .llava import Llava, anyres_plan, decoder_config, decoder_plan, pick, projector_plan

# transformers' LlavaOnevisionConfig default: 384 px tiles in grids of 1x1 to 6x6
PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def anyres_max(value, where: str) -> int:
    """vision_aspect_ratio "anyres_max_N" -> N (transformers computes no other form)."""
    m = re.fullmatch(r"anyres_max_(\d+)", str(value))
    if not m or int(m.group(1)) < 1:
        raise EdgemmError(f"{where}: vision_aspect_ratio {value!r} is not supported (anyres_max_N)")
    return int(m.group(1))


def map_llava_onevision(hf: dict, src, rules: str = "original") -> Plan:
    w = "config.json"
    tc, vc = _req(hf, "text_config", w), _req(hf, "vision_config", w)
    wt, wv = "config.json text_config", "config.json vision_config"
    # tied when config.json or its text_config says so (LlavaOnevisionConfig.__post_init__: 4.x saves may carry a
    # top-level false over a Qwen2 text_config that ties, as Qwen2-0.5B does)
    tie = bool(hf.get("tie_word_embeddings")) or bool(tc.get("tie_word_embeddings"))
    decoder = decoder_config({**hf, "tie_word_embeddings": tie}, tc, wt)
    vmt = vc.get("model_type", "siglip_vision_model")
    if vmt != "siglip_vision_model":
        raise EdgemmError(f"{wv}: vision tower {vmt!r} is not supported (siglip_vision_model)")
    fl = hf.get("vision_feature_layer", -1)
    if not isinstance(fl, int):
        raise EdgemmError(f"{w}: vision_feature_layer {fl!r} (several layers) is not supported")
    vl = _req(vc, "num_hidden_layers", wv)
    used = vl + 1 + fl if fl < 0 else fl
    if not 1 <= used <= vl:
        raise EdgemmError(f"{w}: vision_feature_layer {fl} is out of range for {vl} layers")
    if hf.get("vision_feature_select_strategy", "full") != "full":
        raise EdgemmError(f"{w}: vision_feature_select_strategy {hf['vision_feature_select_strategy']!r} is not "
                          "supported (SigLIP has no CLS row: 'full')")
    n_max = anyres_max(hf.get("vision_aspect_ratio", "anyres_max_9"), w)
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=_req(vc, "image_size", wv), patch_size=_req(vc, "patch_size", wv),
                            width=_req(vc, "hidden_size", wv), layers=vl, heads=_req(vc, "num_attention_heads", wv),
                            mlp_dim=_req(vc, "intermediate_size", wv), eps=vc.get("layer_norm_eps", 1e-6),
                            gelu=_act(vc.get("hidden_act", "gelu_pytorch_tanh"), wv), image_mean=CLIP_MEAN,
                            image_std=CLIP_STD, arch="siglip", feature_layer=used, anyres_max=n_max),
        adapter=AdapterConfig(kind="mlp", gelu=_act(hf.get("projector_hidden_act", "gelu"), w),
                              bias=bool(hf.get("multimodal_projector_bias", True))),
        decoder=decoder)
    names = set(src.where)
    vt = pick(names, ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                      "vision_tower."), "embeddings.patch_embedding.weight")
    plan = Plan(cfg)
    decoder_plan(plan, src)
    _siglip_vision(plan, vt, used, False, names)
    projector_plan(plan, pick(names, ("model.multi_modal_projector.", "multi_modal_projector."), "linear_1.weight"))
    plan = anyres_plan(plan, hf, src, PINPOINTS)
    p = _read_json(src.path / "processor_config.json") or {}        # the processor's own (the prompt's row count)
    if "vision_aspect_ratio" in p and anyres_max(p["vision_aspect_ratio"], "processor_config.json") != n_max:
        raise EdgemmError(f"processor_config.json: vision_aspect_ratio {p['vision_aspect_ratio']!r} differs from "
                          f"config.json's anyres_max_{n_max}")
    plan.notes.append(f"anyres_max_{n_max}: an image's tile features are downscaled past {n_max} tiles' worth")
    plan.cfg.vision.video = video_settings(src.path, {"pool": 2, "pool_mode": "bilinear", "project_first": True,
                                                      "newline": True, "resize": "stretch"})
    plan.notes.append(f"video: {plan.cfg.vision.video['frames']} frames through the tower and projector, each map "
                      f"downscaled 2x (bilinear), + one newline row, where the template puts <video> (token "
                      f"{hf.get('video_token_index')}); several images in one prompt are tiled each as a one-image "
                      "prompt (transformers encodes each as its overview alone)")
    return plan


@register
class LlavaOnevision(Llava):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    architectures = ("llavaonevisionforconditionalgeneration",)
    source = "`LlavaOnevisionForConditionalGeneration` (Qwen2 language model)"
    computes = "SigLIP tower, any-resolution tiling with anyres_max downscaling; video frames pooled"
    blocks = ("vision:siglip", "connector:mlp", "layer:single")
    core = ("single branch (llava)", "siglip vision tower", "mlp projector", "any-resolution tiling")

    def plan(self, hf, src, rules="original"):
        return map_llava_onevision(hf, src, rules)
