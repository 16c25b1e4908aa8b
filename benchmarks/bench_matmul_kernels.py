#!/usr/bin/env python
"""Which ONNX Runtime CPU matmul form is fastest here for a prefill / vision-sized layer (not a test).

    python benchmarks/bench_matmul_kernels.py --threads 2                     # M 1, 16, 258; bench-0.5b's FFN
    python benchmarks/bench_matmul_kernels.py --threads 2 --rows 258 --k 1024 --n 5632 --rounds 7

One [M, K] x [K, N] layer, as a one-node graph per form, on the CPU provider: fp32 MatMul (MLAS SGEMM),
MatMulNBits 4-bit and 8-bit (block 128) at accuracy_level 0 (fp32 compute: the block dequantized into SGEMM) and 4
(int8 compute: the activations quantized per block inside the kernel), DynamicQuantizeMatMul (activations
quantized per tensor at run time, u8 x s8 weights per output channel: MLAS QGEMM). Forms are timed in interleaved
rounds (median of --rounds rounds x --iters runs), so load from other processes hits them alike. Printed: ms a
run, GFLOP/s, and the speed against fp32 MatMul.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def one_node_model(form: str, W: np.ndarray, block: int = 128):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    K, N = W.shape
    inits, nodes = [], []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])
    if form == "fp32":
        inits.append(numpy_helper.from_array(W, "W"))
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"]))
    elif form.startswith("nbits"):
        from edgemm.calib.quantize import quant_blockwise
        bits, level = (4 if "4b" in form else 8), int(form[-1])
        q, s, _ = quant_blockwise(W, bits, block)
        inits += [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(s, "Ws")]
        nodes.append(helper.make_node("MatMulNBits", ["x", "Wq", "Ws"], ["y"], domain="com.microsoft", K=K, N=N,
                                      bits=bits, block_size=block, accuracy_level=level))
    elif form.startswith("dqmm"):                  # dqmm7: 7-bit weights (no 16-bit saturation without VNNI)
        qmax = 63 if form == "dqmm7" else 127
        s = np.abs(W).max(0) / qmax
        q = np.clip(np.round(W / s), -qmax, qmax).astype(np.int8)
        inits += [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(s.astype(np.float32), "Ws")]
        nodes.append(helper.make_node("DynamicQuantizeMatMul", ["x", "Wq", "Ws"], ["y"], domain="com.microsoft"))
    else:
        raise ValueError(form)
    g = helper.make_graph(nodes, form, [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString()


FORMS = ("fp32", "nbits4b-acc0", "nbits4b-acc4", "nbits8b-acc0", "nbits8b-acc4", "dqmm", "dqmm7")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", default="1,16,258")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=5632)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--forms", default=",".join(FORMS))
    a = ap.parse_args(argv)
    import onnxruntime as ort
    from edgemm.cpu import threads_or_default, x86_summary
    threads = threads_or_default(a.threads)
    rng = np.random.default_rng(0)
    forms = a.forms.split(",")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    W = rng.standard_normal((a.k, a.n)).astype(np.float32) * 0.02
    sess = {f: ort.InferenceSession(one_node_model(f, W), so, providers=["CPUExecutionProvider"])
            for f in forms}
    print(f"onnxruntime {ort.__version__}, {threads} threads, {x86_summary()}; K {a.k}, N {a.n}; median of "
          f"{a.rounds} interleaved rounds x {a.iters} runs")
    for M in [int(r) for r in a.rows.split(",")]:
        # GELU-like inputs (mostly non-negative, a few large): the case where 16-bit pair sums can saturate
        x = np.maximum(rng.standard_normal((M, a.k)), -0.17).astype(np.float32) * 3
        ref = x @ W
        times = {f: [] for f in forms}
        for f in forms:
            sess[f].run(None, {"x": x})
        for _ in range(a.rounds):
            for f in forms:
                t = time.perf_counter()
                for _ in range(a.iters):
                    y = sess[f].run(None, {"x": x})[0]
                times[f].append((time.perf_counter() - t) / a.iters)
        base = float(np.median(times[forms[0]]))
        print(f"M {M}:")
        for f in forms:
            dt = float(np.median(times[f]))
            y = sess[f].run(None, {"x": x})[0]
            err = float(np.abs(y - ref).max() / (np.abs(ref).max() + 1e-12))
            print(f"  {f:<14} {dt * 1e3:8.3f} ms  {2 * M * a.k * a.n / dt / 1e9:7.1f} GFLOP/s  "
                  f"{base / dt:5.2f}x {forms[0]}  (rel. max err vs x @ W {err:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
