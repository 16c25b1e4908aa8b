"""`--target gguf`: the decoder as a llama.cpp `cogvlm` GGUF, the vision stage as an mmproj GGUF (clip arch,
projector `cogvlm`), the tokenizer inside, and the manifest. Imported LLaVA models (single branch, CLIP tower, MLP
projector) go to llama.cpp's `llama` architecture (`qwen2` with QKV bias) and an mmproj with projector `mlp`;
MoE-LLaVA (Mixtral experts in every layer) as `llama` with ffn_gate_inp + ffn_{gate,up,down}_exps (Mixtral layout).

This module is the entry point (export_gguf) and says which models llama.cpp can compute (check_supported); the
jobs it runs are modules of their own, and their public names are importable from here as well:
  gguf_tokenizer  the tokenizer fields and chat template inside the decoder file
  gguf_tensors    the decoder and mmproj tensor layouts (names, metadata) and reading a file's tensor table
  gguf_quant      the precisions, what the mmproj gets per precision and tensor, llama.cpp's quantizer
  gguf_validate   the files run in llama.cpp against the reference (logits, image rows, fidelity)
  gguf_llava_cls  the llama.cpp llava CLS-row defect (ggml-org/llama.cpp#25814): simulated and detected

The decoder is written in f32 with the `gguf` package and quantized by llama.cpp's own quantizer
(llama_model_quantize); the mmproj is written at f32 / f16 / q8_0 / q4_0, K-quant requests for the vision stage fall
back to q8_0, and it says so. Before it reports success the export runs its files in llama.cpp and compares with the
reference model.
"""
from __future__ import annotations

from pathlib import Path

from edgemm.cpu import threads_or_default
from edgemm.errors import EdgemmError, UnsupportedVariant
from edgemm.export import gguf_validate
from edgemm.export.gguf_llava_cls import llava_rows_cls_last, mtmd_cls_order_defect  # noqa: F401
from edgemm.export.gguf_quant import FTYPES, PRECISIONS, VISION_TYPES, quantize_decoder  # noqa: F401
from edgemm.export.gguf_tensors import (branch_of, gguf_tensor_table, rope_permute, type_summary,  # noqa: F401
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


def decoder_arch(cfg) -> str:
    """llama.cpp's architecture for the decoder: cogvlm (edgemm's family), llama, or qwen2 (LLaMA + QKV bias)."""
    if not is_llava(cfg):
        return "cogvlm"
    return "qwen2" if cfg.decoder.qkv_bias else "llama"


PERSIMMON = "persimmon decoder (layernorm, partial rope, relu2 mlp, biases)"


def check_supported(cfg, log=print) -> None:
    """Refuse every config llama.cpp's graphs cannot compute; warn where it approximates."""
    from edgemm.blocks import support
    llava = is_llava(cfg)
    where = (f"the gguf exporter (llama.cpp's {decoder_arch(cfg)} architecture + mlp mmproj)" if llava
             else "the gguf exporter (llama.cpp's cogvlm architecture)")
    if cfg.vision.tiling == "smolvlm":          # SmolVLM / Idefics3: llama.cpp has the graph, edgemm no writer yet
        raise UnsupportedVariant("tile grid (smolvlm)", "the gguf exporter (llama.cpp's mtmd has an idefics3 "
                                 "projector, but edgemm does not write its mmproj and tile markers yet)",
                                 support.targets_that_can("tile grid (smolvlm)", exclude="gguf"))
    if cfg.vision.arch == "patch_linear":       # Fuyu: no persimmon / fuyu in libllama's or libmtmd's names
        raise UnsupportedVariant(PERSIMMON, "the gguf exporter (llama.cpp has no Fuyu graph: no Persimmon decoder "
                                 "architecture, no raw-patch projector)", support.targets_that_can(PERSIMMON, "gguf"))
    # the variants no llama.cpp graph here computes are named first (a BLIP-2 import is refused for its Q-Former)
    v = support.refusal(cfg, "gguf")            # the support matrix: llama.cpp's cogvlm graph, or its llava graph
    if v is not None:
        raise UnsupportedVariant(v, where, support.targets_that_can(v, exclude="gguf"))
    if cfg.vision.width % cfg.vision.heads:
        raise EdgemmError("vision width must be divisible by the vision heads")
    if llava:
        _check_moe(cfg.decoder, where)
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


def validate(model, tok, decoder: Path, mmproj: Path, precision: dict, threads: int, log=print) -> dict:
    """Run the files in llama.cpp and compare with the reference (gguf_validate.validate). -> figures (raises when
    f32/f16 are off)."""
    return gguf_validate.validate(model, tok, decoder, mmproj, precision, threads, is_llava(model.cfg), log)


# --------------------------------------------------------------------------- entry point
def _source(spec) -> dict:
    from edgemm.checkpoint import checkpoint_digest, resolve_model
    kind, path = resolve_model(spec)
    if kind == "dir":
        return {"model": str(Path(path).resolve()), "digest": checkpoint_digest(path)}
    return {"model": spec, "digest": None, "note": "random-weight preset (init_weights seed 0)"}


def export_gguf(model=None, out=None, precision=None, force=False, calib=None, no_build=False, log=print,
                threads: int | None = None) -> dict:
    """Export `model` (checkpoint dir or preset) to a GGUF bundle at `out`. -> the manifest."""
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
    if calib:
        log("note: GGUF quantization is weight-only (llama.cpp types); --calib is not used by --target gguf")
    cfg, _, _ = model_config(model)
    check_supported(cfg, log)
    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()      # the quantizer and the validation need llama.cpp (with a CPU variant this machine runs)
    threads = threads_or_default(threads)
    src = _source(model)
    m, tok = load_model(model)
    tok_fields = tokenizer_fields(tok, cfg.decoder.vocab_size)   # one llama.cpp cannot read is refused up front
    name = cfg.name
    arch, llava = decoder_arch(cfg), is_llava(cfg)
    projector = "mlp" if llava else "cogvlm"
    from edgemm.checkpoint import chat_template_for
    template = chat_template_for(model)
    dprec, vprec = precision["decoder"], precision["vision"]
    vtype = VISION_TYPES[vprec]
    if vtype != vprec:
        log(f"note: llama.cpp's mmproj files take f32/f16/q8_0/q4_0 here; the vision stage is written as {vtype} "
            f"for --precision vision={vprec}")
    with bundle_writer(out, force=force) as tmp:
        dec_file, mm_file = f"decoder-{dprec}.gguf", f"mmproj-{vtype}.gguf"
        f32_path = tmp / ("decoder-f32.gguf" if dprec == "f32" else ".decoder-f32.tmp.gguf")
        log(f"writing the decoder ({arch}, f32) ...")
        # an imported model's own chat template goes into the file; edgemm's format as the GGUF form of it
        write_decoder_gguf(m, tok, f32_path, name, template if llava else None, tok_fields)
        if dprec != "f32":
            log(f"quantizing the decoder to {dprec} with llama.cpp (llama_model_quantize) ...")
            quantize_decoder(f32_path, tmp / dec_file, dprec, threads)
            f32_path.unlink()
        log(f"writing the mmproj (clip, projector {projector}, {vtype}) ...")
        vis_types = (write_llava_mmproj_gguf if llava else write_mmproj_gguf)(m, tmp / mm_file, name, vtype)
        tok.save(tmp / "tokenizer.json")
        (tmp / "chat_template.jinja").write_text(template)
        log("validating in llama.cpp ...")
        figures = validate(m, tok, tmp / dec_file, tmp / mm_file, {"decoder": dprec, "vision": vtype}, threads, log)
        dec_table = gguf_tensor_table(tmp / dec_file)
        manifest = {
            "target": "gguf",
            "model": cfg.to_dict(),
            "source": src,
            "reference": {"model": src["model"], "digest": src["digest"], "backend": "torch (edgemm.model)"},
            "precision": {"decoder": dprec, "vision": vtype, "requested": dict(precision)},
            "tokenizer": "tokenizer.json",
            "chat_template": "chat_template.jinja",
            "stages": {
                "vision": {"file": mm_file, "format": f"gguf mmproj (clip arch, projector {projector})",
                           "precision": vtype,
                           "runs_with": "reference code with the mmproj weights"
                           if figures.get("mtmd_cls_order_defect") or cfg.vision.grid_pinpoints else "llama.cpp mtmd",
                           "input": {"pixels": ["tiles" if cfg.vision.grid_pinpoints else "1", "3",
                                                cfg.vision.image_size, cfg.vision.image_size]},
                           "output": {"rows": ["1", cfg.n_image_rows, cfg.decoder.d_model]},
                           "tensor_types": type_summary([{"name": k, "type": t} for k, t in vis_types.items()])},
                "decoder": {"file": dec_file, "format": f"gguf (arch {arch})", "precision": dprec,
                            "quantizer": "llama_model_quantize" if dprec != "f32" else None,
                            "branches": {"decoder_text": "token batches -> blk.N.{attn_qkv,attn_output,ffn_*}",
                                         "decoder_image": "embedding batches -> blk.N.vis_*"} if not llava else
                            {"decoder_text": "token batches", "decoder_image": "embedding batches (same weights)"},
                            "tensor_types": type_summary(dec_table)},
            },
            "runtime": {"backend": "llamacpp", "image_rows": (
                            "the reference vision code with the mmproj weights (any-resolution tiles packed on the "
                            "host)" if cfg.vision.grid_pinpoints else
                            "the reference vision code with the mmproj weights (llama.cpp#25814)"
                            if figures.get("mtmd_cls_order_defect") else
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
