"""One validation for every ONNX-graph export (onnx, trt graphs, trt engines): a backend against a reference on
the same prompt, compared stage by stage, and the table the exporters print.

The prompt: the input stage on `ins`, then text, image and text segments into one KV cache, then greedy decode
steps (the reference's argmax fed to both), comparing the logits after every segment and step. Where a decoder
stage fails, each segment runs again on the reference's cache rows (_isolated), so the check blames the stage
that computes wrong and names the ones that only read its rows as following it; failure() says so in one line.
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
    r, fed = None, []
    for kind, data in segments:
        if kind == "text" and not len(data):
            continue                        # no bos (a tokenizer that prepends nothing, as Qwen)
        data = ref_rows if kind == "image" and data is None else data
        r, g = both(kind, data)
        stage = "decoder_" + kind if "decoder_" + kind in res else "decoder_text"
        res[stage].append(compare(r, g))
        fed.append((stage, kind, data))
    for _ in range(decode_steps):
        t = int(np.argmax(r))
        if stop_id is not None and t == stop_id:
            break           # a real prompt's answer is complete: rows past </s> are never computed by a runtime
        r, g = both("text", [t])
        res["decoder_text"].append(compare(r, g))
        fed.append(("decoder_text", "text", [t]))
    if "decoder_image" in res:                  # run only where a decoder stage fails (_attribute)
        res["_isolated"] = lambda: _isolated(ref, b, fed, need)
    return res


def _isolated(ref, b, fed, need: int) -> dict | None:
    """The prompt again with every segment isolated: before each, the backend's K/V cache is overwritten with the
    reference's rows, so a segment is judged on right inputs alone. -> {stage: compare rows of its logits and of
    the K/V rows it wrote (the worst layer)}, or None where the backend's cache cannot be written here (_kv)."""
    both = _stepper(ref, b, need, isolate=True)
    out: dict[str, list] = {}
    for stage, kind, data in fed:
        r, g = both(kind, data)
        kv = both.kv_rows()
        if kv is None:
            return None
        out.setdefault(stage, []).extend([compare(r, g), kv])
    return out


def _stepper(ref, b, need: int, isolate: bool = False):
    """-> both(kind, data): one segment through the reference and the backend, each on a state of its own
    (isolate: the backend's cache rows overwritten with the reference's before it runs);
    both.kv_rows(): the K/V rows the last segment wrote against the reference's, the worst layer's compare()
    figures (a layer zeroed is off even where the others hide it), None where a backend's cache is not host
    memory in a known layout (_kv)."""
    st = b.new_state(max_len=need)
    if isinstance(ref, TorchReference) and ref.pos:
        ref = TorchReference(ref.m, need)       # a second run: a cache of its own
    rst = ref.new_state(max_len=need) if not isinstance(ref, TorchReference) else None
    span = [0, 0]

    def both(kind, data):
        r = ref.segment(kind, data) if rst is None else ref.text(rst, data) if kind == "text" else ref.image(rst, data)
        if isolate:
            _kv(st, _kv(ref if rst is None else rst), span[1])
        g = b.text(st, data) if kind == "text" else b.image(st, data)
        span[:] = span[1], ref.pos if rst is None else rst.length
        return r, g

    def kv_rows():
        want, got = _kv(ref if rst is None else rst), _kv(st)
        if want is None or got is None or want.shape[:3] + want.shape[4:] != got.shape[:3] + got.shape[4:]:
            return None
        lo, hi = span
        rows = [compare(want[:, i, :, lo:hi], got[:, i, :, lo:hi]) for i in range(want.shape[1])]
        return max(r[0] for r in rows), min(r[1] for r in rows), max(r[2] for r in rows), min(r[3] for r in rows)
    both.kv_rows = kv_rows
    return both


def _kv(x, write=None, rows: int = 0):
    """K and V of a reference or a state as one array [2, layers, heads, rows, head_dim], or None: a
    TorchReference's KVCache, an ort CPU state's BNSH arrays, an OnnxQdq state's BSNH numpy buffers.
    write (a state's): its first `rows` rows overwritten with write's."""
    c = getattr(x, "cache", None)
    if isinstance(x, TorchReference):
        return np.stack([c.k[:, 0].numpy(), c.v[:, 0].numpy()])
    if not isinstance(c, dict):
        return None
    if c.get("arrays") is not None:
        if write is not None:
            for i, a in enumerate(c["arrays"]):                         # k0, v0, k1, v1 ... [1, heads, rows, E]
                a[0, :, :rows] = write[i % 2, i // 2, :, :rows]
        a = np.stack([np.asarray(t)[0] for t in c["arrays"]])
        return np.stack([a[0::2], a[1::2]])
    if c.get("k") and all(isinstance(t, np.ndarray) for t in c["k"] + c["v"]):
        if write is not None:
            for j, n in enumerate(("k", "v")):                          # [1, rows, heads, E]
                for i, t in enumerate(c[n]):
                    t[0, :rows] = write[j, i, :, :rows].transpose(1, 0, 2)
        return np.stack([np.stack([t[0] for t in c[n]]) for n in ("k", "v")]).transpose(0, 1, 3, 2, 4)
    return None


def _attribute(out: dict, res: dict, precision_of, judge) -> None:
    """Where a decoder stage fails, the prompt runs again with every segment isolated (_isolated: the cache rows
    it reads are the reference's): a stage that fails there is to blame (its logits, or the K/V rows it writes,
    which the text after it reads: it fails even where its own logits passed); one that fails only in the full
    prompt fails through another's rows in the cache (`follows`: not judged)."""
    kv = [s for s in ("decoder_text", "decoder_image") if s in out]
    if "_isolated" not in res or all(out[s]["ok"] for s in kv):
        return
    alone = res["_isolated"]()
    if alone is None:
        return
    to_blame = [s for s in alone if not judge(s, precision_of(s), max(r[0] for r in alone[s]),
                                              min(r[1] for r in alone[s]), max(r[2] for r in alone[s]))[1]]
    if not to_blame:
        return
    for s in kv:
        if s in to_blame and out[s]["ok"]:
            out[s]["ok"], out[s]["tolerance"] = False, out[s]["tolerance"] + ", and the K/V rows it writes"
        elif s not in to_blame and not out[s]["ok"]:
            out[s]["follows"] = to_blame[0]


def failure(figures: dict) -> str | None:
    """One line naming the stages a failed check blames (a stage off only after another one's rows in its KV cache
    is named as following it: edgemm.export.validate._attribute), or None."""
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
    from edgemm.tilings import preprocess_image          # any-resolution models: the image's tiles (anyres.Tiles)
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


def check_video(model, b, gen, seed: int, calib_items=None) -> list:
    """The video stage (ModelConfig.video_stage) of backend b against the reference on three frames (Qwen2-VL: two
    temporal patches, at the vision check's image size): random, or (a quantized bundle: calib_items) held-out
    images, the frames its scales were fitted for -> [compare figures]."""
    import torch
    from edgemm.export.graph import input_examples
    cfg = model.cfg
    S, T = cfg.vision.image_size, int(cfg.vision.video.get("temporal", 0))
    n_frames, hw = (2 * T, tuple(input_examples(cfg, gen)["pixels"].shape[2:])) if T else (3, (S, S))
    frames = torch.randn(n_frames, 3, *hw, generator=gen)
    if calib_items:
        from edgemm.video import still_frames
        n = len(calib_items.samples)
        frames = torch.from_numpy(still_frames([calib_items.samples[(seed + i) % n].image for i in range(n_frames)],
                                               cfg))
    with torch.inference_mode():
        want = model.encode_video(frames).numpy()
    return [compare(want, b.video(frames.numpy()))]


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
    if hasattr(px, "groups"):           # LLaVA-UHD: the first vision call (its slices or the image) and its regions
        from edgemm.runtimes.base import UHD_INPUTS
        first = px.groups(cfg)[0]
        ins = {"pixels": torch.from_numpy(first[0]), **{k: torch.from_numpy(x) for k, x in zip(UHD_INPUTS, first[1:])}}
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
