"""Qwen2-VL and Qwen2.5-VL (transformers' Qwen2VLForConditionalGeneration, model_type "qwen2_vl", and
Qwen2_5_VLForConditionalGeneration, "qwen2_5_vl": Qwen2-VL-2B/7B, Qwen2.5-VL-3B/7B) -> edgemm, for image input.

- the vision tower (Qwen2VisionTransformerPretrainedModel / Qwen2_5_...) as edgemm.blocks.qwen2vl's tower: the
  Conv3d patch embedding summed over its temporal_patch_size frames (an image is one frame repeated), 2-D RoPE,
  LayerNorm + QuickGELU MLP blocks (2-VL) or RMSNorm + SwiGLU blocks with window attention outside
  fullatt_block_indexes (2.5-VL); the patch merger (ln_q, 2 x 2 cells concatenated, Linear-GELU-Linear) as the
  qwen2vl_merger connector;
- the language model as LLaVA's Qwen2 decoder (edgemm.families.llava: single branch, QKV bias) with M-RoPE
  (DecoderConfig.mrope_section): an image's rows at 3-D positions, the text after it at max + 1, as get_rope_index;
- the processor: Qwen2VLImageProcessor's smart_resize (min_pixels / max_pixels, multiples of 28, BICUBIC), mean /
  std (edgemm.qwen2vl_pixels); the chat template's `<|image_pad|>` (Qwen2VLProcessor expands it to the image's rows
  between `<|vision_start|>` and `<|vision_end|>`) becomes edgemm's <image>, the vision start / end tokens staying text;
- video, as Qwen2VLVideoProcessor and the model take it: the Conv3d's whole kernel kept beside the summed one
  (vision.patch_embed_t), frames sampled at the processor's fps (video_preprocessor_config.json, else
  preprocessor_config.json as transformers falls back to it; 2 a second, qwen-vl-utils' rate, where it says none),
  each temporal patch of T frames one grid of rows at its own temporal M-RoPE position (Qwen2.5-VL: spaced by
  tokens_per_second * T / the sampled fps); the template's `<|video_pad|>` becomes edgemm's <video>
  (edgemm.qwen2vl_pixels.clip_pixels, edgemm.video).
Both layouts: the releases' (model., visual., lm_head; text settings at the top of config.json, rope_scaling
{"type": "mrope"}) and transformers 5.x's (model.language_model., model.visual., text_config).
"""
from __future__ import annotations

from ..config import AdapterConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError
from ..importers.shards import Source
from ..importers.tokenizer import _read_json
from ..chat_template import VIDEO
from ..tokenizer import IMAGE
from . import Family, register
from .base import CLIP_MEAN, CLIP_STD, Plan, _act, _req
from .llava import decoder_config, decoder_plan, pick

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
BICUBIC = 3


def _mrope(tc: dict, wt: str) -> tuple[float, list]:
    """-> (rope_theta, mrope_section) from rope_parameters (5.x) or rope_theta / rope_scaling (the releases)."""
    rp = {**(tc.get("rope_scaling") or {}), **(tc.get("rope_parameters") or {})}
    rtype = rp.get("rope_type") or rp.get("type") or "default"
    if rtype not in ("default", "mrope"):
        raise EdgemmError(f"{wt}: RoPE {rtype!r} is not supported (M-RoPE, no scaling)")
    return float(rp.get("rope_theta", tc.get("rope_theta", 1_000_000.0))), list(rp.get("mrope_section", [16, 24, 24]))


def _vision(vc: dict, wv: str, v25: bool, d_model: int) -> VisionConfig:
    """vision_config -> the qwen2vl tower's VisionConfig; an output width other than the text's is refused."""
    rp = vc.get("rope_parameters") or {}
    if float(rp.get("rope_theta", 10000.0)) != 10000.0 or vc.get("in_channels", vc.get("in_chans", 3)) != 3:
        raise EdgemmError(f"{wv}: a vision RoPE base other than 10000 or other than 3 input channels is not supported")
    if v25:
        W, out, mlp_dim = _req(vc, "hidden_size", wv), _req(vc, "out_hidden_size", wv), _req(vc, "intermediate_size", wv)
        if vc.get("hidden_act", "silu") != "silu":
            raise EdgemmError(f"{wv}: hidden_act {vc['hidden_act']!r} is not supported (silu)")
        act, norm, mlp = "erf", "rms", "swiglu"
    else:
        W, out = _req(vc, "embed_dim", wv), _req(vc, "hidden_size", wv)
        mlp_dim, act, norm, mlp = int(W * vc.get("mlp_ratio", 4)), _act(vc.get("hidden_act", "quick_gelu"), wv), \
            "layer", "gelu"
    if out != d_model:
        raise EdgemmError(f"{wv}: the merger's output width {out} differs from the language model's {d_model}")
    p, m = vc.get("patch_size", 14), vc.get("spatial_merge_size", 2)
    heads, layers = _req(vc, "num_heads", wv), _req(vc, "depth", wv)
    if W % heads or (W // heads) % 4:
        raise EdgemmError(f"{wv}: the head width {W}/{heads} must be a multiple of 4 (2-D RoPE)")
    full = list(vc.get("fullatt_block_indexes", [])) if v25 else []
    return VisionConfig(image_size=p * m, patch_size=p, width=W, layers=layers, heads=heads, mlp_dim=mlp_dim,
                        eps=1e-6, gelu=act, norm=norm, mlp=mlp, arch="qwen2vl", tiling="qwen2vl", merge_size=m,
                        window_px=int(vc.get("window_size", 112)) if v25 else 0, full_blocks=full)


def _processor(src: Source, v: VisionConfig, temporal: int) -> None:
    """preprocessor_config.json (Qwen2VLImageProcessor) -> min / max pixels, mean, std; anything else refused."""
    p, w = _read_json(src.path / "preprocessor_config.json") or {}, "preprocessor_config.json"
    size = p.get("size") or {}
    v.min_pixels = int(p.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
    v.max_pixels = int(p.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
    if (p.get("patch_size", v.patch_size), p.get("merge_size", v.merge_size),
            p.get("temporal_patch_size", temporal)) != (v.patch_size, v.merge_size, temporal):
        raise EdgemmError(f"{w}: patch_size / merge_size / temporal_patch_size differ from the vision tower's")
    if p.get("do_resize") is False or p.get("do_rescale") is False or p.get("do_normalize") is False or \
            abs(p.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12 or p.get("resample", BICUBIC) != BICUBIC:
        raise EdgemmError(f"{w}: resize / rescale / normalize off, another rescale_factor or resample filter are "
                          "not supported (BICUBIC)")
    v.image_mean = tuple(p.get("image_mean", CLIP_MEAN))
    v.image_std = tuple(p.get("image_std", CLIP_STD))


VIDEO_SIZE = (128 * 28 * 28, 768 * 28 * 28)    # Qwen2VLVideoProcessor's size (shortest_edge, longest_edge) default
VIDEO_FRAMES = (4, 768)                          # its min_frames, max_frames
VIDEO_FPS = 2.0                                  # qwen-vl-utils' sampling rate (the processor's own samples none)


def _video(src: Source, v: VisionConfig, temporal: int, tokens_per_second: float) -> dict:
    """VisionConfig.video: Qwen2VLVideoProcessor's settings from video_preprocessor_config.json, else from
    preprocessor_config.json (transformers reads that when the video one is missing), its class defaults else."""
    w = "video_preprocessor_config.json"
    p = _read_json(src.path / w)
    if not isinstance(p, dict):
        w, p = "preprocessor_config.json", _read_json(src.path / "preprocessor_config.json") or {}
    size = p.get("size") or {}
    lo = int(p.get("min_pixels") or size.get("shortest_edge") or VIDEO_SIZE[0])
    hi = int(p.get("max_pixels") or size.get("longest_edge") or VIDEO_SIZE[1])
    fps = float(p.get("fps") or VIDEO_FPS)
    n = p.get("num_frames") if p.get("do_sample_frames") else None
    lo_f, hi_f = int(p.get("min_frames", VIDEO_FRAMES[0])), int(p.get("max_frames", VIDEO_FRAMES[1]))
    if not 0 < lo <= hi or hi < (v.patch_size * v.merge_size) ** 2 or fps <= 0 or not 0 < lo_f <= hi_f or \
            n is not None and (not isinstance(n, int) or n < 1) or p.get("temporal_patch_size", temporal) != temporal:
        raise EdgemmError(f"{w}: the video settings (min / max pixels, fps, min / max frames, num_frames, "
                          "temporal_patch_size) are out of range or differ from the vision tower's")
    out = {"temporal": temporal, "min_pixels": lo, "max_pixels": hi, "fps": fps, "min_frames": lo_f,
           "max_frames": hi_f, "sample": "qwen2vl", "tokens_per_second": float(tokens_per_second),
           "image_mean": list(p.get("image_mean", v.image_mean)), "image_std": list(p.get("image_std", v.image_std))}
    return {**out, **({"frames": n} if n else {})}


def map_qwen2vl(hf: dict, src: Source, rules: str = "original") -> Plan:
    w, wv = "config.json", "config.json vision_config"
    v25 = "qwen2_5" in str(hf.get("model_type", "")) or any("2_5" in str(a) for a in hf.get("architectures") or [])
    tc = hf.get("text_config") or hf                    # (the releases keep the text settings at the top)
    wt = "config.json text_config" if "text_config" in hf else w
    vc = _req(hf, "vision_config", w)
    if tc.get("use_sliding_window"):
        raise EdgemmError(f"{wt}: sliding-window attention is not supported")
    theta, section = _mrope(tc, wt)
    decoder = decoder_config(hf, {**tc, "model_type": "qwen2", "rope_parameters": {"rope_theta": theta},
                                  "rope_scaling": None}, wt)
    decoder.mrope_section = section
    cfg = ModelConfig(name=src.path.name, vision=_vision(vc, wv, v25, decoder.d_model),
                      adapter=AdapterConfig(kind="qwen2vl_merger", gelu="erf"), decoder=decoder)
    T = int(vc.get("temporal_patch_size", 2))
    _processor(src, cfg.vision, T)
    cfg.vision.video = _video(src, cfg.vision, T, vc.get("tokens_per_second", 4) if v25 else 0)
    cfg.validate()
    names = set(src.where)
    plan = Plan(cfg)
    decoder_plan(plan, src)
    vt = pick(names, ("model.visual.", "visual."), "patch_embed.proj.weight")
    plan.add("vision.patch_embed.weight", vt + "patch_embed.proj.weight", fn=lambda t: t[0].float().sum(2))
    W, p = cfg.vision.width, cfg.vision.patch_size      # (a video's: [W, 3, T, p, p] -> frame-major channels)
    plan.add("vision.patch_embed_t.weight", vt + "patch_embed.proj.weight",
             fn=lambda t: t[0].float().permute(0, 2, 1, 3, 4).reshape(W, 3 * T, p, p))
    mlp = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")) if v25 else (("fc1", "fc1"), ("fc2", "fc2"))
    norms = ("weight",) if v25 else ("weight", "bias")
    for i in range(cfg.vision.layers):
        e, s = f"vision.blocks.{i}.", f"{vt}blocks.{i}."
        for n in norms:
            plan.add(f"{e}norm1.{n}", f"{s}norm1.{n}")
            plan.add(f"{e}norm2.{n}", f"{s}norm2.{n}")
        for n in ("weight", "bias"):
            plan.add(f"{e}qkv.{n}", f"{s}attn.qkv.{n}")
            plan.add(f"{e}proj.{n}", f"{s}attn.proj.{n}")
            for ours, theirs in mlp:
                plan.add(f"{e}{ours}.{n}", f"{s}mlp.{theirs}.{n}")
    for n in norms:
        plan.add(f"adapter.ln_q.{n}", f"{vt}merger.ln_q.{n}")
    for n in ("weight", "bias"):
        plan.add(f"adapter.fc1.{n}", f"{vt}merger.mlp.0.{n}")
        plan.add(f"adapter.fc2.{n}", f"{vt}merger.mlp.2.{n}")
    v = cfg.vision
    plan.notes.append(f"image token id {hf.get('image_token_id')} ({IMAGE_PAD}): any size resized within "
                      f"{v.min_pixels}..{v.max_pixels} pixels, one row per {v.patch_size * v.merge_size} px cell, "
                      f"at 3-D M-RoPE positions (sections {section})"
                      + (f"; window attention over {v.window_px} px, full in blocks {v.full_blocks}" if v.window_px
                         else ""))
    vv = v.video
    plan.notes.append(f"video token id {hf.get('video_token_id')} ({VIDEO_PAD}): frames sampled at {vv['fps']:g} a "
                      f"second ({vv['min_frames']}..{vv['max_frames']}), resized within {vv['min_pixels']}.."
                      f"{vv['max_pixels']} pixels, {T} frames a temporal patch at its own temporal position"
                      + (f" ({vv['tokens_per_second']:g} positions a second)" if vv["tokens_per_second"] else ""))
    return plan


@register
class Qwen2VL(Family):
    name = "qwen2vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    architectures = ("qwen2vlforconditionalgeneration", "qwen2_5_vlforconditionalgeneration")
    source = "`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`"
    computes = "Qwen2-VL ViT (2-D RoPE, any size; 2.5: RMSNorm, SwiGLU, window attention), 2x2 patch merger, " \
               "Qwen2 decoder with M-RoPE; images and video (temporal patches of frames at temporal positions)"
    blocks = ("vision:qwen2vl", "connector:qwen2vl_merger", "layer:single")
    core = ("single branch (llava)", "qkv bias", "qwen2-vl vision tower (2-d rope, any size)", "qwen2-vl patch merger",
            "m-rope (3-d image positions)")
    optional = ("grouped-query attention", "window attention (qwen2.5-vl)")

    def plan(self, hf, src, rules="original"):
        return map_qwen2vl(hf, src, rules)

    def adapt_template(self, template: str, src) -> str:
        """The template's <|image_pad|> / <|video_pad|> (one per image / video, expanded by the processor) become
        edgemm's <image> / <video>."""
        return template.replace(IMAGE_PAD, IMAGE).replace(VIDEO_PAD, VIDEO)
