"""The decoder stages (`decoder_text`, `decoder_image`) of the onnx and trt exporters, written op by op with
edgemm.export.graph's primitives from the reference model's layers.

Both decoder flavours are emitted from one layer description (`decoder_layers`) and differ only in attention:

- `ort-contrib-gqa` (onnx bundles, the `ort` backend): com.microsoft GroupQueryAttention with past and present
  sharing one preallocated buffer per layer ([1, K, cache_len, E], BNSH): the runtime binds the same OrtValue as
  `past_key.i` and `present_key.i`, the op writes the new rows in place at `seqlens_k + 1 - T` and attends over
  the first `total_sequence_length` rows, so a decode step never copies the cache. The text graph has a dynamic
  batch dimension (`batch=True`, where decode_batch_supported): the runtime binds rows of one [slots, K,
  cache_len, E] buffer and each row's seqlens_k is its own, so one run decodes a token for several slots.
- `onnx-standard-kv-window` (trt bundles, TensorRT and the CPU emulation): standard ops only. Per layer the
  cache is an input `cache_key.i` / `cache_value.i` [1, W, K, E] (BSNH: the first W rows of the runtime's buffer),
  the T new rows are written at `past_len` with ScatterElements, attention is a masked softmax (row i sees cache
  rows <= past_len + i), and the new rows come out as `new_key.i` / `new_value.i` [1, T, K, E] for the runtime
  to store.

RoPE (NEOX form) is computed from an explicit `positions` input in both, so the cogvlm position rule works.
M-RoPE (Qwen2-VL): GroupQueryAttention's rotary is 1-D, so decoder_image takes the image rows' `mrope_positions`
[3, T] and rotates q and k outside the op (do_rotary 0), each frequency from its section's row; decoder_text
rotates outside it too, from its `positions` input (a text row's three positions are equal: M-RoPE is plain RoPE
there, but the text after an image is not at its cache row, which is where the op's rotary would put it).
Imported-model variants: low-rank vision branches (two MatMuls per projection, the weights stay low-rank),
per-modality norms (the vision graph holds the vision norms, incl. the final one), Libra's cross-modal K/V bridge
(a cache of 2 * kv_heads heads: each segment writes both versions of its rows and attends over its own half),
CogVLM's eoi-through-text rule (decoder_text then takes `input_rows` too). The input stage is traced from the
reference (`vision`: pixels -> image rows; Libra's `image_tokens`: codes, signal -> rows).

Qwen3's per-head Q/K RMSNorm runs on the [1, T, heads, E] view before RoPE.
"""
from __future__ import annotations

import math

import numpy as np

from edgemm.export.graph import GRAPH_GQA, GRAPH_KV, MOE_DEFAULT, NEG, Graph, add_rms, norm_weights, np32, rms, rope, rope_tables
from edgemm.export.layer_emit import EMITTERS, branch_emitter


def decoder_input(g: Graph, model, branch: str, B: int | str = 1) -> tuple[list, str]:
    """-> (graph inputs, rows [B, T, D]): token ids (text) or image rows (vision); B is 1, or "batch" for a
    batch-capable decoder_text (decode_batch_supported). The text graph of a model that
    routes the image segment's eoi row through the text branch (CogVLM's original rule) also takes `input_rows`
    [1, rows, D], appended after the ids' embeddings: the runtime feeds the ids and no rows for text, no ids
    and the eoi row for the end of an image segment."""
    from onnx import TensorProto
    from onnx.helper import make_tensor_value_info as vi
    D = model.cfg.decoder.d_model
    if branch != "text":
        return [vi("image_rows", TensorProto.FLOAT, [1, "seq", D])], g.act("image_rows")
    emb = g.weight("tok_embeddings.weight", np32(model.decoder.tok_embeddings.weight))
    x = g.op("Gather", [emb, "input_ids"], axis=0)                                        # [1, T, D]
    if model.cfg.decoder.embed_scale:                                                     # Gemma: times sqrt(D)
        x = g.op("Mul", [x, g.scalar(model.cfg.decoder.embed_scale)])
    if model.cfg.decoder.eoi_branch != "text":
        return [vi("input_ids", TensorProto.INT64, [B, "seq"])], x
    ins = [vi("input_ids", TensorProto.INT64, [B, "ids"]), vi("input_rows", TensorProto.FLOAT, [B, "rows", D])]
    return ins, g.op("Concat", [x, g.act("input_rows")], axis=1)


def decoder_layers(g: Graph, model, branch: str, x: str, attend) -> str:
    """The layers of one decoder branch, each branch's projections and MLP by its kind's emitter
    (export/layer_emit.py); what all share here: norms (per-modality ones on the vision side, Gemma's sandwich
    norms), residuals, the gated cross-attention layers before the layers that have one, Libra's bridge on K/V.

    attend(i, q, k, v, read) -> [1, T, H*E]: q [1, T, H*E] and k, v [1, T, cache_heads*E] before RoPE; with the
    bridge k, v hold both versions of the rows (heads [0, K) as text queries read them, [K, 2K) as vision
    queries do: this branch's own rows plain, the other modality's with its rank-r bridge added) and
    `read` says which half this branch's queries attend over (None without the bridge)."""
    from edgemm.xattn import cross_layer_at
    c = model.cfg.decoder
    own = branch == "vision" and c.per_modality_norms
    pend = None                                         # the last MLP's output, not yet added to x (see add_rms)
    packed = getattr(attend, "packed", False) and not c.qk_norm and not c.cross_modal_bridge
    for i, layer in enumerate(model.decoder.layers):
        j = cross_layer_at(c, i) if c.cross_attn_every else None
        if j is not None:
            if pend is not None:
                x, pend = g.op("Add", [x, pend]), None
            x = EMITTERS["gated-cross-attention"].block(g, c, model.decoder.cross_layers[j], j, x)
        br, p, emit = getattr(layer, branch), f"layers.{i}.{branch}", branch_emitter(c, layer, branch)
        nrm = (layer.vision_attn_norm, layer.vision_ffn_norm) if own else (layer.attn_norm, layer.ffn_norm)
        pre = f"layers.{i}.vision_" if own else f"layers.{i}."
        w = norm_weights(g, nrm[0], f"{pre}attn_norm")
        if pend is None:
            h = rms(g, x, w, c.rms_eps)
        else:
            x, h = add_rms(g, x, pend, w, c.rms_eps)
        if packed and emit.fused_qkv:                 # GroupQueryAttention takes the fused QKV as it is
            a = attend(i, emit.proj(g, h, br.qkv, f"{p}.qkv"), None, None, None)
        else:
            q, k, v = emit.qkv(g, c, br, h, p)
            read = None
            if c.cross_modal_bridge:
                k, v, read = EMITTERS["bridge"].kv(g, br, h, p, branch, k, v)
            a = attend(i, q, k, v, read)
        o = emit.proj(g, a, br.o, f"{p}.o")
        if c.sandwich_norms:                                # Gemma: the attention output normed before the residual
            o = rms(g, o, norm_weights(g, layer.post_attn_norm, f"layers.{i}.post_attn_norm"), c.rms_eps)
        x, h = add_rms(g, x, o, norm_weights(g, nrm[1], f"{pre}ffn_norm"), c.rms_eps)
        pend = emit.mlp(g, h, br, p, c.ffn_dim)
        if c.sandwich_norms:                                # (and the MLP's)
            pend = rms(g, pend, norm_weights(g, layer.post_ffn_norm, f"layers.{i}.post_ffn_norm"), c.rms_eps)
    return g.op("Add", [x, pend])


def cross_inputs(model, kv_type=None) -> list:
    """The decoder graph inputs of the gated cross-attention layers (none without them); cross K/V in kv_type
    (the cross_kv stage's output type: fp16 with half)."""
    from onnx import TensorProto
    from onnx.helper import make_tensor_value_info as vi
    from edgemm.xattn import n_cross_layers
    c = model.cfg.decoder
    if not c.cross_attn_every:
        return []
    return [vi("cross_gate", TensorProto.FLOAT, [1, "seq", 1])] + [
        vi(f"cross_{kv}.{j}", kv_type or TensorProto.FLOAT, [1, c.n_heads, "cross_len", c.head_dim])
        for j in range(n_cross_layers(c)) for kv in ("key", "value")]


def cross_kv_graph(model, fp16: bool = False, half: bool = False):
    """Stage `cross_kv`: an image's resampled rows image_rows [1, n, W] -> cross_key.j / cross_value.j
    [1, H, n, E] for every cross-attention layer j (k normed per head with qk norms), once per image; half: in
    fp16 compute, K/V out in fp16 (the fp16 decoder's cross inputs)."""
    from onnx import TensorProto
    from onnx.helper import make_tensor_value_info as vi
    c = model.cfg.decoder
    H, E, W = c.n_heads, c.head_dim, c.cross_attn_kv_dim or c.d_model
    g, outs = Graph(fp16, half=half), []
    rows = g.act("image_rows")
    for j, xl in enumerate(model.decoder.cross_layers):
        EMITTERS["gated-cross-attention"].kv(g, c, xl, j, rows)
        outs += [vi(f"cross_{kv}.{j}", g.ftype, [1, H, "rows", E]) for kv in ("key", "value")]
    ins = [vi("image_rows", TensorProto.FLOAT, [1, "rows", W])]
    return g.model("edgemm_cross_kv", ins, outs), g.weight_bytes


def final_norm(model, branch: str):
    dec = model.decoder
    return dec.vision_norm if branch == "vision" and model.cfg.decoder.per_modality_norms else dec.norm


# --------------------------------------------------------------------------- attention, per flavour
def gqa_rotary(c) -> bool:
    """GroupQueryAttention rotates Q and K itself (do_rotary, NEOX form, cos/sin caches) when every row's RoPE
    position is its cache row, i.e. the sequential position rule; CogVLM's collapsed image positions keep the
    external RoPE from the `positions` input, as do head sizes ONNX Runtime's rotary kernel refuses (not a
    multiple of 16) and partial rotary (Persimmon: the op rotates whole heads). M-RoPE (Qwen2-VL) too: the text
    after an image sits at p + max(grid rows, cols), not at its cache row (the op rotated it there: at head size 128
    decoder_text's fp32 check measured max abs 0.044 against 4e-7 with the positions input)."""
    return (c.position_rule == "sequential" and c.head_dim % 16 == 0 and c.rope_dims in (0, c.head_dim)
            and not c.mrope_section)


def rotary_caches(g: Graph, c, local: bool = False) -> tuple[str, str]:
    """cos, sin caches [max_seq_len, E/2] for GroupQueryAttention's do_rotary (edgemm.model.rope_cos_sin); local:
    Gemma 3's sliding layers' base, else rope_theta with its linear scaling."""
    import torch
    from edgemm.model import rope_cos_sin
    theta, factor = (c.rope_local_theta, 1.0) if local else (c.rope_theta, c.rope_linear_factor)
    cos, sin = rope_cos_sin(torch.arange(c.max_seq_len), c.head_dim, theta, factor)
    E2, dt = c.head_dim // 2, np.float16 if g.half else np.float32      # the op takes them in the queries' type
    n, tag = g.weight_bytes, "rotary_local" if local else "rotary"
    out = (g.const(f"{tag}.cos_cache", cos[:, :E2].numpy().astype(dt)),
           g.const(f"{tag}.sin_cache", sin[:, :E2].numpy().astype(dt)))
    g.weight_bytes = n                  # tables (fp32, or fp16 with half), not weights: a step reads T rows
    return out


def layer_window(c, i: int) -> int:
    """The attention window of layer i: Gemma 3's sliding_window on its sliding layers, else 0 (all rows)."""
    return c.sliding_window if i in c.sliding_layers else 0


def rope_by_window(g: Graph, c, batch: bool, mrope: bool = False) -> dict:
    """{layer window: (cos, sin)} external RoPE tables: the full layers' and, with sliding layers, their own base;
    mrope: from the image rows' 3-D positions (Qwen2-VL)."""
    return {w: rope_tables(g, c, batch, bool(w), mrope) for w in rope_windows(c)}


def rope_windows(c) -> list:
    return [0] + ([c.sliding_window] if c.sliding_layers else [])


def attn_scale(c) -> float:
    return c.query_scale ** -0.5 if c.query_scale else 1.0 / math.sqrt(c.head_dim)


def allowed_rows(g: Graph, rows: str, cols: str, T: str, past: str, window: int, bidir: bool) -> str:
    """[T, S] bool: new row r (cache row rows[r]) reads cache column j: j <= rows[r] (causal); bidir (Gemma 3's image
    segment): also the new rows between its first and last row among themselves; window: only j > rows[r] - window."""
    r2, c2 = g.op("Unsqueeze", [rows, g.i64([1])]), g.op("Unsqueeze", [cols, g.i64([0])])
    allowed = g.op("LessOrEqual", [c2, r2])
    if bidir:
        def inner(t):                                   # 0 < t < T - 1
            return g.op("And", [g.op("Greater", [t, g.i64(0)]), g.op("Less", [t, g.op("Sub", [T, g.i64(1)])])])
        own = g.op("Range", [g.i64(0), T, g.i64(1)])
        block = g.op("And", [g.op("Unsqueeze", [inner(own), g.i64([1])]),
                             g.op("Unsqueeze", [inner(g.op("Sub", [cols, past])), g.i64([0])])])
        allowed = g.op("Or", [allowed, block])
    if window:
        allowed = g.op("And", [allowed, g.op("Less", [g.op("Sub", [r2, c2]), g.i64(window)])])
    return allowed


def masked_attention(g: Graph, c, q4: str, kh: str, vh: str, allowed: str) -> str:
    """softmax(q k^T * scale, masked) v: q4 [1, T, H, E], kh [1, K, E, S], vh [1, K, S, E] -> [1, T, H*E]."""
    H, K, E = c.n_heads, c.kv_heads, c.head_dim
    qh = g.op("Transpose", [q4], perm=[0, 2, 1, 3])                                           # [1, H, T, E]
    if K != H:                                                                                # grouped-query
        rep = g.i64([1, 1, H // K, 1, 1])
        kh = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [kh, g.i64([2])]), rep]), g.i64([1, H, E, -1])])
        vh = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [vh, g.i64([2])]), rep]), g.i64([1, H, -1, E])])
    s = g.op("Mul", [g.op("MatMul", [qh, kh]), g.scalar(attn_scale(c))])                      # [1, H, T, S]
    s = g.op("Where", [allowed, s, g.scalar(NEG)])
    a = g.op("MatMul", [g.op("Softmax", [s], axis=-1), vh])                                   # [1, H, T, E]
    return g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), g.i64([1, -1, H * E])])


def _gqa_attention(g: Graph, c, tables, bidir: bool = False):
    """GroupQueryAttention over the shared past/present buffer (flavour ort-contrib-gqa). tables: the external
    RoPE tables by layer window (rope_by_window), or None when the op rotates (gqa_rotary); a sliding layer's
    window is the op's local_window_size. bidir (Gemma 3's image segment): the op writes the new rows and its causal
    output is replaced by masked_attention over the written cache, the image's rows reading each other both ways."""
    from onnx import TensorProto
    H, E, NK, R = c.n_heads, c.head_dim, c.cache_heads, c.rope_dims
    caches = {w: rotary_caches(g, c, bool(w)) for w in rope_windows(c)} if tables is None else None
    masks = {}

    def attend(i, q, k, v, read):
        # with the bridge, the queries are duplicated (2H heads over the 2K cache heads: the first H read
        # [0, K), the others [K, 2K)), so one GroupQueryAttention writes both versions of the new rows into
        # the shared buffer; the half of the output this branch does not read is dropped
        n = 1 if read is None else 2
        ins, rot = [], {}
        if k is None:                                   # packed QKV (attend.packed): the op splits and rotates
            k = v = ""
        w = layer_window(c, i)
        if caches is None:
            cos, sin = tables[w]
            q = g.op("Reshape", [rope(g, g.op("Reshape", [q, g.i64([0, 0, H, E])]), cos, sin, E, R),
                                 g.i64([0, 0, H * E])])
            k = g.op("Reshape", [rope(g, g.op("Reshape", [k, g.i64([0, 0, NK, E])]), cos, sin, E, R),
                                 g.i64([0, 0, NK * E])])
        else:
            ins, rot = list(caches[w]), {"do_rotary": 1, "rotary_interleaved": 0}
        a, pk, pv = g.op("GroupQueryAttention", [g.op("Concat", [q] * n, axis=-1) if n > 1 else q, k, v,
                                                 f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                                                 "total_sequence_length", *ins], n_out=3, domain="com.microsoft",
                         num_heads=n * H, kv_num_heads=NK, scale=attn_scale(c), **rot,
                         **({"local_window_size": w} if w else {}))
        g.op("Identity", [pk], out=f"present_key.{i}", name=f"present_key_id.{i}")
        g.op("Identity", [pv], out=f"present_value.{i}", name=f"present_value_id.{i}")
        if bidir:
            S = g.op("Cast", ["total_sequence_length"], to=TensorProto.INT64)
            T = g.op("Gather", [g.op("Shape", [q]), g.i64(1)], axis=0)
            if w not in masks:
                past = g.op("Sub", [S, T])
                masks[w] = allowed_rows(g, g.op("Range", [past, S, g.i64(1)]), g.op("Range", [g.i64(0), S, g.i64(1)]),
                                        T, past, w, True)
            kf, vf = (g.op("Slice", [t, g.i64([0]), g.op("Unsqueeze", [S, g.i64([0])]), g.i64([2])]) for t in (pk, pv))
            return masked_attention(g, c, g.op("Reshape", [q, g.i64([1, -1, H, E])]),
                                    g.op("Transpose", [kf], perm=[0, 1, 3, 2]), vf, masks[w])
        return a if n == 1 else g.op("Split", [a, g.i64([H * E, H * E])], n_out=2, axis=-1)[read]
    attend.packed = caches is not None                  # with do_rotary the op can take the fused QKV unsplit
    return attend


def _window_attention(g: Graph, c, tables, bidir: bool = False):
    """Masked softmax over a fixed cache window written with ScatterElements (flavour onnx-standard-kv-window);
    tables: RoPE by layer window (rope_by_window); the mask per layer window (allowed_rows: Gemma 3's sliding
    layers, its image rows both ways with bidir)."""
    H, K, E, NK, R = c.n_heads, c.kv_heads, c.head_dim, c.cache_heads, c.rope_dims
    zero, one = g.i64(0), g.i64(1)
    T = g.op("Squeeze", [g.op("Shape", ["positions"]), g.i64([0])])
    W = g.op("Gather", [g.op("Shape", ["cache_key.0"]), one], axis=0)
    rows = g.op("Add", [g.op("Range", [zero, T, one]), "past_len"], name="write_rows")         # [T]
    cols = g.op("Range", [zero, W, one])                                                      # [W]
    masks = {w: allowed_rows(g, rows, cols, T, "past_len", w, bidir) for w in rope_windows(c)}   # [T, W]
    scatter_shape = g.op("Concat", [g.i64([1]), g.op("Unsqueeze", [T, g.i64([0])]), g.i64([NK, E])], axis=0)
    scatter_idx = g.op("Expand", [g.op("Reshape", [rows, g.i64([1, -1, 1, 1])]), scatter_shape])  # [1, T, NK, E]

    def attend(i, q, k, v, read):
        w = layer_window(c, i)
        cos, sin = tables[w]
        q4 = rope(g, g.op("Reshape", [q, g.i64([1, -1, H, E])]), cos, sin, E, R)             # [1, T, H, E]
        k4 = rope(g, g.op("Reshape", [k, g.i64([1, -1, NK, E])]), cos, sin, E, R)            # [1, T, NK, E]
        v4 = g.op("Reshape", [v, g.i64([1, -1, NK, E])])
        g.op("Identity", [k4], out=f"new_key.{i}")
        g.op("Identity", [v4], out=f"new_value.{i}")
        kf = g.op("ScatterElements", [f"cache_key.{i}", scatter_idx, k4], axis=1)             # [1, W, NK, E]
        vf = g.op("ScatterElements", [f"cache_value.{i}", scatter_idx, v4], axis=1)
        if read is not None:            # the bridge: this branch's queries read one half of the heads
            kf, vf = (g.op("Slice", [t, g.i64([read * K]), g.i64([(read + 1) * K]), g.i64([2])]) for t in (kf, vf))
        return masked_attention(g, c, q4, g.op("Transpose", [kf], perm=[0, 2, 3, 1]),      # k [1, K, E, W]
                                g.op("Transpose", [vf], perm=[0, 2, 1, 3]), masks[layer_window(c, i)])
    return attend


def decode_batch_supported(cfg, moe_form: str | None = None) -> bool:
    """Whether decoder_text can take a batch dimension (several KV caches stepped in one run): not with gated
    cross-attention (each row would need its own image's cross K/V) nor the dense MoE form (its expert MatMuls
    broadcast over the batch axis)."""
    c = cfg.decoder
    return not c.cross_attn_every and not (c.n_experts and (moe_form or MOE_DEFAULT[GRAPH_GQA]) == "dense")


def decoder_graph(model, branch: str, flavour: str = GRAPH_GQA, fp16: bool = False, moe_form: str | None = None,
                  batch: bool = False, half: bool = False):
    """One decoder branch ('text' or 'vision') as an ONNX model of the given flavour -> (model, weight bytes);
    MoE layers in `moe_form` (default MOE_DEFAULT[flavour]; the trt flavour takes standard ops only).
    batch (ort-contrib-gqa text branch only): a dynamic batch dimension on input_ids [batch, seq], positions
    [batch, seq], seqlens_k [batch], the KV buffers [batch, K, cache_len, E] and logits [batch, V], so one run
    steps several KV caches (rows of one buffer per layer; GroupQueryAttention reads each row's own seqlens_k);
    B = 1 is the single-state path. half (ort-contrib-gqa): fp16 compute
    for the CUDA provider, past/present in fp16 (see the module docstring)."""
    from onnx import TensorProto
    from onnx.helper import make_tensor_value_info as vi
    c, dec = model.cfg.decoder, model.decoder
    E, L, NK, V = c.head_dim, c.n_layers, c.cache_heads, c.vocab_size
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    gqa = flavour == GRAPH_GQA                          # ONNX Runtime's contrib ops are this flavour's anyway
    if half and not gqa:
        raise ValueError("fp16 compute is for the ort-contrib-gqa graphs")
    g = Graph(fp16, fused_norms=gqa, moe_form=moe_form or MOE_DEFAULT.get(flavour, "dense"), half=half)
    kvt = g.ftype
    if batch and not (gqa and branch == "text" and decode_batch_supported(model.cfg, g.moe_form)):
        raise ValueError("a batch dimension is for the ort-contrib-gqa text graph of models that support it")
    B = "batch" if batch else 1
    inputs, x = decoder_input(g, model, branch, B)
    inputs.append(vi("positions", i64, [B, "seq"] if batch else ["seq"]))
    if gqa:
        inputs += [vi("seqlens_k", i32, [B]), vi("total_sequence_length", i32, [])]
        inputs += [vi(f"past_{kv}.{i}", kvt, [B, NK, "cache_len", E]) for i in range(L) for kv in ("key", "value")]
    elif flavour == GRAPH_KV:
        inputs.append(vi("past_len", i64, [1]))
        inputs += [vi(f"cache_{kv}.{i}", f32, [1, "cache_len", NK, E]) for i in range(L) for kv in ("key", "value")]
    else:
        raise ValueError(f"unknown decoder graph flavour {flavour!r}")
    inputs += cross_inputs(model, g.ftype)
    bidir = branch == "vision" and c.image_bidirectional    # (GroupQueryAttention's own rotary hides the rotated q)
    mrope = branch == "vision" and bool(c.mrope_section)    # Qwen2-VL's image rows: 3-D positions [3, T] (text
    if mrope:                                               # rows have three equal ones: the op's 1-D rotary)
        inputs.append(vi("mrope_positions", i64, [3, "seq"]))
    tables = None if gqa and gqa_rotary(c) and not bidir and not mrope else rope_by_window(g, c, batch, mrope)
    attend = (_gqa_attention if gqa else _window_attention)(g, c, tables, bidir)
    x = decoder_layers(g, model, branch, x, attend)
    last = g.op("Gather", [x, g.i64(-1)], axis=1)                                         # [B, D]
    hn = rms(g, last, norm_weights(g, final_norm(model, branch), "norm"), c.rms_eps)
    lm = g.weight("lm_head.weight.T", np32(dec.lm_head.weight).T)
    if half:
        g.op("Cast", [g.op("MatMul", [hn, lm], name="lm_head")], out="logits", to=f32)
    else:
        g.op("MatMul", [hn, lm], out="logits", name="lm_head")
    outputs = [vi("logits", f32, [B, V])]
    if gqa:
        outputs += [vi(f"present_{kv}.{i}", kvt, [B, NK, "cache_len", E]) for i in range(L) for kv in ("key", "value")]
    else:
        outputs += [vi(f"new_{kv}.{i}", f32, [1, "seq", NK, E]) for kv in ("key", "value") for i in range(L)]
    name = f"edgemm_decoder_{branch}" if gqa else f"edgemm_trt_decoder_{branch}"
    return g.model(name, inputs, outputs), g.weight_bytes
