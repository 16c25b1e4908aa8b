"""TensorRT engines on the device: build them from a trt bundle's Q/DQ graphs (`edgemm build-engines`),
validate them against those graphs, and commit them to the manifest.

A rebuild is atomic: the new engines are written under new names, validated, and only then does the manifest
(rewritten atomically) point to them; the old engine files are removed after that. A build that fails or is
interrupted leaves the bundle with its previous engines, manifest and files as they were."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError
from edgemm.export.trt_profiles import build_plan, default_device_class
from edgemm.export.validate import format_validation, run_prompt, summarize

# engine vs its Q/DQ graph (build-engines): edgemm.export.thresholds, target "trt-engine"


NO_GPU_MESSAGE = ("building TensorRT engines needs TensorRT and a CUDA GPU, and this machine has {what}: "
                  "copy the bundle to the target device (Jetson or GPU workstation) and run "
                  "`edgemm build-engines {bundle}` there")


def _missing_what() -> str:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "no tensorrt Python package"
    return "no usable CUDA GPU"


def _progress_monitor(trt, log):
    """A trt.IProgressMonitor that logs the top-level phases of the build."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.t0 = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.t0[phase_name] = time.time()
            if parent_phase is None:
                log(f"    [{phase_name}] {num_steps} steps")

        def step_complete(self, phase_name, step):
            return True                     # False would cancel the build

        def phase_finish(self, phase_name):
            dt = time.time() - self.t0.pop(phase_name, time.time())
            if dt > 2:
                log(f"    [{phase_name}] done in {dt:.1f}s")
    return Monitor()


def build_engine(onnx_path, stage_plan: dict, timing_cache: bytes | None, log=print):
    """Parse one Q/DQ graph and build its engine with the settings of build_plan; -> (engine, timing cache)."""
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if stage_plan["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgemmError(f"TensorRT could not parse {Path(onnx_path).name}: {errs[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, stage_plan["workspace_bytes"])
    config.builder_optimization_level = stage_plan["builder_optimization_level"]
    for f in stage_plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, f))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):                 # shapes for the inputs with dynamic dimensions
        t = network.get_input(i)
        if all(d >= 0 for d in t.shape):
            continue
        if t.name not in stage_plan["profile"]:
            raise EdgemmError(f"the build plan has no profile for input {t.name} of {Path(onnx_path).name}; "
                              "re-export the bundle")
        s = stage_plan["profile"][t.name]
        profile.set_shape(t.name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, log)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgemmError(f"TensorRT failed to build the engine for {Path(onnx_path).name} (see its log above)")
    return bytes(serialized), bytes(memoryview(config.get_timing_cache().serialize()))


def validate_engines(bundle, engines: dict | None = None, decode_steps: int = 8, seed: int = 0, threads=None) -> dict:
    """Engines (trt backend; `engines` = a record not yet in the manifest) against their Q/DQ graphs
    (onnxruntime CPU) on the same random prompt."""
    import torch
    from edgemm.export.thresholds import judge
    from edgemm.export.validate import validation_inputs
    from edgemm.runtimes.trt_backend import OnnxQdqBackend, TrtBackend
    ref = OnnxQdqBackend.open(bundle=str(bundle), verify=False, threads=threads)
    eng = TrtBackend.open(bundle=str(bundle), device="cuda", verify=False, engines=engines)
    cfg = ref.cfg
    ins, hw = validation_inputs(cfg, torch.Generator().manual_seed(seed))      # (hw: any-resolution tiling)
    ids = np.random.default_rng(seed).integers(0, cfg.decoder.vocab_size, 6).tolist()
    res = run_prompt(ref, eng, cfg, ins, [("text", ids), ("image", None), ("text", ids)], decode_steps,
                     image_hw=hw)
    return summarize(res, lambda s: ref.manifest["stages"][s].get("precision"),
                     lambda *a: judge("trt-engine", *a))


def build_engines(bundle, device_class: str | None = None, force: bool = False, log=print, threads=None) -> dict:
    """Build the engines of a trt bundle on this machine, validate them against the Q/DQ graphs, and add them
    (files, sha256, TensorRT version, GPU, compute capability, build settings) to the manifest (see the module
    docstring: nothing of the previous engines changes until the new ones have validated)."""
    from edgemm.bundle import bundle_path, verify_bundle, write_manifest
    from edgemm.runtimes.trt_backend import engine_mismatch, gpu_identity
    log = log or (lambda s: None)
    here = gpu_identity()
    if here is None:
        raise EdgemmError(NO_GPU_MESSAGE.format(what=_missing_what(), bundle=bundle))
    man = verify_bundle(bundle)
    if man.get("target") != "trt":
        raise EdgemmError(f"{bundle} is a {man.get('target')!r} bundle; build-engines needs a trt bundle "
                          "(edgemm export --target trt)")
    old = man["trt"].get("engines") or {}
    if old.get("files") and engine_mismatch(old, here) is None and not force:
        raise EdgemmError(f"{bundle} already holds engines for this GPU and TensorRT version; pass --force to "
                          "rebuild them")
    plan = build_plan(man, here, device_class or default_device_class(here))
    log(f"building TensorRT {here['tensorrt']} engines for {here['gpu']} (sm {here['compute_capability']}, "
        f"{plan['device_class']} profiles, context {plan['max_context']}) ...")
    d = Path(bundle)
    eng_dir = d / "engines"
    eng_dir.mkdir(exist_ok=True)
    build_id = uuid.uuid4().hex[:8]
    cache_path = eng_dir / "timing.cache"
    cache = cache_path.read_bytes() if cache_path.is_file() else None
    files, timings, sizes, written = {}, {}, {}, []
    committed = False
    try:
        for s, sp in plan["stages"].items():
            t0 = time.time()
            log(f"  {s} ({sp['precision']}, {'strongly typed' if sp['strongly_typed'] else 'flags ' + '+'.join(sp['flags'])})")
            data, cache = build_engine(bundle_path(bundle, sp["onnx"]), sp, cache, log)
            rel = f"engines/{s}.{build_id}.engine"
            (d / rel).write_bytes(data)
            written.append(d / rel)
            files[s], timings[s], sizes[s] = rel, round(time.time() - t0, 2), len(data)
            log(f"  {s}: {len(data) / 1e6:.1f} MB in {timings[s]:.1f}s")
        new = {"tensorrt": here["tensorrt"], "gpu": here["gpu"], "compute_capability": here["compute_capability"],
               "files": files, "build_seconds": timings, "bytes": sizes, "plan": plan}
        log("validating the engines against the Q/DQ graphs (onnxruntime) ...")
        figures = validate_engines(bundle, engines=new, threads=threads)
        log(format_validation(figures, "engine vs graph"))
        bad = [s for s, f in figures.items() if not f["ok"]]
        if bad:
            raise EdgemmError(f"the {', '.join(bad)} engine(s) disagree with their Q/DQ graphs (see above); the "
                              "new engines were discarded" + ("; the previous engines stay" if old.get("files") else ""))
        new["validation"] = figures
        tmp_cache = cache_path.with_name(f".timing.{build_id}.cache")
        tmp_cache.write_bytes(cache)
        os.replace(tmp_cache, cache_path)
        man["trt"]["engines"] = new
        man["trt"]["device_class"] = plan["device_class"]
        man["trt"]["max_context"] = plan["max_context"]
        man.pop("files", None)
        stale = [rel for rel in (old.get("files") or {}).values() if rel not in files.values()]
        result = write_manifest(bundle, man, exclude=stale)   # atomic, hashes the new engines: the commit point
        committed = True
    finally:
        if not committed:
            for p in written:
                p.unlink(missing_ok=True)
    for rel in stale:                                   # the previous build, no longer named by the manifest
        (d / rel).unlink(missing_ok=True)
    return result
