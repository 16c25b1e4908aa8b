"""TensorRT export: explicit-quantization (Q/DQ) ONNX per stage, optimization profiles, engines on the device.

`edgemm export --target trt --precision int8|fp8|fp16` writes a portable bundle:

- `vision.onnx`: the vision stage traced from the reference (standard ops), opset 19.
- `decoder_text.onnx`, `decoder_image.onnx`: the decoder branches in *standard* ONNX ops, graph flavour
  `onnx-standard-kv-window` of edgemm.export.graph (the ONNX Runtime bundles use com.microsoft
  GroupQueryAttention, which TensorRT cannot parse): a fixed KV-cache window per layer written with
  ScatterElements, masked-softmax attention, the new rows returned for the runtime to store.
- int8 / fp8: Q/DQ inserted by edgemm.calib.quantize.quantize_stage (the s8s8 storage TensorRT consumes):
  per-output-channel symmetric weights, per-tensor symmetric activations at every weight MatMul / Gemm input
  (lm_head included), scales from the calibration set, collected per modality branch (the text branch and the
  vision branch each get their own). No implicit INT8 calibrator is involved.
- fp16: the fp32 graphs; TensorRT applies fp16 at build time.

Profiles and build plans: edgemm.export.trt_profiles; engines: edgemm.export.trt_engines.
The manifest holds the optimization profiles for a Jetson Orin and for a workstation (batch, sequence and cache
lengths, min/opt/max), the build settings, and, once engines exist, the TensorRT version, GPU and compute
capability they were built for. Every export validates its graphs in ONNX Runtime's CPU provider against the
PyTorch reference before the bundle is renamed into place. Engines are built at export time when TensorRT and a
CUDA GPU are present (and --no-build is not given); otherwise `edgemm build-engines BUNDLE` builds them on the
target device.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError
from edgemm.export.decoder_graph import decoder_graph
from edgemm.export.graph import GRAPH_KV, GRAPH_STANDARD, OPSET, io_spec, vision_graph
from edgemm.export.onnx import group
from edgemm.export.trt_engines import build_engines
from edgemm.export.trt_profiles import (DEVICE_CLASSES, FP8_MIN_CC, TRT_PRECISIONS as PRECISIONS,
                                        check_precision_supported, default_device_class, make_profiles, trt_flags)
from edgemm.export.validate import (TorchReference, calibration_items, check_items, check_video, format_validation,
                                    random_ids, random_record, real_prompt, run_prompt, summarize, validation_inputs)

STAGES = ("vision", "decoder_text", "decoder_image")      # Libra: image_tokens instead of vision (cfg.stages)
# Validation tolerances on the CPU (ONNX Runtime) against the fp32 reference: edgemm.export.thresholds (target
# "trt"). fp16 bundles hold fp32 graphs (max abs); the Q/DQ graphs are judged by cosine, the image segment's own
# logits (at eoi, never sampled: a text segment always follows, and the image branch's error reaches the answer
# through the KV cache, which the decoder_text rows after it measure) looser (trained tiny-shapes, fp8: eoi-row
# cosine 0.959, text 0.99993), decoder_text on the held-out prompt where a runtime samples: low-confidence rows
# (count and position answers) have near-tied logits whose full-vector cosine dips and whose top-1 may flip on a
# tie; top-1 is reported, accuracy on the test split is what `edgemm eval` measures.


def _calib_digest(items) -> str:
    import hashlib
    h = hashlib.sha256()
    for px, segs in items:
        h.update(np.ascontiguousarray(px, np.float32).tobytes())
        for k, d in segs:
            h.update(k.encode() + (np.asarray(d, np.int64).tobytes() if d is not None else b""))
    return h.hexdigest()


# --------------------------------------------------------------------------- validation (CPU)
def validate_graphs(model, bundle_dir, precision: dict, seed: int | None = None, threads=None,
                    decode_steps: int = 8, calib_items=None) -> dict:
    """The bundle's graphs in ONNX Runtime (CPU) against the reference: vision rows, and the decoder logits
    after text, image and text segments then greedy decode steps; a held-out prompt when calib_items are given
    (edgemm.export.validate.check_items)."""
    import torch
    from edgemm.export.thresholds import judge
    from edgemm.runtimes.trt_backend import OnnxQdqBackend
    cfg = model.cfg
    seed = 0 if seed is None else seed              # reproducible: the same export checks the same inputs
    gen = torch.Generator().manual_seed(seed)
    b = OnnxQdqBackend.open(bundle=str(bundle_dir), verify=False, threads=threads)
    hw = None
    if calib_items:
        ins, hw, ids2 = real_prompt(calib_items, seed, cfg, b.tokenizer, gen)
    else:
        ins, hw = validation_inputs(cfg, gen)   # random pixels (tiles), or Libra's random image tokens and signal
        ids2 = random_ids(b.tokenizer, cfg.decoder.vocab_size, 6, gen)
    ref = TorchReference(model, 2 + len(ids2) + cfg.n_image_rows + decode_steps + 2)
    res = run_prompt(ref, b, cfg, ins, [("text", [1]), ("image", None), ("text", ids2)], decode_steps,
                     stop_id=b.tokenizer.eos_id if calib_items else None, image_hw=hw)
    if cfg.video_stage:                 # LLaVA-NeXT-Video's pooled frames
        res["video"] = check_video(model, b, gen, seed, calib_items)
    out = summarize(res, lambda s: precision[group(s)], lambda *a: judge("trt", *a))
    out["_seed"] = seed
    return out


# --------------------------------------------------------------------------- the exporter
def _precisions(precision) -> dict:
    from edgemm.export.onnx import _precisions as parse
    return parse(precision, PRECISIONS, "int8", "trt")


def export_trt(model=None, out=None, precision=None, force: bool = False, calib=None, no_build: bool = False,
               log=print, threads: int | None = None, seed: int | None = None, device_class: str | None = None,
               max_context: int | None = None, max_batch: int | None = None, calib_size: int = 32,
               keep_sensitive=None, max_tiles: int | None = None) -> dict:
    """Export `model` (a --model spec or a (model, tokenizer) pair) to a trt bundle at `out`; -> the manifest.
    max_tiles: the bundle's tile budget (any-resolution models), which also bounds the vision profile's batch."""
    import onnx
    import torch
    from edgemm.bundle import bundle_writer, check_out, tool_versions, write_manifest
    from edgemm.checkpoint import load_source
    from edgemm.export.onnx import VIDEO_NOTE, check_variants, stage_notes
    from edgemm.runtimes.trt_backend import gpu_identity
    log = log or (lambda s: None)
    if not out:
        raise EdgemmError("-o OUT is required: the bundle directory to write")
    out = Path(out)
    check_out(out, force)
    prec = _precisions(precision)
    here = gpu_identity()
    build_here = here is not None and not no_build
    if build_here:
        check_precision_supported(prec, here["compute_capability"], here["gpu"])   # fail before the work
    m, tok, source = load_source(model)
    m = m.float().cpu().eval()
    cfg = m.cfg
    from edgemm.anyres import manifest_fields
    from edgemm.tilings import set_max_tiles
    set_max_tiles(cfg, max_tiles)
    check_variants(cfg, "the trt exporter", prec, target="trt")
    profiles = {dc: make_profiles(cfg, dc, max_context, max_batch) for dc in DEVICE_CLASSES}
    from edgemm.calib.recipes import QDQ
    quantized = any(p in QDQ for p in prec.values())
    names = tuple(cfg.stages) + (("video",) if cfg.video_stage else ())
    t0 = time.time()
    with bundle_writer(out, force) as tmp, torch.inference_mode():
        fp32_dir = Path(tempfile.mkdtemp(prefix="edgemm-trt-fp32-", dir=tmp.parent))
        try:
            graphs = {cfg.input_stage: vision_graph(m)[0], "decoder_text": decoder_graph(m, "text", GRAPH_KV)[0]}
            if cfg.video_stage:                     # LLaVA-NeXT-Video's pooled frames (the vision group)
                graphs["video"] = vision_graph(m, video=True)[0]
            if "cross_kv" in cfg.stages:            # gated cross-attention: the image's K/V stage, no image branch
                from edgemm.export.decoder_graph import cross_kv_graph
                graphs["cross_kv"] = cross_kv_graph(m)[0]
            else:
                graphs["decoder_image"] = decoder_graph(m, "vision", GRAPH_KV)[0]
            for s, g in graphs.items():
                onnx.save_model(g, str(fp32_dir / f"{s}.onnx"))
            del graphs
            calib_items, recipe, calib_digest, held = None, {}, None, None
            if quantized:
                from edgemm.calib.quantize import quantize_stage
                from edgemm.calib.stats import collect_stats
                calib_items = calibration_items(m, tok, calib, calib_size)
                calib_digest = _calib_digest(calib_items)
                held = check_items(m, tok, calib, calib_size)      # the check's prompts: the set's held-out part
                log(f"calibrating on {len(calib_items)} image+prompt pairs "
                    f"({'the bundled shapes calibration split' if calib is None else calib}) ...")
                stats = collect_stats((m, tok), calib, n=calib_size, log=log, progress=False)
            for s in names:
                p = prec[group(s)]
                src, dst = fp32_dir / f"{s}.onnx", tmp / f"{s}.onnx"
                if p in QDQ:
                    recipe[s] = quantize_stage(str(src), str(dst), s, p, stats=stats, log=log,
                                               keep_sensitive=keep_sensitive, int8_storage="s8s8")
                else:
                    shutil.copy(src, dst)
                    recipe[s] = {"recipe": "fp32 graph; fp16 applied by TensorRT at build time"}
                onnx.checker.check_model(str(dst), full_check=True)
        finally:
            shutil.rmtree(fp32_dir, ignore_errors=True)
        stages = {}
        heads = "2 * kv_heads" if cfg.decoder.cross_modal_bridge else "kv_heads"
        for s in names:
            g = onnx.load(str(tmp / f"{s}.onnx"))
            ins, outs = io_spec(g)
            st = {"file": f"{s}.onnx", "graph": GRAPH_KV if s.startswith("decoder") else GRAPH_STANDARD,
                  "precision": prec[group(s)], "inputs": ins, "outputs": outs, "quantization": recipe[s],
                  **stage_notes(cfg, s)}
            if s == "video":
                st["note"] = VIDEO_NOTE
            if s.startswith("decoder"):
                st["branch"] = "text" if s == "decoder_text" else "vision"
                st["kv_cache"] = {"layout": f"BSNH [1, rows, {heads}, head_dim] per layer", "dtype": "float32",
                                  "inputs": "cache_key.i / cache_value.i: the first past_len + seq rows of the "
                                            "runtime's buffer", "outputs": "new_key.i / new_value.i: the seq new "
                                            "rows, for the runtime to store at past_len",
                                  "past_len": "rows filled before this call"}
            stages[s] = st
        tok.save(tmp / "tokenizer.json")
        from edgemm.qformer import bundle_fields
        qformer = bundle_fields(tok, tmp, cfg)                  # InstructBLIP: its Q-Former tokenizer
        from edgemm.checkpoint import chat_template_for
        (tmp / "chat_template.jinja").write_text(chat_template_for(model))
        dc_default = device_class or default_device_class(here)
        manifest = {"target": "trt", "model": cfg.to_dict(), "source": source, "variants": cfg.variants(),
                    "reference": {"model": source["model"], "digest": source["digest"],
                                  "backend": "torch (edgemm.model)"},
                    "precision": prec, "stages": stages, "tokenizer": "tokenizer.json",
                    "chat_template": "chat_template.jinja",
                    "tools": tool_versions("onnx", "onnxruntime"), "opset": {"": OPSET},
                    "trt": {"device_class": dc_default,
                            "max_context": profiles[dc_default]["_meta"]["max_context"],
                            "profiles": profiles,
                            "build": {"explicit_quantization": "Q/DQ in the ONNX graphs (no INT8 calibrator)",
                                      "network": "strongly typed on TensorRT >= 11; on TensorRT 10 weakly typed "
                                                 "with builder flags per precision",
                                      "flags_tensorrt10": {p: trt_flags(p, False) for p in PRECISIONS},
                                      "timing_cache": "engines/timing.cache",
                                      "fp8_min_compute_capability": "%d.%d" % FP8_MIN_CC},
                            "engines": {}}, **qformer}
        if cfg.vision.grid_pinpoints:
            manifest["anyres"] = manifest_fields(m)
        if calib_digest:
            manifest["calibration"] = {"set": "shapes calib split" if calib is None else str(calib),
                                       "items": len(calib_items), "digest": calib_digest,
                                       "statistics": "activation amax per stage (per modality branch)"}
        write_manifest(tmp, manifest)
        log(f"exported {', '.join(names)} ({'/'.join(sorted(set(prec.values())))}) in {time.time() - t0:.1f}s; "
            "validating in onnxruntime (CPU) against the reference ...")
        figures = validate_graphs(m, tmp, prec, seed=seed, threads=threads, calib_items=held)
        log(format_validation(figures))
        from edgemm.export.validate import raise_failure
        raise_failure(figures)              # one line naming the stage to blame
        from edgemm.export.thresholds import used
        seed = figures.pop("_seed")
        manifest["validation"] = {"reference": f"edgemm.model (PyTorch {torch.__version__}, fp32, CPU)",
                                  "runtime": "onnxruntime CPU provider (Q/DQ emulated)",
                                  "source_digest": source["digest"],
                                  **(held.record(seed) if held else random_record(seed, cfg.input_stage)),
                                  "seed": seed, "thresholds": used("trt", lambda s: prec[group(s)], figures),
                                  "stages": figures}
        result = write_manifest(tmp, manifest)
        if build_here:
            result = build_engines(tmp, device_class=device_class, log=log, threads=threads)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB)")
    if not build_here:
        why = "--no-build given" if no_build and here else "no TensorRT with a CUDA GPU here"
        log(f"engines not built ({why}): run `edgemm build-engines {out}` on the target device")
    return result
