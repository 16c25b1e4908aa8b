"""Qwen2-VL / Qwen2.5-VL's image input (tiling "qwen2vl"): the host side of its vision stage, as transformers'
Qwen2VLImageProcessor (the PIL backend) computes it, and the M-RoPE positions of the image's rows as
Qwen2VLModel.get_rope_index gives them.

An image of H x W pixels is resized (BICUBIC) to smart_resize's h x w: each side rounded to a multiple of
factor = patch_size * merge_size (28), scaled down (floor) when h * w > max_pixels or up (ceil) when below
min_pixels, aspect kept. The processor cuts the normalised pixels into patch_size patches, repeats each frame
temporal_patch_size times and flattens them in 2 x 2 merge blocks ([gh * gw, 3 * 2 * 14 * 14], `patches` here);
edgemm's vision stage takes the normalised pixels [1, 3, h, w] of any h, w (multiples of 28) and patchifies inside
(edgemm.blocks.qwen2vl), so its rows are in the same order: (h / 28) x (w / 28) rows, row-major over the merged grid.

The decoder reads an image's rows at 3-D positions (temporal, height, width; DecoderConfig.mrope_section splits the
rotary frequencies between them): row (i, j) of the merged grid at (p, p + i, p + j) when the image starts at text
position p; the text after it continues at p + max(grid rows, grid cols). The rows carry their grid (`GridRows.grid`
(1, rows, cols), set by pack_rows) to the backends; rows without one (an export's check on random rows) take the
most nearly square grid of their count.

A video (VisionConfig.video "temporal" T): its frames resized as Qwen2VLVideoProcessor resizes them (clip_pixels),
each T frames one temporal patch; the rows of temporal patch k sit at temporal position p + int(k * step) (step 1,
Qwen2.5-VL: tokens_per_second * T / the sampled fps, GridRows.tstep), their height and width positions as an
image's; the text after the clip continues at the largest position + 1, as the released get_rope_index has it
(transformers 5.x continues at p + max(grid rows, grid cols) whatever the temporal patches: the same wherever a clip
has no more temporal patches than its grid has rows or columns).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import EdgemmError

FIELDS = {"min_pixels": 0, "max_pixels": 0}     # the processor's pixel budget (smart_resize)


def factor(v) -> int:
    return v.patch_size * v.merge_size


def smart_resize(v, height: int, width: int) -> tuple[int, int]:
    """transformers' smart_resize (Qwen2VLImageProcessor) -> (height, width), multiples of factor(v)."""
    f, lo, hi = factor(v), v.min_pixels, v.max_pixels
    if max(height, width) / max(min(height, width), 1) > 200:
        raise EdgemmError(f"image {width}x{height}: the aspect ratio must be below 200 (Qwen2-VL's processor)")
    h, w = round(height / f) * f, round(width / f) * f
    if h * w > hi:
        beta = math.sqrt(height * width / hi)
        h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h * w < lo:
        beta = math.sqrt(lo / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h, w


class GridRows(np.ndarray):
    """An image's (a clip's) rows [1, rows, D] that remember their merged grid (t, rows, cols) and the temporal
    positions' step (tstep): the M-RoPE positions."""
    grid: tuple | None = None
    tstep: float = 1.0

    def __array_finalize__(self, obj):
        self.grid, self.tstep = getattr(obj, "grid", None), getattr(obj, "tstep", 1.0)


class QwenPixels(np.ndarray):
    """One image's normalised pixels [1, 3, h, w]; pack_rows gives the vision stage's rows their grid."""

    def pack_rows(self, rows, cfg):
        """The vision stage's rows (numpy, or the reference's torch tensor) -> the same, carrying their grid."""
        m = factor(cfg.vision)
        out = rows if hasattr(rows, "detach") else np.asarray(rows, np.float32).view(GridRows)
        out.grid = (1, self.shape[2] // m, self.shape[3] // m)
        return out


def preprocess(src, v) -> QwenPixels:
    """An image (path, PIL image or uint8 array) -> float32 pixels [1, 3, h, w] (QwenPixels), normalised."""
    from PIL import Image
    from .processor import load_image, normalize
    img = load_image(src)
    h, w = smart_resize(v, img.size[1], img.size[0])
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC, reducing_gap=None)
    return normalize(img, v).view(QwenPixels)


def patches(pixels: np.ndarray, v, temporal: int = 2) -> np.ndarray:
    """Pixels [1, 3, h, w] -> the processor's pixel_values [gh * gw, 3 * temporal * p * p] (merge-block order)."""
    p, m = v.patch_size, v.merge_size
    _, c, h, w = pixels.shape
    gh, gw = h // p, w // p
    x = pixels[0].reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, p, p))
    return x.reshape(gh * gw, c * temporal * p * p)


def grid_of(rows) -> tuple[int, int, int]:
    """The (t, rows, cols) merged grid of an image's rows: the one they carry, else the most nearly square one."""
    g = getattr(rows, "grid", None)
    if g is not None:
        return tuple(int(x) for x in g)
    n = int(rows.shape[1])
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0) if n else 1
    return 1, h, n // h if n else 0


def image_positions(start: int, rows) -> np.ndarray:
    """int64 [3, n]: the (temporal, height, width) positions of an image's rows starting at text position start."""
    t, gh, gw = grid_of(rows)
    if t * gh * gw != rows.shape[1]:
        raise EdgemmError(f"image rows {rows.shape[1]} do not fill their grid {t}x{gh}x{gw}")
    i, j = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    k = (np.arange(t, dtype=np.float32) * np.float32(getattr(rows, "tstep", 1.0))).astype(np.int64)  # (torch's f32)
    return np.stack([np.repeat(k, gh * gw), np.tile(i.reshape(-1), t), np.tile(j.reshape(-1), t)]) + start


# ---- video --------------------------------------------------------------------------------------------------------
def video_config(v):
    """The vision config with the video processor's pixel budget (smart_resize of a frame)."""
    import dataclasses
    vv = v.video
    return dataclasses.replace(v, min_pixels=int(vv["min_pixels"]), max_pixels=int(vv["max_pixels"]))


def clip_pixels(frames, cfg, mean, std) -> np.ndarray:
    """Frames uint8 [H, W, 3] -> float32 [F', 3, h, w] as Qwen2VLVideoProcessor gives them: h x w the video budget's
    smart_resize of the first frame, each frame resized to it BICUBIC with antialias on its uint8 values (torchvision's
    resize: torch's interpolate on uint8, which rounds), rescaled and normalised in one step ((x - 255 mean) / (255
    std), the processor's fused form), the last frame repeated up to a multiple of T frames (patchify's padding).
    A clip's frames share a size; still images taken as frames (calibration, checks) are each resized to it."""
    import torch
    import torch.nn.functional as F
    v = cfg.vision
    T = int(v.video["temporal"])
    h, w = smart_resize(video_config(v), *frames[0].shape[:2])
    out = []
    for f in frames:
        x = torch.from_numpy(np.array(f, np.uint8)).permute(2, 0, 1)[None]
        if tuple(x.shape[2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        out.append(x)
    x = torch.cat(out).float()
    m, s = (torch.tensor(a, dtype=torch.float32).view(1, 3, 1, 1) * 255 for a in (mean, std))
    x = ((x - m) / s).numpy()
    if len(x) % T:
        x = np.concatenate([x, np.repeat(x[-1:], T - len(x) % T, 0)])
    return np.ascontiguousarray(x, np.float32)


def clip_grid(cfg, pixels) -> tuple[int, int, int]:
    """A clip's pixels [F', 3, h, w] -> the merged grid of its rows (temporal patches, rows, cols)."""
    m = factor(cfg.vision)
    return -(-len(pixels) // int(cfg.vision.video["temporal"])), pixels.shape[2] // m, pixels.shape[3] // m


def video_grid_rows(cfg, pixels, rows, sampled_fps: float = 0.0):
    """The video stage's rows [1, n, D] -> GridRows carrying the clip's grid and temporal step (Qwen2.5-VL:
    tokens_per_second * T / the sampled fps; 1 else, or where the clip says no rate)."""
    vv = cfg.vision.video
    out = np.asarray(rows, np.float32).view(GridRows)
    out.grid = clip_grid(cfg, pixels)
    tps = float(vv.get("tokens_per_second") or 0)
    out.tstep = tps * int(vv["temporal"]) / sampled_fps if tps and sampled_fps else 1.0
    return out


# ---- the tiling hooks (edgemm.tilings) ------------------------------------------------------------------------
def check_config(cfg) -> None:
    v, d = cfg.vision, cfg.decoder
    if not (v.arch == "qwen2vl" and cfg.adapter.kind == "qwen2vl_merger" and v.tiling == "qwen2vl"):
        raise EdgemmError("the qwen2vl tower, the qwen2vl_merger connector and tiling 'qwen2vl' go together")
    if v.merge_size < 1 or not 0 < v.min_pixels <= v.max_pixels or v.max_pixels < factor(v) ** 2:
        raise EdgemmError("qwen2vl: merge_size >= 1 and 0 < min_pixels <= max_pixels, max_pixels at least one "
                          f"{factor(v)} px block")
    if v.window_px and v.window_px % factor(v):
        raise EdgemmError(f"qwen2vl: window_px {v.window_px} must be a multiple of {factor(v)}")
    vv = v.video
    if vv and not (vv.get("temporal", 0) >= 1 and 0 < vv.get("min_pixels", 0) <= vv.get("max_pixels", 0)
                   and vv.get("fps", 0) > 0):
        raise EdgemmError("qwen2vl video: temporal >= 1, 0 < min_pixels <= max_pixels and fps > 0")
    if len(d.mrope_section) != 3 or sum(d.mrope_section) != d.head_dim // 2:
        raise EdgemmError(f"mrope_section {d.mrope_section} must be 3 sections summing to head_dim / 2 "
                          f"({d.head_dim // 2})")


def image_rows(cfg, width: int, height: int, max_tiles=None) -> int:
    h, w = smart_resize(cfg.vision, height, width)
    return (h // factor(cfg.vision)) * (w // factor(cfg.vision))


def pixel_rows(cfg, pixels) -> int:
    m = factor(cfg.vision)
    return (pixels.shape[2] // m) * (pixels.shape[3] // m)


def max_rows(cfg) -> int:
    return cfg.vision.max_pixels // factor(cfg.vision) ** 2


def max_tile_batch(v) -> int:
    return 1


def profile_side(budget: int, f: int) -> int:
    """The largest side a trt profile takes for images (frames) of `budget` pixels: any aspect up to 2:1 at the
    whole budget (16:9 included; a longer strip is refused by the engine's profile, edgemm.export.trt_profiles)."""
    return max(f, math.isqrt(2 * budget) // f * f)


def input_profiles(cfg) -> dict:
    """The trt vision stage's input profiles: pixels of one image, from one merged cell to profile_side's square."""
    v = cfg.vision
    f = factor(v)
    side, opt = profile_side(v.max_pixels, f), max(f, math.isqrt(v.max_pixels) // 2 // f * f)
    return {"pixels": {"min": [1, 3, f, f], "opt": [1, 3, opt, opt], "max": [1, 3, side, side]}}


def describe_rows(cfg, typical=((640, 480), (1024, 768), (1920, 1080))) -> str:
    v = cfg.vision
    per = ", ".join(f"{w}x{h}: {image_rows(cfg, w, h)} rows" for w, h in typical)
    win = f", window attention over {v.window_px} px (full in blocks {v.full_blocks})" if v.window_px else ""
    return (f"vision: Qwen2-VL ViT {v.patch_size}px patches, 2-D RoPE{win}, {v.merge_size}x{v.merge_size} merger; "
            f"any size resized to {factor(v)}-px multiples within {v.min_pixels}..{v.max_pixels} pixels -> image "
            f"rows per image: {per}; at most {max_rows(cfg)} rows; M-RoPE sections {cfg.decoder.mrope_section}")
