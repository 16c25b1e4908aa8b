#!/usr/bin/env python
"""Decode tokens/s of GGUF bundles through the llamacpp backend, next to the memory-bandwidth roofline.

    python benchmarks/bench_gguf.py                                    # bench-0.5b at f16, q8_0, q4_k_m
    python benchmarks/bench_gguf.py --threads 2 --steps 32 --workdir /tmp/gguf-bench   # keep the bundles
    python benchmarks/bench_gguf.py --compare-build /tmp/old-site --rounds 5           # two llama.cpp builds

`--stock --onnx-vision` also times the backend on a bundle of the same decoder whose vision stage is vision.onnx
(export_gguf vision="onnx"), after one image has run through ONNX Runtime, so the process holds a warm ONNX vision
session while it decodes (its workers should sleep, not spin: runtimes/gguf_vision.py OnnxVision).

`--stock --fresh` runs every engine in a fresh process per round, the order rotating: the backend (also after an
image through its mtmd context, and with --onnx-vision on the ONNX-vision bundle), llama.cpp's plain loop at the
backend's n_ctx, at n_ctx 512, with an mtmd context made first, and with flash attention on (llama.cpp's own
default, `-fa auto`, where the CPU has it); printed with the threads each process holds.

`--compare-build DIR` times the same bundles with another llama-cpp-python build as well (DIR: a directory it was
installed into with `pip install --target DIR --no-deps WHEEL`), each measurement in its own child process, the
two builds alternating round by round; the table then shows the median of each.

For each precision the model is exported with `export_gguf` (which validates it against the reference), then a
short prompt (<s> + image rows + a question) is prefilled and `--steps` greedy single-token decode steps are timed
after a warm-up. The roofline is measured memory bandwidth (a 512 MB float32 torch sum on all threads, best of
several) divided by the bytes of weights one decode step reads (from the GGUF: text branch + shared norms + LM head
+ one token-embedding row; the vision branch and the mmproj are never read while decoding).
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


def measure_bandwidth(threads: int, mbytes: int = 512, repeats: int = 7) -> float:
    """Bytes/s of a streaming read: torch sum over a float32 buffer of `mbytes` MB."""
    import torch
    torch.set_num_threads(threads)
    x = torch.ones(mbytes * 1024 * 1024 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def decode_bytes_per_step(decoder_gguf: Path, d_model: int) -> tuple[int, int]:
    """-> (bytes of weights one text decode step reads, bytes of the whole decoder file's tensors)."""
    from edgemm.export.gguf import branch_of, gguf_tensor_table
    total = step = 0
    for t in gguf_tensor_table(decoder_gguf):
        total += t["bytes"]
        b = branch_of(t["name"])
        if t["name"] == "token_embd.weight":
            step += t["bytes"] // t["shape"][1]            # one row
        elif b in ("text branch", "shared"):
            step += t["bytes"]
    return step, total


def bench_bundle(bundle: Path, threads: int, steps: int, warmup: int, mtmd: bool = False) -> dict:
    from edgemm.runtimes.llamacpp_backend import LlamaCppBackend
    b = LlamaCppBackend.open(bundle=str(bundle), threads=threads)
    tok, cfg = b.tokenizer, b.cfg
    rng = np.random.default_rng(0)
    # an ONNX vision stage: one image through it first (its session warm); mtmd: one image through the mmproj first
    # (the backend holds its mtmd context from then on, as in `edgemm run/serve` after an image)
    if b._onnx_vision is not None or mtmd:
        from edgemm import shapes
        from edgemm.tilings import preprocess_image
        b.vision(preprocess_image(shapes.make_split("val", 1)[0][0], cfg.vision))     # an 8-bit image (mtmd's)
    rows = (rng.standard_normal((1, cfg.n_image_rows, cfg.decoder.d_model)) * 0.02).astype(np.float32)
    question = tok.user_turn("what color is the circle?", True)
    # a context sized to need, as `edgemm run` sizes it (ChatSession: the prompt and the answer, at least 256 rows)
    st = b.new_state(max_len=max(256, 1 + cfg.n_image_rows + len(question) + warmup + steps + 1))
    t0 = time.perf_counter()
    b.text(st, [tok.bos_id])
    b.image(st, rows)
    logits = b.text(st, question)
    prefill = time.perf_counter() - t0
    prompt_rows = st.length
    for _ in range(warmup):
        logits = b.text(st, [int(np.argmax(logits))])
    t = time.perf_counter()
    for _ in range(steps):
        logits = b.text(st, [int(np.argmax(logits))])
    dt = time.perf_counter() - t
    out = {"tokens_per_s": steps / dt, "ms_per_token": 1e3 * dt / steps, "prefill_rows": prompt_rows,
           "prefill_s": prefill, "kv_cache": b.runner.kv_type, "n_ctx": b.runner.n_ctx}
    b.close()
    return out


def stock_loop(decoder: Path, threads: int, steps: int, warmup: int, n_ctx: int, prompt_len: int = 300,
               mmproj: Path | None = None, flash_attn: bool = False) -> float:
    """llama.cpp's own low-level loop on the same file and context settings (f16 KV cache, flash attention off,
    as the backend for quantized bundles): a prompt of `prompt_len` tokens, then greedy single-token
    llama_decode steps reading the logits in place. -> tokens/s. No edgemm code inside the timed loop. mmproj: an
    mtmd context made on it first (as the backend holds one once it has encoded an image), with one image encoded."""
    from edgemm.llamacpp import load_llama_cpp
    ll = load_llama_cpp()
    model = ll.llama_model_load_from_file(str(decoder).encode(), ll.llama_model_default_params())
    mtmd = None
    if mmproj is not None:
        from llama_cpp import mtmd_cpp
        p = mtmd_cpp.mtmd_context_params_default()
        p.use_gpu, p.print_timings, p.n_threads, p.warmup = False, False, threads, False
        p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), model, p)
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, 1
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.no_perf = True
    ctx = ll.llama_init_from_model(model, cp)
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    batch = ll.llama_batch_init(512, 0, 1)
    try:
        def decode(tokens, pos0):
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos0 + i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            assert ll.llama_decode(ctx, batch) == 0
            return np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, len(tokens) - 1), shape=(n_vocab,))
        logits = decode([1] + [5] * (prompt_len - 1), 0)
        pos = prompt_len
        for _ in range(warmup):
            logits = decode([int(np.argmax(logits))], pos)
            pos += 1
        t = time.perf_counter()
        for _ in range(steps):
            logits = decode([int(np.argmax(logits))], pos)
            pos += 1
        return steps / (time.perf_counter() - t)
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        if mtmd is not None:
            from llama_cpp import mtmd_cpp
            mtmd_cpp.mtmd_free(mtmd)
        ll.llama_model_free(model)


def process_facts() -> dict:
    """What else the process holds while it decodes: threads (all of them, /proc), torch / onnxruntime loaded."""
    threads = None
    try:
        threads = int(next(x for x in Path("/proc/self/status").read_text().splitlines()
                           if x.startswith("Threads:")).split()[1])
    except (OSError, StopIteration):
        pass
    return {"process_threads": threads, "torch": "torch" in sys.modules, "onnxruntime": "onnxruntime" in sys.modules}


def variant(name: str, bundle: str, threads: int, steps: int, warmup: int, n_ctx: int, prompt_len: int) -> dict:
    """One engine of the --stock comparison (run in a fresh process: _variant_child) -> {tokens_per_s, ...}."""
    if name in ("backend", "backend-onnx-vision", "backend-mtmd"):
        r = bench_bundle(Path(bundle), threads, steps, warmup, mtmd=name == "backend-mtmd")
    else:
        man = json.loads((Path(bundle) / "edgemm.json").read_text())
        dec = Path(bundle) / man["stages"]["decoder"]["file"]
        mmproj = Path(bundle) / man["stages"]["vision"]["file"] if name == "plain-mtmd" else None
        ctx = 512 if name == "plain-ctx512" else n_ctx
        r = {"tokens_per_s": stock_loop(dec, threads, steps, warmup, ctx, prompt_len, mmproj, name == "plain-fa"),
             "n_ctx": ctx}
    return {**r, **process_facts()}


def _variant_child(name: str, bundle: Path, threads: int, steps: int, warmup: int, n_ctx: int,
                   prompt_len: int) -> dict:
    import subprocess
    code = ("import json, sys; sys.path.insert(0, %r); from bench_gguf import variant; "
            "print(json.dumps(variant(%r, %r, %d, %d, %d, %d, %d)))") % (
        str(Path(__file__).parent), name, str(bundle), threads, steps, warmup, n_ctx, prompt_len)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed ({out.returncode}): {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_rounds(bundle: Path, onnx_bundle: Path | None, a) -> dict:
    """--stock: every engine in a fresh process per round, the order rotating round by round -> {name: [runs]}."""
    first = _variant_child("backend", bundle, a.threads, a.steps, a.warmup, 0, 0)
    n_ctx, rows = first["n_ctx"], first["prefill_rows"]
    names = ["backend", "backend-mtmd", "plain", "plain-ctx512", "plain-mtmd", "plain-fa"]
    if onnx_bundle is not None:
        names.append("backend-onnx-vision")
    runs: dict = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            runs[n].append(_variant_child(n, onnx_bundle if n == "backend-onnx-vision" else bundle, a.threads,
                                          a.steps, a.warmup, n_ctx, rows))
    return runs


def _child_run(bundle: Path, threads: int, steps: int, warmup: int, site: str | None) -> dict:
    """bench_bundle in a fresh process, with `site` (another llama-cpp-python build) first on the path."""
    import subprocess
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([p for p in (site, root, env.get("PYTHONPATH")) if p])
    code = ("import json, sys; sys.path.insert(0, %r); from bench_gguf import bench_bundle; "
            "from edgemm.llamacpp import GGML_CPU; "
            "r = bench_bundle(__import__('pathlib').Path(%r), %d, %d, %d); r['variant'] = GGML_CPU.get('variant'); "
            "print(json.dumps(r))") % (str(Path(__file__).parent), str(bundle), threads, steps, warmup)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({out.returncode}): {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare-build", default=None, help="Another llama-cpp-python build's install directory.")
    ap.add_argument("--rounds", type=int, default=5, help="Interleaved rounds with --compare-build / --stock.")
    ap.add_argument("--stock", action="store_true", help="Also time llama.cpp's own low-level loop on the same "
                    "file (no edgemm code in the loop), interleaved with the backend, and print the ratio.")
    ap.add_argument("--onnx-vision", action="store_true", help="With --stock: also time the same decoder in a "
                    "bundle whose vision stage is ONNX (the process holding a warm ONNX Runtime session).")
    ap.add_argument("--fresh", action="store_true", help="With --stock: every engine in a fresh process per round "
                    "(the backend, with an mtmd context, with --onnx-vision an ONNX vision session; llama.cpp's loop "
                    "at the backend's n_ctx, at n_ctx 512, with an mtmd context), the order rotating each round.")
    ap.add_argument("--bundle", default=None, help="Time this GGUF bundle (no export; --precisions ignored).")
    ap.add_argument("--model", default="bench-0.5b")
    ap.add_argument("--precisions", default="f16,q8_0,q4_k_m")
    from edgemm.cpu import default_threads
    ap.add_argument("--threads", type=int, default=default_threads()[0],
                    help="default: the CPUs this process may use (affinity, cgroup quota)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--workdir", default=None, help="Keep (and reuse) the exported bundles here.")
    ap.add_argument("--json", default=None, help="Write the figures to this file.")
    a = ap.parse_args(argv)
    import importlib.metadata as md
    from edgemm.export.gguf import export_gguf
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="edgemm-gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bw = measure_bandwidth(a.threads)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, threads {a.threads}; "
          f"measured bandwidth {bw / 1e9:.1f} GB/s (512 MB float32 torch sum)")
    rows = []
    for prec in a.precisions.split(",") if not a.bundle else ["bundle"]:
        bundle = Path(a.bundle) if a.bundle else work / f"{Path(a.model).name}-{prec}"
        if not (bundle / "edgemm.json").exists():
            t = time.perf_counter()
            export_gguf(model=a.model, out=bundle, precision={"vision": "f16", "decoder": prec}, force=True,
                        log=lambda s: print("  " + s, file=sys.stderr), threads=a.threads)
            print(f"  exported {bundle} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        onnx_bundle = work / f"{Path(a.model).name}-{prec}-onnx-vision"
        if a.onnx_vision and not (onnx_bundle / "edgemm.json").exists():
            export_gguf(model=a.model, out=onnx_bundle, precision={"vision": "f16", "decoder": prec}, force=True,
                        log=lambda s: print("  " + s, file=sys.stderr), threads=a.threads, vision="onnx")
        man = json.loads((bundle / "edgemm.json").read_text())
        dec = bundle / man["stages"]["decoder"]["file"]
        step_bytes, dec_bytes = decode_bytes_per_step(dec, man["model"]["decoder"]["d_model"])
        if a.compare_build:
            runs = {"this": [], "other": []}
            for _ in range(a.rounds):
                for name, site in (("this", None), ("other", a.compare_build)):
                    runs[name].append(_child_run(bundle, a.threads, a.steps, a.warmup, site))
            med = {n: float(np.median([x["tokens_per_s"] for x in v])) for n, v in runs.items()}
            print(f"  {prec}: this build ({runs['this'][0]['variant']}) {med['this']:.2f} tok/s, "
                  f"--compare-build ({runs['other'][0]['variant']}) {med['other']:.2f} tok/s "
                  f"(medians of {a.rounds} interleaved rounds; ratio {med['this'] / med['other']:.3f})")
            r = dict(runs["this"][0], tokens_per_s=med["this"], ms_per_token=1e3 / med["this"],
                     compare_build={"dir": a.compare_build, "tokens_per_s": med["other"],
                                    "variant": runs["other"][0]["variant"],
                                    "rounds": {n: [x["tokens_per_s"] for x in v] for n, v in runs.items()}})
        elif a.stock and a.fresh:
            runs = fresh_rounds(bundle, onnx_bundle if a.onnx_vision else None, a)
            med = {n: float(np.median([x["tokens_per_s"] for x in v])) for n, v in runs.items()}
            print(f"  {prec}: each engine in a fresh process per round, {a.rounds} rounds (order rotating), medians "
                  f"(load average {os.getloadavg()[0]:.1f}):")
            for n, v in runs.items():
                f = v[0]
                print(f"    {n:<20} {med[n]:8.2f} tok/s  {med[n] / med['plain']:.3f}x plain  (n_ctx {f.get('n_ctx')}, "
                      f"{f.get('process_threads')} threads in the process, torch {f.get('torch')}, onnxruntime "
                      f"{f.get('onnxruntime')})")
            r = dict(runs["backend"][0], tokens_per_s=med["backend"], ms_per_token=1e3 / med["backend"],
                     fresh={n: {"tokens_per_s": med[n], "rounds": [x["tokens_per_s"] for x in v]}
                            for n, v in runs.items()})
        elif a.stock:
            ours, stock, with_ort = [], [], []
            for _ in range(a.rounds):
                ours.append(bench_bundle(bundle, a.threads, a.steps, a.warmup))
                if a.onnx_vision:
                    with_ort.append(bench_bundle(onnx_bundle, a.threads, a.steps, a.warmup)["tokens_per_s"])
                stock.append(stock_loop(dec, a.threads, a.steps, a.warmup, ours[-1]["n_ctx"], ours[-1]["prefill_rows"]))
            med_o = float(np.median([x["tokens_per_s"] for x in ours]))
            med_s = float(np.median(stock))
            print(f"  {prec}: edgemm llamacpp backend {med_o:.2f} tok/s, llama.cpp low-level loop {med_s:.2f} tok/s "
                  f"(medians of {a.rounds} interleaved rounds; ratio {med_o / med_s:.3f})")
            r = dict(ours[0], tokens_per_s=med_o, ms_per_token=1e3 / med_o,
                     stock={"tokens_per_s": med_s, "rounds": stock, "ours": [x["tokens_per_s"] for x in ours]})
            if a.onnx_vision:
                med_v = float(np.median(with_ort))
                print(f"  {prec}: with a warm ONNX vision session in the process {med_v:.2f} tok/s (ratio to the "
                      f"low-level loop {med_v / med_s:.3f}, to the backend without it {med_v / med_o:.3f})")
                r["onnx_vision"] = {"tokens_per_s": med_v, "rounds": with_ort}
        else:
            r = bench_bundle(bundle, a.threads, a.steps, a.warmup)
        r.update(precision=prec, decoder_file_bytes=dec.stat().st_size, weight_bytes_per_step=step_bytes,
                 roofline_tokens_per_s=bw / step_bytes)
        r["fraction_of_roofline"] = r["tokens_per_s"] / r["roofline_tokens_per_s"]
        rows.append(r)
    print(f"\n{'precision':<9} {'decoder file':>12} {'weights/step':>12} {'tok/s':>8} {'ms/tok':>8} "
          f"{'roofline tok/s':>14} {'of roofline':>11}")
    for r in rows:
        print(f"{r['precision']:<9} {r['decoder_file_bytes'] / 2**20:>9.0f} MB {r['weight_bytes_per_step'] / 2**20:>9.0f} MB "
              f"{r['tokens_per_s']:>8.2f} {r['ms_per_token']:>8.1f} {r['roofline_tokens_per_s']:>14.2f} "
              f"{100 * r['fraction_of_roofline']:>10.0f}%")
    if a.json:
        versions = {}
        for n in ("edgemm", "torch", "numpy", "gguf", "llama_cpp_python"):
            try:
                versions[n] = md.version(n)
            except md.PackageNotFoundError:
                pass
        Path(a.json).write_text(json.dumps({"model": a.model, "threads": a.threads, "bandwidth_Bps": bw,
                                            "machine": platform.platform(), "cpu_count": os.cpu_count(),
                                            "versions": versions, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
