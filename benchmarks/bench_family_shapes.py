#!/usr/bin/env python
"""`edgemm bench` on a bench-sized, random-weight instance of a family's real shapes (issue 30; not a test).

    python benchmarks/bench_family_shapes.py --family smolvlm --out runs/family-smolvlm --precisions fp32,int8,int4

Builds a checkpoint in the transformers layout with the preset's shapes (random weights, a small byte-level
tokenizer carrying the family's special tokens; the embedding keeps the real vocabulary's row count), imports it
with `edgemm import`, exports onnx at each precision (default calibration) and runs `edgemm bench --limit 0
--fidelity-prompts 0` (random weights: no accuracy, no fidelity) over the bundles. Prints one table (vision ms, TTFT
ms, decode tok/s, peak RSS MiB per precision) and writes OUT/family_shapes.json (plus bench's own OUT/bench/).

Presets (SHAPES) hold the real configs' fields; add a family with its config builder (BUILDERS). SmolVLM runs with
do_image_splitting off and the first resize's longest edge at the tile size (512): every image is one 512 x 512 tile,
64 image rows (the released processor splits into up to 4 x 4 tiles + the whole image).

Measured (2026-12-03, the command above, 2-core AMD EPYC without VNNI, onnxruntime 1.32, --threads 2; 67 image rows:
the tile's 64 + its markers; int8 runs as u8u8 here):

    precision   vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32           3019.8     3536.7          20.0          3794     1568
    int8           1104.5     1259.2         108.2          1750      488
    int4           2743.0     3421.6          65.1          1257      329
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# HuggingFaceTB/SmolVLM-256M-Instruct's config.json / processor settings (as recalled, not read from the hub: no
# network here). Tied embeddings give 228.1 M parameters; the released "256M" (513 MB in bf16) suggests an untied
# lm_head (+28.4 M = 49280 x 576): the same decode compute, a larger bundle.
SHAPES = {
    "smolvlm": {
        "text": dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     rope_theta=100000.0, tie_word_embeddings=True),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        "scale_factor": 4, "image_seq_len": 64, "image_splitting": False, "longest_edge": 512,
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    },
    # the same family at test scale (a quick check of the builder, seconds)
    "smolvlm-tiny": {
        "text": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True),
        "vision": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                       image_size=16, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        "scale_factor": 2, "image_seq_len": 4, "image_splitting": False, "longest_edge": 16,
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    },
}

SMOLVLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                    "<global-img>", "<image>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def build_smolvlm(preset: dict, src: Path, seed: int = 0):
    """A random SmolVLMForConditionalGeneration saved as transformers saves it, with the tests' byte-level tokenizer
    (SmolVLM's special tokens), the image processor's settings, processor_config and chat template."""
    import torch
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    sys.path.insert(0, str(ROOT))
    from tests.test_smolvlm import TEMPLATE, save_tokenizer
    from tests.test_tokenizers import QWEN2_SPLIT, _byte_level
    tok = _byte_level(QWEN2_SPLIT, SMOLVLM_SPECIALS, 300, False, False, None)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab = preset["text"]["vocab_size"]
    assert n_tok <= vocab, (n_tok, vocab)
    text = LlamaConfig(**preset["text"])
    vision = SmolVLMVisionConfig(**preset["vision"])
    cfg = SmolVLMConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                        scale_factor=preset["scale_factor"], image_token_id=tok.token_to_id("<image>"),
                        tie_word_embeddings=preset["text"]["tie_word_embeddings"])
    torch.manual_seed(seed)
    hf = SmolVLMForConditionalGeneration(cfg).eval()
    emb = hf.get_input_embeddings().weight
    assert emb.shape == (vocab, preset["text"]["hidden_size"]), emb.shape
    hf.save_pretrained(src, safe_serialization=True)
    save_tokenizer(tok, src)
    SmolVLMImageProcessorPil(size={"longest_edge": preset["longest_edge"]},
                             max_image_size={"longest_edge": preset["vision"]["image_size"]},
                             image_mean=preset["mean"], image_std=preset["std"],
                             do_image_splitting=preset["image_splitting"]).save_pretrained(src)
    (src / "processor_config.json").write_text(json.dumps({"image_seq_len": preset["image_seq_len"]}))
    (src / "chat_template.jinja").write_text(TEMPLATE)
    return sum(p.numel() for p in hf.parameters())


BUILDERS = {"smolvlm": build_smolvlm, "smolvlm-tiny": build_smolvlm}


def sh(args, log):
    t = time.time()
    print("$ " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    with open(log, "a") as f:
        r = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, args))}; see {log}")
    print(f"  done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    return time.time() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="smolvlm", choices=sorted(SHAPES))
    ap.add_argument("--out", default="runs/family-shapes", help="working folder (checkpoint, bundles, results)")
    ap.add_argument("--precisions", default="fp32,int8,int4", help="onnx precisions, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="bench's CPU threads")
    ap.add_argument("--export-threads", type=int, default=None, help="export's CPU threads (default: export's own)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--force", action="store_true", help="rebuild the checkpoint and re-export existing bundles")
    ap.add_argument("--build-only", action="store_true", help="build and import the checkpoint, then stop")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    edgemm = [shutil.which("edgemm") or "edgemm"]
    preset, timings = SHAPES[a.family], {}
    src, ck = out / "src", out / "ck"
    if a.force or not (ck / "config.json").exists():
        t = time.time()
        n = BUILDERS[a.family](preset, src)
        timings["build_s"] = time.time() - t
        print(f"built {src}: {n / 1e6:.1f} M parameters in {timings['build_s']:.0f}s", file=sys.stderr)
        timings["import_s"] = sh(edgemm + ["import", src, "-o", ck] + (["--force"] if ck.exists() else []), log)
    if a.build_only:
        return 0
    bundles = []
    for p in a.precisions.split(","):
        dst = out / p
        if a.force or not (dst / "edgemm.json").exists():
            th = ["--threads", a.export_threads] if a.export_threads else []
            timings[f"export_{p}_s"] = sh(edgemm + ["export", "--target", "onnx", "--model", ck, "--precision", p,
                                                    "-o", dst, "--force"] + th, log)
        bundles.append(dst)
    timings["bench_s"] = sh(edgemm + ["bench", *bundles, "--limit", "0", "--fidelity-prompts", "0", "--threads",
                                      a.threads, "--repeats", a.repeats, "-o", out / "bench"], log)
    rep = json.loads((out / "bench" / "bench.json").read_text())
    rows = []
    for p, r in zip(a.precisions.split(","), rep["results"]):
        rows.append({"precision": p, **{k: r.get(k) for k in ("vision_ms", "ttft_ms", "decode_tok_s", "peak_rss_mb",
                                                              "size_mb", "image_rows", "error")}})
    lines = [f"{a.family} shapes (random weights), onnx on CPU, {a.threads} threads",
             f"{'precision':<10} {'vision ms':>10} {'TTFT ms':>10} {'decode tok/s':>13} {'peak RSS MiB':>13} "
             f"{'size MB':>8} {'image rows':>11}"]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['precision']:<10} error: {r['error'][:80]}")
            continue
        lines.append(f"{r['precision']:<10} {r['vision_ms']:>10.1f} {r['ttft_ms']:>10.1f} {r['decode_tok_s']:>13.1f} "
                     f"{r['peak_rss_mb']:>13.0f} {r['size_mb']:>8.0f} {r['image_rows']!s:>11}")
    print("\n".join(lines))
    (out / "family_shapes.json").write_text(json.dumps({
        "family": a.family, "shapes": preset, "threads": a.threads, "results": rows, "timings_s": timings,
        "machine": rep.get("machine")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
