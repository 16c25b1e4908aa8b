#!/usr/bin/env python
"""What M-RoPE costs in the onnx bundle's decoder graphs (issue 30, Qwen2-VL; not a test).

    python benchmarks/bench_mrope.py --layers 4 --rows 256 --rounds 7 --threads 2

ONNX Runtime's GroupQueryAttention rotates with 1-D positions only (do_rotary, its cos/sin caches). A Qwen2-VL
image's rows have 3-D positions, so edgemm's decoder_image graph takes `mrope_positions` [3, T] and rotates q and k
outside the op (angles of the three rows times a one-hot of mrope_section, summed; then NEOX rotation per layer),
the op running with do_rotary 0. decoder_text rotates outside the op too, from its 1-D `positions` input (a text
row's three positions are equal, but the text after an image is not at its cache row, where the op's rotary puts it:
fixed 2026-12-03, export/decoder_graph.gqa_rotary); the script prints whether its graph equals the 1-D model's (it no
longer does) and times --steps one-row decode steps of both decoder_text graphs from --context cached rows. It
times decoder_image of one random-weight model
with Qwen2-VL-2B's text shapes
(d_model 1536, 12 heads, 2 KV heads, head_dim 128, FFN 8960; --layers of its 28) on --rows image rows, the M-RoPE
graph against the same model's graph with the op's own 1-D rotary, in interleaved rounds, and prints the medians.

Measured (2026-12-03, onnxruntime 1.32, the shared 2-core machine at load average 17-19 from other agents: the
spread is noise; before the decoder_text fix). decoder_text op for op the same (43 nodes at 2 layers); decoder_image
86 nodes against 42 (the tables, the unpacked QKV split and two rotations a layer):

    --layers 2 --rows 64 --rounds 9:   m-rope median 1953 ms (1644-2127), 1-d 1961 ms (1880-2123): ratio 0.996
    --layers 4 --rows 256 --rounds 7:  m-rope median 12342 ms (10022-16491), 1-d 13339 ms (7691-15598): ratio 0.925

i.e. the rotary outside the op costs nothing measurable next to the image rows' MatMuls, once per image.

The decode step (2026-12-03, after the decoder_text fix, a 2-core AMD EPYC Zen 4 with AVX-512 VNNI, quiet; fp32
weights, so a step reads 0.7 GB: memory-bound), `--layers 4 --rows 256 --rounds 5 --steps 64 --context 320`:

    decoder_text step   m-rope (rotary outside the op) 18.47 ms (16.00-21.68), the op's rotary 19.68 ms
                        (14.82-22.28): ratio 0.94, within the rounds' spread
    decoder_image       295.7 ms against 274.0 ms: ratio 1.08

so rotating q and k from the positions input (NEOX, 2 x 70 more nodes at 4 layers) costs no measurable decode time
at these weights; an int4 decoder, whose step reads 5x fewer bytes, was not measured.
"""
from __future__ import annotations

import argparse
import statistics
import time


def build(layers: int):
    from edgemm.config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
    from edgemm.model import EdgeMM
    v = VisionConfig(image_size=28, patch_size=14, width=32, layers=1, heads=2, mlp_dim=64, arch="qwen2vl",
                     tiling="qwen2vl", min_pixels=3136, max_pixels=28 * 28 * 1280, norm="layer", gelu="quick")
    d = DecoderConfig(vocab_size=1024, d_model=1536, n_layers=layers, n_heads=12, n_kv_heads=2, ffn_dim=8960,
                      rope_theta=1e6, rms_eps=1e-6, max_seq_len=2048, qkv_bias=True, single_branch=True,
                      mrope_section=[16, 24, 24])
    return EdgeMM(ModelConfig(vision=v, adapter=AdapterConfig(kind="qwen2vl_merger", gelu="erf"), decoder=d)
                  ).init_weights(0).eval()


def decode_steps(graphs, so, c, a) -> None:
    """decoder_text's one-row decode steps, the M-RoPE graph (rotary outside the op, from `positions`) against the
    1-D graph (the op's rotary), --steps a round from --context cached rows, rounds interleaved: median ms a step."""
    import numpy as np
    import onnxruntime as ort
    sess = {k: ort.InferenceSession(g["text"].SerializeToString(), so, providers=["CPUExecutionProvider"])
            for k, g in graphs.items()}
    cap, rng = a.context + a.steps + 1, np.random.default_rng(1)
    past = {f"past_{kv}.{i}": rng.standard_normal((1, c.kv_heads, cap, c.head_dim)).astype(np.float32) * 0.5
            for i in range(c.n_layers) for kv in ("key", "value")}
    ids = rng.integers(5, c.vocab_size, a.steps)
    times = {k: [] for k in sess}
    for r in range(a.rounds + 1):                       # the first round warms up, not counted
        for k, s in sess.items():
            t0 = time.perf_counter()
            for j in range(a.steps):
                n = a.context + j                       # cached rows before this step; the text's M-RoPE position
                f = {"input_ids": np.array([[ids[j]]], np.int64), "positions": np.array([n + 40], np.int64),
                     "seqlens_k": np.array([n], np.int32), "total_sequence_length": np.array(n + 1, np.int32), **past}
                s.run(["logits"], {i.name: f[i.name] for i in s.get_inputs()})
            if r:
                times[k].append((time.perf_counter() - t0) * 1e3 / a.steps)
    print(f"decoder_text, one-row steps from {a.context} cached rows, {c.n_layers} layers, {a.threads} threads, "
          f"{a.steps} steps x {a.rounds} interleaved rounds (ms a step):")
    for k, ts in times.items():
        print(f"  {k:<32} median {statistics.median(ts):8.2f} ms  (min {min(ts):.2f}, max {max(ts):.2f})")
    m_, d_ = (statistics.median(ts) for ts in times.values())
    print(f"  ratio m-rope / 1-d: {m_ / d_:.3f}")


def main(argv=None):
    import numpy as np
    import onnxruntime as ort
    from edgemm.export.decoder_graph import decoder_graph
    from edgemm.qwen2vl_pixels import GridRows, image_positions
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=256, help="image rows (256: a 448 x 448 image)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64, help="decoder_text one-row steps timed per round (0: none)")
    ap.add_argument("--context", type=int, default=320, help="rows already in the KV cache at the first step")
    a = ap.parse_args(argv)
    m = build(a.layers)
    c = m.cfg.decoder
    graphs = {}
    for name, section in (("m-rope (rotary outside the op)", [16, 24, 24]), ("1-d rope (the op's rotary)", [])):
        c.mrope_section = section
        graphs[name] = {b: decoder_graph(m, b)[0] for b in ("vision", "text")}
    ops = [[(n.op_type, list(n.input), list(n.output)) for n in g["text"].graph.node] for g in graphs.values()]
    print(f"decoder_text op for op the same: {ops[0] == ops[1]} ({len(ops[0])} nodes); decoder_image nodes: "
          + ", ".join(f"{k} {len(g['vision'].graph.node)}" for k, g in graphs.items()))
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = {k: ort.InferenceSession(g["vision"].SerializeToString(), so, providers=["CPUExecutionProvider"])
            for k, g in graphs.items()}
    T, cap = a.rows, a.rows + 16
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((1, T, c.d_model)).astype(np.float32)
    grid = np.zeros((1, T, 1), np.float32).view(GridRows)
    grid.grid = (1, int(T ** 0.5), T // int(T ** 0.5))               # the image's merged grid (16 x 16 for 256)
    pos3 = image_positions(5, grid)                                   # after 5 text rows
    feeds = {"image_rows": rows, "positions": np.arange(5, 5 + T, dtype=np.int64),
             "seqlens_k": np.array([5 + T - 1], np.int32), "total_sequence_length": np.array(5 + T, np.int32)}
    for i in range(c.n_layers):
        for kv in ("key", "value"):
            feeds[f"past_{kv}.{i}"] = np.zeros((1, c.kv_heads, cap, c.head_dim), np.float32)
    if a.steps:
        decode_steps(graphs, so, c, a)
    times = {k: [] for k in sess}
    for _ in range(a.rounds + 1):                       # the first round warms up, not counted
        for k, s in sess.items():
            f = {n.name: feeds[n.name] if n.name != "mrope_positions" else pos3 for n in s.get_inputs()}
            t0 = time.perf_counter()
            s.run(["logits"], f)
            times[k].append((time.perf_counter() - t0) * 1e3)
    print(f"decoder_image, {T} rows, {c.n_layers} layers of Qwen2-VL-2B's text shapes, {a.threads} threads, "
          f"{a.rounds} interleaved rounds:")
    for k, ts in times.items():
        ts = ts[1:]
        print(f"  {k:<32} median {statistics.median(ts):8.1f} ms  (min {min(ts):.1f}, max {max(ts):.1f})")
    a_, b_ = (statistics.median(ts[1:]) for ts in times.values())
    print(f"  ratio m-rope / 1-d: {a_ / b_:.3f}")


if __name__ == "__main__":
    main()
