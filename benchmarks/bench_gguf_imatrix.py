#!/usr/bin/env python
"""Why llama.cpp's q4_k_m with an importance matrix can fit the fp32 model worse than without one (issue 33; not a
test). On tiny-shapes-outliers (`--spec kquant`: weight outliers beside the activation outliers):

    python benchmarks/bench_gguf_imatrix.py --spec kquant                     # fidelity KL, 3 ways, per file
    python benchmarks/bench_gguf_imatrix.py --spec kquant --accuracy 200      # + accuracy, emulated
    python benchmarks/bench_gguf_imatrix.py --spec kquant --ablate            # + one tensor kind at a time

Writes the decoder in f32 and quantizes it with llama.cpp (llama_model_quantize) three ways: q4_k_m without a
matrix, with the matrix of the float activations' mean x^2 (what llama-imatrix sums), and with the matrix of the
activations as ggml's CPU kernels multiply them (Q8_K-rounded, calib.stats.q8k_round: what edgemm writes). Per file,
the mean KL(fp32 || quantized) on the GGUF export check's fidelity prompts (export/gguf_validate.fidelity) three
ways: run by llama.cpp; the dequantized weights in the torch model (float activations); the same with every decoder
linear's input rounded to Q8_K as ggml's kernels do. The third reproducing the first is the evidence that the
activation rounding, not the weights, decides. --accuracy N: accuracy on N test questions of the torch model with the
dequantized weights and Q8_K inputs (fp32 with Q8_K inputs as a baseline). Also the llama.cpp KL per position:
the check's mean over 30 positions of one image is decided by one or two of them. --ablate: the q4_k_m file with one tensor
kind swapped for the float-sum matrix file's (Q8_K inputs).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

NAMES = {"attn_qkv": "text.qkv", "attn_output": "text.o", "ffn_gate": "text.gate", "ffn_up": "text.up",
         "ffn_down": "text.down", "vis_attn_qkv": "vision.qkv", "vis_attn_output": "vision.o",
         "vis_gate": "vision.gate", "vis_up": "vision.up", "vis_down": "vision.down"}


def param_name(t: str) -> str | None:
    """A cogvlm GGUF tensor name -> the edgemm parameter it was written from."""
    if t == "token_embd.weight":
        return "decoder.tok_embeddings.weight"
    if t == "output.weight":
        return "decoder.lm_head.weight"
    p = t.split(".")
    return f"decoder.layers.{p[1]}.{NAMES[p[2]]}.weight" if p[0] == "blk" and p[2] in NAMES else None


def dequantized(model, path: Path, only=None):
    """A copy of `model` with the (dequantized) weights of the GGUF file (tensors named in `only`, if given)."""
    import gguf
    import torch
    from gguf.quants import dequantize
    m2 = copy.deepcopy(model)
    ps = dict(m2.named_parameters())
    for t in gguf.GGUFReader(str(path)).tensors:
        pn = param_name(t.name)
        if pn and (only is None or t.name in only):
            with torch.no_grad():
                ps[pn].copy_(torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(ps[pn].shape)))
    return m2


def q8k_inputs(model):
    """Round every decoder linear's input as ggml's CPU kernels do for K-quant weights (calib.stats.q8k_round)."""
    import torch
    from edgemm.calib.stats import QK_K, q8k_round
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("decoder.") and mod.in_features % QK_K == 0:
            mod.register_forward_pre_hook(lambda _m, inp: (torch.from_numpy(q8k_round(inp[0].float().numpy())),))
    return model


class TorchRun:
    """The calls fidelity() makes of a LlamaRunner, on a torch model."""

    def __init__(self, model):
        self.m = model
        self.clear()

    def clear(self):
        from edgemm.model import KVCache
        self.cache = KVCache.empty(self.m.cfg.decoder, 1)

    def decode_tokens(self, ids, pos):
        import torch
        with torch.inference_mode():
            r, _ = self.m.forward_segment("text", torch.tensor([list(ids)]), self.cache, pos)
        return r[0, -1].float().numpy()

    def decode_embd(self, a, pos, bidirectional=False, positions=None):
        import torch
        with torch.inference_mode():
            self.m.forward_segment("image", torch.from_numpy(np.asarray(a))[None], self.cache, pos)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-shapes-outliers")
    ap.add_argument("--spec", default="kquant")
    ap.add_argument("--out", default="runs/gguf-imatrix")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--accuracy", type=int, default=0, help="test questions for the emulated accuracy (0: none)")
    ap.add_argument("--ablate", action="store_true")
    a = ap.parse_args(argv)
    import torch
    from edgemm.calib.stats import collect_stats
    from edgemm.checkpoint import load_model
    from edgemm.cpu import threads_or_default
    from edgemm.export.gguf import decoder_arch, write_decoder_gguf
    from edgemm.export.gguf_imatrix import imatrix_entries, write_imatrix
    from edgemm.export.gguf_quant import quantize_decoder
    from edgemm.export.gguf_validate import fidelity, validation_image
    from edgemm.outliers import use_spec
    from edgemm.runtimes.llamacpp_runner import LlamaRunner
    from edgemm.tilings import preprocess_image
    use_spec(a.spec)
    threads = threads_or_default(a.threads)
    torch.set_num_threads(threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    m, tok = load_model(a.model)
    cfg = m.cfg
    st = collect_stats(a.model, None, log=lambda s: print(s, file=sys.stderr))
    write_decoder_gguf(m, tok, out / "f32.gguf", "t")
    files = {"q4_k_m": None, "q4_k_m + float-sum matrix": False, "q4_k_m + Q8_K-sum matrix (edgemm)": True}
    paths = {}
    for label, q8k in files.items():
        imx = None
        if q8k is not None:
            imx = write_imatrix(out / f"imatrix-{'q8k' if q8k else 'float'}.gguf",
                                imatrix_entries(st, decoder_arch(cfg), q8k=q8k), ["calib"], st.meta.get("samples") or 1)
        paths[label] = out / f"q4_k_m-{['plain', 'float', 'q8k'][[None, False, True].index(q8k)]}.gguf"
        quantize_decoder(out / "f32.gguf", paths[label], "q4_k_m", threads, imatrix=imx)
    with torch.inference_mode():
        rows = m.encode_image(torch.from_numpy(np.asarray(preprocess_image(validation_image(cfg), cfg.vision))))

    per = {}

    def llama(path):
        run = LlamaRunner(path, cfg.decoder.max_seq_len, threads, n_batch=512, f32_kv=True)
        try:
            r = fidelity(m, tok, run, rows)
            per[path] = r["kl_per_position"]
            return r["mean_kl"]
        finally:
            run.close()
    print(f"{a.model} (spec {a.spec}): mean KL(fp32 || file) on the GGUF check's fidelity prompts")
    print(f"{'file':<36} {'llama.cpp':>10} {'torch, float inputs':>20} {'torch, Q8_K inputs':>19}")
    print(f"{'fp32 weights':<36} {'':>10} {0.0:>20.4f} {fidelity(m, tok, TorchRun(q8k_inputs(copy.deepcopy(m))), rows)['mean_kl']:>19.4f}")  # noqa: E501
    for label, p in paths.items():
        dq = dequantized(m, p)
        print(f"{label:<36} {llama(p):>10.4f} {fidelity(m, tok, TorchRun(dq), rows)['mean_kl']:>20.4f} "
              f"{fidelity(m, tok, TorchRun(q8k_inputs(copy.deepcopy(dq))), rows)['mean_kl']:>19.4f}", flush=True)
    print("\nllama.cpp, KL per position (questions x positions; the mean is decided by a few):")
    for label, p in paths.items():
        print(f"{label:<36} " + " ".join(f"{k:.3f}" for k in per[p]))
    if a.accuracy:
        from edgemm.evaluate import evaluate
        from edgemm.runtimes.torch_backend import TorchBackend
        print(f"\naccuracy on {a.accuracy} test questions, torch with Q8_K inputs (llama.cpp's numerics, emulated)")
        for label, mm in [("fp32 (float inputs)", m), ("fp32 weights", q8k_inputs(copy.deepcopy(m)))] + [
                (label, q8k_inputs(dequantized(m, p))) for label, p in paths.items()]:
            r = evaluate(TorchBackend(mm, tok), limit=a.accuracy, progress=False)
            print(f"{label:<36} {r['accuracy']:.3f} ({r['correct']}/{r['total']})", flush=True)
    if a.ablate:
        import gguf
        base = dequantized(m, paths["q4_k_m"])
        kinds: dict = {}
        for t in gguf.GGUFReader(str(paths["q4_k_m"])).tensors:
            if param_name(t.name):
                kinds.setdefault(t.name.split(".")[-2] if t.name.startswith("blk.") else t.name, set()).add(t.name)
        print("\nq4_k_m with one tensor kind taken from a matrix file: mean KL, torch with Q8_K inputs")
        print(f"{'tensor kind':<20} {'float-sum matrix':>17} {'Q8_K-sum matrix':>16}")
        for k, names in kinds.items():
            kl = [fidelity(m, tok, TorchRun(q8k_inputs(dequantized(base, paths[lbl], names))), rows)["mean_kl"]
                  for lbl in list(paths)[1:]]
            print(f"{k:<20} {kl[0]:>17.4f} {kl[1]:>16.4f}", flush=True)


if __name__ == "__main__":
    main()
