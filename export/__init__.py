"""edgemm.export: exporters per target (onnx, trt, gguf), registered in EXPORTERS by target name."""
from __future__ import annotations

import importlib

# target -> "module:function(model_spec, out, precision, force, threads, log) -> manifest"
EXPORTERS: dict[str, str] = {
    "gguf": "edgemm.export.gguf:export_gguf",
    "onnx": "edgemm.export.onnx:export_onnx",
    "trt": "edgemm.export.trt:export_trt",
}


def export(target: str, **kwargs):
    from edgemm.errors import EdgemmError
    if target not in EXPORTERS:
        raise EdgemmError(f"unknown export target {target!r}; targets: {', '.join(EXPORTERS) or 'none installed'}")
    mod, fn = EXPORTERS[target].split(":")
    return getattr(importlib.import_module(mod), fn)(**kwargs)
