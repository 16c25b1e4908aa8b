"""Specs of edgemm.blocks.omnifusion: OmniFusion's MLP adapter (per-encoder first layers with the merged towers) and
its transformer adapter (one post-norm layer of attn_heads heads + a linear)."""
from __future__ import annotations

from ...errors import EdgemmError
from ..spec import declare


def check_transformer(cfg) -> None:
    h = cfg.adapter.attn_heads
    if h < 1 or cfg.vision.width % h:
        raise EdgemmError("the omni_transformer adapter needs attn_heads >= 1 dividing the vision width")


declare("connector", "omni_mlp")
declare("connector", "omni_transformer", fields={"attn_heads": 4}, check=check_transformer)
