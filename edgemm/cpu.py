"""What this CPU can run, as the kernel reports it (Linux `/proc/cpuinfo` flags, the instruction sets the kernel
has enabled: an AMX or AVX-512 unit the kernel does not enable is absent there, whatever CPUID says).

Used by the llama.cpp loader (pick a CPU variant this machine runs), the ort backend (int8 kernels that are exact
here) and `edgemm doctor`.
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# the x86 instruction sets that matter to llama.cpp's CPU variants and ONNX Runtime's int8 kernels, as named in
# /proc/cpuinfo (`pni` is SSE3)
X86_FLAGS = ("sse4_2", "avx", "f16c", "fma", "bmi2", "avx2", "avx_vnni", "avx512f", "avx512cd", "avx512dq",
             "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_flags(text: str) -> frozenset:
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):          # x86 | aarch64
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset | None:
    """The kernel's flags for CPU 0, or None where the OS does not say (not Linux).

    EDGEMM_CPU_FLAGS (a space-separated list) overrides it, to rehearse another CPU's choices."""
    env = os.environ.get("EDGEMM_CPU_FLAGS")
    if env is not None:
        return frozenset(env.split())
    try:
        return _read_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def has_vnni(flags=None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return bool(flags) and ("avx512_vnni" in flags or "avx_vnni" in flags)


def s8s8_int8_exact(flags=None) -> bool:
    """Whether ONNX Runtime's fused int8 MatMul kernels compute s8 x s8 Q/DQ graphs exactly on this CPU.

    On x86 they run as u8 x s8 (activations shifted by 128); without VNNI they add pairs of products in 16-bit
    lanes with saturation (vpmaddubsw), so an activation near +127 times a weight near +-127 overflows. VNNI's
    vpdpbusd sums into 32 bits; ARM's dot-product kernels widen first. u8 x u8 graphs are exact everywhere."""
    if not is_x86():
        return True
    return has_vnni(flags)


def x86_summary(flags=None) -> str:
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "unknown (no /proc/cpuinfo)"
    if not is_x86():
        return " ".join(sorted(flags)) or "none reported"
    have = [f for f in X86_FLAGS if f in flags]
    return " ".join(have) if have else "none of " + " ".join(X86_FLAGS[:6])
