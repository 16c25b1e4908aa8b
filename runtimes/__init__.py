"""edgemm.runtimes: one small protocol over backends (torch, ort, trt, llamacpp).

A backend runs the three stages of docs/architecture.md section 5 and owns its KV cache:

    b = load_backend("torch", model="tiny-shapes")       # or bundle="out/fp32"
    rows = b.vision(pixels)                              # float32 [1, 3, S, S] -> [1, P+2, D]
    st = b.new_state()                                   # empty KV cache, next position 0
    logits = b.text(st, [bos_id])                        # float32 [vocab] for the last row
    logits = b.image(st, rows)
    logits = b.text(st, ids)

Generation, chat and preprocessing live above the backends (edgemm.generation).
Heavy imports (onnxruntime, tensorrt, llama_cpp) happen inside the backend that needs them.
"""
from __future__ import annotations

import importlib

from .base import Backend, State

# name -> "module:Class"; resolved lazily so `import edgemm` stays cheap.
BACKENDS: dict[str, str] = {
    "torch": "edgemm.runtimes.torch_backend:TorchBackend",
    "llamacpp": "edgemm.runtimes.llamacpp_backend:LlamaCppBackend",
    "ort": "edgemm.runtimes.ort_backend:OrtBackend",
    "trt": "edgemm.runtimes.trt_backend:TrtBackend",
}


def backend_class(name: str):
    from edgemm.errors import EdgemmError
    if name not in BACKENDS:
        raise EdgemmError(f"unknown or unavailable backend {name!r}; available: {', '.join(BACKENDS)}")
    mod, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def load_backend(name: str = "auto", model: str | None = None, bundle: str | None = None,
                 device: str = "auto", threads: int | None = None, log=None, slots: int = 1,
                 kv_cache: str | None = None, mmproj_offload: bool = True, context: int | None = None,
                 vision_threads: int | None = None) -> Backend:
    """Open a model directory/preset or a bundle with the named backend ('auto' picks and says why).

    slots: how many states will be live at once (a server's parallel slots); backends whose states share one
    native context (llamacpp) size it for them, the others hold any number of states anyway. kv_cache (f16, q8_0,
    q4_0) and mmproj_offload=False are llama.cpp's (--kv-cache, --no-mmproj-offload); a backend without them
    refuses them in one line (kv_cache_refusal). vision_threads: the vision stage's own threads where a backend
    sizes them when it opens (ort, llamacpp; torch sets them on the thread that encodes: Backend.on_side_thread)."""
    from edgemm.errors import EdgemmError
    if model and bundle:
        raise EdgemmError("give either --model or --bundle, not both")
    if name == "auto" and bundle is None and model in (None, "tiny-shapes"):
        bundle = shipped_bundle(log)             # the shipped model without importing torch, where it can
        if bundle is not None:
            model = None
    if name == "auto":
        name, why = pick_backend(bundle, device)
        if name == "trt" and why.startswith(TRT_CPU_FALLBACK):
            device = "cpu"
        if log:
            log(f"backend: {name} ({why})")
    if bundle is None and name != "torch":
        raise EdgemmError(f"the {name} backend runs bundles: export one with `edgemm export` and pass --bundle")
    cls = backend_class(name)
    import inspect
    params = inspect.signature(cls.open).parameters
    kw = {"slots": slots} if "slots" in params else {}
    if kv_cache is not None and kv_cache not in getattr(cls, "kv_caches", ()):
        raise EdgemmError(kv_cache_refusal(name, kv_cache))
    for key, val, default in (("kv_cache", kv_cache, None), ("mmproj_offload", mmproj_offload, True)):
        if val != default:
            if key not in params:
                raise EdgemmError(kv_cache_refusal(name, val) if key == "kv_cache" else
                                  f"--no-mmproj-offload applies to the llamacpp backend (its mmproj on the GPU); "
                                  f"the {name} backend places its vision stage with --device")
            kw[key] = val
    if context is not None and "context" in params:        # sized at opening (llama.cpp's n_ctx)
        kw["context"] = context
    if vision_threads and "vision_threads" in params:
        kw["vision_threads"] = vision_threads
    b = cls.open(model=model, bundle=bundle, device=device, threads=threads, log=log, **kw)
    if context is not None:                     # the others: the caches new states get (Backend.context_limit)
        b.context_limit = min(int(context), b.context_length)
    return b


def kv_cache_refusal(name: str, kv_cache: str) -> str:
    """Why a --kv-cache type is refused on a backend (Backend class attribute kv_caches: the types it takes), with
    the evidence for ONNX Runtime: whether the installed version's GroupQueryAttention (the ort bundles' attention
    op) has an int8-cache form at all."""
    if name == "llamacpp":
        return (f"--kv-cache {kv_cache} is the ort backend's (onnx bundles); llama.cpp's types are f32, f16, q8_0 and "
                "q4_0")
    head = f"--kv-cache {kv_cache} applies to the llamacpp backend (gguf bundles); "
    if name != "ort":
        return head + f"the {name} backend keeps its KV cache in the model's float type"
    try:
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
        gqa = next((x for x in get_all_operator_schema() if x.name == "GroupQueryAttention"), None)
        quant = gqa is not None and any(i.name == "k_scale" for i in gqa.inputs)
        what = (f"the ort backend takes --kv-cache int8 (ONNX Runtime {ort.__version__}'s GroupQueryAttention does "
                "take an int8 cache: k_scale / v_scale inputs, k_quant_type; the scales are the bundle's) or the "
                "bundle's float type" if quant else
                f"ONNX Runtime {ort.__version__}'s GroupQueryAttention has no quantized KV cache (no k_scale / "
                "v_scale inputs in its schema)")
    except ImportError:
        what = "ONNX Runtime is not installed"
    return head + what


TRT_CPU_FALLBACK = "falling back to the CPU: the bundle's Q/DQ graphs on ONNX Runtime"


def shipped_bundle(log=None):
    """The shipped tiny-shapes model as a validated fp32 ONNX bundle, made once into the cache
    ($EDGEMM_CACHE or ~/.cache/edgemm/bundles) and reused, so `edgemm run` answers without importing torch
    (most of a cold start). None where onnxruntime is not installed or EDGEMM_NO_BUNDLE_CACHE is set: then
    the torch reference runs, as it does with --backend torch."""
    import importlib.util
    import os
    from pathlib import Path
    if os.environ.get("EDGEMM_NO_BUNDLE_CACHE") or importlib.util.find_spec("onnxruntime") is None:
        return None
    from edgemm import __version__
    from edgemm.checkpoint import DEMO_DIR, checkpoint_digest
    if not (DEMO_DIR / "model.safetensors").exists():
        return None
    root = Path(os.environ.get("EDGEMM_CACHE", Path.home() / ".cache" / "edgemm")) / "bundles"
    out = root / f"tiny-shapes-{checkpoint_digest(DEMO_DIR)[:12]}-{__version__}"
    stale = False
    if (out / "edgemm.json").is_file():
        from edgemm.bundle import read_manifest
        try:
            read_manifest(out)                           # (the backend verifies the files' hashes when it opens)
        except EdgemmError:                              # an older format or a damaged manifest: make it again
            stale = True
    if stale or not (out / "edgemm.json").is_file():
        from edgemm.export.onnx import export_onnx
        if log:
            log(f"note: making a validated ONNX bundle of the shipped model once, at {out}; later runs use it "
                "without loading torch (--backend torch runs the reference)")
        try:
            root.mkdir(parents=True, exist_ok=True)
            export_onnx(model="tiny-shapes", out=out, precision="fp32", log=None, seed=0, force=stale)
        except EdgemmError:
            if not (out / "edgemm.json").is_file():      # another process may have made it meanwhile
                raise
        except OSError as e:                             # an unwritable cache: run the reference instead
            if log:
                log(f"note: cannot write the bundle cache ({e}); running the torch reference")
            return None
    return str(out)


def pick_backend(bundle: str | None, device: str) -> tuple[str, str]:
    """-> (backend name, reason). Model directories run on torch; bundles on the fastest backend they support."""
    if bundle is None:
        return "torch", "a model directory runs on the torch reference backend"
    from edgemm.bundle import read_manifest
    man = read_manifest(bundle)
    target = man.get("target", "onnx")
    candidates = {"onnx": ["ort"], "trt": ["trt", "ort"], "gguf": ["llamacpp"]}.get(target, [])
    for cand in candidates:
        if cand in BACKENDS:
            cls = backend_class(cand)
            ok, why = cls.available(man, device)
            if ok:
                return cand, why
    if target == "trt" and "trt" in BACKENDS:
        import importlib.util
        if importlib.util.find_spec("onnxruntime") is not None:
            return "trt", TRT_CPU_FALLBACK + " (no TensorRT engines usable on this machine)"
    raise EdgemmError(f"no installed backend can run this {target} bundle; "
                      f"install the matching extra (see README: pip install 'edgemm[cpu]' or 'edgemm[gguf]')")


from edgemm.errors import EdgemmError  # noqa: E402  (used above at call time)

__all__ = ["Backend", "State", "BACKENDS", "backend_class", "load_backend", "pick_backend"]
