#!/usr/bin/env python
"""Acceptance figures of the quantized ONNX variants (issue 5; not a test).

    python benchmarks/bench_quant.py tiny  --out runs/quant-tiny     # accuracy/fidelity on the shipped tiny-shapes
    python benchmarks/bench_quant.py kl    --out runs/quant-tiny     # per-modality vs shared calibration (int8 decoder)
    python benchmarks/bench_quant.py speed --out runs/quant-05b      # bench-0.5b decode tok/s: fp32, int8-wo, int4

`tiny` exports fp32, fp16, int8, int8-wo, int4 and fp8 bundles of --model (default tiny-shapes, the shipped
weights), then runs `edgemm bench` over them (full test split unless --limit) and checks int8 within 1 point
of fp32 and int4 within 3. `kl` exports the decoder at int8 twice (vision fp32), once with per-modality
statistics and once with one shared calibration (both branches' inputs pooled per layer), and compares their
fidelity (mean KL, top-1) to the reference. `speed` exports bench-0.5b (random weights) at fp32, int8-wo and
int4 and measures decode tokens/s and the fraction of each variant's own roofline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def export_all(model, out: Path, precisions, stats=None, threads=None, force=False, recipes=None):
    from edgemm.export.onnx import export_onnx
    paths = []
    for p in precisions:
        dst = out / p.replace("=", "-").replace(",", "_")
        if dst.exists() and not force:
            print(f"reusing {dst}", file=sys.stderr)
        else:
            prec = p if "=" not in p else dict(x.split("=") for x in p.split(","))
            t = time.time()
            export_onnx(model=model, out=dst, precision=prec, force=True, threads=threads, stats=stats, recipes=recipes,
                        log=lambda s: print(s, file=sys.stderr))
            print(f"exported {dst} in {time.time() - t:.0f}s", file=sys.stderr)
        paths.append(str(dst))
    return paths


def cmd_tiny(a):
    from edgemm.bench import bench, format_table
    from edgemm.calib.stats import collect_stats
    out = Path(a.out)
    stats = collect_stats(a.model, None, n=a.calib_n, log=lambda s: print(s, file=sys.stderr))
    precs = ["fp32", "fp16", "int8", "int8-wo", "int4", "fp8"]
    paths = export_all(a.model, out, precs, stats=stats, threads=a.threads, force=a.force)
    rep = bench(paths, limit=a.limit, threads=a.threads, out=out / "bench", repeats=a.repeats,
                log=lambda s: print(s, file=sys.stderr))
    print(format_table(rep))
    acc = {r["name"]: r.get("accuracy") for r in rep["results"]}
    checks = {"int8 within 1 point of fp32": acc["fp32"] - acc["int8"] <= 0.01,
              "int4 within 3 points of fp32": acc["fp32"] - acc["int4"] <= 0.03}
    for k, v in checks.items():
        print(f"{k}: {'yes' if v else 'NO'} (fp32 {acc['fp32']:.3f}, int8 {acc['int8']:.3f}, int4 {acc['int4']:.3f}, "
              f"fp8 {acc['fp8']:.3f})")
    (out / "acceptance.json").write_text(json.dumps({"accuracy": acc, "checks": checks}, indent=1))


def cmd_kl(a):
    from edgemm.bench import fidelity, reference_logits
    from edgemm.calib.stats import collect_stats
    from edgemm.runtimes import load_backend
    out = Path(a.out)
    stats = collect_stats(a.model, None, n=a.calib_n, log=lambda s: print(s, file=sys.stderr))
    res = {}
    ref = reference_logits(a.model, a.fidelity_n)
    for mode, st in (("per-modality", stats), ("shared", stats.shared())):
        for method in a.methods.split(","):
            from edgemm.calib.recipes import RECIPES
            [p] = export_all(a.model, out / f"kl-{mode}-{method}", ["vision=fp32,decoder=int8"], stats=st,
                             threads=a.threads, force=True,
                             recipes={"decoder": RECIPES["int8"].with_options(method=method)})
            b = load_backend("ort", bundle=p, device="cpu", threads=a.threads)
            res[f"{mode}/{method}"] = fidelity(b, ref)
            print(mode, method, res[f"{mode}/{method}"], flush=True)
    (out / "kl.json").write_text(json.dumps(res, indent=1))
    print(f"{'calibration':<26} {'mean KL':>10} {'top-1':>7}")
    for k, v in res.items():
        print(f"{k:<26} {v['mean_kl']:>10.3e} {v['top1_agreement']:>7.3f}")


def cmd_speed(a):
    from edgemm.bench import bench, format_table
    out = Path(a.out)
    from edgemm.checkpoint import DEMO_DIR
    model = "bench-0.5b"
    if not (DEMO_DIR / "tokenizer.json").exists():        # random weights either way; any tokenizer will do
        from edgemm import shapes
        from edgemm.config import get_preset
        from edgemm.model import EdgeMM
        from edgemm.tokenizer import Tokenizer, train_tokenizer
        model = (EdgeMM(get_preset("bench-0.5b")).init_weights(0).eval(),
                 Tokenizer(train_tokenizer(shapes.corpus_lines(), 512)))
    paths = export_all(model, out, ["fp32", "int8-wo", "int4"], threads=a.threads, force=a.force)
    rep = bench(paths, limit=0, fidelity_n=0, threads=a.threads, out=out / "bench", repeats=a.repeats,
                decode_steps=a.decode_steps, log=lambda s: print(s, file=sys.stderr))
    print(format_table(rep))
    tps = {r["name"]: r["decode_tok_s"] for r in rep["results"]}
    for name, want in (("int8-wo", 1.6), ("int4", 2.5)):
        x = tps[name] / tps["fp32"]
        print(f"{name}: {tps[name]:.2f} tok/s = {x:.2f}x fp32 ({tps['fp32']:.2f}); target {want}x: "
              f"{'yes' if x >= want else 'NO'}")
    for r in rep["results"]:
        print(f"{r['name']}: {r['decode_tok_s']:.2f} tok/s, roofline {r['roofline_tok_s']:.2f} tok/s "
              f"({r['weight_bytes_per_step'] / 1e6:.0f} MB/step) -> {r['roofline_fraction']:.0%} of roofline")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["tiny", "kl", "speed"])
    ap.add_argument("--model", default="tiny-shapes")
    ap.add_argument("--out", default="runs/quant")
    from edgemm.cpu import default_threads
    ap.add_argument("--threads", type=int, default=default_threads()[0],
                    help="default: the CPUs this process may use (affinity, cgroup quota)")
    ap.add_argument("--limit", type=int, default=None, help="test questions (default all 1,000)")
    ap.add_argument("--calib-n", type=int, default=64)
    ap.add_argument("--fidelity-n", type=int, default=64)
    ap.add_argument("--methods", default="max,percentile,entropy")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--force", action="store_true", help="re-export bundles that exist")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    {"tiny": cmd_tiny, "kl": cmd_kl, "speed": cmd_speed}[a.what](a)


if __name__ == "__main__":
    main()
