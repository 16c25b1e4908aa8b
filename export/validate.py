"""One validation for every ONNX-graph export (onnx, trt graphs, trt engines): a backend against a reference on
the same prompt, compared stage by stage, and the table the exporters print.

The prompt: the input stage on `ins`, then text, image and text segments into one KV cache, then greedy decode
steps (the reference's argmax fed to both), comparing the logits after every segment and step.
"""
from __future__ import annotations

import numpy as np


def compare(ref, got) -> tuple[float, float, float, int]:
    """-> (max abs error, cosine, max |ref|, top-1 agreement) of two vectors. The cosine is of the vectors less
    their means: logits mean the same up to a constant (softmax ignores it), and a trained model's logits sit far
    from 0 (tiny-shapes: mean -9, std 2), which held the plain cosine of a wrong answer's logits at 0.995 (one
    int8 projection's sign flipped: the held-out prompt's answer wrong, accuracy 0.96 -> 0.15; centred 0.93)."""
    ref, got = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    err = float(np.abs(ref - got).max())
    rc, gc = ref - ref.mean(), got - got.mean()
    cos = float(rc @ gc / max(np.linalg.norm(rc) * np.linalg.norm(gc), 1e-30))
    return err, cos, float(np.abs(ref).max()), int(ref.argmax() == got.argmax())


class TorchReference:
    """The PyTorch reference model behind the backend protocol's segment calls (vision/text/image)."""

    def __init__(self, model, need: int):
        from edgemm.model import KVCache
        self.m, self.cfg = model, model.cfg
        self.cache, self.pos = KVCache.empty(model.cfg.decoder, 1, need), 0

    def input_stage(self, ins: dict):
        import torch
        with torch.inference_mode():
            enc = self.m.encode_image if self.cfg.input_stage == "vision" else self.m.encode_image_tokens
            return enc(*ins.values()).numpy()

    def cross_kv(self, rows) -> np.ndarray:
        """Gated cross-attention: an image's K and V of every cross-attention layer, flattened."""
        import torch
        from edgemm.xattn import cross_kv
        with torch.inference_mode():
            return torch.cat([t.flatten() for t in cross_kv(self.m, torch.from_numpy(np.asarray(rows)))]).numpy()

    def image_newline(self):
        return self.m.adapter.image_newline.detach().numpy()

    def segment(self, kind: str, data):
        import torch
        x = torch.tensor([list(data)]) if kind == "text" else torch.from_numpy(np.asarray(data, np.float32))
        with torch.inference_mode():
            out, self.pos = self.m.forward_segment(kind, x, self.cache, self.pos)
        return out[0, -1].numpy()


def backend_input_stage(b, cfg, ins: dict):
    arrs = [t.numpy() if hasattr(t, "numpy") else np.asarray(t) for t in ins.values()]
    return b.vision(*arrs) if cfg.input_stage == "vision" else b.image_tokens(*arrs)


def run_prompt(ref, b, cfg, ins: dict, segments, decode_steps: int, stop_id: int | None = None,
               image_hw=None) -> dict:
    """ref: a TorchReference (or a backend); b: the backend under test. segments: [("text", ids) |
    ("image", rows | None)], None = the reference's own rows for `ins` (any-resolution tiling: `ins` holds the
    tiles of an image of image_hw = (height, width), packed by edgemm.anyres). -> {stage: [compare rows]}."""
    res: dict[str, list] = {s: [] for s in cfg.stages}
    ref_rows = ref.input_stage(ins) if isinstance(ref, TorchReference) else backend_input_stage(ref, cfg, ins)
    res[cfg.input_stage].append(compare(ref_rows, backend_input_stage(b, cfg, ins)))
    if image_hw is not None:
        from edgemm.anyres import pack, row_index
        ref_rows = pack(ref_rows, ref.image_newline(), row_index(cfg.vision, *image_hw))
    if "cross_kv" in res:                   # gated cross-attention: the image's cross K/V, once per image
        res["cross_kv"].append(compare(ref.cross_kv(ref_rows), b.cross_kv(ref_rows)))
    need = sum(len(d) if k == "text" else cfg.n_image_rows for k, d in segments) + decode_steps + 2
    both = _stepper(ref, b, need)
    r = None
    for kind, data in segments:
        if kind == "text" and not len(data):
            continue                        # no bos (a tokenizer that prepends nothing, as Qwen)
        data = ref_rows if kind == "image" and data is None else data
        r, g = both(kind, data)
        res["decoder_" + kind if "decoder_" + kind in res else "decoder_text"].append(compare(r, g))
    for _ in range(decode_steps):
        t = int(np.argmax(r))
        if stop_id is not None and t == stop_id:
            break           # a real prompt's answer is complete: rows past </s> are never computed by a runtime
        r, g = both("text", [t])
        res["decoder_text"].append(compare(r, g))
    if "decoder_image" in res and any(k == "image" for k, _ in segments):
        res["_text_alone"] = lambda: _text_alone(ref, b, segments, decode_steps, stop_id)    # run if needed
    return res


def _stepper(ref, b, need: int):
    """-> both(kind, data): one segment through the reference and the backend, each on a fresh state of its own
    (a TorchReference keeps the input stage it ran; a new one holds the KV cache)."""
    st = b.new_state(max_len=need)
    rst = ref.new_state(max_len=need) if not isinstance(ref, TorchReference) else None
    tref = TorchReference(ref.m, need) if rst is None and ref.pos else ref

    def both(kind, data):
        r = tref.segment(kind, data) if rst is None else ref.text(rst, data) if kind == "text" else ref.image(rst, data)
        return r, (b.text(st, data) if kind == "text" else b.image(st, data))
    return both


def _text_alone(ref, b, segments, decode_steps: int, stop_id) -> list:
    """The prompt's text segments without its image, then greedy steps: decoder_text's rows on its own."""
    texts = [d for k, d in segments if k == "text" and len(d)]
    both, rows, r = _stepper(ref, b, sum(len(d) for d in texts) + decode_steps + 2), [], None
    for data in texts + [None] * decode_steps:
        if data is None:
            data = [int(np.argmax(r))]
            if stop_id is not None and data[0] == stop_id:
                break
        r, g = both("text", data)
        rows.append(compare(r, g))
    return rows


def _attribute(out: dict, res: dict, precision_of, judge) -> None:
    """decoder_text's rows after the image read the rows decoder_image wrote into the KV cache, and decoder_image's
    read decoder_text's: where either fails, decoder_text runs the prompt's text alone. Right alone, its failure
    is decoder_image's (`follows`, and decoder_image fails); wrong alone, decoder_image's failure is not judged."""
    dt, di = out.get("decoder_text"), out.get("decoder_image")
    if "_text_alone" not in res or dt is None or di is None or (dt["ok"] and di["ok"]):
        return
    alone = summarize({"decoder_text": res["_text_alone"]()}, precision_of, judge)["decoder_text"]
    dt["text_alone"] = {k: alone[k] for k in ("max_abs_err", "cosine", "compared", "ok")}
    if alone["ok"] and not dt["ok"]:
        dt["follows"] = "decoder_image"
        if di["ok"]:
            di["ok"], di["tolerance"] = False, di["tolerance"] + ", and the text rows after the image"
    elif not alone["ok"]:
        dt["ok"] = False
        if not di["ok"]:
            di["follows"] = "decoder_text"


def failure(figures: dict) -> str | None:
    """One line naming the stages a failed check blames (a stage off only after another one's rows in its KV cache
    is named as following it), or None."""
    bad = [s for s, f in figures.items() if not s.startswith("_") and not f["ok"] and not f.get("follows")]
    if not bad:
        return None
    msg = "validation failed for " + ", ".join(
        f"{s} (cosine {figures[s]['cosine']:.4g}, max abs err {figures[s]['max_abs_err']:.3g}, "
        f"needs {figures[s]['tolerance']})" for s in bad)
    after = [f"{s} is off only after {f['follows']}'s rows in the KV cache" for s, f in figures.items()
             if not s.startswith("_") and f.get("follows")]
    return msg + "".join("; " + a for a in after)


def raise_failure(figures: dict) -> None:
    """An export's check: EdgemmError with failure()'s line where a stage failed."""
    msg = failure(figures)
    if msg:
        from edgemm.errors import EdgemmError
        raise EdgemmError(f"{msg} (see the table above); no bundle written")


def summarize(res: dict, precision_of, judge) -> dict:
    """Per stage: worst error and cosine over its compared vectors, judged by judge(stage, p, err, cos, scale)
    -> (tolerance text, ok); decoder failures attributed (_attribute)."""
    out = {}
    for stage, rows in res.items():
        if stage.startswith("_"):
            continue
        err, cos, scale = max(r[0] for r in rows), min(r[1] for r in rows), max(r[2] for r in rows)
        p = precision_of(stage)
        tol, ok = judge(stage, p, err, cos, scale)
        out[stage] = {"max_abs_err": err, "cosine": cos, "ref_max_abs": scale, "compared": len(rows),
                      "top1_agree": sum(r[3] for r in rows) / len(rows), "precision": p, "tolerance": tol,
                      "ok": bool(ok)}
    _attribute(out, res, precision_of, judge)
    return out


def format_validation(figures: dict, title: str = "onnxruntime CPU vs the reference") -> str:
    """The per-stage validation table the exporters print (onnx, trt graphs, trt engines, gguf)."""
    lines = [f"{'stage':<14} {'precision':<9} {'max abs err':>12} {'cosine':>10} {'|ref| max':>10} {'top-1':>6}  "
             f"check ({title})", "-" * 86]
    for stage, f in figures.items():
        if stage.startswith("_"):
            continue
        top1 = f"{f['top1_agree']:>6.2f}" if "top1_agree" in f else f"{'-':>6}"
        err = f"{f['max_abs_err']:>12.3e}" if f.get("max_abs_err") is not None else f"{'-':>12}"
        cos = f"{f['cosine']:>10.7f}" if f.get("cosine") is not None else f"{'-':>10}"
        verdict = "ok" if f["ok"] else f"after {f['follows']}" if f.get("follows") else "FAIL"
        lines.append(f"{stage:<14} {f['precision']:<9} {err} {cos} "
                     f"{f.get('ref_max_abs') or float('nan'):>10.3g} {top1}  {verdict} ({f['tolerance']})")
    return "\n".join(lines)


def _items(model, tok, samples):
    from edgemm.anyres import preprocess_image          # any-resolution models: the image's tiles (anyres.Tiles)
    items = []
    for x in samples:
        ids = tok.user_turn(x.prompt, first=True) + (tok.answer(x.answer) if x.answer else [])
        items.append((preprocess_image(x.image, model.cfg.vision), [("text", tok.prefix_ids()), ("image", None),
                                                                     ("text", ids)]))
    return items


def calibration_items(model, tok, calib=None, n: int = 32):
    """(pixels, segments) of the calibration part of the calibration set (edgemm.calib.sets: the bundled shapes
    calibration split, or a folder with images and prompts.jsonl). Segments: bos, the image, the user turn and
    the answer."""
    from edgemm.calib.sets import resolve_calib
    return _items(model, tok, resolve_calib(calib, n).samples)


class CheckItems(list):
    """A quantized bundle's check prompts: (pixels, segments) of the set's held-out part (edgemm.calib.sets),
    disjoint from the items its scales were fitted on; `.samples` the CalibSamples (ids, prompts)."""

    def __init__(self, items, samples):
        super().__init__(items)
        self.samples = tuple(samples)

    def record(self, seed: int) -> dict:
        """The manifest's account of what the check with `seed` ran on."""
        x = self.samples[seed % len(self.samples)]
        return {"inputs": f"held-out prompt {x.id} (seed {seed} picks item {seed % len(self.samples)} of "
                          f"{len(self.samples)}): its image and question, then greedy decode steps up to </s>",
                "prompt": {"id": x.id, "question": x.prompt},
                "held_out": [s.id for s in self.samples]}


def check_items(model, tok, calib=None, n: int | None = None) -> CheckItems:
    """The held-out part of the calibration set (n: the calibration part's size, which names the set)."""
    from edgemm.calib.sets import resolve_calib
    cset = resolve_calib(calib, n)
    if not cset.held_out:
        from edgemm.errors import EdgemmError
        raise EdgemmError(f"the calibration set {cset.name} holds no item apart from its calibration items for "
                          "the export's check")
    return CheckItems(_items(model, tok, cset.held_out), cset.held_out)


INPUTS = {"vision": "pixels", "image_tokens": "image tokens and continuous signal (Libra)"}


def random_record(seed: int, input_stage: str) -> dict:
    """The manifest's account of a check on random inputs."""
    return {"inputs": f"random inputs seed {seed}: random {INPUTS.get(input_stage, input_stage)}; random text + "
                      "image rows + text, then greedy decode steps"}


def real_prompt(calib_items, seed: int, cfg, tokenizer, gen):
    """A held-out item for a quantized bundle's check -> (input-stage inputs, image_hw, prompt ids): its image
    and its user turn up to the answer cue, so the greedy steps after it are compared where a runtime samples (up
    to </s>: rows past it are never computed, and their near-flat logits make int8 cosines meaningless)."""
    import torch
    from edgemm.tokenizer import USER_FMT
    px, segs = calib_items[seed % len(calib_items)][:2]
    ins, hw = {"pixels": torch.from_numpy(np.asarray(px))}, getattr(px, "hw", None)
    ins.update({k: v for k, v in validation_inputs(cfg, gen)[0].items() if k.startswith("qformer_")})
    ids = segs[2][1]
    cue = tokenizer.encode(USER_FMT.split("}")[-1])                    # "\nA:"
    ends = [i + len(cue) for i in range(len(ids) - len(cue) + 1) if ids[i:i + len(cue)] == cue]
    return ins, hw, ids[:ends[-1]] if ends else ids


def random_ids(tokenizer, vocab_size: int, n: int, gen) -> list[int]:
    """n random ordinary token ids (Tokenizer.ordinary_ids): a prompt of words the model knows. Uniform over the
    whole vocabulary, an export's check drew untrained reserved tokens whose outlying activations no int8 scale
    covers: 8 of 20 seeds failed an int8 export of the shipped model that answers 0.968 of the test questions."""
    import torch
    pool = tokenizer.ordinary_ids(vocab_size) if tokenizer is not None else list(range(vocab_size))
    return [pool[int(i)] for i in torch.randint(0, len(pool), (n,), generator=gen)]


def validation_inputs(cfg, gen):
    """Random input-stage inputs for an export's check -> (ins, image_hw): graph.input_examples, or for
    any-resolution tiling the tile batch of an image as tall as the largest pinpoint allowed and 3/4 as wide
    (so the grid, the unpad and the newline rows all take part); image_hw = (height, width), else None."""
    from edgemm.export.graph import input_examples
    v = cfg.vision
    if not v.grid_pinpoints:
        return input_examples(cfg, gen), None
    import torch
    from edgemm.anyres import allowed_pinpoints, n_tiles
    S = v.image_size
    pts = allowed_pinpoints(v) or [[S, S]]
    h, w = max(pts, key=lambda p: (p[0] // S) * (p[1] // S))
    hw = (h, max(1, w * 3 // 4))
    return {"pixels": torch.randn(n_tiles(v, *hw), 3, S, S, generator=gen)}, hw
