"""The one ONNX graph builder of the onnx and trt exporters: stage graphs from the reference model.

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
RMSNorm is written `Pow(x, 2) -> ReduceMean -> Add -> Sqrt -> Div -> Mul`, the form ONNX Runtime fuses into
SimplifiedLayerNormalization (and TensorRT into its normalization layer). One opset for every graph: 19 (the
first with FLOAT8E4M3FN QuantizeLinear; ONNX Runtime >= 1.16, TensorRT 10).

Imported-model variants: low-rank vision branches (two MatMuls per projection, the weights stay low-rank),
per-modality norms (the vision graph holds the vision norms, incl. the final one), Libra's cross-modal K/V bridge
(a cache of 2 * kv_heads heads: each segment writes both versions of its rows and attends over its own half),
CogVLM's eoi-through-text rule (decoder_text then takes `input_rows` too). The input stage is traced from the
reference (`vision`: pixels -> image rows; Libra's `image_tokens`: codes, signal -> rows).

fp16 onnx exports store weight matrices in fp16 behind a Cast to fp32; compute and the KV cache stay fp32 (what the
CPU provider runs fastest). fp16 exports for CUDA (`half`, ort flavour) compute in fp16: fp16
weights, activations, GroupQueryAttention and KV cache (ONNX Runtime registers its CUDA GroupQueryAttention for
fp16/bf16 only), RMSNorm statistics in fp32, fp32 logits out and fp32 image rows in.

Mixture-of-experts layers (MoE-LLaVA, `moe_mlp`): com.microsoft MoE in the onnx graphs (QMoE with int4 experts
for int4 bundles), a standard-op dense form in the trt graphs (measured: benchmarks/bench_moe.py). Qwen3's
per-head Q/K RMSNorm runs on the [1, T, heads, E] view before RoPE.
"""
from __future__ import annotations

import math

import numpy as np

OPSET = 19
IR_VERSION = 9
GRAPH_STANDARD = "onnx-standard"
GRAPH_GQA = "ort-contrib-gqa"
GRAPH_KV = "onnx-standard-kv-window"
NEG = -1e9                      # masked attention score (-inf in fp16 after TensorRT's cast: still correct)


class Graph:
    """A small op-by-op builder over onnx.helper; returns value names."""

    def __init__(self, fp16_weights: bool = False, fused_norms: bool = False, moe_form: str = "dense",
                 half: bool = False):
        """fused_norms: the graph may use ONNX Runtime's contrib ops for residual + norm and separate gate/up
        MatMuls (the ort flavour, see add_rms and mlp); moe_form: how MoE layers are written (moe_mlp);
        half: fp16 compute (weights and activations in fp16; see act)."""
        from onnx import TensorProto, helper
        self.h = helper
        self.nodes, self.inits, self.n = [], [], 0
        self.fp16, self.fused_norms, self.moe_form = fp16_weights and not half, fused_norms, moe_form
        self.half = half
        self.ftype = TensorProto.FLOAT16 if half else TensorProto.FLOAT      # the activations' element type
        self.weight_bytes = 0
        self._consts: dict = {}

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str | None = None, name=None,
           out: str | None = None, **attrs):
        outs = [out] if out else [self._name(op_type) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, inputs, outs, name=name or self._name(f"n_{op_type}"),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper
        arr = np.asarray(arr, order="C")              # (np.ascontiguousarray would make 0-d arrays 1-d)
        self.inits.append(numpy_helper.from_array(arr, name))
        self.weight_bytes += arr.nbytes
        return name

    def i64(self, vals) -> str:
        key = ("i64", tuple(np.atleast_1d(vals).tolist()), np.ndim(vals))
        if key not in self._consts:
            self._consts[key] = self.const(f"const.i64.{len(self._consts)}", np.array(vals, np.int64))
        return self._consts[key]

    def f32(self, v) -> str:
        key = ("f32", float(v))
        if key not in self._consts:
            self._consts[key] = self.const(f"const.f32.{len(self._consts)}", np.array(v, np.float32))
        return self._consts[key]

    def scalar(self, v) -> str:
        """A scalar constant in the activations' type (fp16 with half)."""
        if not self.half:
            return self.f32(v)
        key = ("f16", float(v))
        if key not in self._consts:
            self._consts[key] = self.const(f"const.f16.{len(self._consts)}", np.array(v, np.float16))
        return self._consts[key]

    def weight(self, name: str, arr: np.ndarray) -> str:
        """A float32 weight; matrices are stored in fp16 (and Cast back to fp32) for fp16 exports; with half
        (fp16 compute) every weight is stored and read in fp16."""
        arr = np.asarray(arr, np.float32)
        if self.half:                                  # fp16 compute: every weight in fp16, as it is read
            return self.const(name, arr.astype(np.float16))
        if self.fp16 and arr.ndim >= 2:
            from onnx import TensorProto
            src = self.const(name + ".fp16", arr.astype(np.float16))
            return self.op("Cast", [src], out=name, to=TensorProto.FLOAT)
        return self.const(name, arr)

    def act(self, x: str) -> str:
        """An fp32 value (a graph input, a table) in the activations' type."""
        return self.op("Cast", [x], to=self.ftype) if self.half else x

    def model(self, name: str, inputs, outputs):
        g = self.h.make_graph(self.nodes, name, inputs, outputs, self.inits)
        ms = any(nd.domain == "com.microsoft" for nd in self.nodes)        # contrib ops: import their domain
        ops = [self.h.make_opsetid("", OPSET)] + ([self.h.make_opsetid("com.microsoft", 1)] if ms else [])
        return self.h.make_model(g, opset_imports=ops, ir_version=IR_VERSION, producer_name="edgemm")


def np32(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# --------------------------------------------------------------------------- layers
def rms(g: Graph, x: str, w: str, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) * w, as edgemm.model.RMSNorm, in the pattern ONNX Runtime fuses (fp16 compute:
    the statistics in fp32, as the fused kernels keep them: x^2 overflows fp16 from |x| = 256)."""
    from onnx import TensorProto
    if g.half:
        x = g.op("Cast", [x], to=TensorProto.FLOAT)
    ms = g.op("ReduceMean", [g.op("Pow", [x, g.f32(2.0)]), g.i64([-1])], keepdims=1)
    y = g.act(g.op("Div", [x, g.op("Sqrt", [g.op("Add", [ms, g.f32(eps)])])]))
    return g.op("Mul", [y, w])


def add_rms(g: Graph, x: str, d: str, w: str, eps: float) -> tuple[str, str]:
    """(x + d, rms(x + d) * w). Graphs that may use ONNX Runtime's contrib ops (g.fused_norms) get one
    com.microsoft SkipSimplifiedLayerNormalization, whose 4th output is the residual sum: ONNX Runtime does not fuse
    Add + SimplifiedLayerNormalization itself when the sum also feeds the next residual, as it does here."""
    if not g.fused_norms:
        s = g.op("Add", [x, d])
        return s, rms(g, s, w, eps)
    h, s = g._name("skip_norm"), g._name("residual")
    g.nodes.append(g.h.make_node("SkipSimplifiedLayerNormalization", [x, d, w], [h, "", "", s],
                                 name=g._name("n_SkipSimplifiedLayerNormalization"), domain="com.microsoft",
                                 epsilon=eps))
    return s, h


def rope_tables(g: Graph, c, batched: bool = False) -> tuple[str, str]:
    """cos, sin [1, T, 1, E] from the `positions` input [T] ([B, T, 1, E] from [B, T] when batched), as
    edgemm.model.rope_cos_sin computes them."""
    import torch
    from onnx import TensorProto
    E = c.head_dim
    inv = (1.0 / c.rope_theta ** (torch.arange(0, E, 2, dtype=torch.float32) / E)).numpy()
    f = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", ["positions"], to=TensorProto.FLOAT), g.i64([-1])]),
                     g.const("rope.inv_freq", inv)])                               # [(B,) T, E/2]
    f = g.op("Concat", [f, f], axis=-1)                                           # [(B,) T, E]
    ax = g.i64([2] if batched else [0, 2])
    return g.act(g.op("Unsqueeze", [g.op("Cos", [f]), ax])), g.act(g.op("Unsqueeze", [g.op("Sin", [f]), ax]))


def rope(g: Graph, x4: str, cos: str, sin: str, E: int) -> str:
    """NEOX RoPE on x4 [1, T, n, E]: x * cos + cat(-x2, x1) * sin."""
    x1, x2 = g.op("Split", [x4, g.i64([E // 2, E // 2])], n_out=2, axis=3)
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=3)
    return g.op("Add", [g.op("Mul", [x4, cos]), g.op("Mul", [rot, sin])])


def linear(g: Graph, x: str, mod, name: str) -> str:
    """x @ W^T (+ b) for an nn.Linear; Libra's LowRankLinear as two MatMuls (x @ A^T @ B^T: stays low-rank)."""
    if hasattr(mod, "weight_A"):
        h = g.op("MatMul", [x, g.weight(f"{name}.weight_A.T", np32(mod.weight_A).T)], name=f"{name}.A")
        return g.op("MatMul", [h, g.weight(f"{name}.weight_B.T", np32(mod.weight_B).T)], name=f"{name}.B")
    y = g.op("MatMul", [x, g.weight(f"{name}.weight.T", np32(mod.weight).T)], name=name)
    return y if mod.bias is None else g.op("Add", [y, g.weight(f"{name}.bias", np32(mod.bias))])


MOE_FORMS = ("ort-moe", "dense", "ort-qmoe4")
MOE_DEFAULT = {GRAPH_GQA: "ort-moe", GRAPH_KV: "dense"}    # onnx: the faster on the CPU (benchmarks/bench_moe.py)
QMOE_BLOCK = 32                 # int4 experts: symmetric per block of 32 inputs (the int4-b32 recipe's block)


def qmoe_int4(w: np.ndarray, block: int = QMOE_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """[E, N, K] float -> (uint8 [E, N, K/2]: two 4-bit codes a byte, low nibble first; scales [E, N, K/block]):
    w ~ (code - 8) * scale, as com.microsoft QMoE dequantizes without zero points."""
    E, N, K = w.shape
    wb = w.reshape(E, N, K // block, block)
    scale = np.abs(wb).max(-1, keepdims=True) / 7.0
    scale[scale == 0] = 1.0
    q = (np.clip(np.round(wb / scale), -8, 7) + 8).astype(np.uint8).reshape(E, N, K)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scale[..., 0].astype(np.float32)


def moe_mlp(g: Graph, x: str, moe, name: str, form: str) -> str:
    """An MoE FFN (edgemm.moe.MoE) on x [1, T, D]. `ort-moe`: com.microsoft MoE (router logits in; softmax, top-k,
    renormalisation and the chosen experts' SwiGLU in the op; gate/up interleaved per row, the CPU kernel's only
    layout). `ort-qmoe4`: the same in com.microsoft QMoE with int4 block-wise experts (onnx int4 bundles).
    `dense`: standard ops (TensorRT): every expert on every row, weighted by the sparse top-k gate."""
    n, Fe, D = moe.gate.shape
    logits = g.op("MatMul", [x, g.weight(f"{name}.router.weight.T", np32(moe.router.weight).T)], name=f"{name}.router")
    gate, up, down = np32(moe.gate), np32(moe.up), np32(moe.down)
    fc1 = np.stack([gate, up], 2).reshape(n, 2 * Fe, D)                           # [n, 2F, D]: g0 u0 g1 u1 ...
    swiglu = dict(k=moe.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                  normalize_routing_weights=int(moe.norm_topk_prob))
    if form == "ort-qmoe4" and D % QMOE_BLOCK == 0 and Fe % QMOE_BLOCK == 0:    # int4 experts, fp32 activations
        (q1, s1), (q2, s2) = qmoe_int4(fc1), qmoe_int4(down)
        c = [g.const(f"{name}.experts.{t}", a) for t, a in (("fc1.q4", q1), ("fc1.scales", s1), ("fc2.q4", q2),
                                                               ("fc2.scales", s2))]
        return g.op("QMoE", [x, g.op("Reshape", [logits, g.i64([-1, n])]), c[0], c[1], "", c[2], c[3], ""],
                    domain="com.microsoft", name=f"{name}.qmoe", expert_weight_bits=4, block_size=QMOE_BLOCK,
                    weights_prepacked=0, **swiglu)
    if form in ("ort-moe", "ort-qmoe4"):                                        # (widths off the int4 blocks)
        return g.op("MoE", [x, g.op("Reshape", [logits, g.i64([-1, n])]), g.weight(f"{name}.experts.fc1", fc1), "",
                            g.weight(f"{name}.experts.fc2", down)], domain="com.microsoft", name=f"{name}.moe",
                    **swiglu)
    if form != "dense":
        raise ValueError(f"unknown MoE form {form!r}; one of {MOE_FORMS}")
    p = g.op("Softmax", [logits], axis=-1)                                        # [1, T, n]
    val, idx = g.op("TopK", [p, g.i64([moe.top_k])], n_out=2, axis=-1)
    if moe.norm_topk_prob:
        val = g.op("Div", [val, g.op("ReduceSum", [val, g.i64([-1])], keepdims=1)])
    w = g.op("ScatterElements", [g.op("Mul", [p, g.scalar(0.0)]), idx, val], axis=-1)   # [1, T, n], k non-zero
    gu = g.op("MatMul", [x, g.weight(f"{name}.experts.gate_up.T", np.concatenate([gate, up], 1).transpose(0, 2, 1))],
              name=f"{name}.experts.gate_up")                                     # [n, T, 2F]
    a, b = g.op("Split", [gu, g.i64([Fe, Fe])], n_out=2, axis=-1)
    y = g.op("MatMul", [g.op("Mul", [g.op("Mul", [a, g.op("Sigmoid", [a])]), b]),
                        g.weight(f"{name}.experts.down.T", down.transpose(0, 2, 1))], name=f"{name}.experts.down")
    y = g.op("Mul", [y, g.op("Transpose", [w], perm=[2, 1, 0])])                 # [n, T, D] * [n, T, 1]
    return g.op("ReduceSum", [y, g.i64([0])], keepdims=1)                         # [1, T, D]


def mlp(g: Graph, x: str, br, name: str, ffn: int) -> str:
    """SwiGLU (a dense branch's gate and up: one MatMul in the TensorRT flavour); an MoE layer's experts: moe_mlp."""
    if "moe" in getattr(br, "_modules", {}):
        return moe_mlp(g, x, br.moe, name, g.moe_form)
    # ONNX Runtime graphs (g.fused_norms): gate and up as two MatMuls, no Split, as ORT GenAI's builder writes them
    # (measured 1-2% faster a decode step on bench-0.5b int4 than one [D, 2F] MatMul + Split); TensorRT: one MatMul
    if hasattr(br.gate, "weight_A") or g.fused_norms:
        gate, up = linear(g, x, br.gate, f"{name}.gate"), linear(g, x, br.up, f"{name}.up")
    else:
        gu = np.concatenate([np32(br.gate.weight).T, np32(br.up.weight).T], 1)   # [D, 2F]: one MatMul
        gate, up = g.op("Split", [g.op("MatMul", [x, g.weight(f"{name}.gate_up.weight.T", gu)], name=f"{name}.gate_up"),
                                  g.i64([ffn, ffn])], n_out=2, axis=-1)
    return linear(g, g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]), br.down, f"{name}.down")


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
    if model.cfg.decoder.eoi_branch != "text":
        return [vi("input_ids", TensorProto.INT64, [B, "seq"])], x
    ins = [vi("input_ids", TensorProto.INT64, [B, "ids"]), vi("input_rows", TensorProto.FLOAT, [B, "rows", D])]
    return ins, g.op("Concat", [x, g.act("input_rows")], axis=1)


def decoder_layers(g: Graph, model, branch: str, x: str, attend) -> str:
    """The layers of one decoder branch: dense or low-rank (Libra) projections, per-modality norms, Libra's
    cross-modal K/V bridge.

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
        if c.cross_attn_every and cross_layer_at(c, i) is not None:
            if pend is not None:
                x, pend = g.op("Add", [x, pend]), None
            x = cross_attn_block(g, model, i, x)
        br, p = getattr(layer, branch), f"layers.{i}"
        nrm = (layer.vision_attn_norm, layer.vision_ffn_norm) if own else (layer.attn_norm, layer.ffn_norm)
        pre = "vision_" if own else ""
        w = g.weight(f"{p}.{pre}attn_norm.weight", np32(nrm[0].weight))
        if pend is None:
            h = rms(g, x, w, c.rms_eps)
        else:
            x, h = add_rms(g, x, pend, w, c.rms_eps)
        if packed and hasattr(br.qkv, "weight"):      # GroupQueryAttention takes the fused QKV as it is
            a = attend(i, linear(g, h, br.qkv, f"{p}.{branch}.qkv"), None, None, None)
        else:
            a = attend(i, *_qkv(g, c, br, h, p, branch))
        x, h = add_rms(g, x, linear(g, a, br.o, f"{p}.{branch}.o"),
                       g.weight(f"{p}.{pre}ffn_norm.weight", np32(nrm[1].weight)), c.rms_eps)
        pend = mlp(g, h, br, f"{p}.{branch}", c.ffn_dim)
    return g.op("Add", [x, pend])


def _qkv(g: Graph, c, br, h: str, p: str, branch: str) -> tuple:
    """-> (q, k, v, read) of one layer for attend: dense or low-rank projections, Qwen3's per-head q/k norm, Libra's
    bridge (k, v then hold both versions of the rows and `read` names the half this branch attends over)."""
    H, K, E = c.n_heads, c.kv_heads, c.head_dim
    if hasattr(br.qkv, "weight"):
        q, k, v = g.op("Split", [linear(g, h, br.qkv, f"{p}.{branch}.qkv"), g.i64([H * E, K * E, K * E])],
                       n_out=3, axis=-1)
    else:
        q, k, v = (linear(g, h, getattr(br, n), f"{p}.{branch}.{n}") for n in "qkv")
    if c.qk_norm:                                       # Qwen3: RMSNorm over each head's Q and K, before RoPE
        def head_norm(t, n, nm):
            w = g.weight(f"{p}.{branch}.{nm}.weight", np32(getattr(br, nm).weight))
            t = rms(g, g.op("Reshape", [t, g.i64([0, 0, n, E])]), w, c.rms_eps)
            return g.op("Reshape", [t, g.i64([0, 0, n * E])])
        q, k = head_norm(q, H, "q_norm"), head_norm(k, K, "k_norm")
    read = None
    if c.cross_modal_bridge:
        read = int(branch == "vision")
        ko, vo = (g.op("Add", [t, linear(g, h, getattr(br, f"{n}_bridge"), f"{p}.{branch}.{n}_bridge")])
                  for t, n in ((k, "k"), (v, "v")))                  # as the other modality's queries read them
        k, v = (g.op("Concat", [t, o] if read == 0 else [o, t], axis=-1) for t, o in ((k, ko), (v, vo)))
    return q, k, v, read


def cross_attn_block(g: Graph, model, i: int, x: str) -> str:
    """The gated cross-attention layer before decoder layer i, if any (edgemm.xattn.GatedCrossAttnLayer): reads
    the graph inputs cross_key.j / cross_value.j [1, H, n, E] (the image's, from the cross_kv stage) and
    cross_gate [1, T, 1] (1 where the row reads the image)."""
    from edgemm.xattn import cross_layer_at
    c = model.cfg.decoder
    j = cross_layer_at(c, i)
    if j is None:
        return x
    xl, p, H, E = model.decoder.cross_layers[j], f"cross_layers.{j}", c.n_heads, c.head_dim
    h = rms(g, x, g.weight(f"{p}.attn_norm.weight", np32(xl.attn_norm.weight)), c.rms_eps)
    q = g.op("Reshape", [linear(g, h, xl.q, f"{p}.q"), g.i64([1, -1, H, E])])              # [1, T, H, E]
    if c.cross_attn_qk_norms:
        q = rms(g, q, g.weight(f"{p}.q_norm.weight", np32(xl.q_norm.weight)), c.rms_eps)
    kt = g.op("Transpose", [f"cross_key.{j}"], perm=[0, 1, 3, 2])                           # [1, H, E, n]
    s = g.op("Mul", [g.op("MatMul", [g.op("Transpose", [q], perm=[0, 2, 1, 3]), kt]), g.scalar(1.0 / math.sqrt(E))])
    a = g.op("MatMul", [g.op("Softmax", [s], axis=-1), f"cross_value.{j}"])                 # [1, H, T, E]
    a = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), g.i64([1, -1, c.d_model])])
    a = g.op("Mul", [linear(g, a, xl.o, f"{p}.o"), g.act("cross_gate")])
    x = g.op("Add", [x, g.op("Mul", [a, g.weight(f"{p}.tanh_alpha_attn", np.tanh(np32(xl.alpha_attn)))])])
    h = rms(g, x, g.weight(f"{p}.ffn_norm.weight", np32(xl.ffn_norm.weight)), c.rms_eps)
    d = g.op("Mul", [mlp(g, h, xl, p, c.ffn_dim), g.weight(f"{p}.tanh_alpha_dense", np.tanh(np32(xl.alpha_dense)))])
    return g.op("Add", [x, d])


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
        for kv in ("key", "value"):
            t = g.op("Reshape", [linear(g, rows, getattr(xl, kv[0]), f"cross_layers.{j}.{kv[0]}"),
                                 g.i64([1, -1, H, E])])
            if kv == "key" and c.cross_attn_qk_norms:
                t = rms(g, t, g.weight(f"cross_layers.{j}.k_norm.weight", np32(xl.k_norm.weight)), c.rms_eps)
            g.op("Transpose", [t], perm=[0, 2, 1, 3], out=f"cross_{kv}.{j}")
            outs.append(vi(f"cross_{kv}.{j}", g.ftype, [1, H, "rows", E]))
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
    multiple of 16)."""
    return c.position_rule == "sequential" and c.head_dim % 16 == 0


def rotary_caches(g: Graph, c) -> tuple[str, str]:
    """cos, sin caches [max_seq_len, E/2] for GroupQueryAttention's do_rotary (edgemm.model.rope_cos_sin)."""
    import torch
    from edgemm.model import rope_cos_sin
    cos, sin = rope_cos_sin(torch.arange(c.max_seq_len), c.head_dim, c.rope_theta)
    E2, dt = c.head_dim // 2, np.float16 if g.half else np.float32      # the op takes them in the queries' type
    n = g.weight_bytes
    out = (g.const("rotary.cos_cache", cos[:, :E2].numpy().astype(dt)),
           g.const("rotary.sin_cache", sin[:, :E2].numpy().astype(dt)))
    g.weight_bytes = n                  # tables (fp32, or fp16 with half), not weights: a step reads T rows
    return out


def _gqa_attention(g: Graph, c, cos, sin):
    """GroupQueryAttention over the shared past/present buffer (flavour ort-contrib-gqa). cos, sin: the external
    RoPE tables, or None when the op rotates (gqa_rotary)."""
    H, E, NK = c.n_heads, c.head_dim, c.cache_heads
    caches = rotary_caches(g, c) if cos is None else None

    def attend(i, q, k, v, read):
        # with the bridge, the queries are duplicated (2H heads over the 2K cache heads: the first H read
        # [0, K), the others [K, 2K)), so one GroupQueryAttention writes both versions of the new rows into
        # the shared buffer; the half of the output this branch does not read is dropped
        n = 1 if read is None else 2
        ins, rot = [], {}
        if k is None:                                   # packed QKV (attend.packed): the op splits and rotates
            k = v = ""
        if caches is None:
            q = g.op("Reshape", [rope(g, g.op("Reshape", [q, g.i64([0, 0, H, E])]), cos, sin, E), g.i64([0, 0, H * E])])
            k = g.op("Reshape", [rope(g, g.op("Reshape", [k, g.i64([0, 0, NK, E])]), cos, sin, E), g.i64([0, 0, NK * E])])
        else:
            ins, rot = list(caches), {"do_rotary": 1, "rotary_interleaved": 0}
        a, pk, pv = g.op("GroupQueryAttention", [g.op("Concat", [q] * n, axis=-1) if n > 1 else q, k, v,
                                                 f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                                                 "total_sequence_length", *ins], n_out=3, domain="com.microsoft",
                         num_heads=n * H, kv_num_heads=NK, scale=1.0 / math.sqrt(E), **rot)
        g.op("Identity", [pk], out=f"present_key.{i}", name=f"present_key_id.{i}")
        g.op("Identity", [pv], out=f"present_value.{i}", name=f"present_value_id.{i}")
        return a if n == 1 else g.op("Split", [a, g.i64([H * E, H * E])], n_out=2, axis=-1)[read]
    attend.packed = caches is not None                  # with do_rotary the op can take the fused QKV unsplit
    return attend


def _window_attention(g: Graph, c, cos, sin):
    """Masked softmax over a fixed cache window written with ScatterElements (flavour onnx-standard-kv-window)."""
    H, K, E, NK = c.n_heads, c.kv_heads, c.head_dim, c.cache_heads
    zero, one = g.i64(0), g.i64(1)
    T = g.op("Squeeze", [g.op("Shape", ["positions"]), g.i64([0])])
    W = g.op("Gather", [g.op("Shape", ["cache_key.0"]), one], axis=0)
    rows = g.op("Add", [g.op("Range", [zero, T, one]), "past_len"], name="write_rows")         # [T]
    cols = g.op("Range", [zero, W, one])                                                      # [W]
    allowed = g.op("LessOrEqual", [g.op("Unsqueeze", [cols, g.i64([0])]),
                                   g.op("Unsqueeze", [rows, g.i64([1])])], name="causal_mask")  # [T, W]
    scatter_shape = g.op("Concat", [g.i64([1]), g.op("Unsqueeze", [T, g.i64([0])]), g.i64([NK, E])], axis=0)
    scatter_idx = g.op("Expand", [g.op("Reshape", [rows, g.i64([1, -1, 1, 1])]), scatter_shape])  # [1, T, NK, E]
    scale = g.f32(1.0 / math.sqrt(E))

    def attend(i, q, k, v, read):
        q4 = rope(g, g.op("Reshape", [q, g.i64([1, -1, H, E])]), cos, sin, E)                # [1, T, H, E]
        k4 = rope(g, g.op("Reshape", [k, g.i64([1, -1, NK, E])]), cos, sin, E)               # [1, T, NK, E]
        v4 = g.op("Reshape", [v, g.i64([1, -1, NK, E])])
        g.op("Identity", [k4], out=f"new_key.{i}")
        g.op("Identity", [v4], out=f"new_value.{i}")
        kf = g.op("ScatterElements", [f"cache_key.{i}", scatter_idx, k4], axis=1)             # [1, W, NK, E]
        vf = g.op("ScatterElements", [f"cache_value.{i}", scatter_idx, v4], axis=1)
        if read is not None:            # the bridge: this branch's queries read one half of the heads
            kf, vf = (g.op("Slice", [t, g.i64([read * K]), g.i64([(read + 1) * K]), g.i64([2])]) for t in (kf, vf))
        qh = g.op("Transpose", [q4], perm=[0, 2, 1, 3])                                       # [1, H, T, E]
        kh = g.op("Transpose", [kf], perm=[0, 2, 3, 1])                                       # [1, K, E, W]
        vh = g.op("Transpose", [vf], perm=[0, 2, 1, 3])                                       # [1, K, W, E]
        if K != H:                                                                            # grouped-query
            rep = g.i64([1, 1, H // K, 1, 1])
            kh = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [kh, g.i64([2])]), rep]), g.i64([1, H, E, -1])])
            vh = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [vh, g.i64([2])]), rep]), g.i64([1, H, -1, E])])
        s = g.op("Mul", [g.op("MatMul", [qh, kh]), scale])                                    # [1, H, T, W]
        s = g.op("Where", [allowed, s, g.f32(NEG)])
        a = g.op("MatMul", [g.op("Softmax", [s], axis=-1), vh])                               # [1, H, T, E]
        return g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), g.i64([1, -1, H * E])])
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
    cos, sin = (None, None) if gqa and gqa_rotary(c) else rope_tables(g, c, batch)
    attend = (_gqa_attention if gqa else _window_attention)(g, c, cos, sin)
    x = decoder_layers(g, model, branch, x, attend)
    last = g.op("Gather", [x, g.i64(-1)], axis=1)                                         # [B, D]
    hn = rms(g, last, g.weight("norm.weight", np32(final_norm(model, branch).weight)), c.rms_eps)
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


# --------------------------------------------------------------------------- the input stage
def input_examples(cfg, gen) -> dict:
    """Random inputs of the input stage: {"pixels": [1, 3, S, S]}, or Libra's {"codes": [1, N, codebooks]
    (+ "signal": [1, N, signal_size])}, N = the image rows (boi, patches, eoi)."""
    import torch
    v, a = cfg.vision, cfg.adapter
    if cfg.input_stage == "vision" and a.kind == "qformer" and a.qformer_text:
        # InstructBLIP: + the question's Q-Former ids and mask [1, T] (T dynamic; the last id padded)
        T = min(6, a.qformer_positions)
        return {"pixels": torch.randn(1, 3, v.image_size, v.image_size, generator=gen),
                "qformer_input_ids": torch.randint(0, a.qformer_vocab, (1, T), generator=gen),
                "qformer_attention_mask": (torch.arange(T) < max(1, T - 1)).long()[None]}
    if cfg.input_stage == "vision":
        return {"pixels": torch.randn(1, 3, v.image_size, v.image_size, generator=gen)}
    out = {"codes": torch.randint(0, a.vision_vocab, (1, cfg.n_image_rows, a.codebooks), generator=gen)}
    if a.signal_size:
        out["signal"] = torch.randn(1, cfg.n_image_rows, a.signal_size, generator=gen)
    return out


def vision_graph(model, fp16: bool = False, half: bool = False):
    """The input stage traced from the reference (standard ops, dynamic batch) -> (model, weight bytes):
    `vision` (pixels -> image rows) or, for Libra, `image_tokens` ((codes, signal) -> image rows); fp16 stores
    matrices in fp16 behind a Cast, as the decoder graphs do. half (fp16 compute for the CUDA provider): traced from
    an fp16 copy of the reference, fp32 inputs and image rows cast at the graph's edges."""
    import copy
    import io
    import warnings

    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    class Vision(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *x):
            if half:
                x = [t.half() if t.is_floating_point() else t for t in x]
            y = self.m.encode_image(*x) if self.m.cfg.input_stage == "vision" else self.m.encode_image_tokens(*x)
            return y.float() if half else y

    ins = input_examples(model.cfg, torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Vision(copy.deepcopy(model).half() if half else model).eval(), tuple(ins.values()), buf,
                          input_names=list(ins),
                          output_names=["image_rows"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={n: {0: "batch", **({1: "instruction_len"} if n.startswith("qformer_") else {})}
                                        for n in [*ins, "image_rows"]})
    m = onnx.load_from_string(buf.getvalue())
    m.ir_version = IR_VERSION
    nbytes = sum(int(np.prod(t.dims)) * (2 if t.data_type == TensorProto.FLOAT16 else 4) for t in m.graph.initializer)
    if fp16 and not half:
        new_inits, casts = [], []
        for t in m.graph.initializer:
            if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2:
                a = numpy_helper.to_array(t).astype(np.float16)
                new_inits.append(numpy_helper.from_array(a, t.name + ".fp16"))
                casts.append(helper.make_node("Cast", [t.name + ".fp16"], [t.name], name=f"cast_{t.name}",
                                              to=TensorProto.FLOAT))
            else:
                new_inits.append(t)
        del m.graph.initializer[:]
        m.graph.initializer.extend(new_inits)
        nodes = casts + list(m.graph.node)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    return m, nbytes


# --------------------------------------------------------------------------- files
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a file at 2 GB: larger graphs keep weights in <file>.data


def save_stage(m, path, weight_bytes: int) -> list[str]:
    """Save one stage; weights go to `<file>.data` when the graph would pass protobuf's 2 GB limit."""
    import onnx
    if weight_bytes > EXTERNAL_DATA_BYTES:
        data = path.name + ".data"
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [data]
    onnx.save_model(m, str(path))
    return []


def io_spec(m) -> tuple[list, list]:
    from onnx import helper

    def one(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "shape": shape, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type))}
    inits = {i.name for i in m.graph.initializer}
    return [one(v) for v in m.graph.input if v.name not in inits], [one(v) for v in m.graph.output]
