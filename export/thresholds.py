"""The one table of export-check thresholds: per target, precision and stage, the metric and its bound. The onnx
check (export/onnx.py), the TensorRT Q/DQ-graph check on ONNX Runtime (export/trt.py), the engine check
(export/trt_engines.py) and the GGUF check (export/gguf_validate.py) all judge with it, every manifest records the
rows its check used (`validation.thresholds`), and README's threshold table is generated from it
(`python -m edgemm.export.thresholds`; tests/test_thresholds.py keeps them equal).

Metrics (figures of edgemm.export.validate.compare over every compared vector of a stage, the worst one judged):
    cosine          cosine similarity with the reference, >= bound
    max_abs         max abs error, <= bound
    max_abs_rel     max abs error, <= bound * max(1, max |reference|)
    mean_kl         mean KL(reference || export) of next-token distributions, <= bound (GGUF fidelity prompts)
    top1_confident  top-1 agreement where the reference is sure, >= bound (GGUF fidelity prompts)

Where the figures come from: `python benchmarks/check_thresholds.py` exports the test suite's tiny models at every
quantized precision and prints each stage's worst figure on its held-out check prompts; the bounds sit a margin
under those figures (the comment of each row), never above what a broken graph gives (cosine ~0).
"""
from __future__ import annotations

from dataclasses import dataclass

HIGHER = ("cosine", "top1_confident")          # metrics that pass at or above their bound; the others at or below


@dataclass(frozen=True)
class Bound:
    metric: str
    value: float

    def ok(self, value, scale: float = 1.0) -> bool:
        if value is None:
            return True                                 # not compared (e.g. any-resolution mtmd rows)
        if self.metric in HIGHER:
            return value >= self.value
        return value <= self.limit(scale)

    def limit(self, scale: float = 1.0) -> float:
        return self.value * max(1.0, scale) if self.metric == "max_abs_rel" else self.value

    def text(self, scale: float | None = None) -> str:
        if self.metric == "max_abs_rel":
            if scale is None:
                return f"max abs <= {self.value:g} x max(1, max abs of the reference)"
            return f"max abs <= {self.limit(scale):.3g}"
        op = ">=" if self.metric in HIGHER else "<="
        name = {"max_abs": "max abs", "mean_kl": "mean KL", "top1_confident": "top-1 where sure"}.get(self.metric,
                                                                                                     self.metric)
        return f"{name} {op} {self.value:g}"


def _cos(v):
    return (Bound("cosine", v),)


# fp32 (and trt fp16's fp32 Q/DQ graphs): float reassociation, which grows with the values' scale: relative to the
# reference's largest value (Qwen-VL's real-shape vision stage, rows up to 15.1: max abs 1.08e-4, 7e-6 of its scale;
# the tiny models' stages are under 1, where this is the absolute 1e-4 it replaced)
_FP32 = (Bound("max_abs_rel", 1e-4),)
# "*" is every stage of the precision not named. Stages: the input stage (vision, or Libra's image_tokens),
# cross_kv (gated cross-attention), decoder_text (the held-out prompt's question, then greedy steps up to </s>),
# decoder_image (the logits at the image segment's last row, never sampled: a text segment always follows),
# decoder_batch (onnx: decode_batch over several KV caches against one-at-a-time steps; quantized bundles against
# their own steps, so it measures batching, not quantization).
# Measured (benchmarks/check_thresholds.py, 16 held-out prompts each, the worst stage figure over the suite's tiny
# models: shipped, random, random-c2, random3, moe; cosines of mean-removed vectors) beside each bound; a bound sits
# where its error (1 - cosine) is several times the worst measured one (2.5-10x), never looser than before.
TABLE: dict[tuple[str, str], dict[str, tuple[Bound, ...]]] = {
    ("onnx", "fp32"): {"*": _FP32},
    # fp16: worst max abs / max(1, |ref|) 8.7e-4 (random), 9.0e-4 with fp16 compute (--device cuda, shipped
    # decoder_image), cosine > 0.99999
    ("onnx", "fp16"): {"*": (Bound("max_abs_rel", 5e-3), Bound("cosine", 0.9999))},
    # int8: worst 0.99883 (shipped decoder_image), int8-sq decoder_text 0.99607 (random, 2 calibration samples);
    # bench-0.5b 0.99761 (decoder_text, first prompt); decoder_batch 1.0 (the bundle's own steps, exact)
    ("onnx", "int8"): {"*": _cos(0.99), "decoder_batch": _cos(0.999)},
    # fp8: worst 0.99561 (shipped decoder_image), 0.99579 (random decoder_text, 2 calibration samples)
    ("onnx", "fp8"): {"*": _cos(0.98), "decoder_batch": _cos(0.999)},
    # int8 weight-only: worst 0.99968 (shipped decoder_image); bench-0.5b 0.99901 (decoder_text, first prompt)
    ("onnx", "int8-wo"): {"*": _cos(0.995), "decoder_batch": _cos(0.999)},
    # int4 (block 128): worst decoder_image 0.93811 (shipped), decoder_text 0.95032 (random; moe 0.984), vision
    # 0.99019; but bench-0.5b (random weights, 16 layers, the preset benchmarks/bench_genai.py and bench_quant.py
    # export at int4) measures decoder_text 0.884, decoder_image 0.905, vision 0.941 on its first held-out prompt:
    # the bound stays at 0.8. decoder_batch 0.99990 (MatMulNBits' batched path against its own single steps;
    # bench-0.5b 0.99980)
    ("onnx", "int4"): {"*": _cos(0.8), "decoder_batch": _cos(0.999)},
    # trt: the Q/DQ graphs on ONNX Runtime's CPU provider (fp16: fp32 graphs, TensorRT applies fp16 at build)
    ("trt", "fp16"): {"*": _FP32},
    # int8: worst vision 0.99962, decoder_text 0.99890, decoder_image 0.99876 (InstructBLIP's random tiny LM:
    # decoder_text 0.943 on an AVX2 EPYC, so tests/test_qformer.py quantizes its vision stage only)
    ("trt", "int8"): {"*": _cos(0.99)},
    # fp8: worst vision 0.99916, decoder_text 0.99618, decoder_image 0.99571 (shipped)
    ("trt", "fp8"): {"*": _cos(0.98)},
    # build-engines: each engine against its own Q/DQ graph, the same inputs
    ("trt-engine", "*"): {"*": _cos(0.99)},
    # gguf, by the decoder's type: logits = next-token logits of the text-only and the image prompt (decoder in
    # llama.cpp, reference image rows); fidelity = the fixed question set (export/gguf_validate.py). By the mmproj's
    # type: vision = the f32 mmproj's rows through the reference code, mtmd_rows = llama.cpp's mtmd rows (f32:
    # relative max abs, ggml's GELU table; f16 / q8_0 / q4_0: cosine, tiny-shapes q8_0 measured 0.9999, a
    # sign-flipped projector -1), mtmd_logits = the logits after the f32 mmproj's mtmd rows
    ("gguf", "f32"): {"logits": (Bound("max_abs", 1e-3),), "fidelity": (Bound("mean_kl", 1e-4),
                                                                        Bound("top1_confident", 0.99)),
                      "vision": (Bound("max_abs", 1e-3),), "mtmd_rows": (Bound("max_abs_rel", 5e-3),),
                      "mtmd_logits": (Bound("max_abs", 1e-2),)},
    ("gguf", "f16"): {"logits": (Bound("max_abs", 5e-2),), "fidelity": (Bound("mean_kl", 1e-3),
                                                                        Bound("top1_confident", 0.95)),
                      "mtmd_rows": _cos(0.99)},
    ("gguf", "q8_0"): {"fidelity": (Bound("mean_kl", 5e-3), Bound("top1_confident", 0.9)), "mtmd_rows": _cos(0.99)},
    ("gguf", "q6_k"): {"fidelity": (Bound("mean_kl", 2e-2), Bound("top1_confident", 0.85))},
    ("gguf", "q5_k_m"): {"fidelity": (Bound("mean_kl", 5e-2), Bound("top1_confident", 0.85))},
    ("gguf", "q4_k_m"): {"fidelity": (Bound("mean_kl", 0.1), Bound("top1_confident", 0.85))},
    ("gguf", "q4_0"): {"fidelity": (Bound("mean_kl", 0.15), Bound("top1_confident", 0.8)), "mtmd_rows": _cos(0.99)},
}


def bounds(target: str, precision: str, stage: str) -> tuple[Bound, ...]:
    """The bounds a check of `stage` at `precision` on `target` must meet (() where the table has none)."""
    row = TABLE.get((target, precision)) or TABLE.get((target, "*")) or {}
    return row.get(stage, row.get("*", ()))


def bound(target: str, precision: str, stage: str, metric: str) -> float | None:
    """One bound's value, or None where the table has none."""
    return next((b.value for b in bounds(target, precision, stage) if b.metric == metric), None)


def judge(target: str, stage: str, p: str, err: float, cos: float, scale: float) -> tuple[str, bool]:
    """edgemm.export.validate.summarize's judge: a stage's worst figures against the table -> (text, ok)."""
    bs = bounds(target, p, stage)
    if not bs:
        raise KeyError(f"no threshold for {target} {p} {stage}")
    fig = {"cosine": cos, "max_abs": err, "max_abs_rel": err}
    return ", ".join(b.text(scale) for b in bs), all(b.ok(fig[b.metric], scale) for b in bs)


def used(target: str, precision_of, stages) -> dict:
    """The manifest's record of the thresholds a check used: {stage: "bound, bound"}; precision_of(stage) -> p."""
    return {s: ", ".join(b.text() for b in bounds(target, precision_of(s), s)) for s in stages}


def table_rows() -> list[list[str]]:
    """[target, precision, stage, bound] rows, in the table's order (README's threshold table)."""
    rows = []
    for (target, p), stages in TABLE.items():
        for stage, bs in stages.items():
            rows.append([target, "every precision" if p == "*" else p, "every other stage" if stage == "*" and len(stages) > 1 else
                         "every stage" if stage == "*" else stage, ", ".join(b.text() for b in bs)])
    return rows


def readme_table() -> str:
    lines = ["| target | precision | stage | check |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(f"`{c}`" if i < 3 and not c.startswith("every ") else c
                                for i, c in enumerate(r)) + " |" for r in table_rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_table())
