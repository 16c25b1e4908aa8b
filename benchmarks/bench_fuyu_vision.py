#!/usr/bin/env python
"""Fuyu-8B's vision stage at its real shapes (issue 29; not a test): the exported ONNX graph (edgemm.export.graph's
vision_graph: 30 x 30 x 3 pixel patches through one Linear to 4096, a newline row after each row of patches) timed in
ONNX Runtime at several image sizes, each preprocessed as FuyuImageProcessor does (edgemm.fuyu_patches: up to the
1080 x 1920 canvas, padded to whole patches). Random weights; the decoder is one layer (only d_model matters here).

    python benchmarks/bench_fuyu_vision.py --threads 2 --repeats 5

Measured (2026-12-03, the command above, 2-core AMD EPYC shared with other jobs (load average ~10), onnxruntime
1.32, fp32; median of 5): the cost is the one [rows, 2700] x [2700, 4096] MatMul, about 2.2 GFLOP per 100 patches.

    image (w x h)   image rows   vision ms
    300 x 300            110        81.6
    640 x 480            368       301.1
    1024 x 768           936       815.7
    1920 x 1080         2340      2286.2
"""
from __future__ import annotations

import argparse
import statistics
import time

SIZES = ((300, 300), (640, 480), (1024, 768), (1920, 1080))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import numpy as np
    import onnxruntime as ort
    import torch
    from edgemm.config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
    from edgemm.export.graph import vision_graph
    from edgemm.fuyu_patches import preprocess
    from edgemm.model import EdgeMM
    cfg = ModelConfig(name="fuyu-8b-vision", vision=VisionConfig(
        image_size=30, patch_size=30, width=4096, layers=0, heads=1, mlp_dim=1, arch="patch_linear", tiling="fuyu",
        canvas=[1080, 1920]), adapter=AdapterConfig(kind="newline_rows"), decoder=DecoderConfig(
        vocab_size=8, d_model=4096, n_layers=1, n_heads=64, ffn_dim=8, single_branch=True, qkv_bias=True,
        qk_norm=True, norm="layer", rope_dims=32, mlp="relu2", linear_bias=True))
    torch.manual_seed(0)
    with torch.no_grad():
        m = EdgeMM(cfg).eval()
        for p in (m.vision.patch_embed.weight, m.vision.patch_embed.bias, m.adapter.image_newline):
            p.normal_(0, 0.02)
        graph, _ = vision_graph(m)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    print(f"{'image (w x h)':<15} {'image rows':>10} {'vision ms':>11}")
    for w, h in SIZES:
        px = preprocess(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), cfg.vision)
        sess.run(None, {"pixels": px})                              # warm-up
        ms = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            rows = sess.run(None, {"pixels": px})[0]
            ms.append((time.perf_counter() - t) * 1000)
        assert rows.shape[1] == cfg.image_rows_for(w, h)
        print(f"{f'{w} x {h}':<15} {rows.shape[1]:>10} {statistics.median(ms):>11.1f}")


if __name__ == "__main__":
    main()
