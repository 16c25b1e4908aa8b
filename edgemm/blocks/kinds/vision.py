"""Specs of edgemm.blocks.vision's towers: EVA (edgemm's own), CLIP, BLIP, SigLIP, none (Libra's image tokens) and
Fuyu's patch_linear front end."""
from __future__ import annotations

from ...errors import EdgemmError
from ..spec import declare


def vit_block(v) -> int:
    """One pre/post-norm ViT block: qkv, out, two LayerNorms, the MLP."""
    W = v.width
    return (W * 3 * W + 3 * W) + (W * W + W) + 2 * (2 * W) + (W * v.mlp_dim + v.mlp_dim) + (v.mlp_dim * W + W)


def blocks_run(v) -> int:
    return v.layers if v.feature_layer is None else v.feature_layer


def eva_params(cfg) -> int:
    """EVA (and BLIP's, + its post_layernorm): patch bias, CLS, positions, blocks."""
    v = cfg.vision
    W = v.width
    return 3 * v.patch_size ** 2 * W + W + W + (v.n_patches + 1) * W + v.layers * vit_block(v) \
        + (2 * W if v.arch == "blip" else 0)


def clip_params(cfg) -> int:
    """LLaVA's CLIP: no patch bias, a pre-LayerNorm, only the blocks before the feature layer."""
    v = cfg.vision
    W = v.width
    return 3 * v.patch_size ** 2 * W + W + (v.n_patches + 1) * W + 2 * W + blocks_run(v) * vit_block(v)


def siglip_params(cfg) -> int:
    """SigLIP: patch bias, no CLS, no pre-LayerNorm; post_layernorm only when it is taken."""
    v = cfg.vision
    W = v.width
    return 3 * v.patch_size ** 2 * W + W + v.n_patches * W + (2 * W if v.post_norm else 0) + blocks_run(v) * vit_block(v)


def check_siglip(cfg) -> None:
    v = cfg.vision
    if v.post_norm and v.feature_layer not in (None, v.layers):
        raise EdgemmError("vision post_norm goes with the siglip tower taking every layer (feature_layer None "
                          "or the tower's layers)")


def check_blip(cfg) -> None:
    if cfg.adapter.kind != "qformer":
        raise EdgemmError("vision arch 'blip' (all tower rows, CLS included) goes with adapter kind 'qformer'")


def check_patch_linear(cfg) -> None:
    from ...fuyu_patches import check_config
    check_config(cfg)


# clip: blocks run before the features are taken (feature_layer None: all); LLaVA's "full" strategy keeps the CLS
declare("vision", "eva", params=eva_params)
declare("vision", "clip", fields={"feature_layer": None, "keep_cls": False}, params=clip_params)
declare("vision", "blip", check=check_blip, params=eva_params)
# SigLIP (patch bias, no CLS, no pre-LayerNorm): post_norm applies its post_layernorm (only when every block runs)
# (its stride-p patch conv drops the remainder, as transformers' does: so400m-patch14-384 gives 27 x 27 patches)
declare("vision", "siglip", fields={"feature_layer": None, "post_norm": False}, check=check_siglip,
        params=siglip_params, partial_patches=True)
# Libra: no pixel tower in the checkpoint (image rows come from its VQ image tokenizer's codes)
declare("vision", "none", check=lambda cfg: check_none(cfg), params=lambda cfg: 0)
declare("vision", "patch_linear", check=check_patch_linear)


def check_none(cfg) -> None:
    from .connectors import check_libra_pair
    check_libra_pair(cfg)
