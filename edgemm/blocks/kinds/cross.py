"""Spec of edgemm.blocks.cross (the decoder option group "gated-cross-attention"; Flamingo / Idefics, edgemm.xattn):
a tanh-gated cross-attention layer before decoder layer i when i % cross_attn_every == 0 reads the current image's
resampled rows (width cross_attn_kv_dim; 0: d_model); an image segment is its cross_attn_image_token (wrapped in
cross_attn_image_wrap tokens, Idefics' <fake_token_around_image>) through the text path; after
cross_attn_reset_token a token reads no image until the next one."""
from __future__ import annotations

from ...errors import EdgemmError
from ..spec import declare


def image_ids(d) -> list:
    """The tokens an image segment feeds (Idefics' processor: fake, <image>, fake)."""
    w = [] if d.cross_attn_image_wrap is None else [d.cross_attn_image_wrap]
    return w + [d.cross_attn_image_token] + w


def check(cfg) -> None:
    d = cfg.decoder
    if (d.cross_attn_every > 0) != (cfg.adapter.kind == "perceiver") or (d.cross_attn_every and not (
            d.single_branch and d.cross_attn_image_token is not None and d.cross_attn_alpha in ("float", "vector")
            and d.cross_attn_every <= d.n_layers and not d.n_kv_heads)):
        raise EdgemmError("gated cross-attention goes with the perceiver adapter (and only with it), "
                          "single_branch, multi-head attention, an image token, cross_attn_every <= n_layers "
                          "and float or vector gates")


declare("decoder", "gated-cross-attention", fields={
    "cross_attn_every": 0,               # 0: none
    "cross_attn_kv_dim": 0,              # 0: d_model
    "cross_attn_qk_norms": False,        # RMSNorm of q and k per head (Idefics' qk_layer_norms)
    "cross_attn_alpha": "float",         # "float" | "vector" gates
    "cross_attn_image_token": None,
    "cross_attn_image_wrap": None,
    "cross_attn_reset_token": None,
}, check=check)
