"""LLaVA-NeXT-Video (transformers' LlavaNextVideoForConditionalGeneration) -> edgemm, images and video.

Its image path is LLaVA-NeXT's (CLIP tower, any-resolution tiles, MLP projector, newline row) and its checkpoint
layout is the same, so the tensor plan is LLaVA-NeXT's. Video (edgemm.video): frames sampled uniformly (the video
processor's num_frames, else 8), each through the tower, the vision_resampler's spatial pooling
(`spatial_pool_mode` average or max, `spatial_pool_stride`), the projector; the rows stand where the template puts
`<video>` (transformers' `video_token_index` rows). The torch backend computes it, and an onnx bundle's `video`
stage (edgemm.model.encode_video traced; fp32); trt and gguf bundles take images.
"""
from __future__ import annotations

from ..video import video_settings
from . import register
from .llava import LlavaNext


@register
class LlavaNextVideo(LlavaNext):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    architectures = ("llavanextvideoforconditionalgeneration",)
    source = "`LlavaNextVideoForConditionalGeneration`"
    computes = "LLaVA-NeXT's image path; video frames pooled (torch, onnx, trt)"

    def plan(self, hf, src, rules="original"):
        plan = super().plan(hf, src, rules)
        stride, mode = hf.get("spatial_pool_stride", 2), hf.get("spatial_pool_mode", "average")
        v, video = plan.cfg.vision, video_settings(src.path, {"pool": stride, "pool_mode": mode})
        frames = video["frames"]
        grid = v.image_size // v.patch_size
        if mode not in ("average", "max") or v.keep_cls or not isinstance(stride, int) or stride < 1 or grid % stride:
            plan.notes.append(f"video input is not imported (pool {mode} by {stride}, {frames} frames, "
                              f"{'CLS kept' if v.keep_cls else 'no CLS'}): images only")
            return plan
        v.video = video
        plan.notes.append(f"video: {frames} frames, each {(grid // stride) ** 2} rows (patch grid pooled {mode} by "
                          f"{stride}) where the template puts <video> (token {hf.get('video_token_index')})")
        return plan
