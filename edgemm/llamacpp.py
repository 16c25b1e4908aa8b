"""Loading llama.cpp (llama-cpp-python) for this CPU: the CPU variant its kernel runs, GPU modules, quiet logs.

Used by the llamacpp backend, the GGUF exporter and `edgemm doctor`; `load_llama_cpp()` is the one entry point.
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from .errors import EdgemmError

_BACKEND_READY = False
_LOG_CB = None
GGML_CPU: dict = {}          # what _load_ggml_backends chose: {"variant", "path", "why", "features"}

# llama.cpp's x86 CPU variants (GGML_CPU_ALL_VARIANTS, ggml/src/CMakeLists.txt) -> the kernel flags each needs.
# ggml scores a variant by CPUID alone; the kernel may not enable what CPUID reports (AMX without the kernel's
# XTILEDATA permission, AVX-512 masked by a hypervisor), so a variant is only a candidate when /proc/cpuinfo
# lists all of its instruction sets.
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
X86_VARIANT_FLAGS = {
    "x64": (), "sse42": ("sse4_2",), "sandybridge": ("sse4_2", "avx"), "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"), "haswell": _HASWELL,
    "skylakex": _HASWELL + _AVX512, "cannonlake": _HASWELL + _AVX512 + ("avx512vbmi",),
    "cascadelake": _HASWELL + _AVX512 + ("avx512_vnni",),
    "icelake": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni"),
    "cooperlake": _HASWELL + _AVX512 + ("avx512_vnni", "avx512_bf16"),
    "zen4": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "alderlake": _HASWELL + ("avx_vnni",),
    "sapphirerapids": _HASWELL + _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
}
# what a monolithic (one CPU library) build reports in llama_print_system_info -> the kernel flags it needs
_SYSINFO_FLAGS = {"AVX": ("avx",), "AVX2": ("avx2",), "F16C": ("f16c",), "FMA": ("fma",), "BMI2": ("bmi2",),
                  "AVX_VNNI": ("avx_vnni",), "AVX512": ("avx512f",), "AVX512_VBMI": ("avx512vbmi",),
                  "AVX512_VNNI": ("avx512_vnni",), "AVX512_BF16": ("avx512_bf16",), "AMX_INT8": ("amx_int8",)}
# Variants whose AMX kernels are not used unless EDGEMM_GGML_AMX=1: this llama.cpp's AMX matmul (ggml-cpu/amx) runs
# `tilezero` with an invalid tile configuration (the compiler drops the stack copy _tile_loadconfig reads; open fix
# ggml-org/llama.cpp#26954) and dies with SIGILL on a Xeon whose kernel enables AMX (seen here: a q8_0 decode). Their
# AMX-free twin (zen4: the same AVX-512 + VNNI + BF16 sets) is picked instead.
AMX_VARIANTS = ("sapphirerapids",)
AMX_SKIPPED = "its AMX kernels die with SIGILL in this llama.cpp (EDGEMM_GGML_AMX=1 allows it)"
REBUILD_HINT = ("rebuild llama-cpp-python with the README's set-up command, adding --no-cache-dir --force-reinstall "
                "--no-deps llama-cpp-python (pip reuses a cached wheel otherwise)")


def _lib_dir(llama_cpp) -> Path:
    return Path(llama_cpp.__file__).resolve().parent / "lib"


def _sysinfo(ll) -> str:
    try:
        return ll.llama_print_system_info().decode("utf-8", "replace")
    except Exception:
        return ""


def _compiled_features(info: str) -> list[str]:
    """'CPU : SSE3 = 1 | AVX = 1 | AVX512 = 0 | ...' -> the features compiled in (= 1)."""
    out = []
    for part in info.replace("\n", "|").split("|"):
        if "=" in part:
            k, v = (x.strip() for x in part.rsplit("=", 1))
            k = k.split(":")[-1].strip()
            if v == "1" and k:
                out.append(k)
    return out


def _libggml(ll):
    """The libggml instance libllama uses (its registry is the one model loads consult). The wheel holds copies,
    not links, of libggml.so and libggml.so.0, so opening another path would load a second, separate registry:
    ask the dynamic loader for the already-loaded object by its soname instead."""
    import llama_cpp.llama_cpp  # noqa: F401  (loads libllama and, through it, libggml)
    lib = _lib_dir(ll)
    if os.name == "posix" and hasattr(os, "RTLD_NOLOAD"):
        for soname in sorted({p.name for p in lib.glob("libggml.so.*") if p.name.count(".") == 2}) or ["libggml.so.0"]:
            try:
                return ctypes.CDLL(soname, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
            except OSError:
                continue
    from llama_cpp._ggml import libggml
    return libggml


def _dlclose(h) -> None:
    try:
        import _ctypes
        _ctypes.dlclose(h._handle)
    except (ImportError, AttributeError, OSError):
        pass


def variant_candidates(names, flags, x86: bool = True, allow_amx: bool | None = None) -> tuple[list, dict]:
    """llama.cpp CPU variant names -> (those this machine may load, {skipped name: why}).

    On x86 a variant is a candidate when /proc/cpuinfo (`flags`; None: unknown, all pass) lists its instruction
    sets, and an AMX variant only with `allow_amx` (default: EDGEMM_GGML_AMX=1; see AMX_VARIANTS)."""
    if allow_amx is None:
        allow_amx = os.environ.get("EDGEMM_GGML_AMX", "") == "1"
    ok, skipped = [], {}
    for name in names:
        need = X86_VARIANT_FLAGS.get(name) if x86 else None
        if x86 and flags is not None and (need is None or any(f not in flags for f in need)):
            skipped[name] = "instruction sets the kernel does not enable" if need else "unknown variant"
        elif x86 and name in AMX_VARIANTS and not allow_amx:
            skipped[name] = AMX_SKIPPED
        else:
            ok.append(name)
    return ok, skipped


def _load_ggml_backends(ll) -> dict:
    """Register llama.cpp's compute backends once, before the first model load.

    A build made with GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS (the README's) ships one CPU library per instruction
    set level (libggml-cpu-haswell.so, -zen4, ...) and registers none by itself; llama-cpp-python does not call
    ggml_backend_load_all. We pick the best variant this CPU *and its kernel* run (ggml's own score among those
    whose instruction sets /proc/cpuinfo lists), load it, then load any GPU backend modules. A monolithic build
    (one libggml-cpu) is checked instead: if it was compiled for instruction sets this kernel does not enable it
    would die with SIGILL, so it is refused with the command that rebuilds it."""
    from .cpu import cpu_flags, is_x86
    libggml = _libggml(ll)
    libggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    libggml.ggml_backend_load.restype = ctypes.c_void_p
    libggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    flags = cpu_flags()
    lib = _lib_dir(ll)
    ext = {"nt": ".dll"}.get(os.name, ".dylib" if os.uname().sysname == "Darwin" else ".so")
    if libggml.ggml_backend_reg_count() > 0:             # backends linked in: a monolithic build
        info = _sysinfo(ll)
        feats = _compiled_features(info)
        if flags is not None and is_x86():
            missing = sorted({f for k in feats for f in _SYSINFO_FLAGS.get(k, ()) if f not in flags})
            if missing:
                raise EdgemmError(f"this llama.cpp build was compiled for {' '.join(missing)}, which this CPU or its "
                                  f"kernel does not enable (it would die with SIGILL); {REBUILD_HINT}")
        return {"variant": "built-in (one CPU library, no runtime dispatch)", "path": None, "features": feats,
                "why": "monolithic build; its instruction sets are all enabled here"}
    prefix = ("" if os.name == "nt" else "lib") + "ggml-cpu-"
    variants = {p.name[len(prefix):-len(ext)]: p for p in sorted(lib.glob(prefix + "*" + ext)) if p.is_file()}
    chosen, why = None, ""
    if variants:
        best = (0, None)
        usable, skipped = variant_candidates(variants, flags, x86=is_x86())
        for name in usable:
            path = variants[name]
            try:
                h = ctypes.CDLL(str(path))
                h.ggml_backend_score.restype = ctypes.c_int
                score = int(h.ggml_backend_score())
                _dlclose(h)
            except (OSError, AttributeError):
                continue
            if score > best[0]:
                best = (score, name)
        if best[1] is None:
            raise EdgemmError(f"none of llama.cpp's CPU variants ({', '.join(variants)}) runs on this CPU; "
                              f"{REBUILD_HINT}")
        chosen = best[1]
        why = (f"best of {len(variants)} CPU variants by ggml's score among those whose instruction sets the "
               f"kernel enables" + "".join(f"; {n} not used: {w}" for n, w in skipped.items() if w == AMX_SKIPPED))
        if not libggml.ggml_backend_load(str(variants[chosen]).encode()):
            raise EdgemmError(f"llama.cpp could not load its CPU library {variants[chosen]}; {REBUILD_HINT}")
    elif (lib / f"{prefix[:-1]}{ext}").exists():                # GGML_BACKEND_DL with one CPU library
        libggml.ggml_backend_load(str(lib / f"{prefix[:-1]}{ext}").encode())
        chosen, why = "cpu", "the one CPU library of this build"
    for p in sorted(lib.glob(("" if os.name == "nt" else "lib") + "ggml-*" + ext)):   # GPU modules
        name = p.name.split("ggml-", 1)[1][:-len(ext)]
        if name not in ("base", "cpu") and not name.startswith("cpu-") and p.is_file():
            libggml.ggml_backend_load(str(p).encode())
    if libggml.ggml_backend_reg_count() == 0:
        raise EdgemmError(f"llama.cpp registered no compute backend from {lib}; {REBUILD_HINT}")
    return {"variant": chosen, "path": str(variants.get(chosen, "")) or None, "why": why,
            "features": _compiled_features(_sysinfo(ll))}


def load_llama_cpp(verbose: bool = False):
    """-> the llama_cpp module with its backends registered (see _load_ggml_backends) and llama.cpp's log kept
    off the terminal unless `verbose` (errors always show); idempotent."""
    global _BACKEND_READY, _LOG_CB
    llama_cpp = import_llama_cpp()
    if _LOG_CB is None:
        @llama_cpp.llama_log_callback
        def _cb(level, text, user_data):
            if verbose or level in (3, 4):         # GGML_LOG_LEVEL_WARN, _ERROR
                import sys
                print(text.decode("utf-8", "replace"), end="", file=sys.stderr)
        _LOG_CB = _cb
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
        try:
            from llama_cpp import mtmd_cpp
            mtmd_cpp.mtmd_log_set(_LOG_CB, ctypes.c_void_p(0))
            mtmd_cpp.mtmd_helper_log_set(_LOG_CB, ctypes.c_void_p(0))
        except Exception:   # older bindings without mtmd logging hooks
            pass
    if not _BACKEND_READY:
        GGML_CPU.update(_load_ggml_backends(llama_cpp))
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    return llama_cpp


# --kv-cache: llama.cpp's KV types -> (GGML_TYPE_* of llama_cpp.py, bytes per stored value: q8_0 blocks hold 32
# values in 34 bytes (an f16 scale + 32 int8), q4_0 in 18 (an f16 scale + 32 nibbles))
KV_TYPES = {"f32": (0, 4.0), "f16": (1, 2.0), "q8_0": (8, 34 / 32), "q4_0": (2, 18 / 32)}
KV_CHOICES = ("f16", "q8_0", "q4_0", "f32", "int8")     # (the CLI's; int8 and f32 for the ort backend too)
KV_BLOCK = 32                 # values per q8_0 / q4_0 block: a row (one head's K or V) must be a multiple
# llama_context's check (src/llama-context.cpp): a quantized V cache is refused without flash attention
QUANTIZED_V_NEEDS_FA = "llama.cpp's quantized V cache needs flash attention"
NO_GPU = ("this llama.cpp build has no GPU backend (llama_supports_gpu_offload() is false; `edgemm doctor` lists "
          "the backends): rebuild llama-cpp-python with CUDA as the README's Jetson / CUDA section shows "
          "(CMAKE_ARGS adds -DGGML_CUDA=ON), or run with --device cpu")

# ggml's enum ggml_backend_dev_type (ggml-backend.h): CPU, GPU, IGPU (integrated, host memory), ACCEL (BLAS, AMX)
_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def gpu_offload(ll) -> bool:
    """Whether the loaded llama.cpp can put layers on a GPU (a GPU / iGPU device, or RPC, is registered)."""
    return bool(ll.llama_supports_gpu_offload())


def ggml_devices(ll) -> list[dict]:
    """The devices in ggml's backend registry (after load_llama_cpp registered the modules): [{"backend",
    "name", "description", "type"}], type one of cpu / gpu / igpu / accel."""
    g = _libggml(ll)
    vp = ctypes.c_void_p
    for fn, res, args in (("ggml_backend_dev_count", ctypes.c_size_t, []),
                          ("ggml_backend_dev_get", vp, [ctypes.c_size_t]),
                          ("ggml_backend_dev_type", ctypes.c_int, [vp]),
                          ("ggml_backend_dev_name", ctypes.c_char_p, [vp]),
                          ("ggml_backend_dev_description", ctypes.c_char_p, [vp]),
                          ("ggml_backend_dev_backend_reg", vp, [vp]), ("ggml_backend_reg_name", ctypes.c_char_p, [vp])):
        getattr(g, fn).restype, getattr(g, fn).argtypes = res, args
    out = []
    for i in range(g.ggml_backend_dev_count()):
        d = g.ggml_backend_dev_get(i)
        out.append({"backend": (g.ggml_backend_reg_name(g.ggml_backend_dev_backend_reg(d)) or b"").decode(),
                    "name": (g.ggml_backend_dev_name(d) or b"").decode(),
                    "description": (g.ggml_backend_dev_description(d) or b"").decode(),
                    "type": _DEV_TYPES.get(g.ggml_backend_dev_type(d), "unknown")})
    return out


def import_llama_cpp():
    """-> the llama_cpp module, or an EdgemmError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise EdgemmError(f"llama-cpp-python is not installed ({e}); install it with "
                          "pip install 'edgemm[gguf]' (it builds llama.cpp from source)") from None
    return llama_cpp
