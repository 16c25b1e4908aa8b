"""Quantization recipes: small frozen dataclasses, one entry point (`edgemm.calib.quantize.quantize_stage`).

    int8      W8A8 static Q/DQ: int8 weights per output channel, int8 activations per tensor from calibration
              (symmetric, zero point 0: the explicit-quantization form TensorRT consumes); SmoothQuant optional
    int8-sq   int8 with SmoothQuant migration (alpha 0.5)
    int8-shared  int8 with ONE activation scale per layer for text and image rows (the two branches' statistics
              merged: what a modality-unaware calibration computes); for comparison (benchmarks/bench_outliers.py)
    int8-wo   int8 weight-only, block-wise (MatMulNBits bits=8); activations stay float in the graph
    int4      4-bit weight-only, block-wise (MatMulNBits bits=4), a scale per 128 weights (AWQ/GPTQ's group size)
    int4-awq  int4 with AWQ's activation-aware scaling per input channel, from each branch's own calibration rows
    int4-gptq int4 rounded by GPTQ (act-order; error feedback through the inverse Hessian of each branch's own
              calibration inputs: text rows for decoder_text, image rows for decoder_image)
    int4-awq-gptq  AWQ's per-input-channel scaling, then GPTQ's rounding of the scaled weights
    int4-b32  int4 with a scale per 32 weights (ONNX Runtime GenAI's builder default): finer, 5 bits a weight
    fp8       E4M3FN Q/DQ for weights (per output channel) and activations (per tensor); opset 19
    int8-dyn  int8 weights per output channel (7 bits: [-63, 63]), activations quantized per tensor at run time
              (com.microsoft DynamicQuantizeMatMul: MLAS's u8 x s8 QGEMM); no calibration. The form of the int4
              precision's many-row stages (vision, decoder_image: PREFILL_RECIPE), whose MatMuls run hundreds of
              rows: MatMulNBits' int8 path is a per-row kernel there, QGEMM a tiled one (benchmarks/
              bench_matmul_kernels.py). 7 bits so that the u8 x s8 kernels' 16-bit pair sums never saturate on x86
              CPUs without VNNI (ONNX Runtime's own `reduce_range` advice)

MatMulNBits' accuracy_level 4 (the default here) computes with int8 dot products, the activations quantized
per block on the fly inside the kernel: ONNX Runtime's fast CPU path. accuracy_level 0 keeps fp32 compute.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgemm.errors import EdgemmError


@dataclass(frozen=True)
class Recipe:
    name: str
    weights: str                         # "int8" | "int4" | "fp8"
    activations: str | None = None       # "int8" | "fp8" | None (weight-only)
    granularity: str = "per-channel"     # weights: "per-channel" (Q/DQ) | "block" (MatMulNBits) | "dynamic"
    #                                      (per channel, activations quantized at run time: DynamicQuantizeMatMul)
    block_size: int = 0                  # block-wise: weights per scale along the input dimension
    method: str = "max"                  # activation amax: max | percentile | entropy
    percentile: float = 99.99
    smoothquant: float | None = None     # SmoothQuant migration strength alpha (W8A8 only)
    accuracy_level: int = 4              # MatMulNBits compute: 0 fp32, 4 int8
    keep_sensitive: float | None = None  # keep layers whose relative output error exceeds this at fp32
    shared_scale: bool = False           # one activation scale for text and image rows (Stats.shared())
    awq: bool = False                    # weight-only: AWQ activation-aware per-input-channel scaling
    gptq: bool = False                   # weight-only: GPTQ rounding with each branch's Hessian

    @property
    def needs_stats(self) -> bool:
        return self.activations is not None or self.smoothquant is not None or self.awq or self.gptq

    def with_options(self, **kw) -> "Recipe":
        kw = {k: v for k, v in kw.items() if v is not None}
        r = dataclasses.replace(self, **kw)
        r.check()
        return r

    def check(self) -> "Recipe":
        from .stats import METHODS
        if self.method not in METHODS:
            raise EdgemmError(f"unknown calibration method {self.method!r}; methods: {', '.join(METHODS)}")
        if self.granularity == "block" and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise EdgemmError(f"block size {self.block_size}: must be a power of 2, at least 16")
        if self.smoothquant is not None and not (0 <= self.smoothquant <= 1 and self.activations):
            raise EdgemmError("SmoothQuant needs quantized activations and an alpha in [0, 1]")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if self.granularity == "dynamic":
            return (f"{self.weights} weights per output channel (7 bits); activations {self.weights} per tensor at "
                    "run time (DynamicQuantizeMatMul)")
        w = f"{self.weights} weights " + (f"block-wise (block {self.block_size}, MatMulNBits, accuracy_level "
                                          f"{self.accuracy_level})" if self.granularity == "block"
                                          else "per output channel (Q/DQ)")
        a = (f"; {self.activations} activations per tensor, static ({self.method}"
             + (f" {self.percentile}" if self.method == "percentile" else "") + ")") if self.activations \
            else "; activations float (weight-only)"
        sq = f"; SmoothQuant alpha {self.smoothquant}" if self.smoothquant is not None else ""
        return (w + a + sq + ("; one activation scale shared by text and image rows" if self.shared_scale else "")
                + ("; AWQ activation-aware scaling" if self.awq else "")
                + ("; GPTQ rounding, act-order (per-branch Hessians)" if self.gptq else ""))


RECIPES: dict[str, Recipe] = {
    "int8": Recipe("int8", "int8", "int8", method="percentile"),
    "int8-sq": Recipe("int8-sq", "int8", "int8", method="percentile", smoothquant=0.5),
    "int8-shared": Recipe("int8-shared", "int8", "int8", method="percentile", shared_scale=True),
    "int8-wo": Recipe("int8-wo", "int8", None, "block", block_size=128),
    # block 128: bench-0.5b decodes 1.19-1.27x as fast as ONNX Runtime GenAI's block-32 int4, level with it at 32
    # (benchmarks/bench_genai.py), and the shipped model keeps its test-split accuracy (0.969, `edgemm bench`)
    "int4": Recipe("int4", "int4", None, "block", block_size=128),
    "int4-awq": Recipe("int4-awq", "int4", None, "block", block_size=128, awq=True),
    "int4-gptq": Recipe("int4-gptq", "int4", None, "block", block_size=128, gptq=True),
    "int4-awq-gptq": Recipe("int4-awq-gptq", "int4", None, "block", block_size=128, awq=True, gptq=True),
    "int4-b32": Recipe("int4-b32", "int4", None, "block", block_size=32),
    "fp8": Recipe("fp8", "fp8", "fp8", method="max"),
    "int8-dyn": Recipe("int8-dyn", "int8", None, "dynamic"),
}

# --precision -> the recipe of its stages that only ever run many rows at once (the vision stage; decoder_image,
# which appends an image's rows): int4 keeps its decode graph (decoder_text) at int4, these compute with int8 dot
# products. bench-0.5b, 2 threads, AVX2 without VNNI (a loaded machine): kernel time of the vision stage 1.5x and of
# the image rows' prefill 1.3x less than MatMulNBits int4 at accuracy_level 4 (benchmarks/profile_ort.py), and the
# stages' cosine to the reference 0.998 / 0.996 where int4 had 0.941 / 0.905; the bundle is larger (254 -> 376 MB)
PREFILL_RECIPE = {"int4": "int8-dyn"}
PREFILL_STAGES = ("vision", "decoder_image", "video")

# --precision value -> recipe name; these are the quantized precisions of every ONNX-graph target
PRECISION_RECIPE = {"int8": "int8", "int8-wo": "int8-wo", "int4": "int4", "fp8": "fp8"}
# --precision value -> its recipe when a calibration set is given (--calib, or statistics passed in), for every
# stage or ({group: recipe}) for a stage group's stages: the best measured on the outlier models
# (benchmarks/bench_outliers.py, README). int4 without a calibration set stays round-to-nearest (it needs no
# calibration pass). The decoders' int8 migrates activation outliers into the weights (SmoothQuant): on the
# kquant variant, whose weights have outlier columns too, per-branch int8 without it is refused by its export
# check (image stage cosine 0.961) while int8-sq keeps fp32's accuracy; on the preset the two are level.
CALIBRATED_RECIPE = {"int4": "int4-awq-gptq", "int8": {"decoder": "int8-sq"}}
QUANTIZED = tuple(PRECISION_RECIPE)
QDQ = ("int8", "fp8")                    # W8A8 Q/DQ (calibrated activations): the trt target's quantized ones
# export checks' thresholds: edgemm.export.thresholds (one table for every target)


def get_recipe(name_or_recipe) -> Recipe:
    if isinstance(name_or_recipe, Recipe):
        return name_or_recipe.check()
    name = PRECISION_RECIPE.get(name_or_recipe, name_or_recipe)
    if name not in RECIPES:
        raise EdgemmError(f"unknown quantization recipe {name_or_recipe!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name].check()


def group(stage: str) -> str:
    """The --precision group of a stage: `decoder` for the decoder stages, `vision` for the input stage."""
    return "decoder" if stage.startswith("decoder") or stage == "cross_kv" else "vision"
