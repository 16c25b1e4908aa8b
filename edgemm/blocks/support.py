"""The support matrix: each model feature (a block, or a variant of one), the block that computes it, how a config
shows it, and the targets that compute it. Data, not prose: `ModelConfig.variants()`, every exporter's refusal,
`edgemm info` and `edgemm families` (and the README's family table, tested) are generated from FEATURES.

Targets: `torch` (the reference model), `onnx` and `trt` (edgemm's graphs: they share the decoder graph builder),
`gguf` (llama.cpp). llama.cpp computes edgemm's own family through its `cogvlm` architecture, which has none of the
features below; a feature marked `gguf="llava"` is computed by its `llama`/`qwen2` decoders with the `mlp` mmproj
projector, so a model reaches that graph only as a LLaVA composition (single branch + CLIP tower + MLP projector).
A vision-side feature marked `gguf="onnx"` has no llama.cpp graph: a gguf bundle carries its vision stage as the
ONNX graph the onnx exporter traces, run by ONNX Runtime beside llama.cpp's llama decoder (`gguf_vision`).
A family llama.cpp has an mtmd projector (and a decoder architecture) of its own for (Gemma 3: `gemma3` + projector
`gemma3`; SmolVLM / Idefics3: `llama` + projector `idefics3`; Qwen2-VL / 2.5-VL: `qwen2vl` + `qwen2vl_merger` /
`qwen2.5vl_merger`) is a composition in MTMD_GRAPHS: its features are computed by gguf only together.

This module is core: it imports nothing of edgemm, and a config is read by duck typing (`cfg.decoder`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

TARGETS = ("torch", "onnx", "trt", "gguf")
NO_TARGET = "none yet (the torch reference backend runs it)"
LLAVA_GRAPH = ("single branch (llava)", "clip vision tower", "mlp projector")     # what makes the llava gguf graph
# the projectors of llama.cpp's llava graph: `mlp`, `mlp_norm` (Yi-VL), and LLaVA v1's single Linear written as an
# `mlp` (export/gguf_tensors.py); any one of them with LLAVA_GRAPH's first two makes a LLaVA composition
LLAVA_PROJECTORS = {"mlp projector": "mlp", "linear projector": "linear", "mlp-norm projector": "mlp_norm"}
GEMMA3 = ("gemma3 projector (avg pool, rmsnorm, linear)",
          "gemma decoder (scaled embeddings, sandwich norms, geglu, query scale, local rope base)")
# Compositions llama.cpp computes with a decoder architecture and an mtmd projector of their own (not the llava graph):
# projector -> (the features that make it, the further features that graph computes). A feature listed here is
# computed by gguf only inside its composition (export/gguf.py writes the decoder and mmproj as llama.cpp's
# converter does: convert_hf_to_gguf.py's Gemma3Model / Gemma3VisionModel)
MTMD_GRAPHS = {
    "gemma3": (("single branch (llava)", "siglip vision tower", GEMMA3[0], GEMMA3[1]),
               ("per-head q/k norm", "grouped-query attention", "head_dim of its own", "sliding-window attention",
                "bidirectional attention among an image's rows")),
    "idefics3": (("single branch (llava)", "siglip vision tower", "pixel-shuffle linear projector",
                  "tile grid (smolvlm)"), ("grouped-query attention",)),
    # Qwen2-VL (projector qwen2vl_merger) and Qwen2.5-VL (qwen2.5vl_merger, its window attention): llama.cpp's
    # qwen2vl decoder (Qwen2 with M-RoPE: rope.dimension_sections) and tools/mtmd/models/qwen2vl.cpp
    # (convert_hf_to_gguf.py's Qwen2VLModel / Qwen2VLVisionModel)
    "qwen2vl": (("single branch (llava)", "qwen2-vl vision tower (2-d rope, any size)", "qwen2-vl patch merger",
                 "m-rope (3-d image positions)"),
                ("qkv bias", "grouped-query attention", "window attention (qwen2.5-vl)")),
}


@dataclass(frozen=True)
class Feature:
    name: str                           # as ModelConfig.variants() names it (manifests record these names)
    block: str                          # "role:kind" of the registered block that computes it (edgemm.blocks.registry),
                                        # or "option:..." for an option every block of its role has (attention
                                        # shapes: GQA, QKV bias, Q/K norm, head_dim; any-res tiling of the input)
    applies: Callable                   # cfg -> bool
    targets: tuple = ("torch", "onnx", "trt")
    gguf: str | None = None             # "llava": llama.cpp computes it in its llava graph; "onnx": the gguf
                                        # bundle's ONNX vision stage beside llama.cpp's decoder (see above)
    unquantized: str | None = None      # onnx/trt compute it unquantized only: the reason

    def computed_by(self, target: str) -> bool:
        return target in self.targets or (target == "gguf" and self.gguf is not None)


def _d(cfg):
    return cfg.decoder


FEATURES: tuple[Feature, ...] = (
    Feature("grouped-query attention", "option:attention",
            lambda c: bool(_d(c).n_kv_heads and _d(c).n_kv_heads != _d(c).n_heads), gguf="llava"),
    Feature("qkv bias", "option:attention", lambda c: bool(_d(c).qkv_bias), gguf="llava"),
    Feature("collapsed image positions (cogvlm position rule)", "layer:routed",
            lambda c: _d(c).position_rule != "sequential"),
    Feature("eoi through the text branch", "layer:routed", lambda c: _d(c).eoi_branch != "vision"),
    Feature("low-rank vision branches", "layer:low-rank",
            lambda c: bool(_d(c).vision_rank or _d(c).vision_down_ratio)),
    Feature("low-rank delta vision branches (partial-lora)", "layer:low-rank-delta",
            lambda c: bool(_d(c).vision_delta_rank)),
    Feature("per-modality norms", "layer:routed", lambda c: bool(_d(c).per_modality_norms)),
    Feature("cross-modal K/V bridge", "layer:bridge", lambda c: bool(_d(c).cross_modal_bridge)),
    Feature("per-modality K/V", "layer:per-modality-kv", lambda c: bool(_d(c).per_modality_kv)),
    Feature("single branch (llava)", "layer:single", lambda c: bool(_d(c).single_branch), gguf="llava"),
    Feature("gated cross-attention", "layer:gated-cross-attention", lambda c: bool(_d(c).cross_attn_every),
            unquantized="quantized precisions are not available for gated cross-attention models yet (their "
                        "calibration has no cross_kv statistics)"),
    Feature("mixture of experts", "layer:moe", lambda c: bool(_d(c).n_experts), gguf="llava"),
    Feature("per-head q/k norm", "option:attention", lambda c: bool(_d(c).qk_norm)),
    Feature("head_dim of its own", "option:attention",
            lambda c: bool(_d(c).attn_head_dim and _d(c).attn_head_dim * _d(c).n_heads != _d(c).d_model)),
    Feature("clip vision tower", "vision:clip", lambda c: c.vision.arch == "clip", gguf="llava"),
    Feature("mlp projector", "connector:mlp", lambda c: c.adapter.kind == "mlp", gguf="llava"),
    Feature("linear projector", "connector:linear", lambda c: c.adapter.kind == "linear", gguf="llava"),
    Feature("mlp-norm projector", "connector:mlp_norm", lambda c: c.adapter.kind == "mlp_norm", gguf="llava"),
    Feature("blip vision tower", "vision:blip", lambda c: c.vision.arch == "blip", gguf="onnx"),
    # gguf: inside its mtmd compositions (gemma3, idefics3) an mmproj, else an ONNX vision stage (LLaVA-OneVision:
    # llama.cpp's llava graph is CLIP's)
    Feature("siglip vision tower", "vision:siglip", lambda c: c.vision.arch == "siglip", gguf="onnx"),
    Feature("qwen-vl vision tower", "vision:qwen", lambda c: c.vision.arch == "qwen", gguf="onnx"),
    Feature("cross-attention resampler (qwen-vl)", "connector:resampler", lambda c: c.adapter.kind == "resampler", gguf="onnx"),
    # llama.cpp has no graph for it (MiniCPM-V's resampler attends to every patch): gguf takes it as an ONNX vision
    # stage, the slices cut on the host
    Feature("variable-size slices + spatially constrained resampler (llava-uhd)", "connector:uhd_resampler",
            lambda c: c.adapter.kind == "uhd_resampler", gguf="onnx"),
    Feature("per-window LoRA (monkey)", "vision:qwen", lambda c: bool(c.vision.window), gguf="onnx"),
    Feature("q-former adapter", "connector:qformer", lambda c: c.adapter.kind == "qformer", gguf="onnx"),
    Feature("q-former instruction input (instructblip)", "connector:qformer",
            lambda c: c.adapter.kind == "qformer" and bool(c.adapter.qformer_text), gguf="onnx"),
    Feature("eva vit-g vision tower (lavis)", "vision:eva_lavis", lambda c: c.vision.arch == "eva_lavis", gguf="onnx"),
    Feature("context + content tokens a frame (llama-vid)", "connector:llamavid",
            lambda c: c.adapter.kind == "llamavid", gguf="onnx"),
    Feature("any-resolution tiling", "option:anyres", lambda c: bool(c.vision.grid_pinpoints), gguf="llava"),
    # gguf: an ONNX vision stage (llama.cpp's internvl mmproj graph misorders the position rows against CLS;
    # tests/test_internvl_gguf.py measures it), the tiles cut on the host
    Feature("internvit vision tower", "vision:internvit", lambda c: c.vision.arch == "internvit", gguf="onnx"),
    Feature("pixel-shuffle projector", "connector:pixel_shuffle", lambda c: c.adapter.kind == "pixel_shuffle",
            gguf="onnx"),
    Feature("dynamic tiles (internvl)", "option:tiles", lambda c: c.vision.tiling == "internvl", gguf="onnx"),
    Feature("pixel-shuffle linear projector", "connector:pixel_shuffle_linear",
            lambda c: c.adapter.kind == "pixel_shuffle_linear"),
    Feature("tile grid (smolvlm)", "option:tiles", lambda c: c.vision.tiling == "smolvlm"),
    Feature("linear patch embedding (fuyu)", "vision:patch_linear", lambda c: c.vision.arch == "patch_linear"),
    Feature("persimmon decoder (layernorm, partial rope, relu2 mlp, biases)", "option:decoder",
            lambda c: _d(c).norm == "layer" or bool(_d(c).rope_dims) or _d(c).mlp == "relu2" or _d(c).linear_bias),
    Feature("dinov2 vision tower", "vision:dinov2", lambda c: c.vision.arch == "dinov2", gguf="onnx"),
    Feature("merged clip + dinov2 towers (omnifusion)", "vision:clip+dinov2", lambda c: c.vision.arch == "clip+dinov2",
            gguf="onnx"),
    Feature("begin/end-of-image rows (omnifusion)", "option:omni-rows", lambda c: c.adapter.kind.startswith("omni_"),
            gguf="onnx"),
    Feature("omnifusion mlp adapter", "connector:omni_mlp", lambda c: c.adapter.kind == "omni_mlp", gguf="onnx"),
    Feature("omnifusion transformer adapter", "connector:omni_transformer",
            lambda c: c.adapter.kind == "omni_transformer", gguf="onnx"),
    Feature(GEMMA3[0], "connector:gemma3", lambda c: c.adapter.kind == "gemma3"),
    Feature(GEMMA3[1], "option:decoder",
            lambda c: bool(_d(c).embed_scale or _d(c).sandwich_norms or _d(c).mlp == "geglu" or _d(c).query_scale)),
    Feature("sliding-window attention", "option:attention", lambda c: bool(_d(c).sliding_layers)),
    Feature("bidirectional attention among an image's rows", "option:attention",
            lambda c: bool(_d(c).image_bidirectional)),
    Feature("m-rope (3-d image positions)", "option:decoder", lambda c: bool(getattr(_d(c), "mrope_section", ()))),
    Feature("qwen2-vl vision tower (2-d rope, any size)", "vision:qwen2vl", lambda c: c.vision.arch == "qwen2vl"),
    Feature("window attention (qwen2.5-vl)", "vision:qwen2vl", lambda c: bool(getattr(c.vision, "window_px", 0))),
    Feature("qwen2-vl patch merger", "connector:qwen2vl_merger", lambda c: c.adapter.kind == "qwen2vl_merger"),
    Feature("libra image tokenizer (pixels)", "vision:libra_vq", lambda c: c.vision.arch == "libra_vq"),
    Feature("libra image tokens", "connector:libra", lambda c: c.vision.arch == "none" and c.adapter.kind == "libra",
            unquantized="quantized precisions calibrate on images through the pixel path, which a Libra import does "
                        "not have (its VQ image tokenizer is not imported)"),
)
BY_NAME = {f.name: f for f in FEATURES}
# Registered blocks without a row of their own: edgemm's own family's (every target computes them; gguf: llama.cpp's
# cogvlm decoder + mmproj), or a block that comes only with another feature's block (its row's targets are its own)
BASE_BLOCKS = {"vision:eva": None, "connector:glu": None,
               "vision:none": "libra image tokens", "connector:perceiver": "gated cross-attention",
               "connector:newline_rows": "linear patch embedding (fuyu)"}


def variants(cfg) -> list[str]:
    """Names of the non-default features a config uses, in FEATURES order."""
    return [f.name for f in FEATURES if f.applies(cfg)]


def targets_that_can(name: str, exclude: str | None = None) -> str:
    """The targets that compute the feature `name`, as a refusal names them ('onnx, trt'), or NO_TARGET."""
    f = BY_NAME.get(name)
    out = [t for t in TARGETS[1:] if f is not None and f.computed_by(t) and t != exclude]
    return ", ".join(out) or NO_TARGET


def refusal(cfg, target: str) -> str | None:
    """The first feature of cfg that `target` cannot compute, or None. gguf: features outside its llava graph are
    named before the llava / onnx ones, which need llama.cpp's llama decoder (a single-branch composition)."""
    names = cfg.variants()
    if target != "gguf":
        return next((v for v in names if v not in BY_NAME or not BY_NAME[v].computed_by(target)), None)
    llama, graph = LLAVA_GRAPH[0] in names, mtmd_features(names)
    for v in sorted(names, key=lambda v: v in BY_NAME and (BY_NAME[v].gguf is not None or v in graph)):
        if not (v in graph or llama and v in BY_NAME and BY_NAME[v].gguf):
            return v
    return None


def mtmd_graph(names) -> str | None:
    """The mtmd projector (MTMD_GRAPHS) whose composition these features make, or None."""
    return next((p for p, (core, _) in MTMD_GRAPHS.items() if all(v in names for v in core)), None)


def mtmd_features(names) -> tuple:
    """Every feature llama.cpp computes in the composition's own graph (MTMD_GRAPHS; () when it makes none)."""
    g = mtmd_graph(names)
    return MTMD_GRAPHS[g][0] + MTMD_GRAPHS[g][1] if g else ()


def gguf_vision(names) -> str:
    """Where a gguf bundle's vision stage runs: "mmproj" (llama.cpp's clip/mtmd computes the tower and projector:
    edgemm's own family, a LLaVA composition) or "onnx" (an ONNX graph run by ONNX Runtime beside llama.cpp's
    decoder: a vision side llama.cpp has no graph for)."""
    return "mmproj" if LLAVA_GRAPH[0] not in names or is_llava_graph(names) or mtmd_graph(names) else "onnx"


def is_llava_graph(names) -> bool:
    """Whether a composition (its feature names) is a LLaVA one, which llama.cpp computes in its llava graph."""
    return all(v in names for v in LLAVA_GRAPH[:2]) and any(p in names for p in LLAVA_PROJECTORS)


def export_targets(cfg) -> str:
    """The targets that export this config, from the matrix ('onnx, trt (fp32, fp16), ...'), or NO_TARGET."""
    q = bool(unquantized_only(cfg))
    out = [t + ({"onnx": " (fp32, fp16)", "trt": " (fp16)"}.get(t, "") if q else "")
           for t in TARGETS[1:] if refusal(cfg, t) is None]
    return ", ".join(out) or NO_TARGET


def unquantized_only(cfg) -> list[str]:
    """Reasons why cfg's onnx/trt graphs can be exported unquantized only (empty: any precision)."""
    return [f.unquantized for f in FEATURES if f.unquantized and f.applies(cfg)]


def target_summary(core: list[str], optional: list[str] = (), hints: dict | None = None) -> str:
    """'onnx, trt, gguf (not X)' for a family whose configs always use `core` and may use `optional`: the
    targets computing every core feature, each with the optional ones it lacks; unquantized-only noted."""
    hints = hints or {}
    llama, graph = LLAVA_GRAPH[0] in core, mtmd_features(core)
    out = []
    for t in TARGETS[1:]:
        def ok(name):
            f = BY_NAME[name]
            return (name in graph or llama and f.gguf is not None) if t == "gguf" else f.computed_by(t)
        feats = [BY_NAME[n] for n in core]
        if not all(ok(n) for n in core):
            continue
        lacks = [n for n in optional if not ok(n)]
        notes = []
        if t in ("onnx", "trt") and any(f.unquantized for f in feats):
            notes.append("fp32, fp16" if t == "onnx" else "fp16")
        if lacks:
            notes.append("not " + ", ".join(lacks))
        if t == "gguf" and gguf_vision(core) == "onnx":
            notes.append("vision stage in ONNX")
        if t in hints:
            notes.append(hints[t])
        out.append(t + (f" ({'; '.join(notes)})" if notes else ""))
    return ", ".join(out)
