"""LLaVA-NeXT-Video (transformers' LlavaNextVideoForConditionalGeneration) -> edgemm, for image input.

Its image path is LLaVA-NeXT's (CLIP tower, any-resolution tiles, MLP projector, newline row) and its checkpoint
layout is the same, so the tensor plan is LLaVA-NeXT's. Video input (frames through the tower, then the
vision_resampler's spatial average pooling, `video_token_index` rows) is not computed yet: the video settings are
read and reported, and an image prompt answers as transformers' model does.
"""
from __future__ import annotations

from . import register
from .llava import LlavaNext


@register
class LlavaNextVideo(LlavaNext):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    architectures = ("llavanextvideoforconditionalgeneration",)
    source = "`LlavaNextVideoForConditionalGeneration`"
    computes = "LLaVA-NeXT's image path (video frames not yet)"

    def plan(self, hf, src, rules="original"):
        plan = super().plan(hf, src, rules)
        stride, mode = hf.get("spatial_pool_stride", 2), hf.get("spatial_pool_mode", "average")
        plan.notes.append(f"video input is not imported (frames pooled {mode} by {stride}, video token "
                          f"{hf.get('video_token_index')}): images only")
        return plan
