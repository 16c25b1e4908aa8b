#!/usr/bin/env python
"""Where an onnx bundle's time goes on ONNX Runtime: per-op times of the vision stage, the prompt's prefill and
one decode step, from ONNX Runtime's own profiler (not a test).

    python benchmarks/profile_ort.py --bundle B --threads 2            # vision, prefill, decode: top ops each
    python benchmarks/profile_ort.py --bundle B --threads 2 --top 20 --runs 20

The bundle's sessions are opened as the ort backend opens them, plus SessionOptions.enable_profiling; the test
image's prompt (bos, image, question) runs --runs times after a warm-up, then --runs decode steps. The profiler's
JSON is read back and its node events ("cat": "Node", kernel time) summed per stage and op type: the printed
share of each op type in a stage's kernel time, its ms per run, and the node count; "provider" is the kernel's
execution provider. MatMulNBits' "activation_type"/"accuracy_level" are printed from the graph so the int8
compute path can be checked against what the profile shows.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def profile_session(sess_factory, feeds_fn, runs: int, warmup: int = 2) -> tuple[dict, float]:
    """Run a freshly opened profiling session `runs` times -> ({op: [us per run, nodes per run]}, wall ms per run)."""
    import time
    sess = sess_factory()
    for _ in range(warmup):
        feeds_fn(sess)
    # the profile starts at session creation: count only the timed runs (events after t_start)
    t0 = time.perf_counter()
    for _ in range(runs):
        feeds_fn(sess)
    wall = (time.perf_counter() - t0) / runs * 1e3
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    Path(path).unlink(missing_ok=True)
    node = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    total_runs = runs + warmup
    ops: dict = defaultdict(lambda: [0.0, 0])
    for e in node[len(node) * warmup // total_runs:]:           # the timed runs' nodes (runs are alike)
        op = e.get("args", {}).get("op_name", "?")
        ops[op][0] += e.get("dur", 0) / runs
        ops[op][1] += 1 / runs
    return dict(ops), wall


def print_ops(title: str, ops: dict, wall: float, top: int) -> None:
    total = sum(v[0] for v in ops.values())
    print(f"\n{title}: {wall:.2f} ms a run (wall, with the Python around it), {total / 1e3:.2f} ms in kernels")
    for op, (us, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {op:<28} {us / 1e3:8.3f} ms  {100 * us / max(total, 1e-9):5.1f}%  {n:5.0f} nodes")


def nbits_attrs(path_or_bytes) -> str:
    import onnx
    m = onnx.load_from_string(path_or_bytes) if isinstance(path_or_bytes, bytes) else onnx.load(path_or_bytes)
    seen: dict = defaultdict(int)
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            seen[(a.get("bits"), a.get("block_size"), a.get("accuracy_level", 0))] += 1
    return ", ".join(f"{k} x{v}" for k, v in seen.items() for k in [f"bits {k[0]} block {k[1]} accuracy_level {k[2]}"]
                     ) or "no MatMulNBits"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args(argv)
    import onnxruntime as ort
    from edgemm import shapes
    from edgemm.bundle import read_manifest, stage_sources
    from edgemm.cpu import threads_or_default
    from edgemm.runtimes import load_backend
    from edgemm.tilings import image_rows
    threads = threads_or_default(a.threads)
    b = load_backend("ort", bundle=a.bundle, device="cpu", threads=threads)
    man = read_manifest(a.bundle)
    paths = stage_sources(a.bundle, man, list(b.sess), False)
    img, q = shapes.make_split("val", 1)[0]
    rows = image_rows(b, img)
    ids = b.tokenizer.user_turn(q.question, first=True)
    print(f"{a.bundle}: {threads} threads, onnxruntime {ort.__version__}; image rows {rows.shape[1]}, "
          f"question {len(ids)} tokens")
    for s, p in paths.items():
        print(f"  {s}: {nbits_attrs(p)}")

    def factory(stage):
        def make():
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
            so.enable_profiling = True
            so.profile_file_prefix = f"/tmp/edgemm-prof-{stage}"
            return ort.InferenceSession(paths[stage], so, providers=["CPUExecutionProvider"])
        return make

    from edgemm.processor import preprocess
    pixels = preprocess(img, b.cfg.vision)
    vis_feeds = {"pixels": np.ascontiguousarray(pixels, np.float32)}
    ops, wall = profile_session(factory("vision"), lambda s: s.run(None, vis_feeds), a.runs)
    print_ops("vision", ops, wall, a.top)

    # prefill: decoder_image over the image rows, decoder_text over the question (each after a bos row), and a
    # decode step; the profiled sessions get the backend's own KV buffers through its binding code
    dec = b.new_state(max_len=1 + rows.shape[1] + len(ids) + 64)          # the decode steps' state, made once
    for stage, n in (("decoder_image", rows.shape[1]), ("decoder_text", len(ids)), ("decoder_text", 1)):
        def run(sess, stage=stage, n=n):
            st = b.new_state(max_len=1 + rows.shape[1] + len(ids) + 64) if n > 1 else dec
            if b.sess[stage] is not sess:                         # the backend runs the profiled session
                b.sess[stage] = sess
                dec.extra.clear()
            if stage == "decoder_image":
                b.text(st, b.tokenizer.prefix_ids())
                st.extra.clear()
                b.image(st, rows)
            elif n > 1:
                b.text(st, b.tokenizer.prefix_ids())
                st.extra.clear()
                b.text(st, ids)
            else:                                                 # a decode step after a 300-row prompt, the
                st.length = st.pos = 300                          # backend's own step (binding made once)
                b.text(st, [5])
        ops, wall = profile_session(factory(stage), run, a.runs if n > 1 else 10 * a.runs)     # (steps: 10x)
        name = {"decoder_image": f"prefill of the image rows ({n} rows, decoder_image)"}.get(
            stage, f"prefill of the question ({n} rows, decoder_text)" if n > 1 else "one decode step (decoder_text, "
            "300 rows of context)")
        print_ops(name, ops, wall, a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
