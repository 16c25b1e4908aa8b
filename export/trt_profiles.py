"""TensorRT optimization profiles per device class and the engine build plan (pure: tested without a GPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError
from edgemm.export.onnx import group

MIN_TRT_MAJOR = 10
FP8_MIN_CC = (8, 9)
TRT_PRECISIONS = ("fp16", "int8", "fp8")
TRT_VIDEO_FRAMES = 16           # Qwen2-VL's video profile: frames a clip (8 temporal patches; 8 s at 2 a second)
TRT_VIDEO_PIXELS = 768 * 28 * 28    # ... and pixels a frame at most (Qwen2VLVideoProcessor's default budget)
# Build defaults per device class; --max-context / --max-batch override them.
DEVICE_CLASSES = {
    "orin": {"description": "Jetson Orin (AGX / NX / Nano; JetPack 6, TensorRT 10; shared CPU/GPU memory)",
             "max_context": 2048, "opt_context": 512, "max_batch": 1, "workspace_mib": 1024,
             "builder_optimization_level": 3},
    "workstation": {"description": "workstation / server with a discrete CUDA GPU",
                    "max_context": 8192, "opt_context": 1024, "max_batch": 8, "workspace_mib": 8192,
                    "builder_optimization_level": 3},
}


def make_profiles(cfg, device_class: str, max_context: int | None = None, max_batch: int | None = None) -> dict:
    """Optimization profiles {stage: {input: {min, opt, max}}} for a device class (pure)."""
    if device_class not in DEVICE_CLASSES:
        raise EdgemmError(f"unknown device class {device_class!r}; choose {', '.join(DEVICE_CLASSES)}")
    dc = DEVICE_CLASSES[device_class]
    c = cfg.decoder
    ctx = int(max_context or min(dc["max_context"], c.max_seq_len))
    if ctx > c.max_seq_len:
        raise EdgemmError(f"--max-context {ctx} exceeds the model's context length {c.max_seq_len}")
    if ctx < cfg.n_image_rows + 8:
        raise EdgemmError(f"--max-context {ctx} cannot hold an image ({cfg.n_image_rows} rows) and a prompt")
    batch = int(max_batch or dc["max_batch"])
    opt_ctx = max(1, min(dc["opt_context"], ctx))
    S, K, E, D, n_img = cfg.vision.image_size, c.cache_heads, c.head_dim, c.d_model, cfg.n_image_rows

    def cache(prof):
        return {f"cache_{kv}.{i}": prof for i in range(c.n_layers) for kv in ("key", "value")}

    def kv(lo, opt, hi):
        return {"min": [1, lo, K, E], "opt": [1, opt, K, E], "max": [1, hi, K, E]}

    def batched(*shape):
        return {"min": [1, *shape], "opt": [1, *shape], "max": [batch, *shape]}
    a, eoi = cfg.adapter, int(c.eoi_branch == "text")     # eoi through text: no ids and one row (input_rows)
    inp = {"pixels": batched(3, S, S)} if cfg.input_stage == "vision" else {"codes": batched(n_img, a.codebooks)}
    if cfg.vision.grid_pinpoints or cfg.vision.tiling:     # one image's tiles per call: any-resolution tiling's
        from edgemm import tilings                         # overview + grid, InternVL's grid + thumbnail,
        from edgemm.anyres import max_tile_batch           # SmolVLM's grid + whole image
        tiles = tilings.of(cfg.vision)
        n = (tiles.max_tile_batch if tiles is not None else max_tile_batch)(cfg.vision)
        inp["pixels"] = {"min": [1, 3, S, S], "opt": [max(1, (n + 1) // 2), 3, S, S], "max": [max(n, batch), 3, S, S]}
        if hasattr(tiles, "input_profiles"):            # Fuyu: one image of any height and width; LLaVA-UHD:
            inp.update(tiles.input_profiles(cfg))       # slices of any size + their RoIAlign weights
    if cfg.input_stage == "image_tokens" and a.signal_size:
        inp["signal"] = batched(n_img, a.signal_size)
    if cfg.reads_question:      # InstructBLIP, LLaMA-VID: the question's Q-Former ids (0 ids: none)
        T, fb = a.qformer_positions, batch
        if cfg.vision.video.get("question"):            # LLaMA-VID: a clip's frames, edgemm.video.QUESTION_BATCH a call
            from edgemm.video import QUESTION_BATCH
            fb = max(batch, QUESTION_BATCH)
            inp["pixels"] = {"min": [1, 3, S, S], "opt": [1, 3, S, S], "max": [fb, 3, S, S]}
        inp.update({n: {"min": [1, 0], "opt": [1, min(32, T)], "max": [fb, T]}
                    for n in ("qformer_input_ids", "qformer_attention_mask")})
    img_max = ctx - 8 if cfg.vision.video.get("question") else n_img        # (a clip's rows: one image segment)
    frames, video = 0, None
    if cfg.video_stage:             # the video stage takes a clip's frames at once, its rows one image segment:
        from edgemm.video import DEFAULT_FRAMES, frame_rows            # LLaVA-NeXT-Video's, at the tower's size;
        v = cfg.vision.video                                           # Qwen2-VL's, any size within the video
        T = int(v.get("temporal", 0))                                  # budget, TRT_VIDEO_FRAMES at most
        if T:
            import math
            from edgemm.qwen2vl_pixels import factor, profile_side
            f, budget = factor(cfg.vision), min(int(v["max_pixels"]), TRT_VIDEO_PIXELS)
            frames = max(T, min(TRT_VIDEO_FRAMES, int(v["max_frames"])) // T * T)
            side, opt = profile_side(budget, f), max(f, math.isqrt(budget) // 2 // f * f)
            video = {"min": [T, 3, f, f], "opt": [frames, 3, opt, opt], "max": [frames, 3, side, side]}
        else:
            frames = int(v.get("frames", DEFAULT_FRAMES))
            video = {"min": [1, 3, S, S], "opt": [frames, 3, S, S], "max": [frames, 3, S, S]}
        img_max = min(ctx - 8, max(n_img, frame_rows(cfg, np.broadcast_to(np.float32(0), video["max"]))[0]))
    rows = {"input_rows": {"min": [1, 0, D], "opt": [1, 0, D], "max": [1, 1, D]}} if eoi else {}
    out = {
        cfg.input_stage: inp,
        "decoder_text": {"input_ids": {"min": [1, 1 - eoi], "opt": [1, 1], "max": [1, ctx]}, **rows,
                         "positions": {"min": [1], "opt": [1], "max": [ctx]},
                         "past_len": {"min": [1], "opt": [1], "max": [1]},
                         **cache(kv(1, opt_ctx, ctx))},
        "decoder_image": {"image_rows": {"min": [1, 1, D], "opt": [1, n_img, D], "max": [1, img_max, D]},
                          "positions": {"min": [1], "opt": [n_img], "max": [img_max]},
                          **({"mrope_positions": {"min": [3, 1], "opt": [3, n_img], "max": [3, img_max]}}
                             if c.mrope_section else {}),
                          "past_len": {"min": [1], "opt": [1], "max": [1]},
                          **cache(kv(1, min(opt_ctx, ctx), ctx))},
        "_meta": {"device_class": device_class, "max_context": ctx, "max_batch": batch,
                  "workspace_mib": dc["workspace_mib"], "builder_optimization_level": dc["builder_optimization_level"]},
    }
    if frames:
        out["video"] = {"pixels": video}
    if c.cross_attn_every:      # gated cross-attention (edgemm.xattn): the cross_kv stage instead of decoder_image
        n, W, H = a.perceiver_latents, c.cross_attn_kv_dim or D, c.n_heads
        del out["decoder_image"]
        out["cross_kv"] = {"image_rows": {"min": [1, 1, W], "opt": [1, n, W], "max": [1, n, W]}}
        out["decoder_text"]["cross_gate"] = {"min": [1, 1, 1], "opt": [1, 1, 1], "max": [1, ctx, 1]}
        for j in range(c.n_layers // c.cross_attn_every):
            for kv in ("key", "value"):
                out["decoder_text"][f"cross_{kv}.{j}"] = {"min": [1, H, 1, E], "opt": [1, H, n, E],
                                                          "max": [1, H, n, E]}
    return out


def parse_cc(cc) -> tuple[int, int]:
    if isinstance(cc, (tuple, list)):
        return int(cc[0]), int(cc[1])
    a, _, b = str(cc).partition(".")
    return int(a), int(b or 0)


def check_precision_supported(precision: dict, compute_capability, gpu: str = "this GPU") -> None:
    """FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); refuse below with an int8 offer."""
    if "fp8" in precision.values() and parse_cc(compute_capability) < FP8_MIN_CC:
        cc = "%d.%d" % parse_cc(compute_capability)
        raise EdgemmError(f"FP8 engines need a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                          f"{gpu} has {cc}: export with --precision int8 instead (Jetson Orin is 8.7)")


def trt_flags(precision: str, strongly_typed: bool) -> list[str]:
    """BuilderFlag names for a weakly typed build; none for a strongly typed one (types come from the graph)."""
    if strongly_typed:
        return []
    return {"fp16": ["FP16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"]}[precision]


def build_plan(manifest: dict, here: dict, device_class: str | None = None) -> dict:
    """The settings the engine build passes to TensorRT, per stage (pure: tested without a GPU).

    here: {'tensorrt': version, 'gpu': name, 'compute_capability': 'X.Y'}.
    """
    trt_ver = str(here["tensorrt"])
    major = int(trt_ver.split(".")[0])
    if major < MIN_TRT_MAJOR:
        raise EdgemmError(f"TensorRT {trt_ver} is too old: trt bundles need TensorRT {MIN_TRT_MAJOR} or newer "
                          "(JetPack 6 on a Jetson; pip install 'edgemm[gpu]' on a workstation)")
    prec = manifest["precision"]
    check_precision_supported(prec, here["compute_capability"], here.get("gpu", "this GPU"))
    info = manifest["trt"]
    device_class = device_class or info.get("device_class", "workstation")
    if device_class not in info["profiles"]:
        raise EdgemmError(f"the bundle has no profiles for device class {device_class!r} "
                          f"(it has {', '.join(info['profiles'])}); re-export with --max-context/--max-batch")
    profiles = info["profiles"][device_class]
    meta = profiles["_meta"]
    # TensorRT 11 builds strongly typed networks only (BuilderFlag FP16/INT8 are gone): the types come from the
    # graph, so the Q/DQ layers run in int8/fp8 and everything else in the graph's fp32.
    strongly_typed = major >= 11
    stages = {}
    for s in (x for x in profiles if x != "_meta"):
        p = prec[group(s)]
        if strongly_typed and p == "fp16":
            raise EdgemmError(f"TensorRT {trt_ver} builds strongly typed networks only, and this bundle's {s} "
                              "graph is fp32 (fp16 was left to TensorRT 10's builder flag): use TensorRT 10, "
                              "or export with --precision int8")
        stages[s] = {"onnx": manifest["stages"][s]["file"], "engine": f"engines/{s}.engine", "precision": p,
                     "strongly_typed": strongly_typed, "flags": trt_flags(p, strongly_typed),
                     "profile": {k: v for k, v in profiles[s].items()},
                     "workspace_bytes": int(meta["workspace_mib"]) << 20,
                     "builder_optimization_level": int(meta["builder_optimization_level"])}
    return {"tensorrt": trt_ver, "gpu": here.get("gpu"), "compute_capability": str(here["compute_capability"]),
            "device_class": device_class, "max_context": meta["max_context"], "timing_cache": "engines/timing.cache",
            "stages": stages}


def default_device_class(here: dict | None) -> str:
    """orin on a Jetson (Tegra), else workstation."""
    if here and ("orin" in str(here.get("gpu", "")).lower() or Path("/etc/nv_tegra_release").exists()):
        return "orin"
    return "workstation"


def outside_profile(manifest: dict, stage: str, feeds: dict) -> str | None:
    """Why an engine's optimization profile (the bundle's device class's) cannot take these inputs, in one line, or
    None: TensorRT refuses a shape outside [min, max] at run time with an error of its own (pure: tested without
    a GPU)."""
    t = manifest.get("trt") or {}
    prof = (t.get("profiles") or {}).get(t.get("device_class"), {}).get(stage, {})
    for name, x in feeds.items():
        p = prof.get(name)
        shape = tuple(getattr(x, "shape", ()))
        if p is None or len(shape) != len(p["max"]):
            continue
        if any(not lo <= n <= hi for n, lo, hi in zip(shape, p["min"], p["max"])):
            what = f"{shape[0]} frames of {shape[3]}x{shape[2]} pixels" if stage == "video" else f"shape {list(shape)}"
            return (f"this trt bundle's {stage} engine takes {name} from {p['min']} to {p['max']}, not {what}: "
                    + ("use a shorter or smaller clip, or an onnx bundle" if stage == "video" else
                       "use a smaller input, or an onnx bundle"))
    return None
