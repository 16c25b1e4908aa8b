"""Specs of edgemm.blocks.connectors: the GLU adapter (edgemm's own), LLaVA's projectors (mlp, linear, mlp_norm),
Libra's image-token input, Idefics' perceiver, InternVL's pixel_shuffle, SmolVLM's pixel_shuffle_linear, Fuyu's
newline_rows and Gemma 3's pooling projector."""
from __future__ import annotations

import math

from ...errors import EdgemmError
from ..spec import declare


def patch_rows(cfg) -> int:
    """boi + patches + eoi: the GLU adapter's rows (and Libra's)."""
    return cfg.vision.n_patches + 2


def glu_params(cfg) -> int:
    W, D, a = cfg.vision.width, cfg.decoder.d_model, cfg.adapter
    return W * D + 2 * D + 3 * D * a.ffn_dim + 2 * D


def llava_rows(cfg) -> int:
    """LLaVA's projectors: one row per tower row (+ CLS when kept)."""
    return cfg.vision.n_patches + (1 if cfg.vision.keep_cls else 0)


def check_mlp(cfg) -> None:
    from ...anyres import check_config           # LLaVA-NeXT's image_newline and any-resolution tiles
    check_config(cfg)


def check_libra_pair(cfg) -> None:
    if (cfg.vision.arch in ("none", "libra_vq")) != (cfg.adapter.kind == "libra"):
        raise EdgemmError("vision arch 'none' (image tokens) or 'libra_vq' (Libra's image tokenizer) goes with "
                          "adapter kind 'libra' (and only they do)")


def check_internvl(cfg) -> None:
    from ...internvl_tiles import check_config
    check_config(cfg)


def check_smolvlm(cfg) -> None:
    from ...smolvlm_tiles import check_config
    check_config(cfg)


def check_fuyu(cfg) -> None:
    from ...fuyu_patches import check_config
    check_config(cfg)


def pixel_shuffle_rows(cfg) -> int:
    from ...internvl_tiles import max_rows           # InternVL without dynamic tiles: one tile's shuffled rows
    return max_rows(cfg)


def check_gemma3(cfg) -> None:
    a, v = cfg.adapter, cfg.vision
    side = v.image_size // v.patch_size
    if not (a.pool_tokens >= 1 and math.isqrt(a.pool_tokens) ** 2 == a.pool_tokens
            and side % math.isqrt(a.pool_tokens) == 0):
        raise EdgemmError("the gemma3 projector needs pool_tokens a square whose side divides the patch grid's")


def perceiver_rows(cfg) -> int:
    from .cross import image_ids                     # gated cross-attention: the image's own tokens
    return len(image_ids(cfg.decoder))


declare("connector", "glu", rows=patch_rows, params=glu_params)
# LLaVA: linear_1 -> GELU -> linear_2 (+ LLaVA-NeXT's newline row `adapter.image_newline` [d_model])
declare("connector", "mlp", fields={"image_newline": False}, check=check_mlp, rows=llava_rows,
        params=lambda cfg: (lambda W, D, a: W * D + D * D + (2 * D if a.bias else 0) + (D if a.image_newline else 0))(
            cfg.vision.width, cfg.decoder.d_model, cfg.adapter))
declare("connector", "linear", rows=llava_rows,                # LLaVA v1's one Linear
        params=lambda cfg: cfg.vision.width * cfg.decoder.d_model + (cfg.decoder.d_model if cfg.adapter.bias else 0))
declare("connector", "mlp_norm", rows=llava_rows,              # Yi-VL's Linear-LN-GELU-Linear-LN
        params=lambda cfg: (lambda W, D: W * D + D * D + 6 * D)(cfg.vision.width, cfg.decoder.d_model))
# Libra's image-token input: per-codebook embeddings (vision_vocab each) + the continuous signal (signal_size; 0:
# none), the processor over their concatenation (concat_signals; RMSNorm first: norm_signals), vision position rows
declare("connector", "libra", fields={"codebooks": 0, "vision_vocab": 0, "signal_size": 0, "concat_signals": True,
                                      "norm_signals": True, "position_embedding": 0},
        check=check_libra_pair, rows=patch_rows)
# InternVL: each side of a tile's feature map scaled by downsample_ratio, LayerNorm-first MLP
declare("connector", "pixel_shuffle", fields={"downsample_ratio": 0.5}, check=check_internvl, rows=pixel_shuffle_rows)
# Idefics3 / SmolVLM: the token ids whose embedding rows the connector holds (`markers`)
declare("connector", "pixel_shuffle_linear", fields={"downsample_ratio": 0.5, "marker_ids": []}, check=check_smolvlm)
declare("connector", "newline_rows", check=check_fuyu)
# Gemma 3: the patch grid average-pooled to pool_tokens rows (mm_tokens_per_image), RMSNorm, projection; boi/eoi
declare("connector", "gemma3", fields={"pool_tokens": 0}, check=check_gemma3,
        rows=lambda cfg: cfg.adapter.pool_tokens + 2)


def perceiver_params(cfg) -> int:
    """Idefics' Perceiver resampler + the cross-attention K/V projections (they run once per image)."""
    v, a, d = cfg.vision, cfg.adapter, cfg.decoder
    W, D = v.width, d.d_model
    nx, Wk = d.n_layers // d.cross_attn_every, d.cross_attn_kv_dim or D
    n, hd = a.perceiver_heads * a.perceiver_head_dim, a.perceiver_ffn or 4 * W
    return (a.perceiver_latents * W + 2 * W + a.perceiver_depth * (6 * W + 4 * W * n + 2 * W * hd)
            + nx * 2 * Wk * D)


# Idefics' Perceiver resampler (goes with the decoder's gated cross-attention, edgemm.xattn): latents, depth, heads
# of head_dim, LayerNorm of q and k per head (qk_norms), a ReLU MLP of perceiver_ffn (0: 4 x the vision width)
declare("connector", "perceiver", fields={"perceiver_latents": 0, "perceiver_depth": 0, "perceiver_heads": 0,
                                          "perceiver_head_dim": 0, "perceiver_qk_norms": False, "perceiver_ffn": 0},
        rows=perceiver_rows, params=perceiver_params)
