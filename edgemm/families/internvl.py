"""InternVL (transformers' InternVLForConditionalGeneration, model_type "internvl": InternVL3's checkpoints in the
transformers layout, the 1B/2B with a Qwen2 language model) -> edgemm.

- the InternViT tower (edgemm.blocks.internvit): the blocks up to vision_feature_layer, the CLS row dropped
  (vision_feature_select_strategy "default"), its LayerNorm after the blocks where the model takes the last hidden
  state without mean pooling;
- the connector (edgemm.blocks.connectors' pixel_shuffle): pixel shuffle by downsample_ratio, then the
  multi_modal_projector (layer_norm -> linear_1 -> GELU -> linear_2);
- the language model as LLaVA's (edgemm.families.llava: decoder_config / decoder_plan);
- the processor: InternVLProcessor's dynamic tiles (GotOcr2 image processor with crop_to_patches: min/max patches,
  closest aspect ratio, thumbnail; edgemm.internvl_tiles) from preprocessor_config.json; its prompt expansion
  <img> + <IMG_CONTEXT> x rows + </img>: the checkpoint's chat template renders an image as <IMG_CONTEXT>, which the
  import stores as <img><image></img> (the tokens named by tokenizer_config.json), so the text around the image
  segment carries <img> and </img> and the segment is the vision stage's rows.
"""
from __future__ import annotations

import json

from ..config import AdapterConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError
from ..importers.shards import Source
from ..tokenizer import IMAGE
from ..video import processor_settings, video_settings
from . import Family, register
from .base import CLIP_MEAN, CLIP_STD, Plan, _act, _cat, _req
from .idefics import _token
from .llava import decoder_config, decoder_plan, feature_layer, pick

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}


def _json(src: Source, name: str) -> dict:
    f = src.path / name
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise EdgemmError(f"{f} is not valid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def image_tokens(src: Source, defaults: dict = IMAGE_TOKENS) -> dict:
    """The image tokens InternVLProcessor uses: tokenizer_config.json's start/end/context image tokens (top level or
    in extra_special_tokens), else InternVL's <img>, </img>, <IMG_CONTEXT> (`defaults`: another family's names and
    values, SmolVLM's)."""
    tc = _json(src, "tokenizer_config.json")
    extra = tc.get("extra_special_tokens") if isinstance(tc.get("extra_special_tokens"), dict) else {}
    out = {}
    for k, default in defaults.items():
        v = extra.get(k, tc.get(k, default))
        out[k] = v.get("content") if isinstance(v, dict) else v
        if not isinstance(out[k], str) or not out[k]:
            raise EdgemmError(f"{src.path / 'tokenizer_config.json'}: {k} {v!r} is not a token")
    return out


def _processor(src: Source, v: VisionConfig, rows: int) -> None:
    """preprocessor_config.json (GotOcr2 image processor) and processor_config.json -> the tiles' settings."""
    p, w = _json(src, "preprocessor_config.json"), "preprocessor_config.json"
    size = p.get("size") or {}
    for what, n in (("size height", size.get("height")), ("size width", size.get("width"))):
        if n not in (None, v.image_size):
            raise EdgemmError(f"{w}: {what} {n} differs from the tower's image_size {v.image_size}")
    v.image_mean = tuple(p.get("image_mean", CLIP_MEAN))
    v.image_std = tuple(p.get("image_std", CLIP_STD))
    if p.get("do_resize") is False or p.get("do_normalize") is False or p.get("do_rescale") is False:
        raise EdgemmError(f"{w}: do_resize, do_rescale and do_normalize off are not supported")
    if p.get("resample", 3) != 3:
        raise EdgemmError(f"{w}: resample {p['resample']} is not supported (3: bicubic, what edgemm resizes with)")
    v.min_tiles, v.max_tiles = int(p.get("min_patches", 1)), int(p.get("max_patches", 12))
    seq = _json(src, "processor_config.json").get("image_seq_length")
    if seq not in (None, rows):
        raise EdgemmError(f"processor_config.json: image_seq_length {seq} differs from the {rows} rows a tile gives "
                          "(image_size / patch_size * downsample_ratio, squared)")


def _internvit(plan: Plan, vt: str, used: int, names) -> None:
    """InternVLVisionModel's tensors under `vt` -> the internvit tower: embeddings, the first `used` layers (fused
    QKV, LayerScale, q/k norms where the config has them), the final LayerNorm where the tower applies it."""
    v = plan.cfg.vision
    em = vt + "embeddings."
    for n in ("weight", "bias"):
        plan.add(f"vision.patch_embed.{n}", em + f"patch_embeddings.projection.{n}")
    plan.add("vision.cls", em + "cls_token")
    plan.add("vision.pos", em + "position_embeddings")
    plan.ignore(em + "mask_token", "masked-image-modelling token: not used at inference")
    norm = ("weight", "bias") if v.norm == "layer" else ("weight",)
    for i in range(used):
        s, e = f"{vt}encoder.layer.{i}.", f"vision.blocks.{i}."
        a = s + "attention."
        for n in ("weight", "bias") if v.qkv_bias else ("weight",):
            plan.add(e + f"qkv.{n}", *(a + f"{x}_proj.{n}" for x in "qkv"), fn=_cat)
        for n in ("weight", "bias"):
            for ours, theirs in (("proj", "attention.projection_layer"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
                plan.add(e + f"{ours}.{n}", s + f"{theirs}.{n}")
        for n in norm:
            plan.add(e + f"ln1.{n}", s + f"layernorm_before.{n}")
            plan.add(e + f"ln2.{n}", s + f"layernorm_after.{n}")
        if v.qk_norm:
            plan.add(e + "q_norm.weight", a + "q_norm.weight")
            plan.add(e + "k_norm.weight", a + "k_norm.weight")
        plan.add(e + "ls1", s + "lambda_1")
        plan.add(e + "ls2", s + "lambda_2")
    for k in names:
        if k.startswith(vt + "encoder.layer.") and int(k[len(vt + "encoder.layer."):].split(".")[0]) >= used:
            plan.ignore(k, f"InternViT layer after the feature layer (the first {used} are used)")
    for n in ("weight", "bias"):
        if v.final_norm:
            plan.add(f"vision.final_norm.{n}", vt + f"layernorm.{n}")
        else:
            plan.ignore(vt + f"layernorm.{n}", "InternViT's last LayerNorm: the feature layer is taken before it")


def map_internvl(hf: dict, src: Source, rules: str = "original") -> Plan:
    """transformers' InternVLForConditionalGeneration: InternViT + pixel shuffle + MLP + a LLaVA-style LM."""
    w, wt, wv = "config.json", "config.json text_config", "config.json vision_config"
    tc, vc = _req(hf, "text_config", w), _req(hf, "vision_config", w)
    decoder = decoder_config(hf, tc, wt)
    vmt = vc.get("model_type", "internvl_vision")
    if vmt != "internvl_vision":
        raise EdgemmError(f"{wv}: vision tower {vmt!r} is not supported (internvl_vision)")
    sizes = []
    for key in ("image_size", "patch_size"):
        x = _req(vc, key, wv)
        x = list(x) if isinstance(x, (list, tuple)) else [x, x]
        if len(x) != 2 or x[0] != x[1]:
            raise EdgemmError(f"{wv}: {key} {x} is not square (edgemm's tiles are square)")
        sizes.append(int(x[0]))
    if vc.get("use_absolute_position_embeddings", True) is not True:
        raise EdgemmError(f"{wv}: use_absolute_position_embeddings false (no position table) is not supported")
    if vc.get("norm_type", "layer_norm") not in ("layer_norm", "rms_norm"):
        raise EdgemmError(f"{wv}: norm_type {vc['norm_type']!r} is not supported (layer_norm, rms_norm)")
    fl, vl, used = feature_layer(hf, vc, -1)
    if hf.get("vision_feature_select_strategy", "default") != "default":
        raise EdgemmError(f"{w}: vision_feature_select_strategy {hf['vision_feature_select_strategy']!r} is not "
                          "supported (default: the CLS row dropped)")
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=sizes[0], patch_size=sizes[1], width=_req(vc, "hidden_size", wv), layers=vl,
                            heads=_req(vc, "num_attention_heads", wv), mlp_dim=_req(vc, "intermediate_size", wv),
                            eps=vc.get("layer_norm_eps", 1e-6), gelu=_act(vc.get("hidden_act", "gelu"), wv),
                            arch="internvit", feature_layer=used,
                            norm="layer" if vc.get("norm_type", "layer_norm") == "layer_norm" else "rms",
                            qkv_bias=bool(vc.get("attention_bias", False)), qk_norm=bool(vc.get("use_qk_norm")),
                            final_norm=fl == -1 and not vc.get("use_mean_pooling", True), tiling="internvl"),
        adapter=AdapterConfig(kind="pixel_shuffle", gelu=_act(hf.get("projector_hidden_act", "gelu"), w),
                              downsample_ratio=float(hf.get("downsample_ratio", 0.5))),
        decoder=decoder)
    from ..internvl_tiles import rows_per_tile
    _processor(src, cfg.vision, rows_per_tile(cfg))
    cfg.validate()
    names = set(src.where)
    plan = Plan(cfg)
    decoder_plan(plan, src)
    _internvit(plan, pick(names, ("model.vision_tower.", "vision_tower."), "embeddings.cls_token"), used, names)
    pj = pick(names, ("model.multi_modal_projector.", "multi_modal_projector."), "linear_1.weight")
    for m in ("layer_norm", "linear_1", "linear_2"):
        for n in ("weight", "bias"):
            plan.add(f"adapter.{m}.{n}", pj + f"{m}.{n}")
    toks = image_tokens(src)
    missing = [t for t in toks.values() if _token(src, t, required=False) is None]
    if missing:
        raise EdgemmError(f"{src.path / 'tokenizer.json'} lacks the image token(s) {', '.join(missing)} that "
                          "InternVL's prompts use")
    v = cfg.vision
    plan.notes.append(f"image token id {hf.get('image_token_id')} ({toks['context_image_token']}): each image is "
                      f"{toks['start_image_token']} + {rows_per_tile(cfg)} rows per tile + {toks['end_image_token']}, "
                      f"{v.min_tiles}..{v.max_tiles} tiles of {v.image_size} px (+ a thumbnail when more than one): "
                      f"up to {cfg.n_image_rows} rows")
    return plan


@register
class InternVL(Family):
    name = "internvl"
    model_types = ("internvl",)
    architectures = ("internvlforconditionalgeneration",)
    source = "`InternVLForConditionalGeneration` (InternVL3: Qwen2 and Llama-style language models)"
    computes = ("InternViT tower, pixel shuffle + MLP connector, dynamic tiles + thumbnail; one branch; video frames "
                "as images")
    blocks = ("vision:internvit", "connector:pixel_shuffle", "layer:single")
    core = ("single branch (llava)", "internvit vision tower", "pixel-shuffle projector", "dynamic tiles (internvl)")
    optional = ("grouped-query attention", "qkv bias", "mixture of experts", "per-head q/k norm", "head_dim of its own")

    def plan(self, hf, src, rules="original"):
        plan = map_internvl(hf, src, rules)
        t, vp = image_tokens(src), processor_settings(src.path)      # video: frames as images (edgemm.video)
        frame = "Frame{n}: " + t["start_image_token"] + IMAGE + t["end_image_token"]
        plan.cfg.vision.video = video_settings(src.path, {"frame": frame, "sep": "\n",
                                                          "shift": vp.get("initial_shift", True) is True})
        plan.notes.append(f"video: {plan.cfg.vision.video['frames']} frames, each one tile as an image, "
                          f"'{frame.replace(IMAGE, '...')}' lines where the template puts <video>")
        return plan

    def adapt_template(self, template: str, src) -> str:
        """The checkpoint's template renders an image as <IMG_CONTEXT>: stored as <img><image></img> (the processor's
        expansion, its context run being the image segment)."""
        t = image_tokens(src)
        return template.replace(t["context_image_token"], t["start_image_token"] + IMAGE + t["end_image_token"])
