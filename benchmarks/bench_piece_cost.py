#!/usr/bin/env python
"""What a prefill piece of n rows costs against a one-row decode step on the torch backend (issue 31: why time-sized
pieces cannot keep piece + step within 2x a 3-stream step there; not a test).

    python benchmarks/bench_piece_cost.py --model bench-0.5b --threads 1

Prints the median ms of: a one-row step, a text piece of n rows (n = 1, 2, 3, 4, 8, 16, 32), the first 4-row piece of
a 258-row image, a vision encode, and torch's F.linear of n rows by a 3584 x 896 weight (the matmul alone). Measured
(2026-12-03, 2-core AVX2 EPYC, --threads 1, load 0.35, by this code before it moved here): step 72-86 ms; pieces of
1 / 2 / 3 / 4 / 8 / 16 / 32 rows 86 / 171 / 204 / 222 / 228 / 269 / 345 ms; the image's first 4-row piece 211 ms;
vision 469-488 ms; F.linear 0.36 / 1.22 / 2.71 / 3.53 ms at 1 / 2 / 4 / 16 rows: torch's CPU matmul of a few rows
costs several times one row's, so any piece of 2+ rows costs about a 3-stream step (3 x 72-86 ms).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _median_ms(f, n: int) -> float:
    ts = []
    for _ in range(n):
        a = time.perf_counter()
        f()
        ts.append(time.perf_counter() - a)
    return float(np.median(ts)) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench-0.5b")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from edgemm.runtimes import load_backend
    b = load_backend("torch", model=a.model, device="cpu", threads=a.threads)
    torch.set_num_threads(a.threads)
    D = b.cfg.decoder.d_model
    st = b.new_state()
    b.text(st, list(range(5, 25)))
    L = st.length

    def text(n):
        st.length = L
        b.text(st, list(range(5, 5 + n)))
    rows = np.random.default_rng(0).standard_normal((1, 258, D)).astype(np.float32)

    def image4():
        st.length = L
        next(b.prefill(st, "image", rows, chunk=4))
    print(f"one-row step {_median_ms(lambda: text(1), a.repeats):.1f} ms")
    for n in (1, 2, 3, 4, 8, 16, 32):
        print(f"text piece of {n} rows {_median_ms(lambda: text(n), a.repeats):.1f} ms")
    print(f"an image's first 4-row piece {_median_ms(image4, a.repeats):.1f} ms")
    S = b.cfg.vision.image_size
    px = np.random.default_rng(0).standard_normal((1, 3, S, S)).astype(np.float32)
    print(f"vision encode {_median_ms(lambda: b.vision(px), 2):.1f} ms")
    W = torch.randn(4 * 896, 896)
    for n in (1, 2, 4, 16):
        x = torch.randn(n, 896)
        print(f"F.linear {n} rows x 3584x896 {_median_ms(lambda: F.linear(x, W), 20):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
