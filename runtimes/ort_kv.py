"""`--kv-cache int8` on the ort backend: the bundle's decoder graphs rewritten, as they load, to keep their KV cache
in int8 through ONNX Runtime's own GroupQueryAttention (com.microsoft, 1.32: k_scale / v_scale inputs,
k_quant_type / v_quant_type, kv_cache_bit_width; its CPU kernel quantizes the new rows and dequantizes the cache
as it attends). The scales are the manifest's `kv_cache_int8` (fitted at export on the calibration set:
edgemm.export.kv_scales), one per layer and cache head, given to the op as PER_CHANNEL tensors [1, heads, 1,
head_dim]; past_key.i / past_value.i and present_* become int8 tensors (a quarter of an fp32 cache, half of fp16).
"""
from __future__ import annotations

import numpy as np

from edgemm.errors import EdgemmError

KV_INT8 = "int8"
K_SCALE_INPUT = 12          # GroupQueryAttention's inputs: ..., head_sink (11), k_scale (12), v_scale (13)


def int8_kv_why(cfg) -> str | None:
    """Why a model's ort bundle cannot have an int8 KV cache (None: it can)."""
    c = cfg.decoder
    if c.cross_attn_every:
        return "gated cross-attention layers read an image's own K/V, kept in the float type"
    if c.image_bidirectional:
        return "an image's rows read the written cache back in the float type (Gemma 3's two-way image rows)"
    return None


def int8_sources(paths: dict, manifest: dict, cfg, bundle) -> dict:
    """{decoder stage: serialized graph with an int8 KV cache} for the decoder stages of `paths` (the bundle's
    graphs, bytes as hashed or paths)."""
    import onnx
    rec = manifest.get("kv_cache_int8")
    why = int8_kv_why(cfg)
    if why:
        raise EdgemmError(f"--kv-cache int8: {why}; use the bundle's float cache")
    if not rec:
        raise EdgemmError(f"--kv-cache int8: bundle {bundle} records no KV-cache scales (kv_cache_int8: exported "
                          "before them); re-export it")
    c = cfg.decoder
    k, v = (np.asarray(rec[n], np.float32) for n in ("k", "v"))
    if k.shape != (c.n_layers, c.cache_heads) or v.shape != k.shape or not (np.isfinite(k).all() and (k > 0).all()
                                                                          and np.isfinite(v).all() and (v > 0).all()):
        raise EdgemmError(f"bundle {bundle}: kv_cache_int8 scales must be positive [{c.n_layers}][{c.cache_heads}] "
                          "per K and V; re-export it")
    out = {}
    for stage in [s for s in paths if s.startswith("decoder")]:
        src = paths[stage]
        if not isinstance(src, (bytes, bytearray)):
            raise EdgemmError(f"--kv-cache int8: stage {stage} keeps its weights in external data (a graph over "
                              "2 GB), which the in-memory rewrite does not handle yet; use the float cache")
        m = onnx.load_from_string(bytes(src))
        with_int8_cache(m, k, v, c.head_dim)
        out[stage] = m.SerializeToString()
    return out


def with_int8_cache(m, k_scales: np.ndarray, v_scales: np.ndarray, head_dim: int) -> None:
    """Rewrite a decoder graph in place: every GroupQueryAttention over past_key.i / past_value.i takes the
    per-head scales of layer i (PER_CHANNEL, [1, heads, 1, head_dim]) and an int8 cache; the cache's graph inputs
    and outputs become int8."""
    from onnx import TensorProto, helper, numpy_helper
    g = m.graph
    cache_names, gqa_outs = set(), set()
    for node in g.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        past = node.input[3] if len(node.input) > 3 else ""
        if not past.startswith("past_key."):
            raise EdgemmError(f"a GroupQueryAttention node reads {past!r}, not a past_key.i cache input")
        i = int(past.split(".")[1])
        names = []
        for kv, s in (("k", k_scales), ("v", v_scales)):
            name = f"kv_scale.{kv}.{i}"
            if not any(t.name == name for t in g.initializer):
                t = np.broadcast_to(s[i].reshape(1, -1, 1, 1), (1, s.shape[1], 1, head_dim)).astype(np.float32)
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(t), name))
            names.append(name)
        ins = list(node.input) + [""] * max(0, K_SCALE_INPUT - len(node.input))
        del node.input[:]
        node.input.extend(ins[:K_SCALE_INPUT] + names)
        for a in [a for a in node.attribute if a.name in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]:
            node.attribute.remove(a)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        cache_names.update((node.input[3], node.input[4]))
        gqa_outs.update(node.output[1:3])
    if not cache_names:
        raise EdgemmError("the decoder graph has no GroupQueryAttention over a past_key.i cache")
    # the Identity after each op names the output present_key.i / present_value.i
    cache_names.update(n.output[0] for n in g.node if n.op_type == "Identity" and n.input[0] in gqa_outs)
    for vi in list(g.input) + list(g.output):
        if vi.name in cache_names:
            vi.type.tensor_type.elem_type = TensorProto.INT8
    for vi in [vi for vi in g.value_info if vi.name in gqa_outs or vi.name in cache_names]:
        g.value_info.remove(vi)
