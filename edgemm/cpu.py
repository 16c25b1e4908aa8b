"""What this CPU can run, as the kernel reports it (Linux `/proc/cpuinfo` flags, the instruction sets the kernel
has enabled: an AMX or AVX-512 unit the kernel does not enable is absent there, whatever CPUID says).

Used by the llama.cpp loader (pick a CPU variant this machine runs), the ort backend (int8 kernels that are exact
here) and `edgemm doctor`. Also how many CPUs this process may use (affinity, cgroup CPU quota): the default
`--threads` of every command and backend (default_threads).
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


# ----------------------------------------------------------------------------------- the CPUs this process may use
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _cgroup_dirs(root: Path, rel: str) -> list:
    """The cgroup directory of this process under `root` and every parent up to `root` itself (a limit on any of
    them binds; in a container `root` is usually the container's own cgroup)."""
    rel = rel.strip("/")
    parts = [p for p in rel.split("/") if p and p != ".."] if rel and ".." not in rel.split("/") else []
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs the cgroup CPU quota allows this process (2.0 for `cpu.max` "200000 100000"), or None without one.

    cgroup v2: `cpu.max` ("max 100000" is no limit); v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none) in
    the cpu controller's directory. The smallest quota on the way from this process's cgroup up to the root."""
    own = {}                                        # controller -> this process's cgroup path
    for line in (_read(proc_cgroup) or "").splitlines():
        _, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        for c in (ctrls.split(",") if ctrls else [""]):
            own[c] = path
    quotas = []
    for d in _cgroup_dirs(root, own.get("", "")):                                   # v2
        fields = (_read(d / "cpu.max") or "").split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                quota, period = float(fields[0]), float(fields[1])
            except ValueError:
                continue
            if quota > 0 and period > 0:
                quotas.append(quota / period)
    for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):                                # v1
        base = root / name
        for d in _cgroup_dirs(base, own.get("cpu", "")) if base.is_dir() else ():
            try:
                quota, period = int(_read(d / "cpu.cfs_quota_us") or ""), int(_read(d / "cpu.cfs_period_us") or "")
            except ValueError:
                continue
            if quota > 0 and period > 0:
                quotas.append(quota / period)
    return min(quotas) if quotas else None


def _affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):                # not Linux
        return None


def default_threads(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP, affinity=_affinity,
                    cpu_count=os.cpu_count) -> tuple[int, str]:
    """-> (n, source): the default `--threads`, the CPUs this process may use: the fewest of its CPU affinity
    (`taskset`, cpusets), the cgroup CPU quota (a container's `--cpus`, rounded up) and the machine's cores, at
    least 1. source: "affinity", "cgroup quota" or "cpu_count" (all cores), whichever set it."""
    import math
    cores = cpu_count() or 1
    n, source = cores, "cpu_count"
    aff = affinity()
    if aff and aff < n:
        n, source = aff, "affinity"
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None and math.ceil(quota) < n:
        n, source = math.ceil(quota), "cgroup quota"
    return max(1, n), source


def threads_or_default(threads: int | None) -> int:
    """`threads` when given, else default_threads()."""
    return int(threads) if threads else default_threads()[0]
