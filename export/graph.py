"""The one ONNX graph builder of the onnx and trt exporters: the op-by-op `Graph`, the primitives every stage is
written with (RMSNorm, RoPE, MoE FFN), the input stage traced from the reference, and how stages are saved. The
decoder stages are written from these in edgemm.export.decoder_graph, each layer kind's projections and MLP by its
emitter in edgemm.export.layer_emit.

RMSNorm is written `Pow(x, 2) -> ReduceMean -> Add -> Sqrt -> Div -> Mul`, the form ONNX Runtime fuses into
SimplifiedLayerNormalization (and TensorRT into its normalization layer). One opset for every graph: 19 (the
first with FLOAT8E4M3FN QuantizeLinear; ONNX Runtime >= 1.16, TensorRT 10).

fp16 onnx exports store weight matrices in fp16 behind a Cast to fp32; compute and the KV cache stay fp32 (what the
CPU provider runs fastest). fp16 exports for CUDA (`half`, ort flavour) compute in fp16: fp16
weights, activations, GroupQueryAttention and KV cache (ONNX Runtime registers its CUDA GroupQueryAttention for
fp16/bf16 only), RMSNorm statistics in fp32, fp32 logits out and fp32 image rows in.

Mixture-of-experts layers (MoE-LLaVA, `moe_mlp`): com.microsoft MoE in the onnx graphs (QMoE with int4 experts
for int4 bundles), a standard-op dense form in the trt graphs (measured: benchmarks/bench_moe.py).
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
        MatMuls (the ort flavour, see add_rms and layer_emit.Routed.split_gate_up); moe_form: how MoE layers are written (moe_mlp);
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
def norm_weights(g: Graph, mod, name: str):
    """A decoder norm's weights: RMSNorm's weight, or LayerNorm's (weight, bias) (Persimmon), for rms / add_rms."""
    w = g.weight(f"{name}.weight", np32(mod.weight))
    return (w, g.weight(f"{name}.bias", np32(mod.bias))) if getattr(mod, "bias", None) is not None else w


def rms(g: Graph, x: str, w, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) * w, as edgemm.model.RMSNorm, in the pattern ONNX Runtime fuses (fp16 compute:
    the statistics in fp32, as the fused kernels keep them: x^2 overflows fp16 from |x| = 256). w a (weight, bias)
    pair (norm_weights of a LayerNorm): LayerNormalization over the last axis."""
    from onnx import TensorProto
    if isinstance(w, tuple):
        return g.op("LayerNormalization", [x, *w], axis=-1, epsilon=eps)
    if g.half:
        x = g.op("Cast", [x], to=TensorProto.FLOAT)
    ms = g.op("ReduceMean", [g.op("Pow", [x, g.f32(2.0)]), g.i64([-1])], keepdims=1)
    y = g.act(g.op("Div", [x, g.op("Sqrt", [g.op("Add", [ms, g.f32(eps)])])]))
    return g.op("Mul", [y, w])


def add_rms(g: Graph, x: str, d: str, w: str, eps: float) -> tuple[str, str]:
    """(x + d, rms(x + d) * w). Graphs that may use ONNX Runtime's contrib ops (g.fused_norms) get one
    com.microsoft SkipSimplifiedLayerNormalization, whose 4th output is the residual sum: ONNX Runtime does not fuse
    Add + SimplifiedLayerNormalization itself when the sum also feeds the next residual, as it does here. A
    LayerNorm's (weight, bias): Add, then LayerNormalization."""
    if not g.fused_norms or isinstance(w, tuple):
        s = g.op("Add", [x, d])
        return s, rms(g, s, w, eps)
    h, s = g._name("skip_norm"), g._name("residual")
    g.nodes.append(g.h.make_node("SkipSimplifiedLayerNormalization", [x, d, w], [h, "", "", s],
                                 name=g._name("n_SkipSimplifiedLayerNormalization"), domain="com.microsoft",
                                 epsilon=eps))
    return s, h


def rope_tables(g: Graph, c, batched: bool = False, local: bool = False, mrope: bool = False) -> tuple[str, str]:
    """cos, sin [1, T, 1, R] from the `positions` input [T] ([B, T, 1, R] from [B, T] when batched), as
    edgemm.model.rope_cos_sin computes them; R the rotated dims of a head (all, or Persimmon's partial rotary);
    local: Gemma 3's sliding layers' base (rope_local_theta), else rope_theta with its linear scaling. mrope
    (Qwen2-VL's image rows): from the `mrope_positions` input [3, T], each frequency taking its mrope_section's row
    (the three rows' angles times a one-hot [3, 1, E/2], summed over the rows)."""
    import torch
    from onnx import TensorProto
    from edgemm.blocks.ops import rope_dims
    E = rope_dims(c)
    theta, factor = (c.rope_local_theta, 1.0) if local else (c.rope_theta, c.rope_linear_factor)
    inv = (1.0 / theta ** (torch.arange(0, E, 2, dtype=torch.float32) / E))
    inv = (inv / factor if factor != 1.0 else inv).numpy()
    pos = "mrope_positions" if mrope else "positions"
    f = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", [pos], to=TensorProto.FLOAT), g.i64([-1])]),
                     g.const("rope_local.inv_freq" if local else "rope.inv_freq", inv)])   # [(B,) T, E/2] / [3, T, E/2]
    if mrope:
        row = np.repeat(np.arange(3), c.mrope_section)
        onehot = (row[None, None, :] == np.arange(3)[:, None, None]).astype(np.float32)   # [3, 1, E/2]
        f = g.op("ReduceSum", [g.op("Mul", [f, g.const("rope.mrope_sections", onehot)]), g.i64([0])], keepdims=0)
    f = g.op("Concat", [f, f], axis=-1)                                           # [(B,) T, E]
    ax = g.i64([2] if batched else [0, 2])
    return g.act(g.op("Unsqueeze", [g.op("Cos", [f]), ax])), g.act(g.op("Unsqueeze", [g.op("Sin", [f]), ax]))


def rope(g: Graph, x4: str, cos: str, sin: str, E: int, R: int | None = None) -> str:
    """NEOX RoPE on x4 [1, T, n, E]: x * cos + cat(-x2, x1) * sin; partial rotary (R < E, cos / sin [.., R]): on
    the first R dims of each head, the others as they are."""
    if R and R < E:
        a, b = g.op("Split", [x4, g.i64([R, E - R])], n_out=2, axis=3)
        return g.op("Concat", [rope(g, a, cos, sin, R), b], axis=3)
    x1, x2 = g.op("Split", [x4, g.i64([E // 2, E // 2])], n_out=2, axis=3)
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=3)
    return g.op("Add", [g.op("Mul", [x4, cos]), g.op("Mul", [rot, sin])])


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


def gelu_tanh(g: Graph, x: str) -> str:
    """GELU's tanh form (Gemma's gate): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    x3 = g.op("Mul", [g.op("Mul", [x, x]), x])
    t = g.op("Tanh", [g.op("Mul", [g.op("Add", [x, g.op("Mul", [x3, g.scalar(0.044715)])]),
                                   g.scalar(math.sqrt(2 / math.pi))])])
    return g.op("Mul", [g.op("Mul", [x, g.scalar(0.5)]), g.op("Add", [t, g.scalar(1.0)])])


# --------------------------------------------------------------------------- the input stage
def input_examples(cfg, gen) -> dict:
    """Random inputs of the input stage: {"pixels": [1, 3, S, S]}, or Libra's {"codes": [1, N, codebooks]
    (+ "signal": [1, N, signal_size])}, N = the image rows (boi, patches, eoi)."""
    import torch
    v, a = cfg.vision, cfg.adapter
    if cfg.input_stage == "vision" and cfg.reads_question:
        # InstructBLIP: + the question's Q-Former ids and mask [1, T] (T dynamic; the last id padded)
        T = min(6, a.qformer_positions)
        return {"pixels": torch.randn(1, 3, v.image_size, v.image_size, generator=gen),
                "qformer_input_ids": torch.randint(0, a.qformer_vocab, (1, T), generator=gen),
                "qformer_attention_mask": (torch.arange(T) < max(1, T - 1)).long()[None]}
    if v.tiling == "uhd":                               # LLaVA-UHD: two slices of 2 x 3 patches + their regions
        from edgemm.uhd_slices import pool_matrices
        pr, pc = pool_matrices(2, 3, math.isqrt(a.query_tokens))
        return {"pixels": torch.randn(2, 3, 2 * v.patch_size, 3 * v.patch_size, generator=gen),
                "pool_rows": torch.from_numpy(pr), "pool_cols": torch.from_numpy(pc)}
    if v.arch == "patch_linear":                        # Fuyu: any size in whole patches (dynamic height, width)
        return {"pixels": torch.randn(1, 3, 2 * v.patch_size, 3 * v.patch_size, generator=gen)}
    if v.arch == "qwen2vl":                             # Qwen2-VL: any size in whole merged cells
        f = v.patch_size * v.merge_size
        return {"pixels": torch.randn(1, 3, 3 * f, 5 * f, generator=gen)}
    if cfg.input_stage == "vision":
        return {"pixels": torch.randn(1, 3, v.image_size, v.image_size, generator=gen)}
    out = {"codes": torch.randint(0, a.vision_vocab, (1, cfg.n_image_rows, a.codebooks), generator=gen)}
    if a.signal_size:
        out["signal"] = torch.randn(1, cfg.n_image_rows, a.signal_size, generator=gen)
    return out


def vision_graph(model, fp16: bool = False, half: bool = False, video: bool = False):
    """The input stage traced from the reference (standard ops, dynamic batch) -> (model, weight bytes):
    `vision` (pixels -> image rows) or, for Libra, `image_tokens` ((codes, signal) -> image rows); video:
    LLaVA-NeXT-Video's `video` stage (frames [F, 3, S, S] -> pooled rows [1, rows, D]); fp16 stores
    matrices in fp16 behind a Cast, as the decoder graphs do. half (fp16 compute for the CUDA provider): traced from
    an fp16 copy of the reference, fp32 inputs and image rows cast at the graph's edges."""
    import copy
    import tempfile
    import warnings
    from pathlib import Path

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
            y = self.m.encode_video(*x) if video else self.m.encode_image(*x) \
                if self.m.cfg.input_stage == "vision" else self.m.encode_image_tokens(*x)
            return y.float() if half else y

    ins = input_examples(model.cfg, torch.Generator().manual_seed(0))
    if video:                                               # two frames (the frame count is a dynamic axis)
        ins = {"pixels": torch.cat([ins["pixels"]] * 2)}
    any_size = model.cfg.vision.arch in ("patch_linear", "qwen2vl") or model.cfg.vision.tiling == "uhd"   # Fuyu,
    # Qwen2-VL, LLaVA-UHD: pixels of any height and width (LLaVA-UHD: + the regions' RoIAlign weights, sized by the
    # patch grid)
    # traced into a file, not memory: a tower over protobuf's 2 GiB (Qwen2-VL-2B's, 675 M parameters: 2.7 GB in
    # fp32) can only be written with its weights as external data beside the file, which onnx.load reads back
    tmp = tempfile.TemporaryDirectory(prefix="edgemm-vision-")
    buf = str(Path(tmp.name) / "vision.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Vision(copy.deepcopy(model).half() if half else model).eval(), tuple(ins.values()), buf,
                          input_names=list(ins),
                          output_names=["image_rows"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={n: {0: "batch", **({1: "instruction_len"} if n.startswith("qformer_") else {}),
                                            **({1: "rows"} if n == "image_rows" and (any_size or video) else {}),
                                            **({2: "height", 3: "width"} if n == "pixels" and any_size else {}),
                                            **({0: n + "_out", 1: n + "_in"} if n.startswith("pool_") else {})}
                                        for n in [*ins, "image_rows"]})
    with tmp:
        m = onnx.load(buf)
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
