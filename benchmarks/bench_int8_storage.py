#!/usr/bin/env python
"""What the u8u8 int8 storage costs against s8s8 on this CPU (issue 13; not a test).

    python benchmarks/bench_int8_storage.py [--rounds 5] [--threads N]

Quantizes MatMuls of the bench-0.5b decoder's shapes (d 1024: qkv 1024x3072, MLP 1024x2816 and 2816x1024) with
edgemm's own quantizer in both storages, then times ONNX Runtime on them in interleaved rounds (median per
storage) at M = 1 row (a decode step) and M = 64 rows (a prompt). Also prints each storage's largest deviation
from the fake-quant reference, so a saturating kernel shows here as well (s8s8 on CPUs without VNNI).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(1024, 3072), (1024, 2816), (2816, 1024)]


def _model(path: Path, K: int, N: int, rng):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    W = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(W, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return W


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50, help="session runs per timing")
    from edgemm.cpu import default_threads
    ap.add_argument("--threads", type=int, default=default_threads()[0],
                    help="default: the CPUs this process may use (affinity, cgroup quota)")
    a = ap.parse_args()
    import onnxruntime as ort
    from edgemm import cpu
    from edgemm.calib.quantize import fake_quant_act, quant_weight_per_channel, quantize_stage
    from edgemm.calib.stats import Stats
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="int8-storage-"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.log_severity_level = 3
    print(f"cpu: {cpu.cpu_model()}; vnni: {cpu.has_vnni()}; onnxruntime {ort.__version__}; {a.threads} threads")
    print(f"{'shape':>12} {'rows':>5} {'s8s8 us':>9} {'u8u8 us':>9} {'u8u8/s8s8':>9} {'s8s8 err':>9} {'u8u8 err':>9}")
    for K, N in SHAPES:
        W = _model(tmp / "in.onnx", K, N, rng)
        calib = rng.standard_normal((64, K)).astype(np.float32)
        stats = Stats.of_matrix(W, calib, rng, digest="bench")
        sess = {}
        for st in ("s8s8", "u8u8"):
            quantize_stage(tmp / "in.onnx", tmp / f"{st}.onnx", "decoder_text", "int8", stats=stats, log=None,
                           method="max", int8_storage=st)
            sess[st] = ort.InferenceSession(str(tmp / f"{st}.onnx"), so, providers=["CPUExecutionProvider"])
        deq = quant_weight_per_channel(W, "int8")[2]
        for M in (1, 64):
            x = rng.standard_normal((1, M, K)).astype(np.float32)
            want = fake_quant_act(x, float(np.abs(calib).max()), "int8") @ deq
            err = {st: float(np.abs(s.run(None, {"x": x})[0] - want).max()) for st, s in sess.items()}
            times = {st: [] for st in sess}
            for _ in range(a.rounds):                           # interleaved: both storages in every round
                for st, s in sess.items():
                    s.run(None, {"x": x})
                    t = time.perf_counter()
                    for _ in range(a.iters):
                        s.run(None, {"x": x})
                    times[st].append((time.perf_counter() - t) / a.iters * 1e6)
            med = {st: float(np.median(v)) for st, v in times.items()}
            print(f"{f'{K}x{N}':>12} {M:>5} {med['s8s8']:>9.1f} {med['u8u8']:>9.1f} "
                  f"{med['u8u8'] / med['s8s8']:>9.2f} {err['s8s8']:>9.2g} {err['u8u8']:>9.2g}")


if __name__ == "__main__":
    main()
