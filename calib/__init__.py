"""edgemm.calib: calibration sets, activation statistics per stage and modality branch, quantization recipes.

    from edgemm.calib import bundled_set, collect_stats, quantize_stage, RECIPES
    stats = collect_stats("tiny-shapes", bundled_set(64))          # cached by digest of set + model
    rec = quantize_stage("vision.onnx", "vision.int8.onnx", "vision", "int8", stats=stats)

Heavy imports (torch, onnx) happen inside the functions.
"""
from __future__ import annotations


def __getattr__(name):
    import importlib
    where = {"bundled_set": "sets", "load_calib_dir": "sets", "resolve_calib": "sets", "CalibSet": "sets",
             "collect_stats": "stats", "Stats": "stats", "METHODS": "stats",
             "quantize_stage": "quantize", "RECIPES": "recipes", "Recipe": "recipes", "get_recipe": "recipes",
             "quantize_bundle_stages": "apply"}
    if name in where:
        return getattr(importlib.import_module(f"{__name__}.{where[name]}"), name)
    raise AttributeError(name)
