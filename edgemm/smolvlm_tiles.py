"""Idefics3's / SmolVLM's tile grid: the host side of its vision stage, as transformers' Idefics3 image processor
(the PIL backend; SmolVLM's is the same class) computes it, and the prompt's expansion of an image as
Idefics3Processor / SmolVLMProcessor write it.

An image of H x W pixels is resized (LANCZOS) so that its longest edge is `longest_edge` (the other edge int() of the
aspect ratio, made even; both under 4096), then, with image_splitting, to the multiples of S (the tower's
image_size) that hold it (resize_for_vision_encoder), cut row-major into its rows x cols tiles of S x S, followed by
the whole (resized) image stretched to S x S; an image that fits one tile is that tile alone (grid 0 x 0). Without
image_splitting the resized image is stretched to S x S. Pixels are scaled to [0, 1] and normalised.

The prompt's image is the text the processor writes around the tiles' <image> runs (image_seq_len rows each):
`<fake_token_around_image><row_i_col_j>` before tile (i, j), a newline after each row of tiles, then
`\\n<fake_token_around_image><global-img>` before the whole image's rows and `<fake_token_around_image>` after them
(a 0 x 0 grid: `<fake_token_around_image><global-img>`, the rows, `<fake_token_around_image>`). The import tokenizes
those pieces once for every grid cell (vision.tile_text) and the connector (edgemm.blocks.connectors'
pixel_shuffle_linear) holds their token embedding rows (adapter.marker_ids) after the tiles' rows, so the vision
stage's output is a table the image's rows are gathered from (row_index), as LLaVA-NeXT's packing does
(edgemm.anyres): the decoder reads the image as one segment, the text between tiles included.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import EdgemmError

# The vision config fields this tiling adds (edgemm.tilings.fields): the image resized to longest_edge, then to
# multiples of image_size, cut into image_size tiles + the whole image (image_splitting; else the whole image alone);
# tile_text: the token ids of the processor's text between the tiles' <image> runs ("tile": per grid cell row-major
# over tile_text["grid"]^2, "global_split", "global", "end")
FIELDS = {"longest_edge": 0, "image_splitting": True, "tile_text": {}}

MAX_IMAGE_SIZE = 4096           # transformers' Idefics3 MAX_IMAGE_SIZE: no edge above it
PIECES = ("tile", "global_split", "global", "end")


def rows_per_tile(cfg) -> int:
    """Image rows one tile gives after the pixel shuffle: (S / patch / scale_factor)^2 (image_seq_len)."""
    side = cfg.vision.image_size // cfg.vision.patch_size
    return (side // round(1 / cfg.adapter.downsample_ratio)) ** 2


def max_grid(v) -> int:
    """The most tiles a side of the grid takes: the longest edge's multiples of S (0: no splitting)."""
    return math.ceil(min(v.longest_edge, MAX_IMAGE_SIZE) / v.image_size) if v.image_splitting else 0


def check_config(cfg) -> None:
    v, a = cfg.vision, cfg.adapter
    if (a.kind == "pixel_shuffle_linear") != (v.tiling == "smolvlm") or v.arch != "siglip" or v.grid_pinpoints:
        raise EdgemmError("the pixel_shuffle_linear connector goes with the siglip tower and the smolvlm tile grid "
                          "(Idefics3 / SmolVLM), without grid_pinpoints")
    side, r = v.image_size // v.patch_size, 1 / a.downsample_ratio
    if r != int(r) or side % int(r):
        raise EdgemmError(f"downsample_ratio {a.downsample_ratio}: its inverse must be a whole number dividing the "
                          f"tower's {side} patches per side")
    if v.image_splitting and v.longest_edge < v.image_size:
        raise EdgemmError(f"longest_edge {v.longest_edge} is below the tile size {v.image_size}")
    t, n = v.tile_text, max_grid(v)
    if set(t) != {*PIECES, "grid"} or t["grid"] != n or len(t["tile"]) != n * n:
        raise EdgemmError(f"vision.tile_text must hold {', '.join(PIECES)} and grid {n} ({n * n} tile pieces)")
    ids = [i for p in t["tile"] for i in p] + [i for k in PIECES[1:] for i in t[k]]
    if any(i not in a.marker_ids for i in ids):
        raise EdgemmError("vision.tile_text names tokens that adapter.marker_ids lacks")


def tile_text(encode, n: int, fake: str, global_img: str) -> dict:
    """The processor's text between an image's <image> runs, tokenized (encode: str -> ids) for every cell of grids
    up to n x n: vision.tile_text."""
    cell = [encode(("\n" if i and not j else "") + f"{fake}<row_{i + 1}_col_{j + 1}>")
            for i in range(n) for j in range(n)]
    return {"grid": n, "tile": cell, "global_split": encode(f"\n\n{fake}{global_img}"),
            "global": encode(f"{fake}{global_img}"), "end": encode(fake)}


def marker_ids(t: dict) -> list:
    """The distinct token ids of tile_text, in order of first use: the connector's marker rows."""
    out: list = []
    for ids in [*t["tile"], *(t[k] for k in PIECES[1:])]:
        out += [i for i in ids if i not in out]
    return out


def _longest(v, height: int, width: int) -> tuple[int, int]:
    """(height, width) after the first resize (_resize_output_size_rescale_to_max_len, then below MAX_IMAGE_SIZE)."""
    aspect = width / height
    if width >= height:
        width, height = v.longest_edge, int(v.longest_edge / aspect)
        height += height % 2
    else:
        height, width = v.longest_edge, int(v.longest_edge * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def _for_encoder(S: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) as multiples of S (resize_for_vision_encoder)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / S) * S
        height = math.ceil(int(width / aspect) / S) * S
    else:
        height = math.ceil(height / S) * S
        width = math.ceil(int(height * aspect) / S) * S
    return height, width


def grid(v, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) of tiles an image of height x width is cut into; (0, 0): the whole image alone."""
    if not v.image_splitting:
        return 0, 0
    h, w = _for_encoder(v.image_size, *_longest(v, height, width))
    return (h // v.image_size, w // v.image_size) if h > v.image_size or w > v.image_size else (0, 0)


def n_tiles(v, height: int, width: int) -> int:
    rows, cols = grid(v, height, width)
    return rows * cols + 1 if rows else 1


def max_tile_batch(v) -> int:
    """The most tiles one image takes (the largest grid + the whole image)."""
    n = max_grid(v)
    return n * n + 1 if n else 1


def row_index(cfg, rows: int, cols: int) -> np.ndarray:
    """int64 [image rows]: an image's rows (grid rows x cols) as indices into the vision stage's table [the tiles'
    rows (N * R); the marker rows (adapter.marker_ids)]."""
    t, R = cfg.vision.tile_text, rows_per_tile(cfg)
    N = rows * cols + 1 if rows else 1
    where = {tid: N * R + k for k, tid in enumerate(cfg.adapter.marker_ids)}
    out = []
    for i in range(rows):
        for j in range(cols):                           # tile k's markers, then its rows
            k = i * cols + j
            out += [where[x] for x in t["tile"][i * t["grid"] + j]] + list(range(k * R, (k + 1) * R))
    out += [where[x] for x in t["global_split" if rows else "global"]] + list(range((N - 1) * R, N * R))
    return np.asarray(out + [where[x] for x in t["end"]], np.int64)


def image_rows(cfg, width: int, height: int) -> int:
    return len(row_index(cfg, *grid(cfg.vision, height, width)))


def pixel_rows(cfg, pixels) -> int:
    """The rows of one preprocessed image (GridTiles), its markers included."""
    return len(pixels.index(cfg))


def max_rows(cfg) -> int:
    """The most image rows one image takes (its largest grid's)."""
    n = max_grid(cfg.vision)
    return len(row_index(cfg, n, n))


def _resize(img, height: int, width: int):
    from PIL import Image
    return img.resize((width, height), Image.LANCZOS, reducing_gap=None)


def tile_image(img, v) -> tuple[list, tuple[int, int]]:
    """RGB PIL image -> (the S x S PIL tiles the tower sees: the grid row-major, then the whole image; the grid)."""
    S = v.image_size
    img = _resize(img, *_longest(v, img.size[1], img.size[0]))
    if not v.image_splitting:
        return [_resize(img, S, S)], (0, 0)
    img = _resize(img, *_for_encoder(S, img.size[1], img.size[0]))
    W, H = img.size
    if H <= S and W <= S:
        return [img], (0, 0)
    tiles = [img.crop((c * S, r * S, (c + 1) * S, (r + 1) * S)) for r in range(H // S) for c in range(W // S)]
    return tiles + [_resize(img, S, S)], (H // S, W // S)


class GridTiles(np.ndarray):
    """One image's tiles [N, 3, S, S] (the grid row-major, then the whole image) that remember the grid: what the
    host queues for the vision stage; pack_rows gathers the image's rows from the stage's table."""
    grid: tuple = (0, 0)

    def index(self, cfg) -> np.ndarray:
        return row_index(cfg, *self.grid)

    def pack_rows(self, table, cfg):
        """The vision stage's table [1, N * R + K, D] (torch or numpy) -> the image's rows [1, rows, D]."""
        return table[:, self.index(cfg)]


def whole_image(pixels) -> GridTiles:
    """One S x S image [1, 3, S, S] as the processor's image without a grid (a SmolVLM video frame)."""
    px = np.ascontiguousarray(pixels, dtype=np.float32).view(GridTiles)
    px.grid = (0, 0)
    return px


def preprocess(src, v) -> GridTiles:
    """An image (path, PIL image or uint8 array) -> float32 pixels [N, 3, S, S] (GridTiles), normalised."""
    from .processor import load_image, normalize
    tiles, g = tile_image(load_image(src), v)
    px = np.concatenate([normalize(t, v) for t in tiles]).view(GridTiles)
    px.grid = g
    return px


def describe_rows(cfg, typical: tuple) -> str:
    """`edgemm info`'s vision line (edgemm.internvl_tiles.vision_line): image rows per image, tile markers
    included, for the tile size and `typical` (width, height) sizes, and the most one image takes."""
    import sys
    from .internvl_tiles import vision_line
    v = cfg.vision
    tiles = (f"a grid of {v.image_size} px tiles after a resize to {v.longest_edge} px (+ the whole image)"
             if v.image_splitting else "the whole image alone")
    return vision_line(cfg, typical, "SigLIP", tiles, sys.modules[__name__])
