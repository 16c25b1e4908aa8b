"""Specs of edgemm.blocks.dinov2: DINOv2 (register tokens after CLS: Dinov2WithRegisters; 0: none; final_norm: its
layernorm) and OmniFusion's merged encoders (clip+dinov2: the vision config is the CLIP tower and `second` the DINOv2
tower's VisionConfig fields, same image_size / patch_size, its own image_mean / image_std)."""
from __future__ import annotations

from ...errors import EdgemmError
from ..spec import declare


def check_merged(cfg) -> None:
    v = cfg.vision
    if not v.second or cfg.adapter.kind != "omni_mlp" or not {"width", "layers", "heads", "mlp_dim"} <= set(v.second):
        raise EdgemmError("vision arch 'clip+dinov2' (OmniFusion's merged encoders) goes with vision.second (the "
                          "DINOv2 tower: width, layers, heads, mlp_dim) and the omni_mlp adapter")


declare("vision", "dinov2", fields={"registers": 0, "final_norm": False})
declare("vision", "clip+dinov2", fields={"second": {}, "feature_layer": None, "keep_cls": False}, check=check_merged)
