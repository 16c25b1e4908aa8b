"""edgemm.export: exporters per target (onnx, trt, gguf), registered in EXPORTERS by target name."""
from __future__ import annotations

import importlib

# target -> "module:function(model_spec, out, precision, force, threads, log) -> manifest"
EXPORTERS: dict[str, str] = {
    "gguf": "edgemm.export.gguf:export_gguf",
    "onnx": "edgemm.export.onnx:export_onnx",
    "trt": "edgemm.export.trt:export_trt",
}


# The one table of precisions per target (`--precision`), and the defaults (docs/architecture.md, Conventions).
TARGET_PRECISIONS: dict[str, tuple] = {"onnx": ("fp32", "fp16", "int8", "int8-wo", "int4", "fp8"),
                                       "trt": ("fp16", "int8", "fp8"),
                                       "gguf": ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")}
DEFAULT_PRECISION = {"onnx": "fp32", "trt": "int8", "gguf": "q8_0"}


def export(target: str, **kwargs):
    from edgemm.errors import EdgemmError
    if target not in EXPORTERS:
        raise EdgemmError(f"unknown export target {target!r}; targets: {', '.join(EXPORTERS) or 'none installed'}")
    mod, fn = EXPORTERS[target].split(":")
    return getattr(importlib.import_module(mod), fn)(**kwargs)
