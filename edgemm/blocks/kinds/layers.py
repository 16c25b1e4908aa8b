"""Specs of edgemm.blocks.layers' routed variants (the decoder option group "routed"): Libra's low-rank vision
branches, per-modality norms and cross-modal bridge, mPLUG-Owl2's per-modality K/V, XComposer2's Partial-LoRA."""
from __future__ import annotations

from ...errors import EdgemmError
from ..spec import declare


def check(cfg) -> None:
    d = cfg.decoder
    if d.single_branch and (d.vision_rank or d.vision_down_ratio or d.per_modality_norms
                            or d.cross_modal_bridge or d.eoi_branch != "vision"):
        raise EdgemmError("single_branch excludes the per-modality variants")
    if d.per_modality_kv and (not d.per_modality_norms or d.vision_rank or d.vision_down_ratio
                              or d.cross_modal_bridge or d.single_branch):
        raise EdgemmError("per_modality_kv (mPLUG-Owl2's modality-adaptive module) goes with per_modality_norms "
                          "and excludes low-rank branches, the bridge and single_branch")
    if d.vision_delta_rank and (d.vision_delta_rank < 1 or d.single_branch or d.vision_rank or d.vision_down_ratio
                                or d.per_modality_kv or d.cross_modal_bridge):
        raise EdgemmError("vision_delta_rank (XComposer2's Partial-LoRA) is a rank >= 1 and excludes single_branch, "
                          "low-rank branches, per-modality K/V and the bridge")


declare("decoder", "routed", fields={
    "vision_rank": None,            # Libra: low-rank vision branches
    "per_modality_norms": False,    # Libra / mPLUG-Owl2
    "cross_modal_bridge": None,     # Libra: rank of the cross-modal K/V bridge
    "per_modality_kv": False,       # mPLUG-Owl2: only K/V are per modality
    "vision_down_ratio": None,      # Libra: low-rank vision branches of rank out_features // ratio
    "vision_delta_rank": None,      # XComposer2's Partial-LoRA: image rows see W0 + B A (rank r), text W0
}, check=check)
