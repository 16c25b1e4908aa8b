"""The types of a GGUF bundle's tensors: the precisions `--target gguf` takes, the llama_ftype each names, what
the mmproj gets per requested precision and per tensor (with its fallbacks), and the decoder's quantization by
llama.cpp's own quantizer (llama_model_quantize).

The decoder is written in f32 and quantized by llama.cpp. The mmproj is written by the `gguf` package at f32 / f16 /
q8_0 / q4_0 (the types llama.cpp's converter writes); K-quant requests for the vision stage fall back to q8_0."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError
from edgemm.export import TARGET_PRECISIONS

PRECISIONS = TARGET_PRECISIONS["gguf"]
# llama_ftype values (llama.h)
FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
# what the mmproj gets per requested precision (gguf-py quantizes f16/q8_0/q4_0; no K-quants for clip files)
VISION_TYPES = {"f32": "f32", "f16": "f16", "q8_0": "q8_0", "q4_0": "q4_0",
                "q4_k_m": "q8_0", "q5_k_m": "q8_0", "q6_k": "q8_0"}


def mmproj_file_type(qtype: str) -> int:
    """general.file_type of an mmproj written at qtype (one of VISION_TYPES' values)."""
    if qtype not in VISION_TYPES.values():
        raise KeyError(qtype)
    return FTYPES[qtype]


def add_vision_tensor(w, name: str, arr: np.ndarray, qtype: str) -> str:
    """Add one mmproj tensor to the GGUFWriter `w`: matrices of linear layers get qtype (when their rows fit its
    blocks, else f16); the rest stay f32. -> the type written."""
    import gguf
    from gguf.quants import quantize
    is_matrix = arr.ndim == 2 and name.endswith(".weight") and not name.startswith(("v.position_embd",))
    if qtype == "f32" or not is_matrix:
        w.add_tensor(name, arr.astype(np.float32))
        return "f32"
    if qtype == "f16":
        w.add_tensor(name, arr.astype(np.float16))
        return "f16"
    gt = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
    block = gguf.GGML_QUANT_SIZES[gt][0]
    if arr.shape[-1] % block:
        w.add_tensor(name, arr.astype(np.float16))
        return "f16"
    w.add_tensor(name, quantize(arr.astype(np.float32), gt), raw_dtype=gt)
    return qtype


def quantize_decoder(src: Path, dst: Path, precision: str, threads: int, imatrix: Path | None = None) -> dict | None:
    """llama.cpp's own quantizer (llama_model_quantize) from the f32 file; with `imatrix` (a GGUF imatrix file,
    gguf_imatrix) the importance matrix read back from it. -> the imatrix's metadata (None without)."""
    import ctypes
    from edgemm.llamacpp import load_llama_cpp
    ll = load_llama_cpp()
    p = ll.llama_model_quantize_default_params()
    p.nthread = threads
    p.ftype = FTYPES[precision]
    meta = None
    if imatrix is not None:
        from edgemm.export.gguf_imatrix import imatrix_params, read_imatrix
        values, meta = read_imatrix(imatrix)
        arr, kvs, _keep = imatrix_params(values, meta, Path(imatrix).name)
        p.imatrix = ctypes.cast(arr, type(p.imatrix))
        p.kv_overrides = ctypes.cast(kvs, type(p.kv_overrides))
    rc = ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0 or not dst.is_file():
        raise EdgemmError(f"llama_model_quantize to {precision} failed (code {rc})")
    return meta
