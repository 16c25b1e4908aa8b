#!/usr/bin/env python
"""MoE FFN speed on the CPU (not a test): bench-0.5b decoder shapes with 8 experts, top-2 (random weights).

    python benchmarks/bench_moe.py onnx             # ONNX Runtime: com.microsoft MoE vs the dense standard-op form
    python benchmarks/bench_moe.py gguf             # llama.cpp: the MoE GGUF vs a dense model, same active params
    python benchmarks/bench_moe.py onnx --layers 4 --rounds 5 --steps 16 --threads 2 --json out.json
    python benchmarks/bench_moe.py onnx --pairs int4:ort-qmoe4,int4:ort-moe   # int4 bundles: QMoE vs fp32 experts

onnx: one bundle per precision:MoE form pair (edgemm.export.graph.MOE_FORMS), each validated by the exporter; then, in
interleaved rounds (form A, form B, form A, ...), decode tok/s after a `--context`-token prompt and the prompt's
prefill time. The faster form is the onnx exporter's default (MOE_DEFAULT).
gguf: the MoE model and a dense one whose FFN has the MoE's active width (top_k * expert_ffn_dim), same
attention, embeddings and layers, both GGUF (--gguf-precision, f16) through llama-cpp-python, decode tok/s in
interleaved rounds.
Medians over the rounds are printed with the min-max range.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def moe_config(layers: int, experts: int, top_k: int, dense_ffn: int | None = None):
    """bench-0.5b decoder shapes (d_model 1024, 16 heads, SwiGLU 2816) with `experts` experts of width 2816 in
    every layer, as a single-branch (MoE-LLaVA) model with a small CLIP tower and the mlp projector (llama.cpp's
    llama architecture + mlp mmproj for gguf); dense_ffn: a dense model instead."""
    from edgemm.config import AdapterConfig, ModelConfig, VisionConfig, get_preset
    d = get_preset("bench-0.5b").decoder
    d.n_layers, d.single_branch, d.max_seq_len = layers, True, 1024
    if dense_ffn:
        d.ffn_dim = dense_ffn
    else:
        d.n_experts, d.experts_top_k = experts, top_k
    vision = VisionConfig(image_size=32, patch_size=16, width=64, layers=1, heads=2, mlp_dim=128, gelu="quick",
                          arch="clip")
    return ModelConfig(name="bench-moe" if not dense_ffn else "bench-dense-active", vision=vision,
                       adapter=AdapterConfig(kind="mlp"), decoder=d).validate()


def build(cfg):
    from edgemm.checkpoint import DEMO_DIR
    from edgemm.model import EdgeMM
    from edgemm.tokenizer import Tokenizer
    return EdgeMM(cfg).init_weights(0).eval(), Tokenizer.load(DEMO_DIR / "tokenizer.json")


def _spread(xs):
    return f"{statistics.median(xs):8.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def bench_onnx(a, log) -> dict:
    from edgemm.export.onnx import export_onnx
    from edgemm.runtimes import load_backend
    model, tok = build(moe_config(a.layers, a.experts, a.top_k))
    tmp = tempfile.TemporaryDirectory(prefix="edgemm-bench-moe-")
    backends = {}
    for pair in a.pairs.split(","):
        prec, form = pair.split(":")
        out = Path(tmp.name) / pair.replace(":", "-")
        t0 = time.time()
        export_onnx(model=(model, tok), out=out, precision=prec, moe_form=form, threads=a.threads, log=None)
        log(f"# exported + validated the {pair} bundle in {time.time() - t0:.0f}s")
        backends[pair] = load_backend("ort", bundle=str(out), device="cpu", threads=a.threads, log=None)
    del model
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, 500, a.context).tolist()
    res = {f: {"decode_tok_s": [], "prefill_ms": []} for f in backends}
    for r in range(-a.warmup, a.rounds):                   # (r < 0: warm-up rounds, not recorded)
        for form, b in (backends.items() if r % 2 == 0 else reversed(backends.items())):
            st = b.new_state(max_len=a.context + a.steps + 2)
            t0 = time.perf_counter()
            logits = b.text(st, prompt)
            res[form]["prefill_ms"].append(1000 * (time.perf_counter() - t0))
            t = int(np.argmax(logits))
            t0 = time.perf_counter()
            for _ in range(a.steps):
                t = int(np.argmax(b.text(st, [t])))
            res[form]["decode_tok_s"].append(a.steps / (time.perf_counter() - t0))
            if r < 0:
                res[form]["decode_tok_s"].pop()
                res[form]["prefill_ms"].pop()
        if r < 0:
            continue
        log(f"# round {r + 1}/{a.rounds}: "
            + ", ".join(f"{f} {v['decode_tok_s'][-1]:.2f} tok/s" for f, v in res.items()))
    print(f"\nMoE FFN in ONNX Runtime (CPU, {a.threads} threads): {a.layers} layers of bench-0.5b shapes, "
          f"{a.experts} experts top-{a.top_k}; median [range] of {a.rounds} interleaved rounds")
    print(f"{'precision:form':<16} {'decode tok/s':>24} {'prefill ' + str(a.context) + ' tok, ms':>28}")
    for f, v in res.items():
        print(f"{f:<16} {_spread(v['decode_tok_s']):>24} {_spread(v['prefill_ms']):>28}")
    tmp.cleanup()
    return res


def bench_gguf(a, log) -> dict:
    from edgemm.checkpoint import save_checkpoint
    from edgemm.export.gguf import export_gguf
    tmp = tempfile.TemporaryDirectory(prefix="edgemm-bench-moe-gguf-")
    moe = moe_config(a.layers, a.experts, a.top_k)
    dense = moe_config(a.layers, a.experts, a.top_k, dense_ffn=a.top_k * moe.decoder.moe_ffn_dim)
    paths = {}
    for name, cfg in (("moe", moe), ("dense-active", dense)):
        m, tok = build(cfg)
        ck, out = Path(tmp.name) / f"{name}-ck", Path(tmp.name) / name
        save_checkpoint(m, tok, ck)
        del m
        export_gguf(model=str(ck), out=out, precision=a.gguf_precision, threads=a.threads, log=None)
        paths[name] = next(p for p in out.glob("*.gguf") if "mmproj" not in p.name)
        log(f"# exported {name}: {paths[name].stat().st_size / 1e6:.0f} MB")
    from llama_cpp import Llama
    llms = {n: Llama(model_path=str(p), n_ctx=a.context + a.steps + 8, n_threads=a.threads, verbose=False)
            for n, p in paths.items()}
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, 500, a.context).tolist()
    res = {n: [] for n in llms}
    for r in range(-a.warmup, a.rounds):                   # (r < 0: warm-up rounds: pages the mmapped files in)
        for n, llm in (llms.items() if r % 2 == 0 else reversed(llms.items())):
            llm.reset()
            llm.eval(prompt)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            res[n].append(a.steps / (time.perf_counter() - t0))
            if r < 0:
                res[n].pop()
        if r < 0:
            continue
        log(f"# round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {v[-1]:.2f} tok/s" for n, v in res.items()))
    print(f"\nllama.cpp decode (CPU, {a.gguf_precision}, {a.threads} threads): {a.layers} layers of bench-0.5b "
          f"shapes; MoE "
          f"{a.experts} experts top-{a.top_k} vs dense FFN {dense.decoder.ffn_dim} (= the MoE's active width); "
          f"median [range] of {a.rounds} interleaved rounds after a {a.context}-token prompt")
    for n, v in res.items():
        print(f"{n:<13} {_spread(v)} tok/s")
    tmp.cleanup()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["onnx", "gguf"])
    ap.add_argument("--pairs", default="fp32:ort-moe,fp32:dense", help="onnx: precision:moe_form bundles to compare")
    ap.add_argument("--gguf-precision", default="f16", help="gguf: the decoder type of both models")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (bench-0.5b has 16)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--context", type=int, default=64, help="prompt tokens before the timed decode steps")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    from edgemm.cpu import default_threads
    ap.add_argument("--threads", type=int, default=default_threads()[0],
                    help="default: the CPUs this process may use (affinity, cgroup quota)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)

    def log(s):
        print(s, file=sys.stderr)
    res = (bench_onnx if a.part == "onnx" else bench_gguf)(a, log)
    if a.json:
        from edgemm.bench import machine_info
        Path(a.json).write_text(json.dumps({"part": a.part, "args": vars(a), "results": res,
                                            "machine": machine_info(a.threads)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
