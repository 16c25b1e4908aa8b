#!/usr/bin/env python
"""What the export checks measure on the test suite's tiny models (not a test): the figures behind the bounds of
edgemm.export.thresholds. Exports each model at each precision (onnx and the trt Q/DQ graphs on ONNX Runtime's CPU
provider), re-runs the export's check with seeds 0..N-1 (a quantized bundle's seed picks one of the calibration set's
16 held-out prompts, so 16 seeds run every one) and prints each stage's worst figure beside the table's bound.

    python benchmarks/check_thresholds.py                     # every model, every precision (~10 min on 2 cores)
    python benchmarks/check_thresholds.py --models shipped --seeds 4 --json out/thresholds.json

Models: `shipped` (the trained tiny-shapes), `random` (tests/conftest.py's random_ckpt: tiny-shapes config, random
weights, init seed 1), `random-c2` (the same, calibrated on 2 samples as tests/test_calib_export.py, and int8-sq as
tests/test_cli.py), `random3` (tests/test_trt.py's ckpt: init seed 3, trt calibrated on 8 samples), `moe`
(tests/test_moe.py's MoE layer pattern, int4 only).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ONNX = ("fp16", "int8", "fp8", "int8-wo", "int4")
TRT = ("int8", "fp8")


def _models(names):
    import torch
    from edgemm.checkpoint import DEMO_DIR, load_model
    from edgemm.config import get_preset
    from edgemm.model import EdgeMM
    from edgemm.tokenizer import Tokenizer
    for name in names:
        if name == "shipped":
            yield name, load_model(None), ONNX, TRT
        elif name in ("random", "random-c2", "random3"):
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.conftest import make_tokenizer
            torch.manual_seed(0)
            yield name, (EdgeMM(get_preset("tiny-shapes")).init_weights(3 if name == "random3" else 1).eval(),
                         make_tokenizer()), *((("int8", "fp8", "int4", "int8-sq"), ()) if name == "random-c2" else (ONNX, TRT))
        elif name == "moe":
            from edgemm.config import DecoderConfig, ModelConfig, VisionConfig
            cfg = ModelConfig(vision=VisionConfig(width=32, layers=1, heads=2, mlp_dim=64),
                              decoder=DecoderConfig(d_model=64, n_layers=4, ffn_dim=96, n_experts=4, experts_top_k=2,
                                                    expert_ffn_dim=64, moe_every=2, moe_dense_layers=[3],
                                                    norm_topk_prob=False, qk_norm=True, single_branch=True)).validate()
            yield name, (EdgeMM(cfg).init_weights(3).eval(), Tokenizer.load(DEMO_DIR / "tokenizer.json")), \
                ("int4",), ()
        else:
            raise SystemExit(f"unknown model {name!r}")


def _export_args(name: str, target: str, model) -> dict:
    """The suite's calibration of each model: random-c2 2 samples (onnx), random3 8 (trt)."""
    if name == "random-c2" and target == "onnx":
        from edgemm.calib.sets import bundled_set
        from edgemm.calib.stats import collect_stats
        return {"stats": collect_stats(model[0], bundled_set(2), tokenizer=model[1], cache=False, progress=False,
                                       log=None)}
    return {"calib_size": 8} if name == "random3" and target == "trt" else {}


def measure(model, target: str, precision: str, seeds: int, threads: int, tmp: Path, **kw) -> dict:
    """{stage: {metric: worst value over the seeds}} of one export's check."""
    from edgemm.calib.recipes import QUANTIZED
    from edgemm.export.onnx import export_onnx, validate_bundle
    from edgemm.export.trt import export_trt, validate_graphs
    from edgemm.export.validate import check_items
    m, tok = model
    out = tmp / f"{target}-{precision}"
    recipe = None
    if precision == "int8-sq":                  # a recipe of --precision int8 (tests/test_cli.py: the decoder's)
        precision, recipe = "int8", {"decoder": "int8-sq"}
    if target == "onnx":
        export_onnx(model, out, precision=precision, threads=threads, log=None, recipes=recipe, **kw)
    else:
        export_trt(model, out, precision=precision, threads=threads, no_build=True, log=None, **kw)
    prec = {"vision": precision, "decoder": precision}
    items = check_items(m, tok) if precision in QUANTIZED else None
    worst: dict = {}
    for seed in range(seeds):
        figs = (validate_bundle(m, out, prec, seed=seed, threads=threads, calib_items=items) if target == "onnx"
                else validate_graphs(m, out, prec, seed=seed, threads=threads, calib_items=items))
        for stage, f in figs.items():
            if stage.startswith("_"):
                continue
            w = worst.setdefault(stage, {"cosine": 1.0, "max_abs_err": 0.0, "ok": True, "bound": f["tolerance"]})
            w["cosine"] = min(w["cosine"], f["cosine"])
            w["max_abs_err"] = max(w["max_abs_err"], f["max_abs_err"])
            w["ok"] = w["ok"] and f["ok"]
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="shipped,random,random-c2,random3,moe")
    ap.add_argument("--targets", default="onnx,trt")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, model, onnx_p, trt_p in _models(a.models.split(",")):
            for target, precs in (("onnx", onnx_p), ("trt", trt_p)):
                if target not in a.targets.split(","):
                    continue
                for p in precs:
                    try:
                        worst = measure(model, target, p, a.seeds, a.threads, Path(d) / name,
                                        **_export_args(name, target, model))
                    except Exception as e:                      # a failing export check is a figure too
                        print(f"{name:<8} {target:<5} {p:<8} export failed: {e}", flush=True)
                        rows.append({"model": name, "target": target, "precision": p, "error": str(e)})
                        continue
                    for stage, w in worst.items():
                        rows.append({"model": name, "target": target, "precision": p, "stage": stage, **w})
                        print(f"{name:<8} {target:<5} {p:<8} {stage:<14} cosine {w['cosine']:.5f}  max abs "
                              f"{w['max_abs_err']:.2e}  {'ok ' if w['ok'] else 'FAIL'} ({w['bound']})", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
