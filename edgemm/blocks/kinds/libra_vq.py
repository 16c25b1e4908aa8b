"""Spec of edgemm.blocks.libra_vq (Libra's image tokenizer): the clip fields are its CLIP tower; tokenizer
{"feature_layers": CLIP hidden-state indices whose rows are concatenated (its select_layer), "embed_dim": quant_conv's
width}."""
from __future__ import annotations

from ...errors import EdgemmError
from ..spec import declare
from .connectors import check_libra_pair


def check(cfg) -> None:
    check_libra_pair(cfg)
    v, a = cfg.vision, cfg.adapter
    t, n = v.tokenizer, v.layers
    fl = t.get("feature_layers")
    if not (isinstance(fl, list) and fl and all(isinstance(i, int) and -n - 1 <= i <= n for i in fl)
            and isinstance(t.get("embed_dim"), int) and t["embed_dim"] >= 1 and a.codebooks >= 1
            and a.vision_vocab > 3 and (a.vision_vocab - 2) & (a.vision_vocab - 3) == 0
            and a.signal_size == v.width * len(fl)):
        raise EdgemmError("the libra_vq tower goes with the libra adapter, tokenizer feature_layers (CLIP "
                          "hidden-state indices) and embed_dim, a codebook of 2^b codes (vision_vocab 2^b + 2) "
                          "and signal_size = width x the number of feature layers")


declare("vision", "libra_vq", fields={"tokenizer": {}, "feature_layer": None, "keep_cls": False}, check=check)
