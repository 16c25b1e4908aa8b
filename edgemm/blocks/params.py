"""Which part of the model a parameter belongs to, from its state-dict name (`edgemm info`, EdgeMM.param_counts).

Core: imports nothing, so the model counts its parameters without importing edgemm.info.
"""
from __future__ import annotations

PARTS = ("vision_tower", "adapter", "decoder_shared", "text_branch", "vision_branch")


def param_part(name: str) -> str:
    """A parameter's name in EdgeMM's state dict -> the part `edgemm info` counts it in."""
    if name.startswith("vision."):
        return "vision_tower"
    if name.startswith("adapter."):
        return "adapter"
    return "text_branch" if ".text." in name else "vision_branch" if ".vision." in name else "decoder_shared"
