"""The tiled models' host sides, looked up by the vision config (one table instead of a string test per family at
every call site): LLaVA-NeXT's any-resolution tiling (grid_pinpoints, edgemm.anyres.HOOKS), InternVL's dynamic tiles,
SmolVLM / Idefics3's tile grid, Fuyu's patches and LLaVA-UHD's slices (vision.tiling, a module each). Every tiling
has the same hooks: preprocess(src, v), image_rows(cfg, width, height), max_rows(cfg), max_tile_batch(v),
describe_rows(cfg, typical), check_config(cfg), pixel_rows(cfg, pixels) (the rows of one preprocessed image), its
vision config fields (FIELDS, composed into VisionConfig by edgemm.config), where a tile count is settable
set_max_tiles(cfg, n, manifest), and where the vision stage's trt inputs are not fixed-size tiles
input_profiles(cfg). A new tiling is a module with these hooks and a line in MODULES."""
from __future__ import annotations

import importlib

import numpy as np

from .errors import EdgemmError

MODULES = {"internvl": "edgemm.internvl_tiles", "smolvlm": "edgemm.smolvlm_tiles", "fuyu": "edgemm.fuyu_patches",
           "uhd": "edgemm.uhd_slices",
           "qwen2vl": "edgemm.qwen2vl_pixels"}


def fields() -> dict:
    """The vision config fields every tiling adds (each module's FIELDS; a field two share has one default)."""
    from .anyres import FIELDS
    out = dict(FIELDS)
    for name in MODULES.values():
        for k, d in importlib.import_module(name).FIELDS.items():
            if out.setdefault(k, d) != d:
                raise ValueError(f"vision.{k} declared by two tilings with two defaults")
    return out


def of(v):
    """The tiling of a VisionConfig (None: one fixed-size image)."""
    if getattr(v, "grid_pinpoints", None):
        from .anyres import HOOKS
        return HOOKS
    name = MODULES.get(getattr(v, "tiling", None) or "")
    return importlib.import_module(name) if name else None


def set_max_tiles(cfg, n, manifest: dict | None = None) -> None:
    """--max-tiles N: at export (the bundle's default) or at run time (overriding it; a trt bundle's profiles bound
    the tile batch, so a run-time value may not need more tiles than its export allowed). None: nothing to set."""
    if n is None:
        return
    tiles = of(cfg.vision)
    if not hasattr(tiles, "set_max_tiles"):
        raise EdgemmError("--max-tiles applies to tiled models (LLaVA-NeXT's any-resolution tiling, InternVL's "
                          "dynamic tiles); this one " + ("cuts its own tile grid by size (longest_edge)" if tiles
                                                         else "takes one fixed-size image"))
    tiles.set_max_tiles(cfg, n, manifest)


def preprocess_image(src, v):
    """The host's image preprocessing for any model: fixed size -> float32 [1, 3, S, S]; tiled -> its tiling's:
    LLaVA-NeXT's anyres.Tiles, InternVL's tiles [N, 3, S, S], SmolVLM's GridTiles."""
    from .processor import preprocess
    tiles = of(v)
    return preprocess(src, v) if tiles is None else tiles.preprocess(src, v)


def encode_pixels(backend, pixels) -> np.ndarray:
    """preprocess_image's output -> image rows [1, rows, D] through the backend's vision stage (+ the packing)."""
    from .anyres import Tiles, pack, row_index
    if hasattr(pixels, "encode_with"):          # LLaVA-UHD: a vision call per size (slices, source image; uhd_slices)
        return pixels.encode_with(backend.vision, backend.cfg)
    if hasattr(pixels, "pack_rows"):            # SmolVLM: its rows gathered from the stage's table (smolvlm_tiles)
        return pixels.pack_rows(backend.vision(np.asarray(pixels)), backend.cfg)
    if not isinstance(pixels, Tiles):
        return backend.vision(pixels)
    (h, w), mt = pixels.hw, pixels.max_tiles
    return pack(backend.vision(np.asarray(pixels)), backend.image_newline(), row_index(backend.cfg.vision, h, w, mt))


def image_rows(backend, src) -> np.ndarray:
    """The host's image path for any backend: image -> rows [1, rows, D] (fixed size: the vision stage's rows)."""
    return encode_pixels(backend, preprocess_image(src, backend.cfg.vision))
