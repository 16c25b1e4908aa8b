#!/usr/bin/env python
"""What an optimized-model cache would save when an onnx bundle is opened (not a test).

    python benchmarks/bench_open.py BUNDLE [--rounds 5] [--threads 2]

For each stage: ONNX Runtime session creation from the bundle's graph with every optimization on (what the ort
backend does at each open), against creation from the same graph saved already optimized by ONNX Runtime
(`optimized_model_filepath`) with optimizations off -- the most a cache of optimized graphs could save -- and the
sha256 of that optimized graph, which such a cache would have to check at each open to keep the ort backend's
guarantee that the graphs it runs are bytes that were hashed (edgemm.bundle.verify_bundle). Kernel weight prepacking
(MatMulNBits, the bulk of an int4 open) runs in both. Interleaved rounds, medians.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import onnxruntime as ort
    man = json.loads((Path(a.bundle) / "edgemm.json").read_text())
    level = ort.GraphOptimizationLevel

    def create(path, lvl, save=None):
        so = ort.SessionOptions()
        so.log_severity_level, so.intra_op_num_threads, so.graph_optimization_level = 3, a.threads, lvl
        if save:
            so.optimized_model_filepath = str(save)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", save.name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        t0 = time.perf_counter()
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return time.perf_counter() - t0

    print(f"{'stage':<14} {'optimize at open s':>19} {'pre-optimized s':>16} {'saved s':>8} {'sha256 s':>9}")
    total = [0.0, 0.0, 0.0]
    with tempfile.TemporaryDirectory() as tmp:
        for stage, st in man["stages"].items():
            src, opt = Path(a.bundle) / st["file"], Path(tmp) / f"{stage}.opt.onnx"
            create(src, level.ORT_ENABLE_ALL, save=opt)
            full, pre, hashed = [], [], []
            for _ in range(a.rounds):
                full.append(create(src, level.ORT_ENABLE_ALL))
                pre.append(create(opt, level.ORT_DISABLE_ALL))
                t0 = time.perf_counter()
                for f in (opt, opt.with_name(opt.name + ".data")):
                    if f.exists():
                        hashlib.sha256(f.read_bytes()).hexdigest()
                hashed.append(time.perf_counter() - t0)
            f, p, h = statistics.median(full), statistics.median(pre), statistics.median(hashed)
            for i, v in enumerate((f, p, h)):
                total[i] += v
            print(f"{stage:<14} {f:>19.3f} {p:>16.3f} {f - p:>8.3f} {h:>9.3f}")
    print(f"{'all stages':<14} {total[0]:>19.3f} {total[1]:>16.3f} {total[0] - total[1]:>8.3f} {total[2]:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
