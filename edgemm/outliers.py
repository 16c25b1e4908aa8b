"""`tiny-shapes-outliers`: the shipped demo model with real-model activation outliers, made at load time (issue 33).

The trained tiny-shapes model has no activation outliers worth the name (its norm-fed linear inputs span about 3x
the median channel), so every quantization recipe keeps its accuracy. This preset gives its decoder the structure
real LLMs and VLMs show, a few input channels of the decoder's linears tens of times larger than the rest and
unlike between image and text rows, by an exact reparametrisation of the shipped weights (no new weights ship):

- RMSNorm is per channel, so multiplying channel c of a norm's gain by s and dividing column c of every linear that
  reads the norm by s leaves every output unchanged while the linears' input channel c grows s-fold. The decoder's
  attn_norm and ffn_norm are shared by both branches, so these channels (`norm`) are the same for text and image
  rows, as a real model's residual outlier features are; the text and vision branches' qkv / gate / up columns are
  divided alike.
- The SwiGLU down projection reads silu(gate x) * up x, linear in up's output row j: multiplying up's row j by s and
  dividing down's column j by s is exact, and each branch has its own up/down, so these channels (`ffn`) and their
  factor differ per modality: image rows' down inputs get far larger outliers than text rows' (in real VLMs image
  tokens' activations are distributed unlike text's).
- The attention output feeding `o` is a mix of both modalities' V rows (text queries read image rows' V), so its
  channels (`attn`) take one factor in both branches' V rows and o columns.

Weight outliers beside them (SPECS["kquant"]; the same reparametrisation the other way, SmoothQuant's inverse): each
activation outlier channel c gets a partner p in the same run of 32 input channels, the channel of the largest
weight column there, whose activation is divided by t and whose weight columns are multiplied by t. Real models have
both: a few input columns with weights far larger than the rest, and activation outliers whose weights are small.
The pair is meant to be what llama.cpp's k-quants find hard and what its importance matrix is for (ggml-quants.c,
quantize_row_q4_K_impl): q4_K rounds each run of 32 weights of a row to 16 levels d*q - m spanning the run's range,
so p widens that grid t times and c's small weight (1/s of the original) lands up to d/2 off, an error c's s-fold
activation multiplies. Without a matrix the quantizer weights each weight's error by sqrt(2 mean w^2) + |w|, blind
to c; with one (llama-imatrix's mean x^2 per input channel) c's error weighs s^2 more and the run's offset m is
fitted to c. One pair per run at most, since one offset per run is what the matrix can spend. The ONNX recipes see
the same model: AWQ's per-channel scaling undoes both kinds; round-to-nearest int4 (a symmetric scale per 128)
rounds c's small weights to zero and p's run coarsely; int8 keeps its weights per output row and the activations per
tensor.

Channels are chosen deterministically from the weights: the k most important (gain x column norm of the readers),
at most one per run of `spread` inputs, so that rounding their now-small weight columns away costs what it costs in
a real model. fp32 logits stay within 1e-4 of tiny-shapes (tests/test_outliers.py); `edgemm calibrate --model
tiny-shapes-outliers --outliers` prints the per-branch channel ratios from calibration statistics.
"""
from __future__ import annotations

# per site (k channels, activation factor s[, weight-outlier factor t of their partners]); ffn per branch. Tuned so
# that RTN int4 and a shared text/image activation scale lose accuracy while per-branch W8A8 keeps it (README,
# benchmarks/bench_outliers.py). (More is refused by the export's own check: image FFN channels at 128x fail int8
# validation, cosine 0.987.)
SPEC = {"norm": (4, 16.0), "attn": (2, 8.0), "ffn": {"text": (24, 8.0), "vision": (16, 64.0)}}
# The variant with weight outliers (`bench_outliers.py --spec kquant`; an experiment, not the preset): one activation
# outlier per 32 inputs (spread: q4_K's sub-block), each with a partner t times larger in weight. Per-branch int8
# without SmoothQuant is refused by its export check (int8 keeps its weights per output row, which the partners widen
# t-fold) and only int8-sq passes (hence int8-sq as the decoders' calibrated int8: calib.recipes.CALIBRATED_RECIPE);
# AWQ int4 keeps fp32's accuracy. llama.cpp's q4_k_m: 0.930 of fp32's 0.969 on 1,000 questions, with the importance
# matrix (Q8_K sums, edgemm.export.gguf_imatrix) 0.963, bench mean KL 3.9e-2 -> 3.7e-3; both pass the GGUF export's
# check since it asks the scene's trained questions and stops at the answer's end (export.gguf_validate; before, two
# off-distribution positions of 30 decided its mean and it refused both).
KQUANT_SPEC = {"norm": (8, 16.0, 8.0), "attn": (8, 16.0, 8.0),
               "ffn": {"text": (16, 16.0, 8.0), "vision": (16, 64.0, 8.0)}, "spread": 32}
SPECS = {"default": SPEC, "kquant": KQUANT_SPEC}
_ACTIVE = "default"          # the preset's spec; use_spec() switches it for a process (benchmarks/bench_outliers.py)


def use_spec(name: str) -> None:
    """Make `tiny-shapes-outliers` load with SPECS[name] in this process (its state digest follows, so calibration
    caches never mix the two)."""
    global _ACTIVE
    if name not in SPECS:
        raise ValueError(f"unknown outlier spec {name!r}; specs: {', '.join(SPECS)}")
    _ACTIVE = name


def _top(score, k: int, exclude=(), spread: int = 0):
    """The k highest-scoring channels not in `exclude`; spread > 0: at most one in each run of `spread` channels."""
    import torch
    score = score.clone()
    if len(exclude):
        score[list(exclude)] = -1
    if not spread:
        return torch.topk(score, k).indices.sort().values
    got, used = [], set()
    for c in torch.argsort(score, descending=True).tolist():
        if c // spread not in used and score[c] >= 0:
            got.append(c)
            used.add(c // spread)
            if len(got) == k:
                break
    return torch.tensor(sorted(got))


def _factors(score, colnorm, site, exclude=(), spread: int = 0):
    """-> (per-channel factor f [n]: the activation side is multiplied by f, the weight side divided, channels
    (activation outliers), partners (weight outliers)). site: (k, s) or (k, s, t): the k channels of highest `score`
    get f = s; with t, each one's partner, the channel of the largest weight column (`colnorm`) in the same run of
    `spread` channels, gets f = 1/t (its weights t times larger, its activation t times smaller)."""
    import torch
    k, s, t = (*site, 1.0)[:3]
    c = _top(score, k, exclude, spread)
    f = torch.ones_like(score)
    f[c] = s
    partners = []
    if t != 1.0 and spread:
        for ch in c.tolist():
            lo = ch // spread * spread
            cn = colnorm[lo: lo + spread].clone()
            for x in [ch, *exclude]:
                if lo <= x < lo + spread:
                    cn[x - lo] = -1
            partners.append(lo + int(cn.argmax()))
        f[partners] = 1.0 / t
    return f, c.tolist(), sorted(partners)


def add_outliers(model, spec: dict | None = None) -> dict:
    """Reparametrise `model`'s decoder in place (see the module docstring). -> {layer: {site: channels}, and
    {site + ":w": partner channels} where the site has weight outliers}."""
    import torch
    spec = spec or SPECS[_ACTIVE]
    sp = spec.get("spread", 0)
    chosen = {}
    with torch.no_grad():
        for i, layer in enumerate(model.decoder.layers):
            t, v = layer.text, layer.vision
            if t is v:
                raise ValueError("the outlier transform needs a model with text and vision branches")
            got = chosen[i] = {}

            def keep(site, c, p):
                got[site] = c
                if p:
                    got[site + ":w"] = p
            for norm, readers in ((layer.attn_norm, ("qkv",)), (layer.ffn_norm, ("gate", "up"))):
                ws = [getattr(b, r).weight for b in (t, v) for r in readers]
                cn = sum(w.norm(dim=0) for w in ws)
                f, c, p = _factors(norm.weight.abs() * cn, cn, spec["norm"], spread=sp)
                norm.weight.mul_(f)
                for w in ws:
                    w.div_(f)
                keep(f"norm:{readers[0]}", c, p)
            c_ = layer.c
            v0 = (c_.n_heads + c_.kv_heads) * c_.head_dim                    # V rows of the fused qkv
            nv = c_.kv_heads * c_.head_dim
            cn = sum(b.o.weight.norm(dim=0)[:nv] for b in (t, v))
            f, c, p = _factors(cn, cn, spec["attn"], spread=sp)
            rep = c_.n_heads // c_.kv_heads                                    # attention output channel of V row
            ch = torch.arange(nv)
            for b in (t, v):
                b.qkv.weight[v0: v0 + nv] *= f[:, None]
                if b.qkv.bias is not None:
                    b.qkv.bias[v0: v0 + nv] *= f
                for r in range(rep):                                           # (GQA: every head reading it)
                    b.o.weight[:, (ch // c_.head_dim * rep + r) * c_.head_dim + ch % c_.head_dim] /= f
            keep("attn", c, p)
            taken = []
            for name, b in (("text", t), ("vision", v)):
                cn = b.down.weight.norm(dim=0)
                f, c, p = _factors(cn * b.up.weight.norm(dim=1), cn, spec["ffn"][name], taken, sp)
                taken += c + p
                b.up.weight.mul_(f[:, None])
                b.down.weight.div_(f)
                keep(f"ffn:{name}", c, p)
    return chosen


def outlier_rows(stats) -> list[dict]:
    """Per decoder linear and branch, from calibration statistics (edgemm.calib.stats.Stats): the largest and the
    median per-channel |x| max and their ratio (the outliers' size), and the top channels."""
    import numpy as np
    rows = []
    for key, v in stats.layers.items():
        if not v.stage.startswith("decoder") or v.branch not in ("text", "vision"):
            continue
        c = np.asarray(v.chan_absmax, np.float64)
        med = float(np.median(c))
        rows.append({"layer": v.module.replace("decoder.layers.", "").replace(f".{v.branch}.", "."),
                     "branch": v.branch, "max": float(c.max()), "median": med,
                     "ratio": float(c.max() / max(med, 1e-12)), "top": np.argsort(-c)[:4].tolist()})
    return rows


def format_outliers(stats) -> str:
    rows = outlier_rows(stats)
    by = {}
    for r in rows:
        by.setdefault(r["layer"], {})[r["branch"]] = r
    lines = [f"{'decoder input':<14} {'text max/median':>16} {'image max/median':>17}  top channels text | image"]
    for layer, b in by.items():
        t, v = b.get("text"), b.get("vision")
        nan = {"ratio": float("nan"), "top": "-"}
        t, v = t or nan, v or nan
        lines.append(f"{layer:<14} {t['ratio']:>16.1f} {v['ratio']:>17.1f}  {t['top']} | {v['top']}")
    return "\n".join(lines)
