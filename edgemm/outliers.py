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

Channels are chosen deterministically from the weights: the k most important (gain x column norm of the readers),
so that rounding their now-small weight columns away costs what it costs in a real model. fp32 logits stay within
1e-4 of tiny-shapes (tests/test_outliers.py); `edgemm calibrate --model tiny-shapes-outliers --outliers` prints the
per-branch channel ratios from calibration statistics.
"""
from __future__ import annotations

# k channels and factor per site; ffn per branch. Tuned so that RTN int4 and a shared text/image activation scale
# lose accuracy while per-branch W8A8 keeps it (README, benchmarks/bench_outliers.py).
# (More is refused by the export's own check: image FFN channels at 128x fail int8 validation, cosine 0.987.)
SPEC = {"norm": (4, 16.0), "attn": (2, 8.0), "ffn": {"text": (24, 8.0), "vision": (16, 64.0)}}


def _top(score, k: int, exclude=()):
    import torch
    score = score.clone()
    if len(exclude):
        score[list(exclude)] = -1
    return torch.topk(score, k).indices.sort().values


def add_outliers(model, spec: dict | None = None) -> dict:
    """Reparametrise `model`'s decoder in place (see the module docstring). -> {layer: {site: channels}}."""
    import torch
    spec = spec or SPEC
    chosen = {}
    with torch.no_grad():
        for i, layer in enumerate(model.decoder.layers):
            t, v = layer.text, layer.vision
            if t is v:
                raise ValueError("the outlier transform needs a model with text and vision branches")
            got = chosen[i] = {}
            k, s = spec["norm"]
            for norm, readers in ((layer.attn_norm, ("qkv",)), (layer.ffn_norm, ("gate", "up"))):
                ws = [getattr(b, r).weight for b in (t, v) for r in readers]
                c = _top(norm.weight.abs() * sum(w.norm(dim=0) for w in ws), k)
                norm.weight[c] *= s
                for w in ws:
                    w[:, c] /= s
                got[f"norm:{readers[0]}"] = c.tolist()
            k, s = spec["attn"]
            c_ = layer.c
            v0 = (c_.n_heads + c_.kv_heads) * c_.head_dim                    # V rows of the fused qkv
            c = _top(sum(b.o.weight.norm(dim=0)[: c_.kv_heads * c_.head_dim] for b in (t, v)), k)
            for b in (t, v):
                rep = c_.n_heads // c_.kv_heads                                # attention output channel of V row
                b.qkv.weight[v0 + c] *= s
                if b.qkv.bias is not None:
                    b.qkv.bias[v0 + c] *= s
                for r in range(rep):                                           # (GQA: every head reading it)
                    b.o.weight[:, (c // c_.head_dim * rep + r) * c_.head_dim + c % c_.head_dim] /= s
            got["attn"] = c.tolist()
            taken = []
            for name, b in (("text", t), ("vision", v)):
                k, s = spec["ffn"][name]
                c = _top(b.down.weight.norm(dim=0) * b.up.weight.norm(dim=1), k, taken)
                taken += c.tolist()
                b.up.weight[c] *= s
                b.down.weight[:, c] /= s
                got[f"ffn:{name}"] = c.tolist()
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
