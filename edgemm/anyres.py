"""Any-resolution tiling (LLaVA-NeXT): the host side of the vision stage.

An image of H x W pixels is fitted to the best of `grid_pinpoints` ([h, w], multiples of the tower's image_size S)
exactly as transformers' LlavaNextImageProcessor picks it (select_best_resolution), resized with its aspect ratio
kept and padded with black to that resolution, and cut row-major into S x S tiles; a stretched S x S overview of the
whole image goes first. The tower + projector run over that dynamic batch of tiles (the `vision` stage: [N, P, D]);
then the rows are packed as LlavaNextModel.pack_image_features does: the overview's P rows, then the tiles' feature
map (gh * side rows x gw * side columns) with the padding rows or columns removed (unpad_image) and the newline row
`adapter.image_newline` after each remaining row. The packing is a gather (`row_index`) into the table
[the N * P tile rows; the newline row], so the PyTorch reference and the runtimes (numpy) share one description.

`max_tiles` (edgemm's budget knob, not in the source model): only pinpoints of at most that many grid tiles are
candidates; when none is, the image is the overview alone plus one newline row (transformers' single-tile path).

`anyres_max` (LLaVA-OneVision's vision_aspect_ratio "anyres_max_N", LlavaOnevisionModel.pack_image_features): when
the unpadded feature map (h x w rows) exceeds N tiles' worth by a side ratio r = sqrt(h * w / (N * side^2)) > 1.1, it
is downscaled to int(h // r) x int(w // r) with bilinear interpolation (torch's, align_corners False) before the
newline rows. Each packed row is then a weighted sum of up to four tile rows: `row_index` returns a `Mix` (the four
indices a row and their weights) instead of plain indices, and `pack` sums them; a row of the overview or a newline
row is its one index with weight 1.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import EdgemmError

CONFIG = "config"           # max_tiles argument: take the config's
# The vision config fields this tiling adds (edgemm.tilings.fields): [h, w] pairs (multiples of image_size) the image
# may be tiled to (empty: one fixed-size image); max_tiles: the most grid tiles (the overview is always added; None:
# any pinpoint), a budget knob that departs from the source model when it excludes pinpoints; anyres_max:
# LLaVA-OneVision's vision_aspect_ratio "anyres_max_N" (the unpadded feature map is downscaled, bilinear, past N
# tiles' worth; None: never, LLaVA-NeXT)
FIELDS = {"grid_pinpoints": [], "max_tiles": None, "anyres_max": None}


def check_config(cfg) -> None:
    v, a = cfg.vision, cfg.adapter
    if a.image_newline and a.kind != "mlp":
        raise EdgemmError("image_newline goes with the mlp projector (LLaVA-NeXT)")
    if not v.grid_pinpoints:
        return
    if a.kind != "mlp" or v.arch not in ("clip", "siglip") or v.keep_cls:
        raise EdgemmError("any-resolution tiling needs the clip or siglip tower and the mlp projector without a CLS "
                          "row (LLaVA-NeXT's 'default' feature strategy; SigLIP has none)")
    if v.anyres_max is not None and (int(v.anyres_max) != v.anyres_max or v.anyres_max < 1):
        raise EdgemmError(f"anyres_max must be a positive integer (or None), not {v.anyres_max!r}")
    S = v.image_size
    for p in v.grid_pinpoints:
        if len(p) != 2 or any(int(x) != x or x <= 0 or x % S for x in p):
            raise EdgemmError(f"grid_pinpoints entry {p} is not an [h, w] pair of multiples of image_size {S}")
    if v.max_tiles is not None and (int(v.max_tiles) != v.max_tiles or v.max_tiles < 1):
        raise EdgemmError(f"max_tiles must be a positive integer (or None), not {v.max_tiles!r}")


def _max_tiles(v, max_tiles):
    return v.max_tiles if isinstance(max_tiles, str) and max_tiles == CONFIG else max_tiles


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint (h, w) that keeps the most of the image's resolution, then wastes the least (transformers')."""
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    return best


def allowed_pinpoints(v, max_tiles=CONFIG) -> list:
    """The pinpoints [h, w] whose grid has at most max_tiles tiles (all of them without a budget)."""
    mt, S = _max_tiles(v, max_tiles), v.image_size
    return [p for p in v.grid_pinpoints if mt is None or (p[0] // S) * (p[1] // S) <= mt]


def best_resolution(v, height: int, width: int, max_tiles=CONFIG) -> tuple[int, int] | None:
    """The tiled resolution (h, w) for an image, or None: the overview alone (no pinpoint within max_tiles)."""
    pts = allowed_pinpoints(v, max_tiles)
    return select_best_resolution(height, width, pts) if pts else None


def n_tiles(v, height: int, width: int, max_tiles=CONFIG) -> int:
    """Tower passes for an image: the overview + the grid tiles."""
    best = best_resolution(v, height, width, max_tiles)
    return 1 + (0 if best is None else (best[0] // v.image_size) * (best[1] // v.image_size))


class Mix(np.ndarray):
    """anyres_max's packing: int64 [rows, 4] indices into the table of `pack`, with `weights` float32 [rows, 4]
    (each packed row is the weighted sum of its four table rows)."""
    weights: np.ndarray


def downscaled(v, h: int, w: int) -> tuple[int, int] | None:
    """anyres_max: the size an h x w unpadded feature map is interpolated to, or None (no downscale)."""
    if not v.anyres_max:
        return None
    side = v.image_size // v.patch_size
    ratio = math.sqrt(h * w / (v.anyres_max * side ** 2))
    return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else None


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's linear interpolation taps along one axis (align_corners False, the scale n_in / n_out in float32):
    -> (i0, i1, l0, l1) [n_out]: out[j] = l0[j] * x[i0[j]] + l1[j] * x[i1[j]]."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.floor(src).astype(np.int64)
    l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, np.minimum(i0 + 1, n_in - 1), (np.float32(1) - l1).astype(np.float32), l1


def _bilinear(fmap: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """fmap [h, w] (table indices) -> (indices [H, W, 4], weights [H, W, 4]) of its bilinear resize to size (H, W)."""
    (y0, y1, a0, a1), (x0, x1, b0, b1) = (_linear_taps(n, m) for n, m in zip(fmap.shape, size))
    idx = np.stack([fmap[y0][:, x0], fmap[y0][:, x1], fmap[y1][:, x0], fmap[y1][:, x1]], -1)
    wts = np.stack([np.outer(a0, b0), np.outer(a0, b1), np.outer(a1, b0), np.outer(a1, b1)], -1)
    return idx, wts.astype(np.float32)


def _grid_rows(h: int, w: int, size) -> int:
    """Packed rows of an unpadded h x w feature map (downscaled to size where anyres_max says), newline rows included."""
    h, w = size or (h, w)
    return h * (w + 1)


def row_index(v, height: int, width: int, max_tiles=CONFIG) -> np.ndarray:
    """int64 [rows]: the packed image rows as indices into [tile rows (N * P, overview first); newline row]; with an
    anyres_max downscale, a Mix (four indices and weights a row)."""
    side = v.image_size // v.patch_size
    P = side * side
    best = best_resolution(v, height, width, max_tiles)
    if best is None:
        return np.arange(P + 1, dtype=np.int64)                  # overview rows, then the newline (index P)
    gh, gw = best[0] // v.image_size, best[1] // v.image_size
    newline = (1 + gh * gw) * P
    r, c = np.meshgrid(np.arange(gh * side), np.arange(gw * side), indexing="ij")
    fmap = (1 + (r // side) * gw + c // side) * P + (r % side) * side + c % side    # [gh*side, gw*side]
    ch, cw = fmap.shape
    if width / height > cw / ch:                                 # unpad_image: drop the padding rows / columns
        pad = (ch - int(round(height * (cw / width), 7))) // 2
        fmap = fmap[pad: ch - pad]
    else:
        pad = (cw - int(round(width * (ch / height), 7))) // 2
        fmap = fmap[:, pad: cw - pad]
    size = downscaled(v, *fmap.shape)
    fmap = np.concatenate([fmap, np.full((fmap.shape[0], 1), newline)], 1)
    index = np.concatenate([np.arange(P), fmap.ravel()]).astype(np.int64)
    if size is None:
        return index
    idx, wts = _bilinear(fmap[:, :-1], size)
    one = np.zeros((1, 4), np.float32)
    one[0, 0] = 1
    nl = np.full((size[0], 1, 4), newline)
    idx = np.concatenate([np.repeat(index[:P, None], 4, 1), np.concatenate([idx, nl], 1).reshape(-1, 4)])
    wts = np.concatenate([np.repeat(one, P, 0), np.concatenate([wts, np.repeat(one[None], size[0], 0)], 1)
                          .reshape(-1, 4)])
    mix = idx.astype(np.int64).view(Mix)
    mix.weights = wts
    return mix


def max_rows(v, max_tiles=CONFIG) -> int:
    """The most image rows one image can take (an image of a pinpoint's aspect ratio: nothing unpadded)."""
    S, side = v.image_size, v.image_size // v.patch_size
    if not v.anyres_max:
        grid = [(h // S) * side * ((w // S) * side + 1) for h, w in allowed_pinpoints(v, max_tiles)]
        return side * side + max(grid, default=1)
    grid = [1]                                  # downscaled maps: the most over every unpadded map of each pinpoint
    for h, w in allowed_pinpoints(v, max_tiles):
        gh, gw = h // S * side, w // S * side
        grid += [_grid_rows(gh, c, downscaled(v, gh, c)) for c in range(1, gw + 1)]
        grid += [_grid_rows(r, gw, downscaled(v, r, gw)) for r in range(1, gh)]
    return side * side + max(grid)


def max_tile_batch(v, max_tiles=CONFIG) -> int:
    """The largest vision-stage batch (overview + grid tiles) an image can need."""
    S = v.image_size
    return 1 + max([(h // S) * (w // S) for h, w in allowed_pinpoints(v, max_tiles)], default=0)


def pack(tile_rows, newline, index):
    """tile_rows [N, P, D] (torch or numpy), newline [D], index (row_index) -> packed rows [1, rows, D]; a Mix
    index: each row the weighted sum of its four table rows (anyres_max's bilinear downscale)."""
    D = tile_rows.shape[-1]
    mix = isinstance(index, Mix)
    if isinstance(tile_rows, np.ndarray):
        table = np.concatenate([tile_rows.reshape(-1, D), np.asarray(newline, tile_rows.dtype).reshape(1, D)])
        rows = table[np.asarray(index)]
        return ((rows * index.weights[..., None].astype(rows.dtype)).sum(1) if mix else rows)[None]
    import torch
    table = torch.cat([tile_rows.reshape(-1, D), newline.reshape(1, D).to(tile_rows)])
    rows = table[torch.from_numpy(np.asarray(index)).to(table.device)]
    return ((rows * torch.from_numpy(index.weights).to(rows)[..., None]).sum(1) if mix else rows)[None]


def tile_image(img, v, max_tiles=CONFIG) -> list:
    """RGB PIL image -> the S x S PIL tiles the tower sees: the stretched overview, then the grid row-major."""
    from PIL import Image
    S = v.image_size
    W, H = img.size
    tiles = [img.resize((S, S), Image.BICUBIC, reducing_gap=None)]
    best = best_resolution(v, H, W, max_tiles)
    if best is None:
        return tiles
    bh, bw = best
    if bw / W < bh / H:                                          # get_patch_output_size
        nw, nh = bw, min(math.ceil(H * bw / W), bh)
    else:
        nw, nh = min(math.ceil(W * bh / H), bw), bh
    canvas = Image.new("RGB", (bw, bh), (0, 0, 0))              # zero padding, centred (left/top get the floor)
    canvas.paste(img.resize((nw, nh), Image.BICUBIC, reducing_gap=None), ((bw - nw) // 2, (bh - nh) // 2))
    tiles += [canvas.crop((x, y, x + S, y + S)) for y in range(0, bh, S) for x in range(0, bw, S)]
    return tiles


def preprocess_tiles(src, v, max_tiles=CONFIG) -> tuple[np.ndarray, tuple[int, int]]:
    """An image (path, PIL image or uint8 array) -> (float32 pixels [N, 3, S, S], (height, width))."""
    from .processor import load_image, normalize
    img = load_image(src)
    return np.concatenate([normalize(t, v) for t in tile_image(img, v, max_tiles)]), (img.size[1], img.size[0])


class Tiles(np.ndarray):
    """One image's tile batch [N, 3, S, S] (overview first) that remembers the image's (height, width) and the
    max_tiles it was cut with: what the host queues for the vision stage (serve's engine hashes it as pixels)."""
    hw: tuple = (0, 0)
    max_tiles = None


def _preprocess(src, v) -> Tiles:
    px, hw = preprocess_tiles(src, v)
    t = px.view(Tiles)
    t.hw, t.max_tiles = hw, v.max_tiles
    return t


def _set_max_tiles(cfg, n, manifest: dict | None = None) -> None:
    """--max-tiles N for any-resolution tiling (edgemm.tilings.set_max_tiles)."""
    cfg.vision.max_tiles = n
    check_config(cfg)
    ar = (manifest or {}).get("anyres") or {}
    if (manifest or {}).get("target") == "trt" and max_tile_batch(cfg.vision) > ar.get("max_tile_batch", 1 << 30):
        raise EdgemmError(f"--max-tiles {n} needs a vision batch of {max_tile_batch(cfg.vision)} tiles; this trt "
                          f"bundle's profiles stop at {ar['max_tile_batch']} (re-export with --max-tiles {n})")


def manifest_fields(model) -> dict:
    """The bundle manifest's `anyres` record (onnx and trt): what the host does and the newline row it needs."""
    v = model.cfg.vision
    return {"grid_pinpoints": v.grid_pinpoints, "max_tiles": v.max_tiles, "max_tile_batch": max_tile_batch(v),
            "anyres_max": v.anyres_max,
            "max_image_rows": max_rows(v),
            "host": "tile choice (select_best_resolution over grid_pinpoints within max_tiles), aspect-preserving "
                    "resize + zero pad, the S x S tiles after the stretched overview, then unpad and the newline "
                    "rows (edgemm.anyres); the vision stage is the tower + projector over a dynamic tile batch",
            "image_newline": [float(x) for x in model.adapter.image_newline.detach().float().cpu().numpy()]}


TYPICAL_SIZES = ((640, 480), (1024, 768), (1920, 1080), (1080, 1920))       # (width, height)


def describe_rows(cfg) -> str:
    """`edgemm info`'s vision line: image rows per image for a few typical sizes and the most one image takes."""
    v = cfg.vision
    mt = "all" if v.max_tiles is None else v.max_tiles
    sizes = ((v.image_size, v.image_size),) + TYPICAL_SIZES
    per = ", ".join(f"{w}x{h}: {cfg.image_rows_for(w, h)} rows ({n_tiles(v, h, w)} tiles)" for w, h in sizes)
    down = f", downscaled past anyres_max {v.anyres_max} tiles" if v.anyres_max else ""
    return (f"vision: ViT {v.image_size}px/{v.patch_size} width {v.width} x {v.layers} layers, any-resolution "
            f"tiling over {len(v.grid_pinpoints)} pinpoints (max tiles {mt}; overview + grid, unpadded{down}, newline "
            f"rows) -> image rows per image: {per}; at most {max_rows(v)} rows ({max_tile_batch(v)} tiles)")


class HOOKS:
    """LLaVA-NeXT's any-resolution tiling under edgemm.tilings' hooks (the tiling modules' names and signatures)."""
    check_config = staticmethod(check_config)
    preprocess = staticmethod(_preprocess)
    set_max_tiles = staticmethod(_set_max_tiles)

    @staticmethod
    def image_rows(cfg, width: int, height: int, max_tiles=CONFIG) -> int:
        return len(row_index(cfg.vision, height, width, max_tiles))

    @staticmethod
    def max_rows(cfg) -> int:
        return max_rows(cfg.vision)

    @staticmethod
    def max_tile_batch(v) -> int:
        return max_tile_batch(v)

    @staticmethod
    def describe_rows(cfg, typical) -> str:
        return describe_rows(cfg)

    @staticmethod
    def pixel_rows(cfg, pixels) -> int:
        return len(row_index(cfg.vision, *pixels.hw, pixels.max_tiles))
