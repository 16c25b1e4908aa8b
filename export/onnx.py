"""ONNX export, stage by stage: `vision`, `decoder_text`, `decoder_image` (docs/architecture.md, section 5).

- `vision` is traced from the reference with torch.onnx.export (standard ops, dynamic batch).
- The two decoder stages are written op by op by edgemm.export.graph (flavour `ort-contrib-gqa`: ONNX Runtime's
  GroupQueryAttention over a shared past/present buffer), one graph per branch, so routing is static:
  `decoder_text` holds the shared weights and the text branch only, `decoder_image` the shared weights and the
  vision branch only. decoder_text has a batch dimension (BATCH_NOTE) so a server's slots decode in one run;
  validation checks that batched step against the reference too (validate_batch).
- fp16: weights (matrices) stored in fp16 and Cast to fp32 at the graph's entry; compute and the KV cache stay
  fp32 (ONNX Runtime's CPU provider lacks fp16 kernels for several ops). The manifest says so per stage.

Every export validates itself through the `ort` backend against the PyTorch reference before the bundle is
renamed into place; a failure leaves no bundle.
"""
from __future__ import annotations

import time
from pathlib import Path


from edgemm.blocks import support
from edgemm.checkpoint import load_source as _load_source
from edgemm.errors import EdgemmError, UnsupportedVariant

from edgemm.export.decoder_graph import decode_batch_supported, decoder_graph
from edgemm.export.graph import GRAPH_GQA, GRAPH_STANDARD, MOE_DEFAULT, OPSET, io_spec, save_stage, vision_graph
from edgemm.export.validate import (INPUTS, TorchReference, check_items, check_video, compare,  # noqa: F401
                                    format_validation, random_ids, random_record, real_prompt, run_prompt, summarize,
                                    validation_inputs)

from edgemm.calib.recipes import QUANTIZED, group
from edgemm.export import TARGET_PRECISIONS

PRECISIONS = TARGET_PRECISIONS["onnx"]          # the quantized ones: edgemm.calib
# the check's thresholds: edgemm.export.thresholds (one table for onnx, trt and gguf)


# What the onnx and trt graphs compute is the support matrix's (edgemm.blocks.support): the input stage is traced
# from the reference (any tower/projector, Libra's image-token input); the decoder graphs read `layer.vision` (the
# text branch for single-branch models), dense or low-rank, with per-modality norms and Libra's bridge; an eoi row
# routed through the text branch runs in decoder_text (its `input_rows` input); BLIP-2's tower and Q-Former live
# in the traced vision stage; Idefics' vision stage emits the resampled rows and `cross_kv` each cross-attention
# layer's K/V of an image (once per image).
BATCH_NOTE = ("dynamic: input_ids / positions [batch, seq], seqlens_k [batch], past/present [batch, ...], logits "
              "[batch, vocab]; one run steps several KV caches (rows of one buffer per layer, each row's seqlens_k "
              "its own; a row that sits out writes its dummy row past its filled rows); batch 1 for prompts")



DEVICES = ("cpu", "cuda")


def _half_for(device: str, prec: dict) -> bool:
    """Whether the decoder graphs compute in fp16 (export_onnx's device); a clear error where they cannot."""
    if device not in DEVICES:
        raise EdgemmError(f"--device {device!r}: the onnx exporter writes bundles for {', '.join(DEVICES)}")
    if device == "cpu":
        return False
    if prec["decoder"] != "fp16":
        raise EdgemmError(f"--device cuda writes fp16 compute decoders (ONNX Runtime's CUDA GroupQueryAttention is "
                          f"fp16 only; a {prec['decoder']} decoder's attention would run on the CPU): use --precision "
                          "fp16 or decoder=fp16, or --device cpu")
    return True


def stage_notes(cfg, stage: str, moe_form: str = "dense") -> dict:
    """Manifest fields that say how a stage computes the model's variants (onnx and trt bundles)."""
    from edgemm.config import cross_image_ids
    c, out = cfg.decoder, {}
    if stage.startswith("decoder") and c.n_experts:
        how = {"ort-moe": "com.microsoft MoE (softmax, top-k and the chosen experts in the op)",
               "ort-qmoe4": "com.microsoft QMoE: int4 experts, block 32, fp32 activations (widths off the blocks: MoE)",
               }.get(moe_form, "standard ops: every expert computed, weighted by the sparse top-k gate")
        out["moe"] = {"form": moe_form, "experts": c.n_experts, "top_k": c.experts_top_k, "how": how}
    if c.cross_attn_every and stage in ("cross_kv", "decoder_text"):
        out["cross_attention"] = (
            "cross_kv: image_rows [1, n, W] (the vision stage's resampled rows) -> cross_key.j / cross_value.j "
            "[1, heads, n, head_dim] per gated cross-attention layer j, run once per image" if stage == "cross_kv" else
            "inputs cross_key.j / cross_value.j (the current image's, kept by the runtime beside the KV cache) and "
            "cross_gate [1, seq, 1] (1 where the row reads the image: from its <image> token on, none after "
            f"token {c.cross_attn_reset_token}); an image segment is its tokens {cross_image_ids(c)} (fake, "
            "<image>, fake: the first fed with the previous image's K/V, the others with the new image's)")
    if stage == "image_tokens":
        out["input"] = ("Libra image tokens: codes [batch, rows, codebooks] (+ signal [batch, rows, signal_size]) "
                        "-> image rows (LibraImageInput); Libra's VQ image tokenizer and CLIP signal encoder are "
                        "not imported, so there is no pixel stage")
    if stage == "decoder_text" and c.eoi_branch == "text":
        out["eoi_row"] = ("the image segment's eoi row runs here (CogVLM's original routing): input_ids empty, "
                          "input_rows = the eoi row; text segments feed input_rows with 0 rows")
    if stage == "decoder_image" and c.eoi_branch == "text":
        out["eoi_row"] = "not here: all image rows but the last (eoi) one, which decoder_text takes as input_rows"
    if stage.startswith("decoder") and c.cross_modal_bridge:
        out["bridge"] = ("Libra's cross-modal K/V bridge: the cache holds 2 * kv_heads heads per layer, [0, K) as "
                         "text queries read the rows, [K, 2K) as vision queries do; every segment writes both "
                         "versions of its rows and attends over its own modality's half")
    return out


VIDEO_NOTE = ("frames [F, 3, S, S] -> rows [1, F * R, D]: each frame's patch grid pooled between the tower and the "
              "connector (LLaVA-NeXT-Video's vision_resampler)")


def video_stage(m, out: Path, fp16: bool = False) -> dict:
    """LLaVA-NeXT-Video's `video` stage (edgemm.model.encode_video: the frames' patch grids pooled between the
    tower and the connector) traced into out/video.onnx (fp32, or fp16 matrices) -> its manifest entry. It belongs to
    the `vision` precision group: quantized beside the vision stage, on statistics of its own (edgemm.calib.stats
    runs each calibration image through it as a one-frame clip: the pooled rows the connector sees differ from an
    image's)."""
    import onnx
    g, nbytes = vision_graph(m, fp16, video=True)
    st = {"file": "video.onnx", "graph": GRAPH_STANDARD, "precision": "fp16" if fp16 else "fp32", "compute": "fp32",
          "weights": "fp16 matrices, cast to fp32 in the graph; fp32 compute" if fp16 else "fp32", "note": VIDEO_NOTE}
    extra = save_stage(g, out / "video.onnx", nbytes)
    onnx.checker.check_model(str(out / "video.onnx"))
    st["inputs"], st["outputs"] = io_spec(g)
    return {**st, **({"extra_files": extra} if extra else {})}


def stage_precision(precision: dict, stage: str) -> str:
    """The precision a stage was exported at: its --precision group's (the video stage: the vision group's)."""
    return precision[group(stage)]


def check_variants(cfg, where: str, precision: dict, target: str = "onnx") -> None:
    """Refuse what the onnx / trt graphs cannot compute, naming the variant (and who can): the support matrix."""
    v = support.refusal(cfg, target)
    if v is not None:
        raise UnsupportedVariant(v, where, support.targets_that_can(v, exclude=target))
    reasons = support.unquantized_only(cfg)
    if reasons and set(precision.values()) & set(QUANTIZED):
        raise EdgemmError(f"{where}: {reasons[0]}; export fp32 or fp16 (trt: fp16)")


def _precisions(precision, allowed=PRECISIONS, default: str = "fp32", target: str = "onnx") -> dict:
    """None | "p" | {"vision": p, "decoder": p} -> {"vision": p, "decoder": p}, each one of `allowed`."""
    if precision is None:
        precision = default
    if isinstance(precision, str):
        precision = {"vision": precision, "decoder": precision}
    out = {"vision": precision.get("vision", default), "decoder": precision.get("decoder", default)}
    for stage, p in out.items():
        if p not in allowed:
            raise EdgemmError(f"--precision {p} ({stage}) is not available for --target {target}; choose one of "
                              f"{', '.join(allowed)}")
    return out


# --------------------------------------------------------------------------- validation
def validate_bundle(model, bundle: Path, precision: dict, seed: int | None = None, threads: int | None = None,
                    decode_steps: int = 8, calib_items=None) -> dict:
    """Run each stage of `bundle` in ONNX Runtime (CPU) against the reference on fresh random inputs.

    -> {stage: {max_abs_err, cosine, ref_max_abs, compared, tolerance, ok}}; the decoder runs a
    text + image + text prompt (random ids, image rows near the reference's), then greedy decode steps,
    comparing the logits after every segment/step (edgemm.export.validate). calib_items (quantized bundles:
    edgemm.export.validate.check_items, the calibration set's held-out part): the prompt is a held-out item's image
    and question instead, its greedy answer compared up to </s> (int8's static activation scales are fitted to such
    prompts; on random ids 8 of 20 seeds failed the shipped model). Judged by edgemm.export.thresholds.
    """
    import torch
    from edgemm.export.thresholds import judge
    from edgemm.runtimes.ort_backend import OrtBackend
    cfg = model.cfg
    seed = 0 if seed is None else seed              # reproducible: the same export checks the same inputs
    gen = torch.Generator().manual_seed(seed)
    b = OrtBackend.open(bundle=str(bundle), device="cpu", threads=threads, verify=False, slots=1 + BATCH_CHECK)
    if calib_items:                     # a real prompt: its image and question, greedy steps up to </s>
        ins, hw, q = real_prompt(calib_items, seed, cfg, b.tokenizer, gen)
        ref = TorchReference(model, 1 + len(q) + cfg.n_image_rows + decode_steps + 2)
        segments, stop = [("text", b.tokenizer.prefix_ids()), ("image", None), ("text", q)], b.tokenizer.eos_id
    else:                               # random ids around image rows near the reference's
        ins, tiles = validation_inputs(cfg, gen)
        ref = TorchReference(model, 2 * 6 + cfg.n_image_rows + decode_steps + 2)
        rows = ref.input_stage(ins)
        if tiles is not None:           # any-resolution tiling: the tiles' rows packed as the host packs them
            from edgemm.anyres import pack, row_index
            rows = pack(rows, ref.image_newline(), row_index(cfg.vision, *tiles))
        rows = torch.from_numpy(rows)
        img = (torch.randn(rows.shape, generator=gen) * rows.std() + rows).numpy()
        ids = [random_ids(b.tokenizer, cfg.decoder.vocab_size, 6, gen) for _ in range(2)]
        segments, stop, hw = [("text", ids[0]), ("image", img), ("text", ids[1])], None, None
    res = run_prompt(ref, b, cfg, ins, segments, decode_steps, stop_id=stop, image_hw=hw)
    if b.batched:
        res["decoder_batch"] = validate_batch(model, b, gen, against_backend=bool(calib_items))
    if cfg.video_stage:                 # LLaVA-NeXT-Video's pooled frames
        res["video"] = check_video(model, b, gen, seed, calib_items)
    out = summarize(res, lambda s: stage_precision(precision, s), lambda *a: judge("onnx", *a))
    out["_seed"] = seed
    return out


BATCH_CHECK = 3                     # KV caches the batched decode check steps at once


class _Alone:
    """The backend under test stepping one cache of its own (not a pool row): a quantized bundle's batched decode
    is checked against its own one-at-a-time steps (the same int8 numbers, so what differs is the batching alone;
    decoder_text measures the quantization error on a real prompt)."""

    def __init__(self, b, n):
        self.b, self.st = b, b.new_state(max_len=n)

    def segment(self, kind, ids):
        return self.b.text(self.st, ids)


def validate_batch(model, b, gen, steps: int = 4, against_backend: bool = False) -> list:
    """decode_batch over BATCH_CHECK KV caches of different lengths (rows of the backend's one buffer per layer)
    against the reference run on each cache alone (against_backend: the backend itself, _Alone) -> compare rows
    (edgemm.export.validate.compare)."""
    import numpy as np
    import torch
    from edgemm.export.validate import compare
    lens = [3 + 2 * i for i in range(BATCH_CHECK)]
    sts = [b.new_state(max_len=max(lens) + steps + 1) for _ in lens]
    refs = [_Alone(b, n + steps + 1) if against_backend else TorchReference(model, n + steps + 1) for n in lens]
    if not all(b.pooled(st) for st in sts):
        raise EdgemmError("internal: the batched decode check did not get rows of the backend's KV pool")
    toks = []
    for ref, st, n in zip(refs, sts, lens):
        ids = random_ids(b.tokenizer, model.cfg.decoder.vocab_size, n, gen)
        b.text(st, ids)
        toks.append(int(np.argmax(ref.segment("text", ids))))
    rows = []
    for _ in range(steps):
        got = b.decode_batch(sts, toks)
        want = [ref.segment("text", [t]) for ref, t in zip(refs, toks)]
        rows += [compare(w, o) for w, o in zip(want, got)]
        toks = [int(np.argmax(w)) for w in want]
    for st in sts + [r.st for r in refs if isinstance(r, _Alone)]:
        b.release(st)
    return rows


# --------------------------------------------------------------------------- the exporter
def export_onnx(model=None, out=None, precision=None, force: bool = False, calib=None, no_build: bool = False,
                log=print, threads: int | None = None, seed: int | None = None, keep_sensitive: float | None = None,
                stats=None, recipes: dict | None = None, moe_form: str | None = None,
                max_tiles: int | None = None, device: str = "cpu") -> dict:
    """Export `model` (a --model spec, or a (model, tokenizer) pair) to an ONNX bundle at `out`. max_tiles: the
    bundle's default tile budget (any-resolution models; edgemm.anyres).
    device: the ONNX Runtime provider the bundle is for. "cuda" with an fp16 decoder writes fp16 compute decoder
    graphs (fp16 activations, GroupQueryAttention and KV cache: ONNX Runtime's CUDA GroupQueryAttention is fp16/bf16
    only, an fp32 one would run on the CPU) and, with an fp16 vision stage, an fp16 compute vision graph; "cpu" keeps
    fp16 weights behind a Cast with fp32 compute.
    moe_form: how MoE layers are written (edgemm.export.graph.MOE_FORMS; default the faster on the CPU).

    Returns the manifest. Raises EdgemmError (and leaves no bundle) when validation fails.
    """
    import onnx
    import torch
    from edgemm.bundle import bundle_writer, check_out, tool_versions, write_manifest
    log = log or (lambda s: None)
    if not out:
        raise EdgemmError("-o OUT is required: the bundle directory to write")
    out = Path(out)
    check_out(out, force)
    prec = _precisions(precision)
    if calib is not None and not set(prec.values()) & set(QUANTIZED):
        log("note: --calib is not used by fp32/fp16 onnx exports")
    m, tok, source = _load_source(model)
    m = m.float().cpu().eval()
    cfg = m.cfg
    from edgemm.tilings import set_max_tiles
    set_max_tiles(cfg, max_tiles)               # --max-tiles: the bundle's default (any-resolution models)
    check_variants(cfg, "the onnx exporter", prec)
    half = _half_for(device, prec)
    if moe_form is not None and not cfg.decoder.n_experts:
        log("note: --moe-form is not used: this model has no mixture-of-experts layers")
    moe_form = moe_form or ("ort-qmoe4" if prec["decoder"] == "int4" else MOE_DEFAULT[GRAPH_GQA])
    if moe_form == "ort-qmoe4" and prec["decoder"] != "int4":
        raise EdgemmError("the ort-qmoe4 MoE form (int4 experts) goes with --precision decoder=int4")
    t0 = time.time()
    with bundle_writer(out, force) as tmp, torch.inference_mode():
        stages = {}
        vision_half = device == "cuda" and prec["vision"] == "fp16"      # (the vision stage: any model)
        vm, vbytes = vision_graph(m, prec["vision"] == "fp16", half=vision_half)
        graphs = {cfg.input_stage: (vm, vbytes, GRAPH_STANDARD, prec["vision"], None)}
        if "cross_kv" in cfg.stages:                    # gated cross-attention: K/V of an image, once per image
            from edgemm.export.decoder_graph import cross_kv_graph
            graphs["cross_kv"] = (*cross_kv_graph(m, prec["decoder"] == "fp16", half), GRAPH_STANDARD, prec["decoder"],
                                  None)
        batch = decode_batch_supported(cfg, moe_form)        # decoder_text steps several KV caches at once
        for branch in [b for b in ("text", "image") if f"decoder_{b}" in cfg.stages]:
            dm, dbytes = decoder_graph(m, "text" if branch == "text" else "vision", GRAPH_GQA,
                                       prec["decoder"] == "fp16", moe_form=moe_form, batch=batch and branch == "text",
                                       half=half)
            graphs[f"decoder_{branch}"] = (dm, dbytes, GRAPH_GQA, prec["decoder"],
                                           "text" if branch == "text" else "vision")
        heads = "2 * kv_heads" if cfg.decoder.cross_modal_bridge else "kv_heads"
        for stage, (g, nbytes, flavour, p, branch) in graphs.items():
            fname = f"{stage}.onnx"
            extra = save_stage(g, tmp / fname, nbytes)
            onnx.checker.check_model(str(tmp / fname))           # path form: works with external data
            ins, outs = io_spec(g)
            fp16_compute = (half and (branch is not None or stage == "cross_kv")) or \
                (vision_half and stage == cfg.input_stage)
            st = {"file": fname, "graph": flavour, "precision": p, "inputs": ins, "outputs": outs,
                  "weights": ("fp16; fp16 compute (RMSNorm statistics in fp32), fp32 logits" if branch else
                              "fp16; fp16 compute, fp32 image rows in, fp16 cross K/V out" if stage == "cross_kv"
                              else "fp16; fp16 compute (traced from an fp16 copy of the reference), fp32 in and out")
                  if fp16_compute else "fp16 matrices, cast to fp32 in the graph; fp32 compute" if p == "fp16" else "fp32",
                  "compute": "fp16" if fp16_compute else "fp32"}
            if extra:
                st["extra_files"] = extra
            if branch:
                st["branch"] = branch
                B = "batch" if batch and branch == "text" else 1
                st["kv_cache"] = {"layout": f"BNSH [{B}, {heads}, cache_len, head_dim] per layer",
                                  "dtype": "float16" if fp16_compute else "float32", "shared_past_present": True,
                                  "inputs": "past_key.i / past_value.i", "outputs": "present_key.i / present_value.i",
                                  "seqlens_k": "rows filled after this call - 1",
                                  "total_sequence_length": "rows filled after this call"}
                if B != 1:
                    st["batch"] = BATCH_NOTE
            stages[stage] = {**st, **stage_notes(cfg, stage, moe_form)}
            del g
        graphs.clear()
        if cfg.video_stage:                 # LLaVA-NeXT-Video's pooled frames: quantized with the vision group
            stages["video"] = video_stage(m, tmp, prec["vision"] == "fp16")
        from edgemm.calib.apply import quantize_bundle_stages     # quantized precisions (no-op for fp32/fp16)
        calibration = quantize_bundle_stages(tmp, stages, prec, m, tok, calib=calib, stats=stats, log=log,
                                             keep_sensitive=keep_sensitive, model_digest=source["digest"],
                                             recipes=recipes)
        tok.save(tmp / "tokenizer.json")
        from edgemm.qformer import bundle_fields
        qformer = bundle_fields(tok, tmp, cfg)                  # InstructBLIP: its Q-Former tokenizer
        from edgemm.checkpoint import chat_template_for
        (tmp / "chat_template.jinja").write_text(chat_template_for(model))
        manifest = {"target": "onnx", "model": cfg.to_dict(), "source": source, "variants": cfg.variants(),
                    "reference": {"model": source["model"], "digest": source["digest"],
                                  "backend": "torch (edgemm.model)"},
                    "precision": prec, "stages": stages, "tokenizer": "tokenizer.json",
                    "chat_template": "chat_template.jinja",
                    "tools": tool_versions("onnx", "onnxruntime"), "opset": {"": OPSET, "com.microsoft": 1},
                    "device": device,
                    **qformer}
        if calibration:
            manifest["calibration"] = calibration
        from edgemm.export.kv_scales import fit_kv_scales
        kv8 = fit_kv_scales(m, tok, calib)               # the ort backend's --kv-cache int8 (runtimes/ort_kv.py)
        if kv8:
            manifest["kv_cache_int8"] = kv8
        if cfg.vision.grid_pinpoints:
            from edgemm.anyres import manifest_fields
            manifest["anyres"] = manifest_fields(m)
        write_manifest(tmp, manifest)
        log(f"exported {', '.join(stages)} in {time.time() - t0:.1f}s; validating against the reference ...")
        items = check_items(m, tok, calib) if set(prec.values()) & set(QUANTIZED) else None
        figures = validate_bundle(m, tmp, prec, seed=seed, threads=threads, calib_items=items)
        log(format_validation(figures))
        from edgemm.export.validate import raise_failure
        raise_failure(figures)              # one line naming the stage to blame
        from edgemm.export.thresholds import used
        seed = figures.pop("_seed")
        manifest["validation"] = {"reference": f"edgemm.model (PyTorch {torch.__version__}, fp32, CPU)",
                                  "source_digest": source["digest"],
                                  **(items.record(seed) if items else random_record(seed, cfg.input_stage)),
                                  "seed": seed, "thresholds": used("onnx", lambda s: stage_precision(prec, s), figures),
                                  "stages": figures}
        if "decoder_batch" in figures:          # not a stage: decoder_text's batched step (validate_batch)
            manifest["validation"]["decode_batch"] = {**figures.pop("decoder_batch"), "states": BATCH_CHECK}
        result = write_manifest(tmp, manifest)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB)")
    return result

