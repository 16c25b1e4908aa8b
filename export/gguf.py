"""`--target gguf`: the decoder as a llama.cpp `cogvlm` GGUF, the vision stage as an mmproj GGUF (clip arch,
projector `cogvlm`), the tokenizer inside, and the manifest. Imported LLaVA models (single branch, CLIP tower, MLP
projector) go to llama.cpp's `llama` architecture (`qwen2` with QKV bias) and an mmproj with projector `mlp`;
MoE-LLaVA (Mixtral experts in every layer) as `llama` with ffn_gate_inp + ffn_{gate,up,down}_exps (Mixtral layout).

Where llama.cpp computes the decoder but not the vision side (a single-branch decoder with a BLIP-2 / InstructBLIP
Q-Former, the features edgemm.blocks.support marks gguf="onnx"), or where asked (vision="onnx": LLaVA while
llama.cpp's llava graph misorders CLIP's CLS row), the vision stage is the ONNX graph the onnx exporter traces
(export/graph.py vision_graph), `vision.onnx` beside the decoder GGUF: one manifest (stages.vision.format "onnx"),
run by ONNX Runtime's CPU provider inside edgemm's llamacpp backend, its rows fed to llama.cpp as embeddings.

This module is the entry point (export_gguf) and says which models llama.cpp can compute (check_supported); the
jobs it runs are modules of their own, and their public names are importable from here as well:
  gguf_tokenizer  the tokenizer fields and chat template inside the decoder file
  gguf_tensors    the decoder and mmproj tensor layouts (names, metadata) and reading a file's tensor table
  gguf_quant      the precisions, what the mmproj gets per precision and tensor, llama.cpp's quantizer
  gguf_imatrix    llama.cpp importance matrices (imatrix.gguf) from the calibration set's text and image rows
  gguf_validate   the files run in llama.cpp against the reference (logits, image rows, fidelity)
  gguf_llava_cls  the llama.cpp llava CLS-row defect (ggml-org/llama.cpp#25814): simulated and detected

The decoder is written in f32 with the `gguf` package and quantized by llama.cpp's own quantizer
(llama_model_quantize; k-quants with an importance matrix when a calibration set is given); the mmproj is written
at f32 / f16 / q8_0 / q4_0, K-quant requests for the vision stage fall back to q8_0, and it says so. Before it
reports success the export runs its files in llama.cpp and compares with the reference model.
"""
from __future__ import annotations

from pathlib import Path

from edgemm.cpu import threads_or_default
from edgemm.errors import EdgemmError, UnsupportedVariant
from edgemm.export import gguf_validate
from edgemm.export.gguf_llava_cls import llava_rows_cls_last, mtmd_cls_order_defect  # noqa: F401
from edgemm.export.gguf_quant import FTYPES, PRECISIONS, VISION_TYPES, quantize_decoder  # noqa: F401
from edgemm.export.gguf_archs import rope_permute  # noqa: F401  (tests/test_gguf_llava.py)
from edgemm.export.gguf_tensors import (branch_of, gguf_tensor_table, type_summary,  # noqa: F401
                                        write_decoder, write_llava_mmproj_gguf, write_mmproj_gguf)
from edgemm.export.gguf_tokenizer import GGUF_CHAT_TEMPLATE, tokenizer_fields  # noqa: F401
from edgemm.export.gguf_validate import (FIDELITY_KL, FIDELITY_MARGIN, FIDELITY_QUESTIONS,  # noqa: F401
                                         FIDELITY_STEPS, FIDELITY_TOP1, LOGIT_TOL, MTMD_LOGIT_TOL, MTMD_ROWS_RTOL,
                                         ROWS_TOL, VALIDATION_QUESTION, fidelity, validation_image)

# --------------------------------------------------------------------------- checks
# LLaVA (transformers' LlavaForConditionalGeneration imports): what llama.cpp's llama / qwen2 decoders and the `mlp`
# mmproj projector (tools/mtmd/models/llava.cpp) compute
def is_llava(cfg) -> bool:
    from edgemm.blocks.support import is_llava_graph
    return is_llava_graph(cfg.variants())


def mtmd_graph(cfg) -> str | None:
    """The mtmd projector of a composition llama.cpp computes with a graph of its own (support.MTMD_GRAPHS:
    gemma3), or None."""
    from edgemm.blocks.support import mtmd_graph as graph
    return graph(cfg.variants())


def decoder_arch(cfg) -> str:
    """llama.cpp's architecture for the decoder: cogvlm (edgemm's family), gemma3 (Gemma 3), qwen2vl (M-RoPE:
    Qwen2-VL), llama, or qwen2 (LLaMA + QKV bias) for the other single-branch decoders (LLaVA, and those beside an
    ONNX vision stage)."""
    if not cfg.decoder.single_branch:
        return "cogvlm"
    if mtmd_graph(cfg) == "gemma3":
        return "gemma3"
    if cfg.decoder.mrope_section:
        return "qwen2vl"                # Qwen2 + M-RoPE (rope.dimension_sections)
    return "qwen2" if cfg.decoder.qkv_bias else "llama"


def projector(cfg) -> str:
    """The mmproj's clip.projector_type: mlp (LLaVA), the composition's own (mtmd_graph; Qwen2-VL's qwen2vl_merger,
    2.5's qwen2.5vl_merger), else cogvlm."""
    if mtmd_graph(cfg) == "qwen2vl":
        from edgemm.export.gguf_mtmd import qwen2vl_projector
        return qwen2vl_projector(cfg)
    return "mlp" if is_llava(cfg) else mtmd_graph(cfg) or "cogvlm"


def mmproj_writer(cfg):
    """The function writing this model's mmproj (model, path, name, qtype) -> {tensor: type}: the writer registered
    for its projector (gguf_tensors.MMPROJ_WRITERS; gguf_mtmd's register on import)."""
    from edgemm.export import gguf_mtmd  # noqa: F401  (its writers register)
    from edgemm.export.gguf_tensors import MMPROJ_WRITERS
    p = projector(cfg)
    if p not in MMPROJ_WRITERS:
        raise EdgemmError(f"gguf: no mmproj writer for llama.cpp projector {p!r} (written: "
                          f"{', '.join(sorted(MMPROJ_WRITERS))}); export with --gguf-vision onnx")
    return MMPROJ_WRITERS[p]


def gguf_chat_template(cfg, template: str) -> str | None:
    """What tokenizer.chat_template holds: an imported model's own template (LLaVA's; Gemma 3's as its release has
    it, <start_of_image> for an image: llama.cpp's mtmd puts the image between <start_of_image> / <end_of_image>
    itself), or None (edgemm's format) for edgemm's own family."""
    if mtmd_graph(cfg) == "gemma3":
        from edgemm.families.gemma3 import release_template
        return release_template(template)
    return template if cfg.decoder.single_branch else None


VISION_STAGES = ("auto", "mmproj", "onnx")
ONNX_VISION_PRECISION = {"f32": "fp32", "f16": "fp16"}      # other gguf types: int8 weight-only (no calibration)


def vision_stage(cfg, requested: str | None = None) -> str:
    """The bundle's vision stage: "mmproj" (llama.cpp's clip/mtmd computes it) or "onnx" (vision.onnx in ONNX
    Runtime beside llama.cpp's decoder). auto: the support matrix's (edgemm.blocks.support.gguf_vision)."""
    from edgemm.blocks.support import gguf_vision
    requested = requested or "auto"
    if requested not in VISION_STAGES:
        raise EdgemmError(f"--gguf-vision {requested!r}: choose one of {', '.join(VISION_STAGES)}")
    route = gguf_vision(cfg.variants())
    if requested == "mmproj" and route == "onnx":
        raise EdgemmError("--gguf-vision mmproj: llama.cpp's clip/mtmd has no graph for this vision stage "
                          f"({cfg.vision.arch} tower, {cfg.adapter.kind} adapter); use auto or onnx")
    return route if requested == "auto" else requested


PERSIMMON = "persimmon decoder (layernorm, partial rope, relu2 mlp, biases)"


def check_supported(cfg, log=print, vision: str | None = None) -> None:
    """Refuse every config llama.cpp's graphs cannot compute; warn where it approximates."""
    from edgemm.blocks import support
    llava = is_llava(cfg) and vision_stage(cfg, vision) == "mmproj"        # (an ONNX vision stage is exact)
    where = (f"the gguf exporter (llama.cpp's {decoder_arch(cfg)} architecture + {projector(cfg)} mmproj)"
             if llava or mtmd_graph(cfg)
             else f"the gguf exporter (llama.cpp's {decoder_arch(cfg)} architecture + an ONNX vision stage)"
             if cfg.decoder.single_branch else "the gguf exporter (llama.cpp's cogvlm architecture)")
    if cfg.vision.arch == "patch_linear":       # Fuyu: no persimmon / fuyu in libllama's or libmtmd's names
        raise UnsupportedVariant(PERSIMMON, "the gguf exporter (llama.cpp has no Fuyu graph: no Persimmon decoder "
                                 "architecture, no raw-patch projector)", support.targets_that_can(PERSIMMON, "gguf"))
    # the variants no llama.cpp graph here computes are named first (a BLIP-2 import is refused for its Q-Former)
    v = support.refusal(cfg, "gguf")            # the support matrix: llama.cpp's cogvlm graph, or its llava graph
    if v is not None:
        raise UnsupportedVariant(v, where, support.targets_that_can(v, exclude="gguf"))
    if cfg.vision.width % cfg.vision.heads:
        raise EdgemmError("vision width must be divisible by the vision heads")
    if cfg.decoder.single_branch:
        _check_moe(cfg.decoder, where)
    if mtmd_graph(cfg) == "qwen2vl":
        if vision_stage(cfg, vision) == "mmproj":       # (an ONNX vision stage computes Qwen's tower exactly)
            _check_qwen2vl(cfg, where, log)
    elif mtmd_graph(cfg) and cfg.vision.gelu != "tanh":
        log(f"warning: this vision tower uses the {cfg.vision.gelu} GELU; llama.cpp's {mtmd_graph(cfg)} mmproj "
            "computes the tanh form (clip.use_gelu), so the vision stage is approximated")
    if vision_stage(cfg, vision) == "onnx" or mtmd_graph(cfg):
        return
    if llava:
        if cfg.vision.keep_cls:         # llava.cpp gathers the patch rows only (its `patches` input skips CLS)
            raise UnsupportedVariant("CLS row kept (vision_feature_select_strategy 'full')", where,
                                     support.targets_that_can("clip vision tower", exclude="gguf"))
        if cfg.vision.gelu == "erf":
            log("warning: this CLIP tower uses the erf GELU; llama.cpp's clip graph computes the tanh form "
                "(use_gelu), so the vision stage is approximated")
        if cfg.adapter.kind == "mlp_norm" and abs(cfg.adapter.eps - cfg.vision.eps) > 1e-12:
            log(f"warning: the projector's LayerNorm eps is {cfg.adapter.eps}; llama.cpp's mlp_norm projector uses "
                f"the tower's ({cfg.vision.eps})")
        if cfg.adapter.gelu != "tanh" and cfg.adapter.kind != "linear":
            log(f"warning: the projector's GELU is the {cfg.adapter.gelu} form; llama.cpp's mlp projector computes "
                "ggml_gelu (the tanh form), so the image rows are approximated")
        return
    if cfg.vision.gelu != "tanh" or cfg.adapter.gelu != "tanh":
        log("warning: this model uses the erf GELU; llama.cpp's cogvlm mmproj computes the tanh form "
            "(ggml_gelu), so the vision stage is approximated")
    if abs(cfg.adapter.eps - 1e-5) > 1e-12:
        log(f"warning: the adapter LayerNorm eps is {cfg.adapter.eps}; llama.cpp's cogvlm projector uses 1e-5")


def _check_qwen2vl(cfg, where: str, log) -> None:
    """What llama.cpp's qwen2vl / qwen2.5vl graphs (tools/mtmd/models/qwen2vl.cpp) fix: 2 x 2 merged cells, 2.5's
    112 px windows with every n-th block full; 2-VL's tower MLP is QuickGELU (clip.cpp's default FFN op) and the
    merger's GELU the tanh form (FFN_GELU) where Qwen's is erf."""
    from edgemm.export.gguf_mtmd import QWEN25_WINDOW_PX, qwen2vl_window_pattern
    v = cfg.vision
    if v.merge_size != 2:
        raise EdgemmError(f"{where}: spatial_merge_size {v.merge_size}; llama.cpp's qwen2vl graph merges 2 x 2 "
                          "patches only")
    if v.mlp != "swiglu" and v.gelu != "quick":
        raise EdgemmError(f"{where}: the tower's MLP activation is {v.gelu} GELU; llama.cpp's qwen2vl mmproj "
                          "computes QuickGELU (Qwen2-VL's)")
    if v.window_px and v.window_px != QWEN25_WINDOW_PX:
        raise EdgemmError(f"{where}: window attention over {v.window_px} px; llama.cpp's qwen2.5vl graph uses "
                          f"{QWEN25_WINDOW_PX} px windows (the released models')")
    qwen2vl_window_pattern(v)
    log("warning: the patch merger's GELU is the erf form; llama.cpp's qwen2vl_merger projector computes the tanh form "
        "(FFN_GELU), so the image rows are approximated")


def _check_moe(d, where: str) -> None:
    """llama.cpp's llama arch with experts (Mixtral's layout): every layer an MoE layer of n_ff-wide experts,
    softmax top-k weights renormalised (build_moe_ffn with norm_w)."""
    from edgemm.blocks.support import targets_that_can
    if not d.n_experts:
        return
    can = targets_that_can("mixture of experts", exclude="gguf")
    if not all(map(d.is_moe_layer, range(d.n_layers))):
        raise UnsupportedVariant("mixture of experts with dense layers between (moe_every / moe_dense_layers)", where,
                                 can)
    if not d.norm_topk_prob:
        raise UnsupportedVariant("mixture of experts without renormalised top-k weights", where, can)


# --------------------------------------------------------------------------- the jobs, for this model's architecture
def write_decoder_gguf(model, tok, path: Path, name: str, chat_template: str | None = None,
                       tok_fields: dict | None = None) -> None:
    """The decoder in f32 as llama.cpp's architecture for it (decoder_arch): gguf_tensors.write_decoder."""
    write_decoder(model, tok, path, name, decoder_arch(model.cfg), chat_template, tok_fields)


def validate(model, tok, decoder: Path, mmproj: Path, precision: dict, threads: int, log=print,
             strict: bool = True) -> dict:
    """Run the files in llama.cpp and compare with the reference (gguf_validate.validate). -> figures (raises when
    they are off, unless not strict)."""
    return gguf_validate.validate(model, tok, decoder, mmproj, precision, threads, is_llava(model.cfg), log, strict)


# --------------------------------------------------------------------------- entry point
def _source(spec) -> dict:
    from edgemm.checkpoint import checkpoint_digest, resolve_model
    kind, path = resolve_model(spec)
    if kind == "dir":
        return {"model": str(Path(path).resolve()), "digest": checkpoint_digest(path)}
    return {"model": spec, "digest": None, "note": "random-weight preset (init_weights seed 0)"}


def export_gguf(model=None, out=None, precision=None, force=False, calib=None, no_build=False, log=print,
                threads: int | None = None, vision: str | None = None, imatrix: bool | None = None,
                stats=None, strict: bool = True) -> dict:
    """Export `model` (checkpoint dir or preset) to a GGUF bundle at `out`. -> the manifest.
    vision: auto (the support matrix decides), mmproj (llama.cpp's clip/mtmd) or onnx (vision.onnx, ONNX Runtime
    beside llama.cpp's decoder: vision_stage). imatrix: quantize the decoder with an importance matrix from the
    calibration set's text and image rows (gguf_imatrix); default: for the k-quants when `calib` or `stats`
    (calibration statistics: edgemm.calib.stats.Stats or a file) is given. strict=False (benchmarks only): a bundle
    the validation refuses is written anyway, its manifest's validation saying why (passed false, refused)."""
    log = log or (lambda s: None)
    from edgemm.bundle import bundle_writer, tool_versions, write_manifest
    from edgemm.checkpoint import load_model
    from edgemm.checkpoint import model_config
    if out is None:
        raise EdgemmError("-o OUT is required: the bundle directory to write")
    if isinstance(precision, str) or precision is None:
        precision = {"vision": precision or "q8_0", "decoder": precision or "q8_0"}
    precision = {"vision": precision.get("vision", "q8_0"), "decoder": precision.get("decoder", "q8_0")}
    for stage, p in precision.items():
        if p not in PRECISIONS:
            raise EdgemmError(f"--precision {p!r} is not a gguf type; choose one of {', '.join(PRECISIONS)}")
    use_imatrix = _wants_imatrix(precision["decoder"], imatrix, calib, stats, log)
    cfg, _, _ = model_config(model)
    check_supported(cfg, log, vision)
    vision = vision_stage(cfg, vision)
    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()      # the quantizer and the validation need llama.cpp (with a CPU variant this machine runs)
    threads = threads_or_default(threads)
    src = _source(model)
    m, tok = load_model(model)
    tok_fields = tokenizer_fields(tok, cfg.decoder.vocab_size)   # one llama.cpp cannot read is refused up front
    name = cfg.name
    arch, llava, proj = decoder_arch(cfg), is_llava(cfg), projector(cfg)
    from edgemm.checkpoint import chat_template_for
    template = chat_template_for(model)
    dprec, vprec = precision["decoder"], precision["vision"]
    vtype = VISION_TYPES[vprec] if vision == "mmproj" else ONNX_VISION_PRECISION.get(vprec, "int8-wo")
    imx = None
    if use_imatrix:
        from edgemm.calib.stats import collect_stats, resolve_stats
        imx = resolve_stats(stats) or collect_stats(model if src["digest"] is None else (m, tok), calib,
                                                    model_digest=src["digest"], log=log)
    if vision == "onnx":
        return _export_onnx_vision(m, tok, cfg, out, force, src, template, tok_fields, dprec, vprec, vtype,
                                   threads, log, imx)
    if vtype != vprec:
        log(f"note: llama.cpp's mmproj files take f32/f16/q8_0/q4_0 here; the vision stage is written as {vtype} "
            f"for --precision vision={vprec}")
    write_mmproj = mmproj_writer(cfg)
    with bundle_writer(out, force=force) as tmp:
        dec_file, mm_file = f"decoder-{dprec}.gguf", f"mmproj-{vtype}.gguf"
        # an imported model's own chat template goes into the file; edgemm's format as the GGUF form of it
        imx_rec = _write_decoder_file(m, tok, tmp, dec_file, name, gguf_chat_template(cfg, template), tok_fields,
                                      dprec, threads, log, imx)
        log(f"writing the mmproj (clip, projector {proj}, {vtype}) ...")
        vis_types = write_mmproj(m, tmp / mm_file, name, vtype)
        tok.save(tmp / "tokenizer.json")
        (tmp / "chat_template.jinja").write_text(template)
        log("validating in llama.cpp ...")
        figures = validate(m, tok, tmp / dec_file, tmp / mm_file, {"decoder": dprec, "vision": vtype}, threads, log,
                           strict)
        dec_table = gguf_tensor_table(tmp / dec_file)
        qwen = cfg.vision.tiling == "qwen2vl"                   # (any image size, M-RoPE)
        manifest = {
            "target": "gguf",
            "model": cfg.to_dict(),
            "source": src,
            "reference": {"model": src["model"], "digest": src["digest"], "backend": "torch (edgemm.model)"},
            "precision": {"decoder": dprec, "vision": vtype, "requested": dict(precision)},
            "tokenizer": "tokenizer.json",
            "chat_template": "chat_template.jinja",
            "stages": {
                "vision": {"file": mm_file, "format": f"gguf mmproj (clip arch, projector {proj})",
                           "precision": vtype,
                           "runs_with": "reference code with the mmproj weights"
                           if figures.get("mtmd_cls_order_defect") or cfg.vision.grid_pinpoints else "llama.cpp mtmd",
                           "input": {"pixels": ["tiles" if cfg.vision.grid_pinpoints else "1", "3",
                                                *(("h", "w") if qwen else (cfg.vision.image_size,) * 2)]},
                           "output": {"rows": ["1", cfg.n_image_rows, cfg.decoder.d_model]},
                           "tensor_types": type_summary([{"name": k, "type": t} for k, t in vis_types.items()])},
                "decoder": {"file": dec_file, "format": f"gguf (arch {arch})", "precision": dprec,
                            "quantizer": "llama_model_quantize" if dprec != "f32" else None,
                            "imatrix": imx_rec,
                            "branches": {"decoder_text": "token batches -> blk.N.{attn_qkv,attn_output,ffn_*}",
                                         "decoder_image": "embedding batches -> blk.N.vis_*"} if arch == "cogvlm" else
                            {"decoder_text": "token batches", "decoder_image": "embedding batches (same weights)"},
                            "tensor_types": type_summary(dec_table)},
            },
            "runtime": {"backend": "llamacpp", "image_rows": (
                            "the reference vision code with the mmproj weights (any-resolution tiles packed on the "
                            "host)" if cfg.vision.grid_pinpoints else
                            "the reference vision code with the mmproj weights (llama.cpp#25814)"
                            if figures.get("mtmd_cls_order_defect") else
                            "mtmd with the mmproj at the host's image size (8-bit images only), the rows at M-RoPE "
                            "positions (p, p + i, p + j), 4 a row" if qwen else
                            "mtmd with the mmproj (8-bit images at the tower size; other pixels: the reference "
                            "vision code with the mmproj weights)"),
                        "kv_cache": "f32 for f32 bundles, else f16", "flash_attention": False},
            "validation": figures,
            "tools": tool_versions("gguf", "llama_cpp_python", "tokenizers"),
        }
        if cfg.vision.grid_pinpoints:       # the host side of LLaVA-NeXT tiling, as the onnx / trt bundles record it
            from edgemm.anyres import manifest_fields
            manifest["anyres"] = manifest_fields(m)
        manifest = write_manifest(tmp, manifest)
    log(f"wrote {out}: {dec_file} + {mm_file}")
    return manifest


def _wants_imatrix(dprec: str, imatrix, calib, stats, log) -> bool:
    """Whether the decoder is quantized with an importance matrix (see export_gguf)."""
    from edgemm.export.gguf_imatrix import KQUANTS
    if dprec in ("f32", "f16"):
        if imatrix:
            raise EdgemmError(f"--imatrix: the decoder is exported at {dprec}, unquantized; an importance matrix "
                              "weights quantization errors")
        if calib:
            log("note: an f32/f16 decoder is not quantized; --calib is not used")
        return False
    if imatrix is None:
        imatrix = dprec in KQUANTS and bool(calib or stats)
        if (calib or stats) and not imatrix:
            log(f"note: {dprec} is quantized without an importance matrix by default (k-quants take one; "
                "--imatrix to use it)")
    return bool(imatrix)


def _write_decoder_file(m, tok, tmp: Path, dec_file: str, name: str, template, tok_fields, dprec: str, threads: int,
                        log, imatrix_stats=None) -> dict | None:
    """The decoder GGUF at `dprec`: written in f32, then quantized by llama.cpp's own quantizer, with the importance
    matrix of `imatrix_stats` (calibration statistics) when given, written beside it as imatrix.gguf and read back
    by the quantizer. -> the manifest's imatrix record (None without)."""
    f32_path = tmp / ("decoder-f32.gguf" if dprec == "f32" else ".decoder-f32.tmp.gguf")
    log(f"writing the decoder ({decoder_arch(m.cfg)}, f32) ...")
    write_decoder_gguf(m, tok, f32_path, name, template, tok_fields)
    rec = None
    if dprec != "f32":
        imx_path = None
        if imatrix_stats is not None:
            from edgemm.export.gguf_imatrix import IMATRIX_FILE, imatrix_entries, write_imatrix
            entries = imatrix_entries(imatrix_stats, decoder_arch(m.cfg))
            meta = imatrix_stats.meta
            imx_path = write_imatrix(tmp / IMATRIX_FILE, entries, [str(meta.get("set"))], meta.get("samples") or 1)
            rec = {"file": IMATRIX_FILE, "format": "llama.cpp GGUF imatrix (in_sum2 / counts per tensor)",
                   "entries": len(entries), "set": meta.get("set"), "set_digest": meta.get("set_digest"),
                   "samples": meta.get("samples"), "stats_digest": meta.get("digest"),
                   "rows": "text-branch tensors: text rows; blk.N.vis_*: image rows; shared tensors: both"}
        log(f"quantizing the decoder to {dprec} with llama.cpp (llama_model_quantize"
            + (f", importance matrix of {rec['entries']} tensors from {rec['set']}" if rec else "") + ") ...")
        quantize_decoder(f32_path, tmp / dec_file, dprec, threads, imatrix=imx_path)
        f32_path.unlink()
    return rec


def _export_onnx_vision(m, tok, cfg, out, force, src: dict, template: str, tok_fields, dprec: str, vprec: str,
                        vtype: str, threads: int, log, imatrix_stats=None) -> dict:
    """The decoder GGUF (llama.cpp's llama / qwen2, or cogvlm) + the vision stage as the onnx exporter's traced
    graph (vision.onnx, ONNX Runtime; fp32, fp16 matrices, or int8 weight-only for the quantized gguf types), one
    manifest; validated as the mmproj bundles are (gguf_validate: the ONNX rows in ONNX Runtime against the
    reference, then through llama.cpp's decoder)."""
    import onnx
    import torch
    from edgemm.bundle import bundle_writer, tool_versions, write_manifest
    from edgemm.calib.apply import quantize_bundle_stages
    from edgemm.export.graph import io_spec, save_stage, vision_graph
    from edgemm.qformer import bundle_fields
    arch = decoder_arch(cfg)
    if vtype == "int8-wo":
        log(f"note: the ONNX vision stage is written {vtype} for --precision vision={vprec} (gguf types are "
            "llama.cpp's; int8 weight-only needs no calibration)")
    m = m.float().cpu().eval()
    with bundle_writer(out, force=force) as tmp:
        dec_file = f"decoder-{dprec}.gguf"
        imx_rec = _write_decoder_file(m, tok, tmp, dec_file, cfg.name,
                                      template if cfg.decoder.single_branch else None, tok_fields, dprec, threads,
                                      log, imatrix_stats)
        log(f"writing the vision stage (ONNX, {vtype}) ...")
        with torch.inference_mode():
            g, nbytes = vision_graph(m, vtype == "fp16")
        extra = save_stage(g, tmp / "vision.onnx", nbytes)
        onnx.checker.check_model(str(tmp / "vision.onnx"))
        ins, outs = io_spec(g)
        del g
        stages = {"vision": {"file": "vision.onnx", "format": "onnx", "precision": vtype, "inputs": ins,
                             "outputs": outs, "runs_with": "onnxruntime (CPU provider, in the llamacpp backend)",
                             "weights": "fp16 matrices, cast to fp32 in the graph; fp32 compute" if vtype == "fp16"
                             else "fp32"}}
        if extra:
            stages["vision"]["extra_files"] = extra
        quantize_bundle_stages(tmp, stages, {"vision": vtype}, m, tok, log=log)    # int8-wo: MatMulNBits, no stats
        tok.save(tmp / "tokenizer.json")
        qformer = bundle_fields(tok, tmp, cfg)                  # InstructBLIP: its Q-Former tokenizer
        (tmp / "chat_template.jinja").write_text(template)
        log("validating in llama.cpp and ONNX Runtime ...")
        figures = validate(m, tok, tmp / dec_file, tmp / "vision.onnx", {"decoder": dprec, "vision": vtype}, threads,
                           log)
        stages["decoder"] = {"file": dec_file, "format": f"gguf (arch {arch})", "precision": dprec,
                             "quantizer": "llama_model_quantize" if dprec != "f32" else None,
                             "imatrix": imx_rec,
                             "branches": {"decoder_text": "token batches", "decoder_image": "embedding batches"},
                             "tensor_types": type_summary(gguf_tensor_table(tmp / dec_file))}
        manifest = {
            "target": "gguf", "model": cfg.to_dict(), "source": src, "variants": cfg.variants(),
            "reference": {"model": src["model"], "digest": src["digest"], "backend": "torch (edgemm.model)"},
            "precision": {"decoder": dprec, "vision": vtype, "requested": {"decoder": dprec, "vision": vprec}},
            "tokenizer": "tokenizer.json", "chat_template": "chat_template.jinja", "stages": stages,
            "runtime": {"backend": "llamacpp", "image_rows": "vision.onnx in ONNX Runtime (CPU provider, intra-op "
                        "threads bounded, spinning off), fed to llama.cpp as an embedding batch",
                        "kv_cache": "f32 for f32 bundles, else f16", "flash_attention": False},
            "validation": figures,
            "tools": tool_versions("gguf", "llama_cpp_python", "tokenizers", "onnx", "onnxruntime"),
            **qformer,
        }
        if cfg.vision.grid_pinpoints:
            from edgemm.anyres import manifest_fields
            manifest["anyres"] = manifest_fields(m)
        manifest = write_manifest(tmp, manifest)
    log(f"wrote {out}: {dec_file} + vision.onnx")
    return manifest
