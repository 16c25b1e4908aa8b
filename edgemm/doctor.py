"""`edgemm doctor`: what this machine can run, and why.

The llama.cpp facts come from a child process: a llama.cpp build made for instruction sets this CPU lacks dies
with SIGILL, and that must be a line in the report, not the end of the process asking.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys

from . import cpu

# extra -> the distributions it installs (pyproject.toml)
EXTRAS = {"cpu": ("onnxruntime",), "gpu": ("onnxruntime-gpu", "tensorrt"), "gguf": ("llama_cpp_python",),
          "bench": ("matplotlib", "psutil"), "test": ("pytest", "transformers")}

_PROBE = """
import json, sys
import numpy as np
from edgemm.llamacpp import GGML_CPU, ggml_devices, gpu_offload, load_llama_cpp
from edgemm.runtimes.llamacpp_runner import LlamaRunner
ll = load_llama_cpp()
out = dict(GGML_CPU, system_info=ll.llama_print_system_info().decode("utf-8", "replace"),
           devices=ggml_devices(ll), gpu_offload=gpu_offload(ll))
if len(sys.argv) > 1:                       # a GGUF decoder: decode a few tokens with the variant that loaded
    r = LlamaRunner(sys.argv[1], n_ctx=32, threads=1, n_batch=8)
    logits = r.decode_tokens([1, 2, 3], 0)
    out["decoded"] = {"tokens": 3, "finite": bool(np.isfinite(logits).all()), "argmax": int(logits.argmax())}
print(json.dumps(out))
"""


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def probe_llama_cpp(gguf: str | None = None, wrapper: list[str] | None = None, env: dict | None = None,
                    timeout: float = 120.0) -> dict:
    """Load llama.cpp's backends (and decode 3 tokens of `gguf`) in a child process, optionally under `wrapper`
    (e.g. ["qemu-x86_64", "-cpu", "Haswell"]) -> {"ok", "variant", "why", "features", ...} or {"ok": False,
    "error"}: a crash (SIGILL) is reported, not suffered."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"ok": False, "error": "llama-cpp-python is not installed (pip install 'edgemm[gguf]')"}
    cmd = list(wrapper or []) + [sys.executable, "-c", _PROBE] + ([str(gguf)] if gguf else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"loading llama.cpp took more than {timeout:.0f} s"}
    if r.returncode < 0 or r.returncode in (132, 128 + signal.SIGILL):
        sig = -r.returncode if r.returncode < 0 else r.returncode - 128
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        return {"ok": False, "signal": name,
                "error": f"llama.cpp died with {name}: the build uses instructions this CPU or its kernel does not "
                         f"allow (CPU flags: {cpu.x86_summary()})"}
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        return {"ok": False, "error": last.removeprefix("edgemm.errors.EdgemmError: ")}
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": f"unexpected probe output: {r.stdout[-200:]!r}"}
    return dict(out, ok=True)


def _onnxruntime() -> dict:
    if importlib.util.find_spec("onnxruntime") is None:
        return {"installed": False}
    import onnxruntime as ort
    return {"installed": True, "version": ort.__version__, "providers": ort.get_available_providers(),
            "int8_s8s8_exact": cpu.s8s8_int8_exact()}


def _gpu() -> dict:
    out: dict = {"cuda": False}
    try:
        import torch
        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out.update(cuda=True, name=torch.cuda.get_device_name(0),
                       compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    except ImportError:     # no torch: "none", with torch "not installed"
        pass
    except Exception as e:  # a broken CUDA install is a fact to report, not a crash
        out["error"] = str(e).splitlines()[0][:160]
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt
            out["tensorrt"] = tensorrt.__version__
        except Exception as e:
            out["tensorrt_error"] = str(e).splitlines()[0][:160]
    return out


def facts(bundle: str | None = None, device: str = "auto", llama: bool = True) -> dict:
    """Everything `doctor` prints, as a dict (bench JSON records it)."""
    flags = cpu.cpu_flags()
    threads, threads_from = cpu.default_threads()
    f = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
         "cpu": {"model": cpu.cpu_model(), "cores": os.cpu_count(), "flags": cpu.x86_summary(flags),
                 "vnni": cpu.has_vnni(flags) if cpu.is_x86() else None,
                 "default_threads": threads, "threads_from": threads_from},
         "onnxruntime": _onnxruntime(), "gpu": _gpu(),
         "extras": {e: all(_version(d) for d in ds) for e, ds in EXTRAS.items()},
         "versions": {d: v for d in ("edgemm", "torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "gguf",
                                     "llama_cpp_python", "tensorrt", "transformers") if (v := _version(d))}}
    if llama:
        f["llama_cpp"] = probe_llama_cpp()
    if bundle is not None:
        from .errors import EdgemmError
        from .runtimes import pick_backend
        try:
            name, why = pick_backend(bundle, device)
            f["bundle"] = {"path": str(bundle), "backend": name, "why": why}
        except EdgemmError as e:
            f["bundle"] = {"path": str(bundle), "backend": None, "why": str(e)}
    return f


THREADS_FROM = {"affinity": "the CPUs this process may run on", "cgroup quota": "the cgroup CPU quota, rounded up",
                "cpu_count": "all cores: no affinity or cgroup limit"}


GPU_PREFIX = "              GPU backends: "


def llama_gpu_line(ll: dict) -> str:
    """The GPU backends llama.cpp registered (its GPU / integrated-GPU devices), or that it has none."""
    gpus = [d for d in ll.get("devices", []) if d["type"] in ("gpu", "igpu")]
    if gpus:
        return (GPU_PREFIX + ", ".join(f"{d['backend']} {d['name']} ({d['description']})" for d in gpus)
                + "; the llamacpp backend offloads to it (--device auto / cuda)")
    return (GPU_PREFIX + "none (this llama.cpp build has no GPU backend: the llamacpp backend runs on the CPU; "
            "the README's CUDA build adds one)")


def report(f: dict) -> str:
    c, o, g, ll = f["cpu"], f["onnxruntime"], f["gpu"], f.get("llama_cpp")
    lines = [f"machine:      {f['platform']} ({f['machine']}), Python {f['python']}",
             f"cpu:          {c['model']}, {c['cores']} cores",
             f"threads:      {c['default_threads']} by default ({THREADS_FROM[c['threads_from']]}; "
             "--threads overrides)",
             f"instructions: {c['flags']}  (as the kernel enables them)"]
    if ll is not None:
        if ll.get("ok"):
            lines.append(f"llama.cpp:    CPU variant {ll.get('variant')} ({ll.get('why')})")
            if ll.get("features"):
                lines.append(f"              compiled features: {' '.join(ll['features'])}")
            lines.append(llama_gpu_line(ll))
        else:
            lines.append(f"llama.cpp:    not usable: {ll.get('error')}")
    if o.get("installed"):
        note = ("int8 kernels exact for every bundle" if o["int8_s8s8_exact"] else
                "no VNNI: int8 Q/DQ bundles are run as u8u8 (the same numbers, exact)")
        lines.append(f"onnxruntime:  {o['version']}, providers {', '.join(o['providers'])}; {note}")
    else:
        lines.append("onnxruntime:  not installed (pip install 'edgemm[cpu]', or 'edgemm[gpu]' with CUDA)")
    if g.get("cuda"):
        lines.append(f"gpu:          {g['name']} (compute capability {g['compute_capability']}), torch CUDA "
                     f"{g.get('torch_cuda')}" + ("; fp8 engines possible" if float(g["compute_capability"]) >= 8.9
                                                 else "; fp8 needs compute capability 8.9+: use int8"))
    elif g.get("error"):                      # CUDA there but broken: said, not shown as "no GPU"
        lines.append(f"gpu:          CUDA present but unusable ({g['error']}): running on the CPU")
    else:
        lines.append(f"gpu:          none (torch {g.get('torch', 'not installed')}"
                     + (f", built for CUDA {g['torch_cuda']}" if g.get("torch_cuda") else ", CPU build") + ")")
    lines.append("tensorrt:     " + (g["tensorrt"] if g.get("tensorrt") else
                                     g.get("tensorrt_error", "not installed (trt bundles run their Q/DQ graphs on "
                                                             "onnxruntime's CPU provider; engines need TensorRT)")))
    lines.append("extras:       " + ", ".join(f"{e} {'yes' if ok else 'no'}" for e, ok in f["extras"].items()))
    if "bundle" in f:
        b = f["bundle"]
        lines.append(f"bundle:       {b['path']}: auto picks {b['backend'] or 'nothing'} ({b['why']})")
    return "\n".join(lines)
