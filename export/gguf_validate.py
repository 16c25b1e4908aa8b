"""The validation of a GGUF bundle against the reference model: its files run in llama.cpp, next-token logits
compared with the reference for a text-only and an image prompt, the mmproj's image rows (through llama.cpp's mtmd)
with the reference vision stage, and the fidelity of the decoder's type (KL, top-1 agreement) on a fixed prompt
set. It raises when a figure is off its bound."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError
from edgemm.export.gguf_llava_cls import CLS_ORDER_WARNING, mtmd_cls_order_defect
from edgemm.export.thresholds import TABLE, bound, bounds

VALIDATION_QUESTION = "what color is the circle?"
# The bounds below are read from edgemm.export.thresholds (target "gguf"), the one table of every export check.
GGUF = [p for t, p in TABLE if t == "gguf"]
# validation tolerances on next-token logits (max abs) by decoder precision; absent: report only
LOGIT_TOL = {p: v for p in GGUF if (v := bound("gguf", p, "logits", "max_abs")) is not None}
ROWS_TOL = {p: v for p in GGUF if (v := bound("gguf", p, "vision", "max_abs")) is not None}
# The mmproj run through mtmd: ggml's CPU GELU reads an fp16 table (GGML_GELU_FP16), so image rows from llama.cpp
# differ from the reference at ~1e-3 relative on trained weights (measured 6.6e-3 max abs on tiny-shapes rows,
# 2.2e-3 on the logits that follow). Checked relative to the rows' scale, and the logits at MTMD_LOGIT_TOL;
# the decoder itself (reference rows in an embd batch) keeps the strict LOGIT_TOL.
MTMD_ROWS_RTOL = bound("gguf", "f32", "mtmd_rows", "max_abs_rel")
MTMD_LOGIT_TOL = bound("gguf", "f32", "mtmd_logits", "max_abs")
# Fidelity of every decoder type on a fixed prompt set (fidelity_questions about the validation image, reference
# image rows, at most FIDELITY_STEPS greedy steps teacher-forced with the reference's tokens, ending where the
# reference ends its answer): mean KL(reference || llama.cpp) of the next-token distributions and top-1 agreement.
# Bounds: a working quantization is far inside them (tiny-shapes: see the note of the issue that set them), a broken
# tensor (zeroed scales) far outside. On a shapes scene the questions are the ones the model was trained to answer
# about it (shapes.all_questions); the generic set asked of a shapes model what it never saw (a yes/no question,
# a shape not in the scene) and went on past the answer's end, where a model's next-token distribution is
# arbitrary: on tiny-shapes-outliers (kquant) two such positions of 30 made most of the mean (issue 33).
FIDELITY_QUESTIONS = ("what color is the circle?", "how many shapes are there?", "where is the red square?",
                      "what shape is at the top left?", "what color is the triangle?", "is there a blue cross?")
FIDELITY_STEPS = 4
FIDELITY_KL = {p: bound("gguf", p, "fidelity", "mean_kl") for p in GGUF}
# top-1 agreement is gated where the reference is sure (top-1 probability ahead of the second by FIDELITY_MARGIN):
# a flip between near-tied tokens (random-weight models have flat logits) is reported, not a failure
FIDELITY_TOP1 = {p: bound("gguf", p, "fidelity", "top1_confident") for p in GGUF}
FIDELITY_MARGIN = 0.2
# A quantized mmproj (no max-abs bound: q8_0 / q4_0 vision) is held to the cosine of its mtmd rows with the
# reference rows (mean removed: edgemm.export.validate.compare), a sanity bound under what a working one gives
# (tiny-shapes q8_0: 0.9999) and far above a broken one (the projector's down weight sign-flipped: -1; before
# this bound such an mmproj passed, its rows judged only at f32). By vision type, from edgemm.export.thresholds.
MMPROJ_COS = {p: v for p in GGUF if (v := bound("gguf", p, "mtmd_rows", "cosine")) is not None}


def validation_image(cfg) -> np.ndarray:
    """A fixed test image at the tower's size (mtmd and edgemm then see the same pixels): a shapes scene when the
    tower is the shapes size, else seeded noise (validation_image_source says which, and why)."""
    return validation_image_source(cfg)[0]


def validation_scene(cfg):
    """The shapes test scene the checks show a tower of the shapes' size (any-size Qwen2-VL towers excepted), else
    None."""
    from edgemm import shapes
    if cfg.vision.tiling == "qwen2vl" or cfg.vision.image_size != shapes.IMAGE_SIZE:
        return None
    return shapes.scene_at("test", 0)


def validation_image_source(cfg) -> tuple[np.ndarray, str]:
    """-> (validation_image, what it is: "a shapes test scene", or "seeded noise (why)")."""
    s = cfg.vision.image_size
    if cfg.vision.tiling == "qwen2vl":          # any size: a 4 x 3 grid of merged cells, at the host's own size
        from edgemm.qwen2vl_pixels import factor, smart_resize
        h, w = smart_resize(cfg.vision, 3 * factor(cfg.vision), 4 * factor(cfg.vision))
        return (np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8),
                f"seeded noise ({w}x{h}: Qwen2-VL's tower takes any size, rows at 2-D M-RoPE positions)")
    try:
        from edgemm import shapes
        scene = validation_scene(cfg)
        if scene is not None:
            return shapes.render(scene), "a shapes test scene"
        why = f"the vision tower takes {s} px, the shapes scenes are {shapes.IMAGE_SIZE} px"
    except Exception as e:
        why = f"the shapes scene did not render: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8), f"seeded noise ({why})"


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def put_image(run, cfg, rows, pos0: int, grid=None) -> int:
    """An image's rows [1, n, D] (or [n, D]) into llama.cpp at pos0, as edgemm's llamacpp backend puts them: at
    sequential positions, or with M-RoPE at (p, p + i, p + j) over the grid `grid` carries (default: `rows`';
    qwen2vl_pixels.GridRows). -> the position of the text after it."""
    a = rows[0] if rows.ndim == 3 else rows
    a = a.numpy() if hasattr(a, "numpy") else np.asarray(a)
    if not cfg.decoder.mrope_section:
        run.decode_embd(a, pos0, bidirectional=cfg.decoder.image_bidirectional)
        return pos0 + a.shape[0]
    from edgemm.qwen2vl_pixels import image_positions
    pos = image_positions(pos0, rows if grid is None else grid)
    run.decode_embd(a, pos0, positions=pos)
    return int(pos.max()) + 1


def fidelity_questions(cfg) -> tuple[str, ...]:
    """The fidelity prompts: on the shapes test scene (validation_scene) every question the shapes templates ask of
    it, else FIDELITY_QUESTIONS."""
    scene = validation_scene(cfg)
    if scene is None:
        return FIDELITY_QUESTIONS
    from edgemm import shapes
    return tuple(q.question for q in shapes.all_questions(scene))


def fidelity(model, tok, run, rows_ref) -> dict:
    """Mean KL(reference || llama.cpp) and top-1 agreement of next-token distributions on the fixed prompt set
    (bos, the reference's image rows, each of fidelity_questions, then at most FIDELITY_STEPS reference-greedy
    steps: none after the reference's end of answer)."""
    import torch
    from edgemm.model import KVCache
    cfg = model.cfg
    kls, agree, pre = [], [], tok.prefix_ids()       # pre: [bos], or [] (a tokenizer that prepends nothing)
    questions = fidelity_questions(cfg)
    for q in questions:
        q_ids = tok.user_turn(q, first=True)
        cache, pos = KVCache.empty(cfg.decoder, 1), 0
        with torch.inference_mode():
            for kind, data in (("text", torch.tensor([pre])), ("image", rows_ref),
                               ("text", torch.tensor([q_ids]))):
                if len(data[0]):
                    r, pos = model.forward_segment(kind, data, cache, pos)
        run.clear()
        if pre:
            run.decode_tokens(pre, 0)
        p = put_image(run, cfg, rows_ref, len(pre))
        g = run.decode_tokens(q_ids, p)
        n = p + len(q_ids)
        for step in range(FIDELITY_STEPS + 1):
            rl = r[0, -1].float().numpy()
            lp, lq = _log_softmax(rl), _log_softmax(g)
            kls.append(float(np.sum(np.exp(lp) * (lp - lq))))
            top2 = np.sort(np.exp(lp))[-2:]
            agree.append((int(rl.argmax() == g.argmax()), bool(top2[1] - top2[0] > FIDELITY_MARGIN)))
            t = int(rl.argmax())
            if step == FIDELITY_STEPS or tok.is_eos(t):
                break
            with torch.inference_mode():
                r, pos = model.forward_segment("text", torch.tensor([[t]]), cache, pos)
            g = run.decode_tokens([t], n)
            n += 1
    sure = [a for a, confident in agree if confident]
    return {"prompts": len(questions), "positions": len(kls), "mean_kl": float(np.mean(kls)),
            "max_kl": float(np.max(kls)), "kl_per_position": [round(k, 4) for k in kls],
            "top1": float(np.mean([a for a, _ in agree])),
            "confident_positions": len(sure), "top1_confident": float(np.mean(sure)) if sure else None}


def gguf_failure(bad: list, decoder: str, mmproj: str) -> str:
    """One line naming the stage of each failed figure ("decoder: ..." / "vision: ..."); the logits after mtmd's
    rows run the decoder too, so a vision figure is named only where the decoder's own figures pass."""
    by: dict[str, list] = {}
    for b in bad:
        stage, _, what = b.partition(": ")
        by.setdefault(stage, []).append(what)
    if "decoder" in by and "vision" in by and all(w.startswith("image_mtmd") for w in by["vision"]):
        del by["vision"]
    files = {"decoder": decoder, "vision": mmproj}
    return "GGUF validation failed for " + ", ".join(f"{s} ({files[s]}: {'; '.join(w)})" for s, w in by.items())


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def _llava_rows_check(model, mmproj, pixels, hw, rows_ref, rows_mt, out: dict, log, run=None):
    """A LLaVA (or SmolVLM) mmproj's image rows: the mmproj's weights through the reference code (what the backend
    falls back to; SmolVLM's marker rows from the decoder `run`) against the reference, and mtmd's rows, diagnosed.
    -> mtmd's rows, or None where not comparable."""
    import torch
    from edgemm.runtimes.llamacpp_runner import markers
    from edgemm.runtimes.gguf_vision import reference_vision_from_mmproj
    tower, proj = reference_vision_from_mmproj(mmproj, model.cfg, markers(model.cfg, run) if run else None)
    px = torch.from_numpy(np.asarray(pixels))
    with torch.inference_mode():
        rows_rc = proj(tower(px))
        if hasattr(pixels, "pack_rows"):            # SmolVLM: the image's rows gathered from the table
            rows_rc, hw = pixels.pack_rows(rows_rc, model.cfg), pixels.grid
        elif hw is not None:
            from edgemm.anyres import pack, row_index
            rows_rc = pack(rows_rc, proj.image_newline, row_index(model.cfg.vision, *hw))
    ref = rows_ref[0].numpy()
    out["vision_rows_reference_code_max_abs"] = float(np.max(np.abs(rows_rc[0].numpy() - ref)))
    if hw is not None:
        # mtmd tiles and packs LLaVA-NeXT / SmolVLM images itself (its own resize and grid rules): its rows are
        # reported, not compared, and the backend packs the reference code's tile rows on the host
        out["mtmd_rows"], out["reference_rows"] = int(rows_mt.shape[0]), int(ref.shape[0])
        out["vision_rows_max_abs"] = None
        out["mtmd_cls_order_defect"] = None
        log(f"note: mtmd tiled the validation image into {rows_mt.shape[0]} rows (edgemm/transformers: "
            f"{ref.shape[0]}); tiled bundles run mtmd-free in edgemm's llamacpp backend")
        return None
    out["vision_rows_max_abs"] = float(np.max(np.abs(rows_mt - ref)))
    out["mtmd_cls_order_defect"] = mtmd_cls_order_defect(model, pixels, rows_mt, out["vision_rows_max_abs"],
                                                         MTMD_ROWS_RTOL * max(1.0, out["vision_rows_scale"]))
    if out["mtmd_cls_order_defect"]:
        log(CLS_ORDER_WARNING)
    return rows_mt


def _mtmd_rows(model, tok, mmproj, run, threads, img, pixels, hw, rows_ref, llava: bool, out: dict, log):
    """The mmproj through llama.cpp's mtmd -> its image rows (LLaVA's diagnosed: _llava_rows_check)."""
    from edgemm.runtimes.llamacpp_runner import MtmdVision, image_bounds
    qwen = model.cfg.vision.tiling == "qwen2vl"         # (any size: mtmd keeps the host's; its rows compared below)
    if qwen:
        from edgemm.qwen2vl_pixels import max_rows
    mt = MtmdVision(mmproj, run, threads, around=image_bounds(model.cfg, tok, run),
                    max_rows=max_rows(model.cfg) if qwen else 0)
    try:
        rows_mt = mt.encode_rgb(img)
    finally:
        mt.close()
    if (llava or hasattr(pixels, "pack_rows")) and not qwen:
        return _llava_rows_check(model, mmproj, pixels, hw, rows_ref, rows_mt, out, log, run)
    out["vision_rows_max_abs"] = float(np.max(np.abs(rows_mt - rows_ref[0].numpy())))
    return rows_mt


def _onnx_rows_check(model, path: Path, pixels, hw, rows_ref, vprec: str, threads: int, out: dict):
    """An ONNX vision stage's rows, run as edgemm's llamacpp backend runs it (OnnxVision), against the reference
    (judged by the onnx rows of edgemm.export.thresholds at its precision). -> its rows [rows, D]."""
    from edgemm.export.thresholds import judge
    from edgemm.export.validate import compare
    from edgemm.runtimes.gguf_vision import OnnxVision
    from edgemm.anyres import CONFIG, Tiles
    from edgemm.tilings import encode_pixels

    class Host:                         # the llamacpp backend's host path (encode_pixels) over OnnxVision
        cfg, vision = model.cfg, OnnxVision(str(path), model.cfg, threads).rows

        @staticmethod
        def image_newline():
            return model.adapter.image_newline.detach().float().numpy()
    if hw is not None:                  # any-resolution tiles: packed on the host, as the backend's host does
        pixels = np.asarray(pixels).view(Tiles)
        pixels.hw, pixels.max_tiles = tuple(hw), CONFIG
    rows = np.asarray(encode_pixels(Host, pixels))
    ref = rows_ref[0].numpy()
    err, cos = compare(ref, rows[0])[:2]
    text, ok = judge("onnx", "vision", vprec, err, cos, out["vision_rows_scale"])
    out["vision_rows_max_abs"], out["vision_rows_cosine"] = err, cos
    out["vision_onnx"] = {"figures": f"max abs {err:.2e}, cosine {cos:.6f}", "bound": text, "ok": bool(ok),
                          "runs_with": "onnxruntime CPU provider (OnnxVision)"}
    return rows[0]


def validate(model, tok, decoder: Path, mmproj: Path, precision: dict, threads: int, llava: bool, log=print,
             strict: bool = True) -> dict:
    """Run the files in llama.cpp and compare with the reference. llava: the files are llama.cpp's llama / qwen2
    decoder + an mlp mmproj (their image rows are diagnosed: _llava_rows_check). mmproj may be an ONNX vision stage
    (`.onnx`: run in ONNX Runtime, _onnx_rows_check; vision precision an onnx one). -> figures (raises when f32/f16
    are off)."""
    import torch
    from edgemm.model import KVCache
    from edgemm.runtimes.llamacpp_runner import LlamaRunner
    cfg = model.cfg
    dprec, vprec = precision["decoder"], precision["vision"]
    q_ids = tok.user_turn(VALIDATION_QUESTION, first=True)
    img, img_what = validation_image_source(cfg)
    if img_what.startswith("seeded noise"):
        log(f"note: the GGUF validation image is {img_what}: llama.cpp is checked against the reference on noise, "
            "not on a scene")
    anyres = bool(cfg.vision.grid_pinpoints)
    if anyres:                      # LLaVA-NeXT: the tiles of the image, packed by the host (edgemm.anyres)
        from edgemm.anyres import preprocess_tiles
        pixels, hw = preprocess_tiles(img, cfg.vision)
    else:                           # (SmolVLM's GridTiles: the host's tiles, gathered by pack_rows)
        from edgemm.tilings import preprocess_image
        pixels = preprocess_image(img, cfg.vision)

    with torch.inference_mode():
        rows_ref = (model.encode_image_tiled(torch.from_numpy(pixels), *hw) if anyres
                    else pixels.pack_rows(model.encode_image(torch.from_numpy(np.asarray(pixels))), cfg)
                    if hasattr(pixels, "pack_rows")
                    else pixels.encode_with(lambda *a: model.encode_image(*map(torch.from_numpy, a)), cfg)
                    if hasattr(pixels, "encode_with")        # LLaVA-UHD: a vision call per size (its slices, source)
                    else model.encode_image(torch.from_numpy(pixels)))  # [1, rows, D]
        n_rows = rows_ref.shape[1]

        def ref(segs):
            cache, pos, logits = KVCache.empty(cfg.decoder, 1), 0, None
            for kind, data in segs:
                logits, pos = model.forward_segment(kind, data, cache, pos)
            return logits[0, -1].float().numpy()
        pre = tok.prefix_ids()                  # [bos], or [] (a tokenizer that prepends nothing: Qwen)
        text_ids = torch.tensor([pre + q_ids])
        ref_text = ref([("text", text_ids)])
        ref_img = ref(([("text", torch.tensor([pre]))] if pre else []) + [("image", rows_ref),
                                                                         ("text", torch.tensor([q_ids]))])

    f32_kv = dprec == "f32"
    run = LlamaRunner(decoder, cfg.decoder.max_seq_len, threads, n_batch=max(512, n_rows), f32_kv=f32_kv,
                      mrope=bool(cfg.decoder.mrope_section))
    try:
        out = {"kv_cache": run.kv_type, "flash_attention": False, "validation_image": img_what}
        # tokenization: llama.cpp's gpt2 BPE vs edgemm's
        prompts = [f"Q: {VALIDATION_QUESTION}\nA:", " red</s>", "\nQ: how many shapes are there?\nA:",
                   " bottom left", "Q: Is there a  Purple cross?!\nA:"]
        out["tokenization_equal"] = all(run.tokenize(p, parse_special=True) == tok.encode(p) for p in prompts)
        lt = run.decode_tokens(pre + q_ids, 0)
        out["text_max_abs"] = float(np.max(np.abs(lt - ref_text)))
        out["text_top1_equal"] = bool(lt.argmax() == ref_text.argmax())
        run.clear()
        if pre:
            run.decode_tokens(pre, 0)
        li = run.decode_tokens(q_ids, put_image(run, cfg, rows_ref, len(pre)))
        out["image_max_abs"] = float(np.max(np.abs(li - ref_img)))
        out["image_top1_equal"] = bool(li.argmax() == ref_img.argmax())
        out["vision_rows_scale"] = float(np.max(np.abs(rows_ref[0].numpy())))
        if mmproj.suffix == ".onnx":            # an ONNX vision stage: ONNX Runtime beside llama.cpp
            rows_mt = _onnx_rows_check(model, mmproj, pixels, hw if anyres else None, rows_ref, vprec, threads, out)
        else:                                   # the mmproj through llama.cpp's mtmd
            rows_mt = _mtmd_rows(model, tok, mmproj, run, threads, img, pixels, hw if anyres else None, rows_ref, llava,
                                 out, log)
        if rows_mt is not None and not out.get("mtmd_cls_order_defect") and "vision_rows_cosine" not in out:
            from edgemm.export.validate import compare
            out["vision_rows_cosine"] = compare(rows_ref[0].numpy(), rows_mt)[1]
        if rows_mt is not None:
            run.rewind(len(pre))
            le = run.decode_tokens(q_ids, put_image(run, cfg, rows_mt, len(pre), grid=rows_ref))
            out["image_mtmd_max_abs"] = float(np.max(np.abs(le - ref_img)))
            out["image_mtmd_top1_equal"] = bool(le.argmax() == ref_img.argmax())
        else:                       # not compared (any-resolution: mtmd tiles by its own rules)
            out["image_mtmd_max_abs"], out["image_mtmd_top1_equal"] = None, None
        out["fidelity"] = fidelity(model, tok, run, rows_ref)
    finally:
        run.close()
    fid = out["fidelity"]
    conf = fid["top1_confident"]
    via = "ONNX Runtime" if "vision_onnx" in out else "mtmd"        # (image_mtmd_*: the vision stage's rows)
    log(f"validate: fidelity on {fid['prompts']} prompts, {fid['positions']} positions: mean KL "
        f"{fid['mean_kl']:.2e} (bound {FIDELITY_KL[dprec]:g}), top-1 agreement {fid['top1']:.3f}, where the "
        f"reference is sure ({fid['confident_positions']} positions) "
        + (f"{conf:.3f}" if conf is not None else "n/a") + f" (bound {FIDELITY_TOP1[dprec]:g})")
    log(f"validate: llama.cpp vs reference ({dprec} decoder, {vprec} vision, KV cache {out['kv_cache']}, "
        f"flash attention off): next-token logits max abs  text-only {out['text_max_abs']:.2e}  "
        f"image {out['image_max_abs']:.2e}  image via {via} {_fmt(out['image_mtmd_max_abs'])}; "
        f"{via} image rows max abs {_fmt(out['vision_rows_max_abs'])}; top-1 equal "
        f"{out['text_top1_equal'] and out['image_top1_equal'] and out['image_mtmd_top1_equal'] is not False}; "
        f"tokenization equal {out['tokenization_equal']}")
    bad = []
    if not out["tokenization_equal"]:
        bad.append("decoder: llama.cpp tokenizes the test prompts differently from edgemm")
    for k in ("text_max_abs", "image_max_abs", "image_mtmd_max_abs", "vision_rows_max_abs"):
        if out[k] is not None and not np.isfinite(out[k]):              # None: not compared (any-resolution)
            bad.append(f"{'vision' if k.startswith('vision') else 'decoder'}: {k} is not finite")
    if not fid["mean_kl"] <= FIDELITY_KL[dprec]:
        bad.append(f"decoder: mean KL {fid['mean_kl']:.3g} > {FIDELITY_KL[dprec]:g} on the fidelity prompts")
    if conf is not None and not conf >= FIDELITY_TOP1[dprec]:
        bad.append(f"decoder: top-1 agreement {conf:.3f} < {FIDELITY_TOP1[dprec]:g} where the reference is sure")
    tol = LOGIT_TOL.get(dprec)
    if tol is not None:
        for k in ("text_max_abs", "image_max_abs"):
            if out[k] > tol:
                bad.append(f"decoder: {k} {out[k]:.2e} > {tol:g}")
        if vprec in ROWS_TOL and dprec == "f32" and "mtmd_rows" not in out \
                and not out.get("mtmd_cls_order_defect") and out["image_mtmd_max_abs"] > MTMD_LOGIT_TOL:
            bad.append(f"vision: image_mtmd_max_abs {out['image_mtmd_max_abs']:.2e} > {MTMD_LOGIT_TOL:g}")
    if vprec in ROWS_TOL and out.get("vision_rows_reference_code_max_abs", 0.0) > ROWS_TOL[vprec]:
        bad.append(f"vision: vision_rows_reference_code_max_abs {out['vision_rows_reference_code_max_abs']:.2e} > "
                   f"{ROWS_TOL[vprec]:g}")
    if vprec in ROWS_TOL and not out.get("mtmd_cls_order_defect") and "mtmd_rows" not in out:
        rtol = MTMD_ROWS_RTOL * max(1.0, out.get("vision_rows_scale", 1.0))
        if out["vision_rows_max_abs"] > rtol:
            bad.append(f"vision: vision_rows_max_abs {out['vision_rows_max_abs']:.2e} > {rtol:.2e}")
    if "vision_onnx" in out and not out["vision_onnx"]["ok"]:
        bad.append(f"vision: the ONNX vision stage's rows ({out['vision_onnx']['figures']}) are off "
                   f"{out['vision_onnx']['bound']}")
    if vprec in MMPROJ_COS and out.get("vision_rows_cosine") is not None \
            and not out["vision_rows_cosine"] >= MMPROJ_COS[vprec]:
        bad.append(f"vision: mtmd image rows cosine {out['vision_rows_cosine']:.4f} < {MMPROJ_COS[vprec]:g}")
    out["tolerance"] = tol
    out["inputs"] = (f"validation image (validation_image), the question {VALIDATION_QUESTION!r} text-only and with "
                     f"the image; fidelity: {fid['prompts']} fixed questions, {fid['positions']} positions (at most "
                     f"{FIDELITY_STEPS + 1} a question, none past the reference's end of answer)")
    used = {k: bounds("gguf", vprec if k in ("vision", "mtmd_rows") else dprec, k)
            for k in ("logits", "fidelity", "vision", "mtmd_rows", "mtmd_logits")}
    out["thresholds"] = {k: ", ".join(b.text() for b in bs) for k, bs in used.items() if bs}      # the table's rows
    out["passed"] = not bad
    if bad and strict:
        raise EdgemmError(gguf_failure(bad, decoder.name, mmproj.name))
    if bad:                         # strict=False (a benchmark measuring what the check refuses): recorded
        out["refused"] = gguf_failure(bad, decoder.name, mmproj.name)
        log(f"validate: NOT PASSED, kept (strict=False): {out['refused']}")
    return out
