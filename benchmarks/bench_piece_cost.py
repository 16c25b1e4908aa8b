#!/usr/bin/env python
"""What a prefill piece of n rows costs against a one-row decode step on the torch backend (issue 31: why time-sized
pieces cannot keep piece + step within 2x a 3-stream step there; not a test).

    python benchmarks/bench_piece_cost.py --model bench-0.5b --threads 1
    python benchmarks/bench_piece_cost.py --model bench-0.5b --threads 1 --compare --rounds 3

--compare measures the backend with its Linears packed in oneDNN's layout (the default: runtimes/torch_pack.py)
and with torch's dense F.linear, round by round (interleaved), and prints each median.

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


def _measure(b, repeats: int) -> dict:
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
    out = {"one-row step": _median_ms(lambda: text(1), repeats)}
    for n in (1, 2, 3, 4, 8, 16, 32):
        out[f"text piece of {n} rows"] = _median_ms(lambda: text(n), repeats)
    out["an image's first 4-row piece"] = _median_ms(image4, repeats)
    S = b.cfg.vision.image_size
    px = np.random.default_rng(0).standard_normal((1, 3, S, S)).astype(np.float32)
    out["vision encode"] = _median_ms(lambda: b.vision(px), 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench-0.5b")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compare", action="store_true", help="packed (default) and dense Linears, interleaved")
    ap.add_argument("--rounds", type=int, default=1, help="with --compare: rounds of (packed, dense)")
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from edgemm.runtimes.torch_backend import TorchBackend
    kinds = ("packed", "dense") if a.compare else ("packed",)
    bs = {k: TorchBackend.open(model=a.model, device="cpu", threads=a.threads, pack=k == "packed") for k in kinds}
    torch.set_num_threads(a.threads)
    runs: dict = {k: [] for k in kinds}
    for r in range(a.rounds if a.compare else 1):
        for k in (kinds if r % 2 == 0 else kinds[::-1]):
            runs[k].append(_measure(bs[k], a.repeats))
    for name in runs[kinds[0]][0]:
        print(f"{name:32s} " + "  ".join(f"{k} {np.median([m[name] for m in runs[k]]):7.1f} ms" for k in kinds))
    W = torch.randn(4 * 896, 896)
    for n in (1, 2, 4, 16):
        x = torch.randn(n, 896)
        print(f"F.linear {n} rows x 3584x896 {_median_ms(lambda: F.linear(x, W), 20):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
