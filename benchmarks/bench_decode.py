#!/usr/bin/env python
"""Decode speed of the torch and ort backends on the CPU at several context lengths (not a test).

    python benchmarks/bench_decode.py                       # bench-0.5b, contexts 64 512 2048, every CPU it may use
    python benchmarks/bench_decode.py --threads 2 --contexts 64,512 --steps 16
    python benchmarks/bench_decode.py --preset tiny-shapes --bundle /tmp/b   # reuse/keep an exported bundle

The model has random weights (speed does not depend on them). For each context length the KV cache is filled
with `context` rows of random K/V (decode cost does not depend on how they were produced; a real prefill of
2048 rows would dominate the run time), then `--steps` single-token decode steps are timed after a warm-up.
Also printed: the bytes of weights one decode step reads (text branch + shared norms + LM head + one embedding
row; the vision branch and the vision tower are never read), the KV-cache bytes it reads, and the effective
bandwidth these imply.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def weight_bytes_per_step(model, bytes_per_param: int = 4) -> int:
    """Weights one decode step reads: everything in the decoder but the vision branch; one embedding row."""
    c = model.cfg.decoder
    n = 0
    for name, p in model.decoder.named_parameters():
        if ".vision." in name:
            continue
        n += c.d_model if name.startswith("tok_embeddings") else p.numel()
    return n * bytes_per_param


def kv_bytes_per_step(cfg, context: int) -> int:
    c = cfg.decoder
    return 2 * c.n_layers * c.kv_heads * context * c.head_dim * 4


def fill_state(backend, state, context: int, rng) -> None:
    """Pretend `context` rows were prefilled: random K/V rows in the cache, length and position advanced."""
    import torch
    if backend.name == "torch":
        for buf in (state.cache.k, state.cache.v):
            buf[:, :, :, :context].copy_(torch.from_numpy(
                rng.standard_normal(buf[:, :, :, :context].shape, dtype=np.float32)))
    else:
        for a in state.cache["arrays"]:
            a[:, :, :context] = rng.standard_normal(a[:, :, :context].shape, dtype=np.float32).astype(a.dtype)
    state.length = state.pos = context


def time_decode(backend, context: int, steps: int, warmup: int, rng) -> float:
    """-> tokens/s of single-token text steps appended after `context` cached rows."""
    return time_decode_capacity(backend, context, context + warmup + steps + 1, steps, warmup, rng)


def time_decode_capacity(backend, context: int, capacity: int, steps: int, warmup: int, rng) -> float:
    st = backend.new_state(max_len=capacity)
    fill_state(backend, st, context, rng)
    tok = 5
    for _ in range(warmup):
        tok = int(np.argmax(backend.text(st, [tok])))
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = int(np.argmax(backend.text(st, [tok])))
    return steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-0.5b")
    from edgemm.cpu import default_threads
    ap.add_argument("--threads", type=int, default=default_threads()[0],
                    help="default: the CPUs this process may use (affinity, cgroup quota)")
    ap.add_argument("--contexts", default="64,512,2048", help="comma-separated context lengths")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--backends", default="torch,ort")
    ap.add_argument("--bundle", default=None, help="ONNX bundle to use; exported there first if missing")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(a.threads)
    from edgemm import shapes
    from edgemm.config import get_preset
    from edgemm.model import EdgeMM
    from edgemm.runtimes import load_backend
    from edgemm.runtimes.torch_backend import TorchBackend
    from edgemm.tokenizer import Tokenizer, train_tokenizer

    contexts = [int(x) for x in a.contexts.split(",")]
    backends = a.backends.split(",")
    cfg = get_preset(a.preset)
    if max(contexts) + a.steps + a.warmup + 1 > cfg.decoder.max_seq_len:
        sys.exit(f"contexts must stay below max_seq_len {cfg.decoder.max_seq_len} of {a.preset}")
    print(f"# {a.preset}: building random weights ...", file=sys.stderr)
    model = EdgeMM(cfg).init_weights().eval()
    tok = Tokenizer(train_tokenizer(shapes.corpus_lines(), cfg.decoder.vocab_size))
    wbytes = weight_bytes_per_step(model)

    tmpdir = None
    opened = {}
    if "torch" in backends:
        opened["torch"] = TorchBackend(model, tok, "cpu", source=a.preset)
    if "ort" in backends:
        bundle = a.bundle
        if bundle is None:
            tmpdir = tempfile.TemporaryDirectory(prefix="edgemm-bench-")
            bundle = str(Path(tmpdir.name) / "fp32")
        if not Path(bundle).exists():
            from edgemm.export.onnx import export_onnx
            t0 = time.time()
            export_onnx(model=(model, tok), out=bundle, precision="fp32", threads=a.threads,
                        log=lambda s: print(s, file=sys.stderr))
            print(f"# exported {bundle} in {time.time() - t0:.0f}s", file=sys.stderr)
        opened["ort"] = load_backend("ort", bundle=bundle, device="cpu", threads=a.threads,
                                     log=lambda s: print("# " + s, file=sys.stderr))

    rng = np.random.default_rng(0)
    rows = []
    for ctx in contexts:
        for name, b in opened.items():
            tps = time_decode(b, ctx, a.steps, a.warmup, rng)
            kv = kv_bytes_per_step(cfg, ctx)
            rows.append({"backend": name, "context": ctx, "tokens_per_s": tps, "ms_per_token": 1000 / tps,
                         "weight_bytes_per_step": wbytes, "kv_bytes_per_step": kv,
                         "effective_GBps": (wbytes + kv) * tps / 1e9})
            print(f"# {name:<5} ctx {ctx:>5}: {tps:7.2f} tok/s", file=sys.stderr)

    print(f"\n{a.preset}, fp32, CPU, {a.threads} threads, {a.steps} timed steps after {a.warmup} warm-up; "
          f"weights read per decode step: {wbytes / 1e6:.1f} MB ({wbytes / 4 / 1e6:.1f}M params x 4 B)")
    print(f"{'backend':<8} {'context':>7} {'tok/s':>8} {'ms/tok':>8} {'weights MB':>10} {'KV MB':>7} {'GB/s':>6}")
    for r in rows:
        print(f"{r['backend']:<8} {r['context']:>7} {r['tokens_per_s']:>8.2f} {r['ms_per_token']:>8.1f} "
              f"{r['weight_bytes_per_step'] / 1e6:>10.1f} {r['kv_bytes_per_step'] / 1e6:>7.1f} "
              f"{r['effective_GBps']:>6.2f}")
    cap_check = None
    if "ort" in opened:   # the decode step must not copy the cache: same context, a 1x and a ~max-size buffer
        ctx = min(contexts)
        small = time_decode_capacity(opened["ort"], ctx, ctx + a.steps + a.warmup + 1, a.steps, a.warmup, rng)
        big = time_decode_capacity(opened["ort"], ctx, cfg.decoder.max_seq_len, a.steps, a.warmup, rng)
        cap_check = {"context": ctx, "small_capacity_tok_s": small, "max_capacity_tok_s": big,
                     "max_capacity": cfg.decoder.max_seq_len}
        print(f"ort at context {ctx}: {small:.2f} tok/s with a {ctx + a.steps + a.warmup + 1}-row cache buffer, "
              f"{big:.2f} tok/s with a {cfg.decoder.max_seq_len}-row buffer (in-place KV: no per-step copy)")
    by = {(r["backend"], r["context"]): r["tokens_per_s"] for r in rows}
    if "ort" in opened:
        lo, hi = min(contexts), max(contexts)
        print(f"ort tok/s at {hi} / at {lo}: {by[('ort', hi)] / by[('ort', lo)]:.2f}x")
        for ctx in contexts:
            if ("torch", ctx) in by:
                print(f"ort / torch at {ctx}: {by[('ort', ctx)] / by[('torch', ctx)]:.2f}x")
    if a.json:
        import importlib.metadata as md
        vers = {}
        for p in ("edgemm", "torch", "onnxruntime", "numpy"):
            try:
                vers[p] = md.version(p)
            except md.PackageNotFoundError:
                pass
        Path(a.json).write_text(json.dumps({"preset": a.preset, "threads": a.threads, "steps": a.steps,
                                            "machine": {"platform": platform.platform(),
                                                        "processor": platform.processor(),
                                                        "cpu_count": os.cpu_count()},
                                            "versions": vers, "rows": rows,
                                            "capacity_check": cap_check}, indent=1))
    if tmpdir is not None:
        tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
