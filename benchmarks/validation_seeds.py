#!/usr/bin/env python
"""How often an export's check passes, over seeds (not a test): re-runs the ONNX exporter's validation of one
bundle with seeds 0..N-1 and prints the failures.

    python benchmarks/validation_seeds.py out/int8 --seeds 20          # a bundle of the shipped model
    python benchmarks/validation_seeds.py out/int8 --model DIR --seeds 20

Quantized bundles are checked as `edgemm export` checks them (a held-out prompt of the calibration set,
edgemm.export.validate.check_items).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--model", default=None, help="the bundle's source model (default: the shipped one)")
    ap.add_argument("--calib", default=None, help="calibration set of a quantized bundle (default: the bundled one)")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from edgemm.calib.recipes import QUANTIZED
    from edgemm.checkpoint import load_model
    from edgemm.export.onnx import group, validate_bundle
    from edgemm.export.validate import check_items
    man = json.loads((Path(a.bundle) / "edgemm.json").read_text())
    prec = {"vision": "fp32", "decoder": "fp32"}
    for s, st in man["stages"].items():
        prec[group(s)] = st.get("precision", "fp32")
    m, tok = load_model(a.model)
    items = check_items(m, tok, a.calib) if set(prec.values()) & set(QUANTIZED) else None
    bad = []
    for seed in range(a.seeds):
        out = validate_bundle(m, Path(a.bundle), prec, seed=seed, threads=a.threads, calib_items=items)
        failed = {k: round(v["cosine"], 3) for k, v in out.items() if not k.startswith("_") and not v["ok"]}
        if failed:
            bad.append(seed)
            print(f"seed {seed}: failed {failed}", flush=True)
    print(f"{a.bundle} ({prec['vision']} vision, {prec['decoder']} decoder): {len(bad)} of {a.seeds} seeds failed "
          f"the check{': ' + ', '.join(map(str, bad)) if bad else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
