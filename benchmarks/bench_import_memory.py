"""Peak resident memory of `edgemm import` on a synthetic CogVLM-layout checkpoint of at least 8 GB.

Writes random fp32 weights with the cogvlm-chat-hf names into sharded safetensors (+ index) under a temporary
directory, runs the import in a subprocess, and reports that subprocess's peak RSS (VmHWM of its own address
space, read by the subprocess itself at the end: it counts the memory-mapped shard pages it touched) against the
largest source shard. (getrusage(RUSAGE_CHILDREN).ru_maxrss is not used: Linux folds the parent's high-water mark
into a vfork+exec'ed child's, so it reports the generator's peak, not the import's.) Everything is deleted
afterwards.

    python benchmarks/bench_import_memory.py                # ~8.6 GB, 2 GB shards
    python benchmarks/bench_import_memory.py --layers 4 --shard-gb 0.5 --keep   # a quick small run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_checkpoint(d: Path, layers: int, d_model: int, ffn: int, vocab: int, shard_bytes: int) -> dict:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    D, F = d_model, ffn
    W, VL, VF, P, IMG = 64, 2, 128, 14, 56
    cfg = {"architectures": ["CogVLMForCausalLM"], "hidden_act": "silu", "hidden_size": D, "intermediate_size": F,
           "max_position_embeddings": 2048, "num_attention_heads": D // 128, "num_hidden_layers": layers,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "vocab_size": vocab, "torch_dtype": "float32",
           "vision_config": {"hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": VL, "hidden_size": W,
                             "patch_size": P, "num_heads": 4, "intermediate_size": VF, "layer_norm_eps": 1e-6,
                             "num_positions": (IMG // P) ** 2 + 1, "image_size": IMG}}
    shapes = {"model.embed_tokens.weight": (vocab, D)}
    for i in range(layers):
        s = f"model.layers.{i}."
        shapes[s + "input_layernorm.weight"] = (D,)
        shapes[s + "post_attention_layernorm.weight"] = (D,)
        for ex in ("language", "vision"):
            shapes[s + f"self_attn.{ex}_expert_query_key_value.weight"] = (3 * D, D)
            shapes[s + f"self_attn.{ex}_expert_dense.weight"] = (D, D)
            shapes[s + f"mlp.{ex}_mlp.gate_proj.weight"] = (F, D)
            shapes[s + f"mlp.{ex}_mlp.up_proj.weight"] = (F, D)
            shapes[s + f"mlp.{ex}_mlp.down_proj.weight"] = (D, F)
        shapes[s + "self_attn.vision_expert_query_key_value.bias"] = (3 * D,)
    pe = "model.vision.patch_embedding."
    shapes.update({pe + "proj.weight": (W, 3, P, P), pe + "proj.bias": (W,), pe + "cls_embedding": (1, W),
                   pe + "position_embedding.weight": ((IMG // P) ** 2 + 1, W)})
    for i in range(VL):
        s = f"model.vision.transformer.layers.{i}."
        for n, sh in {"attention.query_key_value": (3 * W, W), "attention.dense": (W, W), "mlp.fc1": (VF, W),
                      "mlp.fc2": (W, VF), "input_layernorm": None, "post_attention_layernorm": None}.items():
            shapes[s + n + ".weight"] = sh or (W,)
            shapes[s + n + ".bias"] = (sh[0],) if sh else (W,)
    lp = "model.vision.linear_proj."
    shapes.update({lp + "linear_proj.weight": (D, W), lp + "norm1.weight": (D,), lp + "norm1.bias": (D,),
                   lp + "dense_h_to_4h.weight": (F, D), lp + "gate_proj.weight": (F, D),
                   lp + "dense_4h_to_h.weight": (D, F), "model.vision.boi": (1, 1, D), "model.vision.eoi": (1, 1, D),
                   "model.norm.weight": (D,), "lm_head.weight": (vocab, D)})
    # HF-style sharding: tensors in order, a new shard when the next tensor would overflow
    shards, cur, size = [], [], 0
    for k, sh in shapes.items():
        nb = 4
        for x in sh:
            nb *= x
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nb
    shards.append(cur)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    wm, sizes = {}, []
    g = torch.Generator().manual_seed(0)
    for i, names in enumerate(shards):
        f = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        part = {k: torch.empty(shapes[k]).uniform_(-0.02, 0.02, generator=g) for k in names}
        save_file(part, str(d / f), {"format": "pt"})
        del part
        wm.update({k: f for k in names})
        sizes.append((d / f).stat().st_size)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    vocab_tok = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    Tokenizer(models.WordLevel(vocab_tok, unk_token="<unk>")).save(str(d / "tokenizer.json"))
    return {"total_bytes": sum(sizes), "largest_shard_bytes": max(sizes), "shards": len(sizes)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gb", type=float, default=2.0, help="source shard size")
    ap.add_argument("--out-shard-gb", type=float, default=2.0, help="output shard size (edgemm import --shard-size)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args(argv)
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="edgemm-bench-import-", dir="/tmp"))
    src, out = root / "src", root / "out"
    try:
        t0 = time.time()
        info = write_checkpoint(src, a.layers, a.d_model, a.ffn, a.vocab, int(a.shard_gb * 1024 ** 3))
        t_write = time.time() - t0
        print(f"source: {info['total_bytes'] / 1e9:.2f} GB in {info['shards']} shards, largest "
              f"{info['largest_shard_bytes'] / 1e9:.2f} GB (written in {t_write:.0f}s)", flush=True)
        code = ("import sys; from edgemm.importers import import_checkpoint; "
                f"import_checkpoint({str(src)!r}, {str(out)!r}, shard_bytes={int(a.out_shard_gb * 1024 ** 3)}, "
                "log=lambda s: print(s, file=sys.stderr, flush=True)); "
                "st = dict(l.split(':', 1) for l in open('/proc/self/status')); "
                "print('VmHWM', int(st['VmHWM'].split()[0]) * 1024)")
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        t_import = time.time() - t0
        if r.returncode:
            print(f"import failed (exit {r.returncode})")
            return 1
        peak = int(r.stdout.split("VmHWM")[-1].split()[0])
        out_bytes = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
        fig = {"source_bytes": info["total_bytes"], "source_shards": info["shards"],
               "largest_source_shard_bytes": info["largest_shard_bytes"], "output_bytes": out_bytes,
               "peak_rss_bytes": peak, "peak_rss_over_largest_shard": peak / info["largest_shard_bytes"],
               "import_seconds": round(t_import, 1), "machine_mem_bytes": os.sysconf("SC_PAGE_SIZE") *
               os.sysconf("SC_PHYS_PAGES")}
        print(f"import: {t_import:.0f}s, output {out_bytes / 1e9:.2f} GB; peak RSS {peak / 1e9:.2f} GB = "
              f"{fig['peak_rss_over_largest_shard']:.2f}x the largest source shard "
              f"({'within' if fig['peak_rss_over_largest_shard'] < 1.5 else 'OVER'} the 1.5x budget)")
        if a.json:
            Path(a.json).write_text(json.dumps(fig, indent=2) + "\n")
        return 0 if fig["peak_rss_over_largest_shard"] < 1.5 else 1
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
