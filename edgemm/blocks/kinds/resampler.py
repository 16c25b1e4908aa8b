"""Specs of edgemm.blocks.resampler: Qwen-VL's tower (Monkey: the image cut into window x window px tiles, each
through the tower with its own LoRA of ranks window_lora [qkv and out proj, MLP-side residual], + the whole image
resized to one window; window 0: one image of image_size) and its resampler (query_tokens queries, one
cross-attention of resampler_heads heads; the release: output_dim // 128); LLaVA-UHD's region-local resampler
(uhd_resampler: the same fields + marker_ids, its separator tokens; with the uhd slices, edgemm.uhd_slices)."""
from __future__ import annotations

import math

from ...errors import EdgemmError
from ..spec import declare
from .vision import vit_block


def tower_params(cfg) -> int:
    """No patch bias, no CLS, ln_pre; Monkey: per window, LoRA on QKV (r x W, 3W x r), out_proj and beside the MLP."""
    v = cfg.vision
    W = v.width
    n = 3 * v.patch_size ** 2 * W + v.n_patches * W + 2 * W + v.layers * vit_block(v)
    if v.window:
        (r, rm), k = v.window_lora, v.tower_passes - 1
        n += v.layers * k * (r * W + 3 * W * r + 2 * r * W + 2 * rm * W)
    return n


def check_tower(cfg) -> None:
    v = cfg.vision
    if v.window and (v.image_size % v.window or v.window % v.patch_size or len(v.window_lora) != 2):
        raise EdgemmError("vision window (Monkey) goes with the qwen tower, image_size a multiple of window, window "
                          "a multiple of patch_size and window_lora [attention rank, MLP rank]")


def params(cfg) -> int:
    """query, pos_embed, key_pos, kv_proj, ln_q / ln_kv, attention, ln_post, proj."""
    a, W, D, P = cfg.adapter, cfg.vision.width, cfg.decoder.d_model, cfg.vision.n_patches
    return (2 * a.query_tokens + P) * D + (W * D if W != D else 0) + 4 * D + 4 * D * D + 4 * D + 2 * D + D * D


def check(cfg) -> None:
    a, d = cfg.adapter, cfg.decoder
    if not (a.resampler_heads >= 1 and d.d_model % a.resampler_heads == 0
            and a.query_tokens >= 1 and math.isqrt(a.query_tokens) ** 2 == a.query_tokens):
        raise EdgemmError("a resampler adapter needs query_tokens a square (a query grid) and resampler_heads >= 1 "
                          "dividing d_model")


def describe(cfg) -> str:
    v = cfg.vision
    per = f"{v.tower_passes} tiles ({v.tower_passes - 1} {v.window}px windows + the whole image) x " if v.window else ""
    return (f"vision: ViT {v.image_size}px/{v.patch_size} width {v.width} x {v.layers} layers -> {per}"
            f"{v.n_patches} tower rows, resampled to {cfg.adapter.query_tokens} queries: {cfg.n_image_rows} image rows")


declare("vision", "qwen", fields={"window": 0, "window_lora": []}, check=check_tower, params=tower_params)
declare("connector", "resampler", fields={"query_tokens": 0, "resampler_heads": 0}, check=check,
        rows=lambda cfg: cfg.adapter.query_tokens * cfg.vision.tower_passes, params=params, describe=describe)


def uhd_params(cfg) -> int:
    """Qwen-VL's resampler without key_pos (interpolated per slice), + the separator rows."""
    a, D = cfg.adapter, cfg.decoder.d_model
    return params(cfg) - cfg.vision.n_patches * D + len(a.marker_ids) * D


def check_uhd(cfg) -> None:
    check(cfg)
    from ...uhd_slices import check_config
    check_config(cfg)


declare("connector", "uhd_resampler", fields={"query_tokens": 0, "resampler_heads": 0, "marker_ids": []},
        check=check_uhd, params=uhd_params)
