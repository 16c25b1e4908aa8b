"""`edgemm info`: what a model or bundle is, parameters per branch, memory estimates."""
from __future__ import annotations

from pathlib import Path

from .blocks import spec, support
from .blocks.kinds import connectors, vision as towers
from .blocks.params import PARTS, param_part
from .config import ModelConfig, get_preset
from .errors import EdgemmError

# bytes per stored KV value: q8_0 blocks hold 32 values in 34 bytes (an f16 scale + 32 int8), q4_0 in 18
KV_TYPE_BYTES = {"f32": 4.0, "fp32": 4.0, "f16": 2.0, "fp16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32,
                 "int8": 1.0, "fp8": 1.0}

# bytes per weight; int4 (MatMulNBits block 128, fp32 scales) and GGUF types include their block scales
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / 128,
                    "q8_0": 34 / 32, "q6_k": 210 / 256, "q5_k_m": 176 / 256, "q4_k_m": 144 / 256, "q4_0": 18 / 32}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per part, from the config alone (no weights; works for cogvlm-17b)."""
    v, a, d = cfg.vision, cfg.adapter, cfg.decoder
    tower, connector = spec.get("vision", v.arch), spec.get("connector", a.kind)
    vision = (tower.params or towers.eva_params)(cfg)        # a kind without its own count: the EVA arithmetic
    adapter = (connector.params or connectors.glu_params)(cfg)
    D = d.d_model
    qkv_out = (d.n_heads + 2 * d.kv_heads) * d.head_dim
    branch_layer = (D * qkv_out + (qkv_out if d.qkv_bias else 0) + d.attn_width * D + 3 * D * d.ffn_dim
                    + (2 * d.head_dim if d.qk_norm else 0))            # Qwen3: per-head Q and K RMSNorm weights
    shared = d.vocab_size * D * (1 if d.tie_embeddings else 2) + d.n_layers * 2 * D + D
    text = d.n_layers * (branch_layer - 3 * D * d.ffn_dim) + d.ffn_params()[0]        # MoE: every expert
    if d.cross_attn_every:              # gated cross-attention (edgemm.xattn): the layers the text branch gains
        nx = d.n_layers // d.cross_attn_every
        text += nx * (2 * D * D + 3 * D * d.ffn_dim + 2 * D + 2 * (D if d.cross_attn_alpha == "vector" else 1))
    return {"vision_tower": vision, "adapter": adapter, "decoder_shared": shared,
            "text_branch": text, "vision_branch": 0 if d.single_branch else d.n_layers * branch_layer}


def checkpoint_param_counts(path: str | Path) -> dict[str, int]:
    """Parameters per part of a checkpoint folder, from its safetensors headers (checked first; nothing loaded):
    exact for every imported variant, where param_counts(cfg) has only the config's arithmetic."""
    from safetensors import safe_open

    from .checkpoint import shard_files
    from .safety import check_safetensors
    path = Path(path)
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else \
        [path / f for f in shard_files(path)]
    out = dict.fromkeys(PARTS, 0)
    for f in files:
        check_safetensors(f)
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                n = 1
                for dim in st.get_slice(k).get_shape():
                    n *= int(dim)
                out[param_part(k)] += n
    return out


def kv_cache_bytes(cfg: ModelConfig, context: int, bytes_per: float = 2.0) -> float:
    d = cfg.decoder
    return 2 * d.n_layers * d.kv_heads * d.head_dim * context * bytes_per


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def describe_config(cfg: ModelConfig, source: str, contexts=None, counts: dict | None = None) -> list[str]:
    """counts: parameters per part (checkpoint_param_counts); None: from the config (param_counts)."""
    pc = counts or param_counts(cfg)
    total = sum(pc.values())
    d, v = cfg.decoder, cfg.vision
    lines = [f"model: {cfg.name}  ({source})",
             f"vision: ViT {v.image_size}px/{v.patch_size} width {v.width} x {v.layers} layers -> "
             + (f"{cfg.adapter.perceiver_latents} resampled rows per image, read by gated cross-attention every "
              f"{d.cross_attn_every} layers ({cfg.n_image_rows} context rows: the image's tokens)"
              if d.cross_attn_every else
              f"{cfg.n_image_rows} image rows"
              + (f" (boi + {v.n_patches} patches + eoi)" if cfg.n_image_rows == v.n_patches + 2 else "")),
             f"decoder: d_model {d.d_model}, {d.n_layers} layers, {d.n_heads} heads"
             f"{f' ({d.kv_heads} kv)' if d.kv_heads != d.n_heads else ''}, ffn {d.ffn_dim}, vocab {d.vocab_size}, "
             f"context {d.max_seq_len}",
             f"variants: {', '.join(cfg.variants()) or 'none (llama.cpp cogvlm-compatible)'}",
             f"targets: {support.export_targets(cfg)}",
             "parameters:"]
    describe = spec.get("connector", cfg.adapter.kind).describe   # Q-Former, resampler: what reaches the decoder
    if describe is not None:
        lines = [describe(cfg) if s.startswith("vision:") else s for s in lines]
    from . import tilings
    tiles = tilings.of(v)
    if tiles is not None:                                   # tiled: rows depend on the image (a few typical sizes)
        from .anyres import TYPICAL_SIZES
        lines = [tiles.describe_rows(cfg, TYPICAL_SIZES) if s.startswith("vision:") else s for s in lines]
    for k, n in pc.items():
        lines.append(f"  {k:<15} {_count(n):>9}  ({100 * n / total:.1f}%)")
    lines.append(f"  {'total':<15} {_count(total):>9}")
    per_step = pc["text_branch"] + pc["decoder_shared"] - d.vocab_size * d.d_model  # embedding row is a lookup
    if d.n_experts:
        stored, read = d.ffn_params()
        per_step -= stored - read                                    # only the top-k experts of each MoE layer
        n_moe = sum(map(d.is_moe_layer, range(d.n_layers)))
        lines.append(f"mixture of experts: {d.n_experts} experts per MoE layer ({n_moe} of {d.n_layers} layers), "
                     f"top-{d.experts_top_k}{' renormalised' if d.norm_topk_prob else ''}, expert ffn "
                     f"{d.moe_ffn_dim}; a decode step reads {_count(read)} of the {_count(stored)} FFN parameters")
    lines.append(f"weights read per decode step (text branch + shared"
                 f"{', top-k experts' if d.n_experts else ''}): {_count(per_step)}")
    contexts = list(contexts or dict.fromkeys((512, d.max_seq_len)))     # one column when they coincide
    lines.append("memory estimate (weights + fp16 KV cache):")
    lines.append("  precision  weights    " + "  ".join(f"ctx {c:>6}" for c in contexts))
    for prec, bpw in BYTES_PER_WEIGHT.items():
        w = total * bpw
        lines.append(f"  {prec:<9} {_fmt(w):>9}   " + "  ".join(f"{_fmt(w + kv_cache_bytes(cfg, c)):>10}"
                                                             for c in contexts))
    return lines


def describe(model: str | None = None, bundle: str | None = None, contexts=None, kv_cache: str | None = None) -> str:
    """kv_cache: also the KV cache at llama.cpp's type (f16, q8_0, q4_0) per context, beside f16; on an onnx bundle
    at int8 (the ort backend's --kv-cache int8) beside the bundle's float type."""
    if model and bundle:
        raise EdgemmError("give either --model or --bundle, not both")
    if bundle:
        lines = describe_bundle(bundle, contexts)
        if kv_cache:
            from .bundle import read_manifest
            m = read_manifest(bundle)
            cfg = ModelConfig.from_dict(m["model"])
            if m.get("target") == "onnx" and kv_cache == "int8":
                own = "f16" if m["stages"].get("decoder_text", {}).get("compute") == "fp16" else "f32"
                lines += kv_cache_lines(cfg, kv_cache, contexts, base=own, runtime="ort")
            elif m.get("target") != "gguf":
                raise EdgemmError(f"--kv-cache {kv_cache} is llama.cpp's (gguf bundles) or, int8, the ort backend's "
                                  f"(onnx bundles); {bundle} is a {m.get('target')} bundle, whose KV cache is the "
                                  "model's float type")
            else:
                lines += kv_cache_lines(cfg, kv_cache, contexts)
        return "\n".join(lines)
    from .checkpoint import model_config
    cfg, source, path = model_config(model)
    counts = checkpoint_param_counts(path) if path is not None else None   # a folder: its weights' own shapes
    return "\n".join(describe_config(cfg, source, contexts, counts) + (kv_cache_lines(cfg, kv_cache, contexts)
                                                                       if kv_cache else []))


def kv_cache_lines(cfg: ModelConfig, kv_cache: str, contexts=None, base: str = "f16",
                   runtime: str = "llama.cpp") -> list[str]:
    """The KV cache at a type per context, beside the `base` type (q8_0: 34 bytes per 32 values, q4_0: 18, int8:
    1)."""
    per, ref = KV_TYPE_BYTES[kv_cache], KV_TYPE_BYTES[base]
    contexts = list(contexts or dict.fromkeys((512, cfg.decoder.max_seq_len)))
    return [f"KV cache at {kv_cache} ({runtime}, {per:g} bytes per value; {base}: {ref:g}):"] + [
        f"  ctx {c:>6}  {_fmt(kv_cache_bytes(cfg, c, per)):>10}  ({base} {_fmt(kv_cache_bytes(cfg, c, ref)):>10}, "
        f"{per / ref:.2f}x)" for c in contexts]


def describe_bundle(bundle: str, contexts=None) -> list[str]:
    from .bundle import verify_bundle
    m = verify_bundle(bundle, check_hashes=False)
    cfg = ModelConfig.from_dict(m["model"])
    lines = [f"bundle: {bundle}  target {m.get('target')}  format v{m.get('format_version')}",
             f"source: {m.get('source', {}).get('model')}  precision: {m.get('precision')}"
             + (f"  for the {m['device'].upper()} provider" if m.get("device") else "")]
    total = 0
    for name, st in m.get("stages", {}).items():
        size = sum((Path(bundle) / f).stat().st_size for f in [st["file"], *st.get("extra_files", [])])
        total += size
        how = f" ({st['compute']} compute)" if st.get("precision") == "fp16" and st.get("compute") else ""
        lines.append(f"  stage {name:<14} {st['file']:<28} {_fmt(size):>10}  {st.get('precision', '')}{how}")
    lines.append(f"  total stage files: {_fmt(total)}")
    if m.get("target") == "gguf":
        lines += describe_gguf_tensors(bundle, m)
    lines += ["", *describe_config(cfg, "from the manifest", contexts)]
    return lines


def describe_gguf_tensors(bundle: str, m: dict) -> list[str]:
    """GGUF bundles: tensors per branch (shared, text branch, vision branch, vision stage) with quant types and sizes."""
    from .bundle import bundle_path
    from .export.gguf_tensors import branch_of, gguf_tensor_table
    lines = ["", "GGUF tensors by branch:"]
    for stage in ("decoder", "vision"):
        st = m["stages"].get(stage)
        if not st or not str(st.get("file", "")).endswith(".gguf"):      # (an ONNX vision stage: vision.onnx)
            continue
        groups: dict[str, dict[str, list[int]]] = {}
        for t in gguf_tensor_table(bundle_path(bundle, st["file"])):
            g = groups.setdefault(branch_of(t["name"]), {}).setdefault(t["type"], [0, 0])
            g[0] += 1
            g[1] += t["bytes"]
        lines.append(f"  {st['file']}:")
        for branch, types in groups.items():
            size = sum(b for _, b in types.values())
            detail = ", ".join(f"{n} x {ty} ({_fmt(b)})" for ty, (n, b) in sorted(types.items()))
            lines.append(f"    {branch:<14} {_fmt(size):>10}  {detail}")
    if m.get("runtime", {}).get("image_rows"):
        lines.append(f"  image rows: {m['runtime']['image_rows']}")
    return lines
