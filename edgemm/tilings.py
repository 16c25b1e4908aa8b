"""The tiled families' host sides, one module each, looked up by `vision.tiling` (one table instead of a string test
at every call site). Each module has preprocess(src, v), image_rows(cfg, w, h), max_rows(cfg),
max_tile_batch(v), describe_rows(cfg, sizes) and check_config(cfg); imported on first use."""
from __future__ import annotations

import importlib

MODULES = {"internvl": "edgemm.internvl_tiles", "smolvlm": "edgemm.smolvlm_tiles"}


def of(v):
    """The tiling module of a VisionConfig (None: no tiling of its own: fixed size or LLaVA-NeXT's anyres)."""
    name = MODULES.get(getattr(v, "tiling", None) or "")
    return importlib.import_module(name) if name else None
