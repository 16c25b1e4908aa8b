#!/usr/bin/env python
"""Decode tok/s with 1 and 4 images in the conversation: a gated cross-attention model (Idefics-shaped) against a
sequence model (LLaVA-shaped) with the same decoder, both as ONNX bundles on the `ort` backend (not a test).

    python benchmarks/bench_xattn.py                       # d_model 768, 12 layers, 256 rows per image
    python benchmarks/bench_xattn.py --threads 2 --rounds 5 --steps 16 --json /tmp/xattn.json

Both models have random weights (speed does not depend on them) and the same LLaMA-style decoder; the
cross-attention one adds a gated cross-attention layer every `--every` layers over `--latents` resampled rows
per image (computed once per image by the cross_kv stage), the sequence one puts each image's `--patches` rows
into the context. Each conversation is n x (image, a `--turn`-token text turn), prefilled for real through the
bundle's stages; then `--steps` greedy decode steps are timed, the configurations interleaved round by round
(each round rewinds every state to its prefilled length), and the median per configuration is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def configs(d: int, layers: int, every: int, image: int, patch: int, latents: int):
    from edgemm.config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
    dec = dict(vocab_size=512, d_model=d, n_layers=layers, n_heads=d // 64, ffn_dim=int(d * 8 / 3) // 64 * 64,
               max_seq_len=4096, single_branch=True)
    vis = dict(image_size=image, patch_size=patch, width=384, layers=2, heads=6, mlp_dim=1536, gelu="erf",
               arch="clip")
    seq = ModelConfig(name="llava-shaped", vision=VisionConfig(**vis),
                      adapter=AdapterConfig(kind="mlp", gelu="erf"), decoder=DecoderConfig(**dec))
    xat = ModelConfig(name="idefics-shaped", vision=VisionConfig(**vis, keep_cls=True),
                      adapter=AdapterConfig(kind="perceiver", perceiver_latents=latents, perceiver_depth=2,
                                            perceiver_heads=6, perceiver_head_dim=64),
                      decoder=DecoderConfig(**dec, cross_attn_every=every, cross_attn_kv_dim=384,
                                            cross_attn_image_token=3, cross_attn_image_wrap=4,
                                            cross_attn_reset_token=2))
    return {"sequence": seq.validate(), "cross-attention": xat.validate()}


def export(cfg, tok, out: Path, threads: int):
    import torch
    from edgemm.export.onnx import export_onnx
    from edgemm.model import EdgeMM
    m = EdgeMM(cfg).init_weights(0)
    with torch.no_grad():               # open gates (Flamingo starts them at 0; the cost is the same either way)
        for layer in getattr(m.decoder, "cross_layers", []):
            layer.alpha_attn.fill_(0.5)
            layer.alpha_dense.fill_(0.5)
    export_onnx((m, tok), out, precision="fp32", log=None, threads=threads, seed=0)
    n = sum(p.numel() for k, p in m.decoder.named_parameters())
    del m
    return n


def prefill(b, n_images: int, turn: int, rng):
    """A conversation of n x (image, text turn) -> (state, last token)."""
    S = b.cfg.vision.image_size
    rows = b.vision(rng.standard_normal((1, 3, S, S)).astype(np.float32))
    st = b.new_state(max_len=n_images * (b.cfg.n_image_rows + turn) + 256)
    logits = b.text(st, [1])
    for _ in range(n_images):
        b.image(st, rows)
        logits = b.text(st, rng.integers(4, 500, turn).tolist())
    return st, int(np.argmax(logits))


def decode(b, st, tok: int, steps: int) -> float:
    saved = (st.length, st.pos, st.extra.get("cross_on"))
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = int(np.argmax(b.text(st, [tok])))
    dt = time.perf_counter() - t0
    st.length, st.pos = saved[:2]
    if saved[2] is not None:
        st.extra["cross_on"] = saved[2]
    return steps / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from edgemm.cpu import default_threads
    ap.add_argument("--threads", type=int, default=default_threads()[0],
                    help="default: the CPUs this process may use (affinity, cgroup quota)")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--every", type=int, default=4, help="cross_attn_every (Idefics-9B: 4)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=14, help="224/14: 256 rows per image in the sequence model")
    ap.add_argument("--latents", type=int, default=64)
    ap.add_argument("--images", default="1,4")
    ap.add_argument("--turn", type=int, default=24, help="text tokens after each image")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import onnxruntime
    import torch
    from edgemm.checkpoint import load_model
    from edgemm.runtimes.ort_backend import OrtBackend
    torch.set_num_threads(a.threads)
    _, tok = load_model("tiny-shapes")
    images = [int(x) for x in a.images.split(",")]
    rng = np.random.default_rng(0)
    runs, params = {}, {}
    with tempfile.TemporaryDirectory(prefix="edgemm-bench-xattn-") as tmp:
        backends = {}
        for name, cfg in configs(a.d_model, a.layers, a.every, a.image_size, a.patch, a.latents).items():
            t0 = time.time()
            params[name] = export(cfg, tok, Path(tmp) / name, a.threads)
            backends[name] = OrtBackend.open(bundle=str(Path(tmp) / name), device="cpu", threads=a.threads)
            print(f"exported {name} ({params[name] / 1e6:.0f}M decoder params, {cfg.n_image_rows} context rows "
                  f"per image) in {time.time() - t0:.0f}s", file=sys.stderr)
            for n in images:
                st, t = prefill(backends[name], n, a.turn, rng)
                runs[(name, n)] = (backends[name], st, t)
                decode(backends[name], st, t, 2)                       # warm-up
        res = {k: [] for k in runs}
        for _ in range(a.rounds):
            for k, (b, st, t) in runs.items():
                res[k].append(decode(b, st, t, a.steps))
        rows = [{"model": name, "images": n, "context_rows": runs[(name, n)][1].length,
                 "decode_tok_s": statistics.median(v), "rounds": v} for (name, n), v in res.items()]
    print(f"{'model':<16} {'images':>6} {'context rows':>12} {'decode tok/s':>13}  (median of {a.rounds} "
          f"interleaved rounds x {a.steps} steps, ort CPU, {a.threads} threads)")
    for r in rows:
        print(f"{r['model']:<16} {r['images']:>6} {r['context_rows']:>12} {r['decode_tok_s']:>13.1f}")
    for name in params:
        v = {r["images"]: r["decode_tok_s"] for r in rows if r["model"] == name}
        if len(v) > 1:
            lo, hi = min(v), max(v)
            print(f"{name}: {hi} images vs {lo}: {v[hi] / v[lo]:.2f}x the tok/s")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": rows, "decoder_params": params,
                                            "machine": platform.platform(), "cpu_count": os.cpu_count(),
                                            "versions": {"onnxruntime": onnxruntime.__version__,
                                                         "torch": torch.__version__}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
