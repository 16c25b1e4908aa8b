"""Specs of edgemm.blocks.qwen2vl (Qwen2-VL / Qwen2.5-VL's tower and patch merger) and of M-RoPE, the decoder option
(edgemm.blocks.decoder) that gives an image's rows 3-D positions. The tiling's own fields (min_pixels, max_pixels)
are edgemm.qwen2vl_pixels.FIELDS."""
from __future__ import annotations

from ...errors import EdgemmError
from ..spec import declare


def check_qwen2vl(cfg) -> None:
    from ...qwen2vl_pixels import check_config
    check_config(cfg)


def tower_params(cfg) -> int:
    """Patch Conv2d (no bias), per block two norms, qkv, proj, the MLP (fc1/fc2, or 2.5's gate/up/down, biased)."""
    v = cfg.vision
    W, F = v.width, v.mlp_dim
    norms = 2 * (2 * W if v.norm == "layer" else W)
    mlp = (3 if v.mlp == "swiglu" else 2) * W * F + (2 * F if v.mlp == "swiglu" else F) + W
    return 3 * v.patch_size ** 2 * W + v.layers * (norms + 3 * W * W + 3 * W + W * W + W + mlp)


def merger_params(cfg) -> int:
    v, D = cfg.vision, cfg.decoder.d_model
    n = v.width * v.merge_size ** 2
    return (2 * v.width if v.norm == "layer" else v.width) + n * n + n + n * D + D


def check_mrope(cfg) -> None:
    if cfg.decoder.mrope_section and cfg.vision.arch != "qwen2vl":
        raise EdgemmError("mrope_section (M-RoPE) goes with the qwen2vl tower, whose rows carry their grid")


# the tower: `norm` "layer" (2-VL) | "rms" (2.5), its MLP `mlp` "gelu" (fc1 -> gelu -> fc2) | "swiglu" (2.5's
# gate/up/down with biases), merge_size x merge_size cells, 2.5's window attention over window_px squares except in
# full_blocks (0: every block full)
declare("vision", "qwen2vl", fields={"norm": "layer", "mlp": "gelu", "merge_size": 2, "window_px": 0,
                                     "full_blocks": []}, check=check_qwen2vl, params=tower_params)
declare("connector", "qwen2vl_merger", check=check_qwen2vl, params=merger_params)
# M-RoPE: the rotary frequency pairs split into (temporal, height, width) sections, each rotated by its own row of
# 3-D positions (image rows; text rows have three equal ones: plain RoPE); empty: 1-D RoPE
declare("decoder", "mrope", fields={"mrope_section": []}, check=check_mrope)
