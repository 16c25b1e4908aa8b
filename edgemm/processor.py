"""Image loading and preprocessing to the vision tower's input, with clear errors for bad files."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import EdgemmError

MAX_PIXELS = 64_000_000   # refuse decompression bombs before decoding
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")   # multi-frame: the first frame


def load_image(src) -> "Image.Image":
    """A path, PIL image or uint8 array [H, W, 3] -> RGB PIL image (EXIF orientation applied)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3:
            raise EdgemmError(f"image arrays must be uint8 [H, W, 3], got {src.dtype} {list(src.shape)}")
        return Image.fromarray(src, "RGB")
    if isinstance(src, Image.Image):
        img = src
    else:
        path = Path(src)
        if not path.exists():
            raise EdgemmError(f"image not found: {path}; check the path")
        if path.is_dir():
            raise EdgemmError(f"{path} is a directory, not an image file")
        try:
            img = Image.open(path, formats=IMAGE_FORMATS)     # no EPS/PDF/PSD/FITS... decoders for user files
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise EdgemmError(f"{path} is {w}x{h} pixels, over the {MAX_PIXELS // 1_000_000} megapixel limit "
                                  "(a possible decompression bomb); downscale it first")
            img.load()
        except EdgemmError:
            raise
        except Image.DecompressionBombError:
            raise EdgemmError(f"{path} is too large to decode safely (decompression bomb); downscale it first") from None
        except UnidentifiedImageError:
            raise EdgemmError(f"{path} is not an image file that Pillow can read (PNG, JPEG, BMP, GIF, WebP...)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise EdgemmError(f"{path} is a damaged or truncated image ({e}); re-save or re-download it") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a corrupt EXIF block should not stop us; orientation is then left as is
        pass
    return to_rgb(img)


def to_rgb(img) -> "Image.Image":
    """Any Pillow mode -> RGB: 16-bit and float greyscale rescaled, alpha composited over black."""
    from PIL import Image
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    raise EdgemmError(f"unsupported image mode {mode!r}; convert the image to RGB first")


def preprocess(src, vision_cfg) -> np.ndarray:
    """-> float32 pixels [1, 3, S, S], resized (stretched) to the tower's size, normalised. (Any-resolution
    models tile the image instead: edgemm.anyres.preprocess_tiles / image_rows; InternVL's dynamic tiles:
    edgemm.internvl_tiles.preprocess.)"""
    from PIL import Image
    img = load_image(src)
    if vision_cfg.pad_square and img.size[0] != img.size[1]:       # Libra / LLaVA-1.5 "pad"
        side = max(img.size)
        bg = Image.new("RGB", (side, side), tuple(int(m * 255) for m in vision_cfg.image_mean))
        bg.paste(img, ((side - img.size[0]) // 2, (side - img.size[1]) // 2))
        img = bg
    s = vision_cfg.image_size
    if img.size != (s, s):
        img = img.resize((s, s), vision_cfg.resample, reducing_gap=None)       # (bicubic unless the family says)
    return normalize(img, vision_cfg)


def normalize(img, vision_cfg) -> np.ndarray:
    """RGB PIL image -> float32 [1, 3, h, w]: scaled to [0, 1], minus the mean, over the std."""
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(vision_cfg.image_mean, np.float32)) / np.asarray(vision_cfg.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
