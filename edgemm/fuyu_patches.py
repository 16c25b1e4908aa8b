"""Fuyu's image input: the host side of its vision stage, as transformers' FuyuImageProcessor (the PIL backend) and
FuyuProcessor compute it.

An image of H x W pixels larger than the canvas (vision.canvas [height, width], the processor's `size`) in either
edge is downscaled (BILINEAR, aspect kept: int(H * s) x int(W * s), s = min(canvas_h / H, canvas_w / W)); it is then
padded at the bottom and right to whole patches with the processor's padding_value (before rescaling: 1 of 255),
scaled to [0, 1] and normalised. There is no tower: the vision stage (edgemm.blocks.vision.PatchLinear + the
newline_rows connector) takes those pixels [1, 3, h p, w p] and gives h (w + 1) rows, each row of w patches
followed by the |NEWLINE| token's row, as the processor's `|SPEAKER|` x w `|NEWLINE|` per row; the prompt then
continues with `<s>` (the chat template the import stores, edgemm.families.fuyu).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import EdgemmError

# The vision config fields this tiling adds (edgemm.tilings.fields): any image size, downscaled (aspect kept) to fit
# canvas [height, width], then padded to whole patches with pad_value (the processor's padding_value before rescaling)
FIELDS = {"canvas": [], "pad_value": 1.0}


def check_config(cfg) -> None:
    v, a = cfg.vision, cfg.adapter
    if not (v.arch == "patch_linear" and a.kind == "newline_rows" and v.tiling == "fuyu") or v.grid_pinpoints:
        raise EdgemmError("the patch_linear front end goes with the newline_rows connector and tiling 'fuyu' "
                          "(Fuyu), without grid_pinpoints")
    if len(v.canvas) != 2 or min(v.canvas) < v.patch_size:
        raise EdgemmError(f"vision.canvas must be [height, width], each at least the patch size {v.patch_size}")


def fitted(v, height: int, width: int) -> tuple[int, int]:
    """(height, width) after the processor's resize: unchanged when the image fits the canvas; at least 1 (where the
    processor's int() gives 0 for a sliver, an empty image it cannot patchify)."""
    ch, cw = v.canvas
    if height <= ch and width <= cw:
        return height, width
    s = min(ch / height, cw / width)
    return max(int(height * s), 1), max(int(width * s), 1)         # (a sliver keeps one pixel: one patch)


def grid(v, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of patches of an image of height x width pixels."""
    h, w = fitted(v, height, width)
    p = v.patch_size
    return min(math.ceil(h / p), v.canvas[0] // p), min(math.ceil(w / p), v.canvas[1] // p)


def preprocess(src, v) -> np.ndarray:
    """-> float32 pixels [1, 3, rows * p, cols * p]."""
    from PIL import Image
    from .processor import load_image
    img = load_image(src)
    w0, h0 = img.size
    h, w = fitted(v, h0, w0)
    if (h, w) != (h0, w0):
        img = img.resize((w, h), Image.BILINEAR)
    rows, cols = grid(v, h0, w0)
    p = v.patch_size
    a = np.full((rows * p, cols * p, 3), v.pad_value, np.float32)
    a[:h, :w] = np.asarray(img, np.float32)[: rows * p, : cols * p]
    a = (a / 255.0 - np.asarray(v.image_mean, np.float32)) / np.asarray(v.image_std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None], np.float32)


def image_rows(cfg, width: int, height: int, max_tiles=None) -> int:
    rows, cols = grid(cfg.vision, height, width)
    return rows * (cols + 1)


def pixel_rows(cfg, pixels) -> int:
    p = cfg.vision.patch_size
    return (pixels.shape[2] // p) * (pixels.shape[3] // p + 1)


def max_rows(cfg) -> int:
    """The most rows one image takes: the whole canvas in patches, a newline row each row."""
    ch, cw = cfg.vision.canvas
    return image_rows(cfg, cw, ch)


def max_tile_batch(v) -> int:
    return 1


def input_profiles(cfg) -> dict:
    """The trt vision stage's input profiles: pixels of one image, from one patch to the whole canvas."""
    v = cfg.vision
    p, (ch, cw) = v.patch_size, v.canvas
    return {"pixels": {"min": [1, 3, p, p], "opt": [1, 3, ch // p // 2 * p or p, cw // p // 2 * p or p],
                       "max": [1, 3, ch, cw]}}


def describe_rows(cfg, typical=((640, 480), (1024, 768), (1920, 1080))) -> str:
    v = cfg.vision
    per = ", ".join(f"{w}x{h}: {image_rows(cfg, w, h)} rows" for w, h in typical)
    return (f"vision: no tower, {v.patch_size}x{v.patch_size} pixel patches through one Linear, any size up to "
            f"{v.canvas[1]}x{v.canvas[0]} (larger images downscaled), a newline row after each row of patches -> "
            f"image rows per image: {per}; at most {max_rows(cfg)} rows")
