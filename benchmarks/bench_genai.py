#!/usr/bin/env python
"""edgemm's ort decode step against ONNX Runtime GenAI on the same shapes and bit width (not a test).

    python benchmarks/bench_genai.py                       # bench-0.5b shapes, int4 and int8, context 64, 64 steps
    python benchmarks/bench_genai.py --threads 2 --rounds 5 --workdir /tmp/genai-bench   # keep the models

ONNX Runtime GenAI runs a plain Llama with the text-branch shapes of the preset (d_model, layers, heads, ffn,
vocab), random weights made with transformers' LlamaForCausalLM and converted by GenAI's own builder
(`onnxruntime_genai.models.builder`, `-e cpu`, its defaults: block 32, accuracy level 4). edgemm runs the same
preset exported with `export_onnx` (its defaults: int4 and int8-wo MatMulNBits block 128; `--edgemm-recipe
int4=int4-b32` for GenAI's block 32, like for like) on its ort backend. Each
engine prefills `--context` random token ids, then `--steps` greedy decode steps are timed.
Each measurement runs in a fresh process that loads one engine alone (`--worker`) and decodes `--repeats` times
(its median counts): on these machines an engine's speed depends on what else the process loaded and in which
order (seen here with both engines in one process: whichever was loaded second decoded faster), which a
per-process measurement leaves out. The processes alternate round by round (ABBA: the order reverses every round);
the table shows the median tok/s of `--rounds` rounds and the median of the per-round ratios edgemm / GenAI (both
engines of a round ran under the same load).
(llama.cpp: `python benchmarks/bench_gguf.py --stock` times edgemm's llamacpp backend against the stock loop.)
Needs the genai extra: pip install 'edgemm[genai]' (onnxruntime-genai, onnx-ir; CPU machines only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PAIRS = {"int4": ("int4", "int4"), "int8": ("int8-wo", "int8")}      # name -> (edgemm precision, GenAI -p)


def plain_llama(cfg, tok, out: Path, seed: int = 0) -> Path:
    """A random LlamaForCausalLM with the preset's text-branch shapes (+ edgemm's tokenizer, which GenAI's builder
    copies), saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    c = cfg.decoder
    torch.manual_seed(seed)
    hf = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                     num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
                     max_position_embeddings=c.max_seq_len, rms_norm_eps=c.rms_eps, rope_theta=c.rope_theta,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(hf).eval().save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tok.tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
    return out


def build_genai(src: Path, out: Path, precision: str, threads: int) -> Path:
    if (out / "genai_config.json").is_file():
        return out
    import subprocess
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(out.parent / "cache")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode:
        sys.exit(f"the GenAI builder failed:\n{r.stderr[-3000:]}")
    return out


class GenAI:
    def __init__(self, path: Path, threads: int, profile: str | None = None):
        import onnxruntime_genai as og
        cfg_path = path / "genai_config.json"
        gc = json.loads(cfg_path.read_text())
        opts = gc["model"]["decoder"].setdefault("session_options", {})
        opts["intra_op_num_threads"], opts["inter_op_num_threads"] = threads, 1
        opts.pop("enable_profiling", None)
        cfg_path.write_text(json.dumps(gc, indent=1))
        if profile:                                    # ONNX Runtime's profiler, written when the model goes
            opts["enable_profiling"] = profile
            cfg_path = Path(tempfile.mkdtemp(prefix="genai-prof-")) / "genai_config.json"
            for f in path.iterdir():                   # (a copy of the folder: the shared config stays as it was)
                (cfg_path.parent / f.name).symlink_to(f.resolve())
            (cfg_path.parent / "genai_config.json").unlink()
            cfg_path.write_text(json.dumps(gc, indent=1))
        self.og, self.model = og, og.Model(str(cfg_path.parent))

    def end_profile(self) -> None:
        del self.model

    def decode(self, prompt: list[int], steps: int, warmup: int) -> float:
        og = self.og
        p = og.GeneratorParams(self.model)
        n = len(prompt) + warmup + steps + 1
        p.set_search_options(max_length=n, min_length=n, do_sample=False)    # min_length: no stop at EOS
        g = og.Generator(self.model, p)
        g.append_tokens(np.asarray(prompt, np.int32))
        for _ in range(warmup):
            g.generate_next_token()
        t0 = time.perf_counter()
        for _ in range(steps):
            g.generate_next_token()
        return steps / (time.perf_counter() - t0)


class Edgemm:
    def __init__(self, bundle: Path, threads: int, profile: str | None = None):
        import onnxruntime as ort
        from edgemm.runtimes import load_backend
        if profile:                 # the backend's sessions with ONNX Runtime's profiler on (this process only)
            options = ort.SessionOptions

            def profiled():
                so = options()
                so.enable_profiling, so.profile_file_prefix = True, profile
                return so
            ort.SessionOptions = profiled
        self.b = load_backend("ort", bundle=str(bundle), device="cpu", threads=threads)

    def end_profile(self) -> None:
        self.b.sess["decoder_text"].end_profiling()

    def decode(self, prompt: list[int], steps: int, warmup: int) -> float:
        st = self.b.new_state(max_len=len(prompt) + warmup + steps + 2)
        tok = int(np.argmax(self.b.text(st, prompt)))
        for _ in range(warmup):
            tok = int(np.argmax(self.b.text(st, [tok])))
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = int(np.argmax(self.b.text(st, [tok])))
        return steps / (time.perf_counter() - t0)


ENGINES = {"edgemm": Edgemm, "genai": GenAI}


def measure(kind: str, path: Path, a) -> float:
    """One engine's decode tok/s, loaded alone in a fresh process (this script's --worker)."""
    import subprocess
    cmd = [sys.executable, __file__, "--worker", kind, str(path), "--threads", str(a.threads), "--context",
           str(a.context), "--steps", str(a.steps), "--warmup", str(a.warmup), "--repeats", str(a.repeats),
           "--preset", a.preset]
    if a.profile:
        cmd += ["--profile", a.profile]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"the {kind} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def kernel_times(prof_dir: Path) -> dict:
    """ONNX Runtime profiles in prof_dir -> {op type: kernel microseconds per decode step} over the decode runs
    (runs under twice the median run: the prefills are left out), "all": their sum."""
    import bisect
    from collections import Counter
    ev = [e for f in prof_dir.glob("*.json") for e in json.loads(f.read_text() or "[]")]
    runs = sorted((e for e in ev if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    med = statistics.median(r["dur"] for r in runs)
    dec = [r for r in runs if r["dur"] < 2 * med]
    starts, ops = [r["ts"] for r in dec], Counter()
    for n in ev:
        if n.get("cat") == "Node" and n.get("name", "").endswith("_kernel_time"):
            i = bisect.bisect_right(starts, n["ts"]) - 1
            if i >= 0 and n["ts"] <= dec[i]["ts"] + dec[i]["dur"]:
                ops[n["args"].get("op_name", "?")] += n["dur"]
    out = {k: v / len(dec) for k, v in ops.most_common()}
    return {"all": sum(out.values()), **out}


def bootstrap_median(xs: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the median of xs: whether a ratio's distance from 1.0 is more than
    the rounds' noise."""
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(np.asarray(xs, float), size=(n, len(xs))), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def worker(kind: str, path: str, a) -> int:
    from edgemm.config import get_preset
    vocab = get_preset(a.preset).decoder.vocab_size
    prompt = np.random.default_rng(0).integers(3, vocab, a.context).tolist()
    prof = Path(tempfile.mkdtemp(prefix="prof-", dir=a.profile)) if a.profile else None
    e = ENGINES[kind](Path(path), a.threads, profile=str(prof / "ort") if prof else None)
    out = {"tok_s": statistics.median(e.decode(prompt, a.steps, a.warmup) for _ in range(a.repeats))}
    if prof:
        e.end_profile()
        out["kernels"] = kernel_times(prof)
        out["kernels"]["outside kernels"] = 1e6 / out["tok_s"] - out["kernels"]["all"]    # the host's share
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "PATH"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="bench-0.5b")
    from edgemm.cpu import default_threads
    ap.add_argument("--threads", type=int, default=default_threads()[0],
                    help="default: the CPUs this process may use (affinity, cgroup quota)")
    ap.add_argument("--precisions", default="int4,int8", help="comma-separated: int4, int8")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="decodes per process (a fresh KV cache each); its median")
    ap.add_argument("--edgemm-recipe", default="", metavar="P=RECIPE,...", help="edgemm's recipe per precision "
                    "instead of its default, e.g. int4=int4-b32 (GenAI's block 32: like for like)")
    ap.add_argument("--workdir", default=None, help="keep the exported models here (reused when present)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, metavar="DIR", help="also run ONNX Runtime's profiler in both "
                    "engines (profiles kept in DIR) and print the kernel time per decode step by op type: what the "
                    "kernels cost, apart from the host loop (the profiler slows both)")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(*a.worker, a)
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        sys.exit("needs onnxruntime-genai: pip install 'edgemm[genai]'")
    import torch
    torch.set_num_threads(a.threads)
    from edgemm import shapes
    from edgemm.calib.recipes import get_recipe
    from edgemm.config import get_preset
    from edgemm.export.onnx import export_onnx
    from edgemm.model import EdgeMM
    from edgemm.tokenizer import Tokenizer, train_tokenizer

    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgemm-genai-")
    work = Path(a.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cfg = get_preset(a.preset)
    precisions = a.precisions.split(",")
    log = lambda s: print("# " + s, file=sys.stderr)   # noqa: E731
    hf = work / "plain-llama"
    model = None
    tok = Tokenizer(train_tokenizer(shapes.corpus_lines(), cfg.decoder.vocab_size))
    if not (hf / "config.json").is_file():
        log(f"building a plain Llama with the {a.preset} text-branch shapes")
        plain_llama(cfg, tok, hf)
    jobs = {}
    chosen = dict(x.split("=", 1) for x in a.edgemm_recipe.split(",") if x)      # --edgemm-recipe
    for name in precisions:
        ours, theirs = PAIRS[name]
        recipe = get_recipe(chosen.get(name, ours))
        bundle = work / f"edgemm-{ours}-b{recipe.block_size}"      # (a bundle per block size: reused when present)
        if not (bundle / "edgemm.json").is_file():
            if model is None:
                model = EdgeMM(cfg).init_weights().eval()
            log(f"exporting edgemm {ours}")
            export_onnx(model=(model, tok), out=bundle, precision=ours, threads=a.threads, log=None,
                        recipes={"decoder": recipe, "vision": recipe})
        log(f"edgemm {name}: recipe {recipe.name} (MatMulNBits block {recipe.block_size})")
        log(f"building ONNX Runtime GenAI {theirs}")
        jobs[f"edgemm-ort-{name}"] = ("edgemm", bundle)
        jobs[f"ort-genai-{name}"] = ("genai", build_genai(hf, work / f"genai-{theirs}", theirs, a.threads))
    runs, kern = {k: [] for k in jobs}, {k: [] for k in jobs}
    if a.profile:
        Path(a.profile).mkdir(parents=True, exist_ok=True)
    for r in range(a.rounds):         # interleaved rounds, ABBA; one fresh process per engine and round
        for k in (list(jobs) if r % 2 == 0 else list(jobs)[::-1]):
            got = measure(*jobs[k], a)
            runs[k].append(got["tok_s"])
            if "kernels" in got:
                kern[k].append(got["kernels"])
        log(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\n{a.preset} text-branch shapes, context {a.context}, {a.steps} greedy steps, {a.threads} threads, "
          f"median of {a.rounds} interleaved rounds (a fresh process per engine and round)")
    print(f"{'engine':<18} {'tok/s':>8}")
    for k, v in med.items():
        print(f"{k:<18} {v:>8.1f}")
    ratios = {n: [x / y for x, y in zip(runs[f"edgemm-ort-{n}"], runs[f"ort-genai-{n}"])]
              for n in precisions}                  # round by round: both engines ran under the same load
    paired = {n: statistics.median(rs) for n, rs in ratios.items()}
    for n, x in paired.items():
        rs = ratios[n]
        lo, hi = bootstrap_median(rs)
        print(f"ratio edgemm-ort-{n} / ort-genai-{n}: {x:.3f} (median of the per-round ratios, 95% bootstrap "
              f"interval {lo:.3f}-{hi:.3f}, rounds {min(rs):.3f}-{max(rs):.3f}; of the medians "
              f"{med[f'edgemm-ort-{n}'] / med[f'ort-genai-{n}']:.3f})")
    if a.profile:
        print("\nkernel time per decode step, us (ONNX Runtime's profiler; median of the rounds)")
        for k, ks in kern.items():
            top = ["outside kernels"] + sorted((o for o in ks[0] if o != "outside kernels"), key=lambda o: -ks[0][o])[:5]
            print(f"{k:<18} " + ", ".join(f"{o} {statistics.median(d.get(o, 0.0) for d in ks):.0f}" for o in top))
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "median": med, "ratios": paired,
                                            "args": vars(a)}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
