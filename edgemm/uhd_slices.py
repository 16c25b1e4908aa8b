"""LLaVA-UHD's image modularization (thunlp/LLaVA-UHD, branch LLaVA-UHD-v1: llava/slice_process.py, the eval
scripts' path): the host side of its vision stage, and the spatial schema of its rows.

An image is first resized (bicubic) so that its longer side is `longest_edge` (resize_image_keep_ratio, 1024; the
other side int() of the ratio). Then slice_image_minicpm (max_slice_nums `max_tiles`, scale_resolution S = the
tower's image_size, the tower's patch p): the number of slices is min(ceil(area / S^2), max_tiles); with one or
fewer the image is not sliced (the source image alone, resized keeping its aspect to about S^2 pixels in whole
patches, upscaled if small). Otherwise the grid (cols x rows) of n - 1, n or n + 1 slices (not 1, at most
max_tiles) whose log aspect ratio is closest to the image's is chosen, the image is resized so that each slice is
about S^2 pixels in whole patches keeping the slice's aspect (get_refine_size) and cut row-major into the grid; the
source image (the whole image downscaled the same way as an unsliced one) follows. Slices and source image are each
of their own size: the tower interpolates its position table to each (edgemm.blocks.vision, tiling "uhd").

The shared compression layer (edgemm.blocks.resampler.UhdResampler) takes one group of same-size images (the
slices, or the source image) with pool_rows / pool_cols, the RoIAlign weights of its g x g regions
(slice_image_feature_minicpm's boxes, cal_best_pooling_size's oh x ow points: pool_matrices below), and returns
one table: Q rows per image, then the separator rows (',' and '\\n', Vicuna's ids 29892 and 13 in the release).
The spatial schema (llava_arch.prepare_inputs_labels_for_multimodal): each slice's Q rows followed by ',' (or '\\n'
after the last slice of a row of the grid), then the source image's Q rows; an unsliced image is its Q rows.

llama.cpp's MiniCPM-V slicing (tools/mtmd, mtmd_image_preprocessor_llava_uhd) is the same idea, not the same
numbers: its ensure_divide rounds to whole patches where this release floors, it works in float32, puts the overview
first and has no keep_ratio resize; its resampler attends to every patch (no regions), so no gguf here.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import EdgemmError

# The vision config fields this tiling reads (edgemm.tilings.fields): max_tiles (the release's max_slice_nums) and
# longest_edge (resize_image_keep_ratio's max_size), shared with the other tilings
FIELDS = {"max_tiles": None, "longest_edge": 0}
POOL_SIZES = ((4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4))    # cal_best_pooling_size's (w, h) candidates


def check_config(cfg) -> None:
    v, a = cfg.vision, cfg.adapter
    if (a.kind == "uhd_resampler") != (v.tiling == "uhd") or v.arch != "clip" or v.keep_cls or v.grid_pinpoints:
        raise EdgemmError("the uhd_resampler connector goes with the clip tower (patch rows only) and the uhd slices "
                          "(LLaVA-UHD), without grid_pinpoints")
    if not (isinstance(v.max_tiles, int) and v.max_tiles >= 1 and v.longest_edge >= v.patch_size):
        raise EdgemmError("uhd slices need max_tiles >= 1 (max_slice_nums) and longest_edge >= the patch size")
    if len(a.marker_ids) != 2:
        raise EdgemmError("uhd slices need adapter.marker_ids: the ',' and '\\n' token ids (the slice separators)")


# --------------------------------------------------------------------------- sizes (slice_process.py)
def _divide(length: float, p: int) -> int:
    """ensure_divide: the largest multiple of p not above length, at least p."""
    return max(math.floor(length / p) * p, p)


def _best_resize(w: float, h: float, S: int, p: int, upscale: bool) -> tuple[int, int]:
    """find_best_resize: (w, h) scaled to about S^2 pixels keeping the ratio (when larger, or upscale), in whole
    patches."""
    if w * h > S * S or upscale:
        r = w / h
        h = int(S / math.sqrt(r))
        w = int(h * r)
    return _divide(w, p), _divide(h, p)


def keep_ratio(w: int, h: int, m: int) -> tuple[int, int]:
    """resize_image_keep_ratio's size: the longer side m (the width when wider, else the height); at least 1 px (the
    release would resize a 3000 x 1 image to 0 px)."""
    return (m, max(1, int(m / w * h))) if w > h else (max(1, int(m / h * w)), m)


def layout(v, width: int, height: int) -> tuple:
    """-> ((w, h) of the source image, (cols, rows) of the grid or None, (w, h) of each slice or None) for an image
    of width x height (after keep_ratio)."""
    S, p = v.image_size, v.patch_size
    W, H = keep_ratio(width, height, v.longest_edge)
    multiple = min(math.ceil(W * H / (S * S)), v.max_tiles)
    if multiple <= 1:
        return _best_resize(W, H, S, p, True), None, None
    log_ratio = math.log(W / H)
    best, err = [1, 1], float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > v.max_tiles:
            continue
        for m in range(1, n + 1):
            if n % m == 0 and abs(log_ratio - math.log(m / (n // m))) < err:
                best, err = [m, n // m], abs(log_ratio - math.log(m / (n // m)))
    gx, gy = best
    sw, sh = _best_resize(_divide(W, gx) / gx, _divide(H, gy) / gy, S, p, True)
    return _best_resize(W, H, S, p, False), (gx, gy), (sw, sh)


def n_tiles(v, height: int, width: int) -> int:
    """Tower passes for an image: its slices + the source image (1 when unsliced)."""
    g = layout(v, width, height)[1]
    return g[0] * g[1] + 1 if g else 1


def image_rows(cfg, width: int, height: int, max_tiles=None) -> int:
    v = cfg.vision
    if max_tiles is not None:
        import dataclasses
        v = dataclasses.replace(v, max_tiles=max_tiles)
    n = n_tiles(v, height, width) - 1
    return (n + 1) * cfg.adapter.query_tokens + n


def max_tile_batch(v) -> int:
    """The most images one vision call takes (the slices of the largest grid)."""
    return v.max_tiles


def max_rows(cfg) -> int:
    n = cfg.vision.max_tiles if cfg.vision.max_tiles > 1 else 0
    return (n + 1) * cfg.adapter.query_tokens + n


def input_profiles(cfg) -> dict:
    """The trt vision stage's input profiles: a call's slices (up to max_tiles, or the source image alone) of any
    size in whole patches up to the longest edge, and their RoIAlign weights (edgemm.export.trt_profiles)."""
    v = cfg.vision
    S, p, g = v.image_size, v.patch_size, math.isqrt(cfg.adapter.query_tokens)
    side = -(-v.longest_edge // p)                       # patches along the longest side an image can have
    bins = max(max(wh) for wh in POOL_SIZES)
    pool = {"min": [g, 1], "opt": [g * 3, S // p], "max": [g * bins, side]}
    return {"pixels": {"min": [1, 3, p, p], "opt": [max(1, v.max_tiles // 2), 3, S, S],
                       "max": [max(1, v.max_tiles), 3, side * p, side * p]},
            "pool_rows": pool, "pool_cols": pool}


def pixel_rows(cfg, pixels) -> int:
    return len(pixels.index(cfg)) + cfg.adapter.query_tokens * (pixels.grid is not None)


def set_max_tiles(cfg, n: int, manifest: dict | None = None) -> None:
    """--max-tiles N: the release's max_slice_nums."""
    cfg.vision.max_tiles = n
    check_config(cfg)


# --------------------------------------------------------------------------- the RoIAlign weights
def pooling_size(wh_ratio: float) -> tuple[int, int]:
    """cal_best_pooling_size: the (h, w) points each region is RoIAligned to, closest in log ratio (first wins)."""
    best, err = (3, 3), float("inf")
    for w, h in POOL_SIZES:
        e = abs(math.log(wh_ratio) - math.log(w / h))
        if e < err:
            best, err = (h, w), e
    return best


def _axis(n: int, g: int, crop: float, out: int) -> np.ndarray:
    """float32 [g * out, n]: along one axis of n feature cells, region i = [i * crop, i * crop + crop) (the boxes
    as float32, generate_subimage_coordinates) RoIAligned to `out` bins as torchvision's roi_align (aligned False,
    sampling_ratio -1: ceil(size / out) samples a bin, bilinear with its border rules, averaged)."""
    f = np.float32
    m = np.zeros((g * out, n), np.float64)
    for i in range(g):
        start, end = f(i * crop), f(i * crop + crop)
        size = max(f(end - start), f(1.0))
        bin_ = f(size / f(out))
        k = math.ceil(size / out)
        for b in range(out):
            for s in range(k):
                y = f(start + f(b) * bin_ + f(f(s + 0.5) * bin_ / f(k)))
                if y < -1.0 or y > n:
                    continue
                y = max(y, f(0))
                lo = int(y)
                if lo >= n - 1:
                    lo = hi = n - 1
                    y = f(lo)
                else:
                    hi = lo + 1
                ly = f(y - lo)
                m[i * out + b, lo] += (1 - ly) / k
                m[i * out + b, hi] += ly / k
    return m.astype(np.float32)


def pool_matrices(h: int, w: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool_rows [g * oh, h], pool_cols [g * ow, w]) of an h x w patch grid (slice_image_feature_minicpm with
    num_windows g^2: regions of h / g x w / g cells, computed as the release does; oh x ow from pooling_size)."""
    ratio = h * w / (g * g)
    ch = math.sqrt(ratio / (w / h))
    cw = ch * (w / h)
    oh, ow = pooling_size(w / h)
    return _axis(h, g, ch, oh), _axis(w, g, cw, ow)


# --------------------------------------------------------------------------- pixels and rows
class Slices(np.ndarray):
    """One image's slices [N, 3, h, w] (the grid row-major; the source image alone when unsliced) that remember the
    grid and carry the source image [1, 3, H, W]: what the host queues for the vision stage. encode_with(run)
    makes the image's rows with run(pixels, pool_rows, pool_cols) (a backend's vision, or the reference's)."""
    grid = None
    source = None

    def index(self, cfg) -> np.ndarray:
        """int64: the slices' rows in the slice table [N Q rows; ',' row; '\\n' row], separators after each."""
        Q, out = cfg.adapter.query_tokens, []
        if self.grid is None:
            return np.arange(Q)
        gx, gy = self.grid
        for k in range(gx * gy):
            out += list(range(k * Q, (k + 1) * Q)) + [gx * gy * Q + (1 if k % gx == gx - 1 else 0)]
        return np.asarray(out, np.int64)

    def groups(self, cfg) -> list:
        """The vision calls: [(pixels, pool_rows, pool_cols)] for the slices, then the source image."""
        g = math.isqrt(cfg.adapter.query_tokens)
        out = []
        for px in ([np.asarray(self)] + ([self.source] if self.grid is not None else [])):
            p = cfg.vision.patch_size
            out.append((np.ascontiguousarray(px, np.float32),
                        *pool_matrices(px.shape[2] // p, px.shape[3] // p, g)))
        return out

    def encode_with(self, run, cfg):
        """-> the image's rows [1, rows, D] (numpy or torch, as run returns)."""
        tables = [run(*x) for x in self.groups(cfg)]
        rows = tables[0][:, self.index(cfg)]
        if self.grid is None:
            return rows
        src = tables[1][:, : cfg.adapter.query_tokens]
        if isinstance(rows, np.ndarray):
            return np.concatenate([rows, src], 1)
        import torch
        return torch.cat([rows, src], 1)


def preprocess(src, v) -> Slices:
    """An image (path, PIL image or uint8 array) -> Slices: float32, normalised (CLIPImageProcessor without resize
    or crop)."""
    from PIL import Image
    from .processor import load_image, normalize
    img = load_image(src)
    img = img.resize(keep_ratio(*img.size, v.longest_edge), Image.BICUBIC)
    source, grid, slice_ = layout(v, *img.size)
    src_px = normalize(img.resize(source, Image.BICUBIC), v)
    if grid is None:
        px = src_px.view(Slices)
        return px
    gx, gy = grid
    big = img.resize((slice_[0] * gx, slice_[1] * gy), Image.BICUBIC)
    sw, sh = slice_
    tiles = [big.crop((c * sw, r * sh, (c + 1) * sw, (r + 1) * sh)) for r in range(gy) for c in range(gx)]
    px = np.concatenate([normalize(t, v) for t in tiles]).view(Slices)
    px.grid, px.source = grid, src_px
    return px


def describe_rows(cfg, typical: tuple) -> str:
    """`edgemm info`'s vision line: image rows for the tower's size and `typical` (width, height) sizes."""
    v = cfg.vision
    sizes = ((v.image_size, v.image_size),) + tuple(typical)
    per = ", ".join(f"{w}x{h}: {image_rows(cfg, w, h)} rows ({n_tiles(v, h, w)} images)" for w, h in sizes)
    return (f"vision: CLIP {v.image_size}px/{v.patch_size} width {v.width}, LLaVA-UHD slices (up to {v.max_tiles} "
            f"of about {v.image_size}^2 px + the source image, after a resize to {v.longest_edge} px), "
            f"{cfg.adapter.query_tokens} resampled rows each + separators -> image rows per image: {per}; at most "
            f"{max_rows(cfg)} rows")
