#!/usr/bin/env python
"""Quantization recipes on the outlier model (issue 33; not a test).

    python benchmarks/bench_outliers.py --out runs/outliers                 # tiny-shapes-outliers, 1,000 questions
    python benchmarks/bench_outliers.py --out runs/outliers --limit 200     # bounded
    python benchmarks/bench_outliers.py --model tiny-shapes --out runs/outliers-base   # the same on the plain model

Prints the per-branch activation outliers from the calibration statistics (edgemm.outliers.format_outliers), then
exports --model as ONNX bundles with the recipes fp32, int8 (W8A8, an activation scale per branch: text rows and
image rows calibrated apart), int8-shared (W8A8, one scale per layer for both), int4 (round-to-nearest, block 128),
int4-awq (AWQ's activation-aware scaling from each branch's calibration rows), int4-gptq (GPTQ with each
branch's Hessian) and runs `edgemm bench` over them:
accuracy on the shapes test split, top-1 agreement and mean KL against the fp32
reference, decode tok/s, bundle MB. Checks the issue's acceptance: the naive recipes (int4, int8-shared) fall
clearly below fp32 (by more than --margin), per-branch int8 keeps >= 99% of fp32's accuracy, int4-awq >= 97%.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant import export_all  # noqa: E402

RECIPES = {"fp32": ("fp32", None), "int8": ("int8", None), "int8-shared": ("int8", "int8-shared"),
           "int4": ("int4", None), "int4-awq": ("int4", "int4-awq"),
           "int4-gptq": ("int4", "int4-gptq")}                                # name -> (--precision, --recipe)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-shapes-outliers")
    ap.add_argument("--out", default="runs/outliers")
    ap.add_argument("--limit", type=int, default=None, help="test questions (default all 1,000)")
    ap.add_argument("--fidelity-n", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--margin", type=float, default=0.03, help="'clearly below': accuracy points under fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="re-export bundles that exist")
    a = ap.parse_args(argv)
    import torch
    from edgemm.bench import bench
    from edgemm.calib.stats import collect_stats
    from edgemm.cpu import threads_or_default
    from edgemm.outliers import format_outliers
    threads = threads_or_default(a.threads)
    torch.set_num_threads(threads)
    out = Path(a.out)
    err = lambda s: print(s, file=sys.stderr)  # noqa: E731
    stats = collect_stats(a.model, None, log=err, hessian=True)          # (GPTQ: each layer's X^T X)
    print(f"activation outliers of {a.model} (calibration statistics: max / median of the per-channel |x| max)")
    print(format_outliers(stats))
    paths = []
    for name, (prec, recipe) in RECIPES.items():
        paths += export_all(a.model, out / name.replace("-", "_"), [prec], stats=stats, threads=threads,
                            force=a.force, recipes={"decoder": recipe} if recipe else None)
    rep = bench(paths, limit=a.limit, fidelity_n=a.fidelity_n, threads=threads, out=out / "bench",
                repeats=a.repeats, log=err)
    rows = {Path(r["bundle"]).parent.name.replace("_", "-"): r for r in rep["results"]}
    fp32 = rows["fp32"].get("accuracy")
    print(f"\n{a.model}, {rows['fp32'].get('total')} test questions, fidelity over {a.fidelity_n} prompts")
    print(f"{'recipe':<12} {'accuracy':>8} {'of fp32':>8} {'top-1':>6} {'mean KL':>9} {'tok/s':>7} {'MB':>6}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<12} error: {r['error']}")
            continue
        print(f"{name:<12} {r['accuracy']:>8.3f} {r['accuracy'] / fp32:>8.1%} {r.get('top1_agreement', 0):>6.3f} "
              f"{r.get('mean_kl', 0):>9.2e} {r['decode_tok_s']:>7.1f} {r['size_mb']:>6.1f}")
    acc = {n: r.get("accuracy") for n, r in rows.items()}
    checks = {f"int4 (RTN) below fp32 by > {a.margin:g}": fp32 - acc["int4"] > a.margin,
              f"int8-shared below fp32 by > {a.margin:g}": fp32 - acc["int8-shared"] > a.margin,
              "int8 (per-branch) >= 99% of fp32": acc["int8"] >= 0.99 * fp32,
              "int4-awq >= 97% of fp32": acc["int4-awq"] >= 0.97 * fp32,
              "int4-gptq >= 97% of fp32": acc["int4-gptq"] >= 0.97 * fp32}
    for k, v in checks.items():
        print(f"{k}: {'yes' if v else 'NO'}")
    (out / "outliers.json").write_text(json.dumps({"model": a.model, "limit": a.limit, "accuracy": acc,
                                                   "checks": checks}, indent=1))


if __name__ == "__main__":
    main()
