"""InternVL's dynamic tiles: the host side of its vision stage, as transformers' GotOcr2 image processor computes it
(crop_to_patches, which InternVLProcessor turns on) and its row counts.

An image of H x W pixels is resized (bicubic, stretched) to the grid of cols x rows tiles of S x S (S: the tower's
image_size) whose aspect ratio is closest to the image's among the grids of min_tiles..max_tiles tiles (a tie goes to
the grid with more tiles while the image's area is more than half the grid's: get_optimal_tiled_canvas), cut
row-major into its tiles, and, when there is more than one, followed by a thumbnail: the whole image stretched to
S x S. The vision stage (edgemm.blocks.internvit tower + edgemm.blocks.connectors' pixel_shuffle connector) maps
that batch of tiles [N, 3, S, S] to the image's rows [1, N * R, D], R = (S / patch * downsample_ratio)^2 rows per
tile; the prompt wraps them in <img> ... </img> (the family's chat template: edgemm.families.internvl).

Unlike LLaVA-NeXT's tiling (edgemm.anyres), nothing is packed afterwards: the tiles' rows follow each other.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import EdgemmError

# The vision config fields this tiling adds (edgemm.tilings.fields): the grids of min_tiles..max_tiles tiles
FIELDS = {"min_tiles": 1, "max_tiles": None}


def check_config(cfg) -> None:
    v, a = cfg.vision, cfg.adapter
    if v.tiling not in ("", "internvl"):
        raise EdgemmError(f"unknown tiling {v.tiling!r} (internvl)")
    if v.norm not in ("layer", "rms"):
        raise EdgemmError(f"vision norm must be 'layer' or 'rms', not {v.norm!r}")
    if (v.arch == "internvit") != (a.kind == "pixel_shuffle") or (v.tiling and v.arch != "internvit"):
        raise EdgemmError("the internvit tower goes with the pixel_shuffle connector (InternVL), and dynamic tiles "
                          "with both")
    if v.keep_cls or v.grid_pinpoints:
        raise EdgemmError("the internvit tower drops the CLS row and tiles as InternVL does (no grid_pinpoints)")
    side = v.image_size // v.patch_size
    r = 1 / a.downsample_ratio
    if r != int(r) or side % int(r):
        raise EdgemmError(f"downsample_ratio {a.downsample_ratio}: its inverse must be a whole number dividing the "
                          f"tower's {side} patches per side")
    if v.tiling and not (isinstance(v.max_tiles, int) and 1 <= v.min_tiles <= v.max_tiles):
        raise EdgemmError(f"dynamic tiles need 1 <= min_tiles <= max_tiles (have {v.min_tiles}, {v.max_tiles})")


def rows_per_tile(cfg) -> int:
    """Image rows one tile gives after the pixel shuffle: (S / patch * downsample_ratio)^2."""
    side = cfg.vision.image_size // cfg.vision.patch_size
    return (side // round(1 / cfg.adapter.downsample_ratio)) ** 2


@lru_cache(maxsize=64)
def _grids(lo: int, hi: int) -> tuple:
    """(cols, rows) grids of lo..hi tiles, by tile count (get_all_supported_aspect_ratios' order)."""
    out = [(w, h) for w in range(1, hi + 1) for h in range(1, hi + 1) if lo <= w * h <= hi]
    return tuple(sorted(out, key=lambda g: g[0] * g[1]))


def grid(v, height: int, width: int) -> tuple[int, int]:
    """The (cols, rows) of tiles an image of height x width is resized to (get_optimal_tiled_canvas)."""
    S = v.image_size
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for g in _grids(v.min_tiles, v.max_tiles):
        diff = abs(aspect - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and area > 0.5 * S * S * g[0] * g[1]:
            best = g
    return best


def n_tiles(v, height: int, width: int) -> int:
    """Tower passes for an image: the grid's tiles, + the thumbnail when there are several; 1 without tiling."""
    if not v.tiling or v.max_tiles <= 1:
        return 1
    cols, rows = grid(v, height, width)
    return cols * rows + (1 if cols * rows > 1 else 0)


def image_rows(cfg, width: int, height: int) -> int:
    return n_tiles(cfg.vision, height, width) * rows_per_tile(cfg)


def pixel_rows(cfg, pixels) -> int:
    """The rows of one preprocessed image (its tiles [N, 3, S, S])."""
    return len(pixels) * rows_per_tile(cfg)


def max_tile_batch(v) -> int:
    """The most tiles one image takes (max_tiles, + the thumbnail)."""
    if not v.tiling or v.max_tiles <= 1:
        return 1
    return v.max_tiles + 1


def max_rows(cfg) -> int:
    """The most image rows one image takes."""
    return max_tile_batch(cfg.vision) * rows_per_tile(cfg)


def tile_image(img, v) -> list:
    """RGB PIL image -> the S x S PIL tiles the tower sees: the grid row-major, then the thumbnail (several tiles)."""
    from PIL import Image
    S = v.image_size
    if n_tiles(v, img.size[1], img.size[0]) == 1:
        return [img.resize((S, S), Image.BICUBIC, reducing_gap=None)]
    cols, rows = grid(v, img.size[1], img.size[0])
    big = img.resize((cols * S, rows * S), Image.BICUBIC, reducing_gap=None)
    tiles = [big.crop((c * S, r * S, (c + 1) * S, (r + 1) * S)) for r in range(rows) for c in range(cols)]
    return tiles + [img.resize((S, S), Image.BICUBIC, reducing_gap=None)]


def preprocess(src, v) -> np.ndarray:
    """An image (path, PIL image or uint8 array) -> float32 pixels [N, 3, S, S]: its tiles, normalised."""
    from .processor import load_image, normalize
    return np.concatenate([normalize(t, v) for t in tile_image(load_image(src), v)])


def describe_rows(cfg, typical: tuple) -> str:
    """`edgemm info`'s vision line: image rows per image for the tile size and `typical` (width, height) sizes, and
    the most one image takes."""
    import sys
    v = cfg.vision
    tiles = (f"dynamic tiles ({v.min_tiles}..{v.max_tiles} of {v.image_size} px, + a thumbnail when more than one)"
             if v.tiling else "one tile")
    return vision_line(cfg, typical, "InternViT", tiles, sys.modules[__name__])


def vision_line(cfg, typical: tuple, tower: str, tiles: str, tiling) -> str:
    """The vision line of a tower over one image's tiles, by its tiling module (this one, edgemm.smolvlm_tiles):
    image_rows(cfg, width, height) and n_tiles(vision, height, width) for the tile size and the `typical` (width,
    height) sizes, rows_per_tile, max_rows, max_tile_batch."""
    v = cfg.vision
    sizes = ((v.image_size, v.image_size),) + tuple(typical)
    per = ", ".join(f"{w}x{h}: {tiling.image_rows(cfg, w, h)} rows ({tiling.n_tiles(v, h, w)} tiles)" for w, h in sizes)
    return (f"vision: {tower} {v.image_size}px/{v.patch_size} width {v.width} x {v.layers} layers, {tiles}, pixel "
            f"shuffle to {tiling.rows_per_tile(cfg)} rows a tile -> image rows per image: {per}; at most "
            f"{tiling.max_rows(cfg)} rows ({tiling.max_tile_batch(v)} tiles)")


def set_max_tiles(cfg, n: int, manifest: dict | None = None) -> None:
    """--max-tiles N (edgemm.tilings.set_max_tiles for InternVL): the processor's max_patches, at export (the bundle's
    default) or at run time; a trt bundle's vision profiles bound the tile batch (N grid tiles + the thumbnail)."""
    cfg.vision.max_tiles = n
    check_config(cfg)
    if (manifest or {}).get("target") != "trt":
        return
    have = min((p.get("vision", {}).get("pixels", {}).get("max", [1 << 30])[0]
                for p in (manifest.get("trt") or {}).get("profiles", {}).values()), default=1 << 30)
    if max_tile_batch(cfg.vision) > have:
        raise EdgemmError(f"--max-tiles {n} needs a vision batch of {max_tile_batch(cfg.vision)} tiles; this trt "
                          f"bundle's profiles stop at {have} (re-export with --max-tiles {n})")
