"""Spec of edgemm.blocks.internvit (InternVL's InternViT): pre-norm blocks with LayerScale, LayerNorm or RMSNorm
(norm "layer" | "rms"), q/k/v biases (qkv_bias), an RMSNorm over all of q and of k (qk_norm), a LayerNorm after the
last block (final_norm: transformers' use_mean_pooling false at vision_feature_layer -1)."""
from __future__ import annotations

from ..spec import declare
from .connectors import check_internvl

declare("vision", "internvit", fields={"norm": "layer", "qkv_bias": True, "qk_norm": False, "final_norm": False},
        check=check_internvl)
