"""ONNX export, stage by stage: `vision`, `decoder_text`, `decoder_image` (DESIGN.md section 2).

- `vision` is traced from the reference with torch.onnx.export (standard ops, dynamic batch).
- The two decoder stages are written op by op with onnx.helper, one graph per branch, so routing is static:
  `decoder_text` holds the shared weights and the text branch only, `decoder_image` the shared weights and the
  vision branch only. Attention is ONNX Runtime's com.microsoft GroupQueryAttention with past and present
  sharing one preallocated buffer per layer ([1, K, cache_len, E], BNSH): the runtime binds the same OrtValue as
  `past_key.i` and `present_key.i`, the op writes the new rows in place at `seqlens_k + 1 - T` and attends over
  the first `total_sequence_length` rows, so a decode step never copies the cache. RoPE (NEOX form) is computed
  in the graph from an explicit `positions` input, so the cogvlm position rule works too.
- Imported-model variants (shared with the trt graphs through decoder_layers): low-rank vision branches (two
  MatMuls per projection, the weights stay low-rank), per-modality norms (the vision graph holds the vision
  norms, incl. the final one), Libra's cross-modal K/V bridge (a cache of 2 * kv_heads heads; GroupQueryAttention
  gets the queries twice, so one op writes both versions of the new rows into the shared buffer and the half of
  the output the branch does not read is dropped: attention costs twice, the graph flavour stays
  `ort-contrib-gqa`), and CogVLM's eoi-through-text rule (decoder_text then takes `input_rows` too; the runtime
  sends the image segment's last row there). Libra's input stage is `image_tokens` (codes, signal -> rows),
  traced from LibraImageInput: its VQ image tokenizer is not imported, so its bundles have no pixel stage.
- fp16: weights (matrices) stored in fp16 and Cast to fp32 at the graph's entry; compute and the KV cache stay
  fp32 (ONNX Runtime's CPU provider lacks fp16 kernels for several ops). The manifest says so per stage.

Every export validates itself through the `ort` backend against the PyTorch reference before the bundle is
renamed into place; a failure leaves no bundle.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError, UnsupportedVariant

OPSET = 17
IR_VERSION = 8                      # readable by every onnxruntime >= 1.14 and TensorRT 8.6+
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a file at 2 GB: larger graphs keep weights in <file>.data
PRECISIONS = ("fp32", "fp16", "int8", "int8-wo", "int4", "fp8")   # quantized: edgemm.calib
GRAPH_STANDARD = "onnx-standard"
GRAPH_GQA = "ort-contrib-gqa"       # com.microsoft GroupQueryAttention, shared past/present KV buffer
FP32_TOL = 1e-4                     # max abs error per stage
FP16_COS = 0.999                    # fp16: cosine similarity per compared vector, and
FP16_REL = 2e-2                     #       max abs error <= FP16_REL * max(1, max |reference|)


# --------------------------------------------------------------------------- graph building
class _Graph:
    """A tiny op-by-op builder over onnx.helper; returns value names."""

    def __init__(self, fp16_weights: bool):
        from onnx import helper
        self.h = helper
        self.nodes, self.inits, self.n = [], [], 0
        self.fp16 = fp16_weights
        self.weight_bytes = 0
        self._consts: dict = {}

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str | None = None, name=None, **attrs):
        outs = [self._name(op_type) for _ in range(n_out)]
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

    def weight(self, name: str, arr: np.ndarray) -> str:
        """A float32 weight; matrices are stored in fp16 (and Cast back to fp32) for fp16 exports."""
        arr = np.asarray(arr, np.float32)
        if self.fp16 and arr.ndim >= 2:
            from onnx import TensorProto
            src = self.const(name + ".fp16", arr.astype(np.float16))
            self.nodes.append(self.h.make_node("Cast", [src], [name], name=self._name("n_Cast"),
                                               to=TensorProto.FLOAT))
            return name
        return self.const(name, arr)


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _rms(g: _Graph, x: str, w: str, eps: float) -> str:
    # x * 1/sqrt(mean(x^2) + eps) * w, as edgemm.model.RMSNorm
    ms = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
    r = g.op("Sqrt", [g.op("Add", [ms, g.f32(eps)])])
    return g.op("Mul", [g.op("Div", [x, r]), w])


def _rope(g: _Graph, x: str, n: int, E: int, cos: str, sin: str) -> str:
    """NEOX RoPE on x [1, T, n*E]: x * cos + cat(-x2, x1) * sin, per head."""
    x4 = g.op("Reshape", [x, g.i64([0, 0, n, E])])
    x1, x2 = g.op("Split", [x4, g.i64([E // 2, E // 2])], n_out=2, axis=3)
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=3)
    y = g.op("Add", [g.op("Mul", [x4, cos]), g.op("Mul", [rot, sin])])
    return g.op("Reshape", [y, g.i64([0, 0, n * E])])


# --------------------------------------------------------------------------- decoder layers (onnx and trt graphs)
def _linear(g, x: str, mod, name: str) -> str:
    """x @ W^T (+ b) for an nn.Linear; Libra's LowRankLinear as two MatMuls (x @ A^T @ B^T: stays low-rank)."""
    if hasattr(mod, "weight_A"):
        h = g.op("MatMul", [x, g.weight(f"{name}.weight_A.T", _np(mod.weight_A).T)], name=f"{name}.A")
        return g.op("MatMul", [h, g.weight(f"{name}.weight_B.T", _np(mod.weight_B).T)], name=f"{name}.B")
    y = g.op("MatMul", [x, g.weight(f"{name}.weight.T", _np(mod.weight).T)], name=name)
    return y if mod.bias is None else g.op("Add", [y, g.weight(f"{name}.bias", _np(mod.bias))])


def _mlp(g, x: str, br, name: str, ffn: int) -> str:
    """SwiGLU; a dense branch's gate and up share one MatMul."""
    if hasattr(br.gate, "weight_A"):
        gate, up = _linear(g, x, br.gate, f"{name}.gate"), _linear(g, x, br.up, f"{name}.up")
    else:
        gu = np.concatenate([_np(br.gate.weight).T, _np(br.up.weight).T], 1)   # [D, 2F]: one MatMul
        gate, up = g.op("Split", [g.op("MatMul", [x, g.weight(f"{name}.gate_up.weight.T", gu)], name=f"{name}.gate_up"),
                                  g.i64([ffn, ffn])], n_out=2, axis=-1)
    return _linear(g, g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]), br.down, f"{name}.down")


def decoder_input(g, model, branch: str) -> tuple[list, str]:
    """-> (graph inputs, rows [1, T, D]): token ids (text) or image rows (vision). The text graph of a model that
    routes the image segment's eoi row through the text branch (CogVLM's original rule) also takes `input_rows`
    [1, rows, D], appended after the ids' embeddings: the runtime feeds the ids and no rows for text, no ids
    and the eoi row for the end of an image segment."""
    from onnx import TensorProto
    from onnx.helper import make_tensor_value_info as vi
    D = model.cfg.decoder.d_model
    if branch != "text":
        return [vi("image_rows", TensorProto.FLOAT, [1, "seq", D])], "image_rows"
    emb = g.weight("tok_embeddings.weight", _np(model.decoder.tok_embeddings.weight))
    x = g.op("Gather", [emb, "input_ids"], axis=0)                                        # [1, T, D]
    if model.cfg.decoder.eoi_branch != "text":
        return [vi("input_ids", TensorProto.INT64, [1, "seq"])], x
    ins = [vi("input_ids", TensorProto.INT64, [1, "ids"]), vi("input_rows", TensorProto.FLOAT, [1, "rows", D])]
    return ins, g.op("Concat", [x, "input_rows"], axis=1)


def decoder_layers(g, model, branch: str, x: str, rms, attend) -> str:
    """The layers of one decoder branch, shared by the onnx (GroupQueryAttention) and trt (KV-window) graphs:
    dense or low-rank (Libra) projections, per-modality norms, Libra's cross-modal K/V bridge.

    attend(i, q, k, v, read) -> [1, T, H*E]: q [1, T, H*E] and k, v [1, T, cache_heads*E] before RoPE; with the
    bridge k, v hold both versions of the rows (heads [0, K) as text queries read them, [K, 2K) as vision
    queries do: this branch's own rows plain, the other modality's with its rank-r bridge added) and
    `read` says which half this branch's queries attend over (None without the bridge)."""
    c = model.cfg.decoder
    H, K, E = c.n_heads, c.kv_heads, c.head_dim
    own = branch == "vision" and c.per_modality_norms
    for i, layer in enumerate(model.decoder.layers):
        br, p = getattr(layer, branch), f"layers.{i}"
        nrm = (layer.vision_attn_norm, layer.vision_ffn_norm) if own else (layer.attn_norm, layer.ffn_norm)
        pre = "vision_" if own else ""
        h = rms(x, g.weight(f"{p}.{pre}attn_norm.weight", _np(nrm[0].weight)), c.rms_eps)
        if hasattr(br.qkv, "weight"):
            q, k, v = g.op("Split", [_linear(g, h, br.qkv, f"{p}.{branch}.qkv"), g.i64([H * E, K * E, K * E])],
                           n_out=3, axis=-1)
        else:
            q, k, v = (_linear(g, h, getattr(br, n), f"{p}.{branch}.{n}") for n in "qkv")
        read = None
        if c.cross_modal_bridge:
            read = int(branch == "vision")
            ko, vo = (g.op("Add", [t, _linear(g, h, getattr(br, f"{n}_bridge"), f"{p}.{branch}.{n}_bridge")])
                      for t, n in ((k, "k"), (v, "v")))              # as the other modality's queries read them
            k, v = (g.op("Concat", [t, o] if read == 0 else [o, t], axis=-1) for t, o in ((k, ko), (v, vo)))
        x = g.op("Add", [x, _linear(g, attend(i, q, k, v, read), br.o, f"{p}.{branch}.o")])
        h = rms(x, g.weight(f"{p}.{pre}ffn_norm.weight", _np(nrm[1].weight)), c.rms_eps)
        x = g.op("Add", [x, _mlp(g, h, br, f"{p}.{branch}", c.ffn_dim)])
    return x


def final_norm(model, branch: str):
    dec = model.decoder
    return dec.vision_norm if branch == "vision" and model.cfg.decoder.per_modality_norms else dec.norm


def _decoder_graph(model, branch: str, fp16: bool):
    """One branch of the decoder as an ONNX model (see the module docstring for the I/O)."""
    import torch
    from onnx import TensorProto, helper
    c = model.cfg.decoder
    dec = model.decoder
    H, K, E, L = c.n_heads, c.kv_heads, c.head_dim, c.n_layers
    NK = c.cache_heads
    g = _Graph(fp16)
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    vi = helper.make_tensor_value_info
    inputs, x = decoder_input(g, model, branch)
    inputs += [vi("positions", i64, ["seq"]), vi("seqlens_k", i32, [1]), vi("total_sequence_length", i32, [])]
    for i in range(L):
        inputs += [vi(f"past_{kv}.{i}", f32, [1, NK, "cache_len", E]) for kv in ("key", "value")]

    # RoPE tables from the positions input, computed as edgemm.model.rope_cos_sin does
    inv = (1.0 / c.rope_theta ** (torch.arange(0, E, 2, dtype=torch.float32) / E)).numpy()
    f = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", ["positions"], to=f32), g.i64([1])]),
                     g.const("rope.inv_freq", inv)])                               # [T, E/2]
    f = g.op("Concat", [f, f], axis=-1)                                           # [T, E]
    cos = g.op("Unsqueeze", [g.op("Cos", [f]), g.i64([0, 2])])                     # [1, T, 1, E]
    sin = g.op("Unsqueeze", [g.op("Sin", [f]), g.i64([0, 2])])

    def attend(i, q, k, v, read):
        # with the bridge, the queries are duplicated (2H heads over the 2K cache heads: the first H read
        # [0, K), the others [K, 2K)), so one GroupQueryAttention writes both versions of the new rows into
        # the shared buffer; the half of the output this branch does not read is dropped
        n = 1 if read is None else 2
        q, k = _rope(g, q, H, E, cos, sin), _rope(g, k, NK, E, cos, sin)
        a, pk, pv = g.op("GroupQueryAttention", [g.op("Concat", [q] * n, axis=-1) if n > 1 else q, k, v,
                                                 f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                                                 "total_sequence_length"], n_out=3, domain="com.microsoft",
                         num_heads=n * H, kv_num_heads=NK, scale=1.0 / math.sqrt(E))
        g.nodes.append(helper.make_node("Identity", [pk], [f"present_key.{i}"], name=f"present_key_id.{i}"))
        g.nodes.append(helper.make_node("Identity", [pv], [f"present_value.{i}"], name=f"present_value_id.{i}"))
        return a if n == 1 else g.op("Split", [a, g.i64([H * E, H * E])], n_out=2, axis=-1)[read]

    x = decoder_layers(g, model, branch, x, lambda x, w, eps: _rms(g, x, w, eps), attend)
    last = g.op("Gather", [x, g.const("const.last", np.array(-1, np.int64))], axis=1)   # [1, D]
    hn = _rms(g, last, g.weight("norm.weight", _np(final_norm(model, branch).weight)), c.rms_eps)
    g.nodes.append(helper.make_node("MatMul", [hn, g.weight("lm_head.weight.T", _np(dec.lm_head.weight).T)],
                                    ["logits"], name="lm_head"))
    outputs = [vi("logits", f32, [1, c.vocab_size])]
    for i in range(L):
        outputs += [vi(f"present_key.{i}", f32, [1, NK, "cache_len", E]),
                    vi(f"present_value.{i}", f32, [1, NK, "cache_len", E])]
    graph = helper.make_graph(g.nodes, f"edgemm_decoder_{branch}", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             ir_version=IR_VERSION, producer_name="edgemm"), g.weight_bytes


def _vision_graph(model, fp16: bool):
    """The input stage traced from the reference (standard ops): `vision` (pixels -> image rows) or, for Libra,
    `image_tokens` ((codes, signal) -> image rows, LibraImageInput); fp16 casts matrices as the decoder does."""
    import io

    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    class Vision(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *x):
            return self.m.encode_image(*x) if self.m.cfg.input_stage == "vision" else self.m.encode_image_tokens(*x)

    ins = input_examples(model.cfg, torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Vision(model).eval(), tuple(ins.values()), buf, input_names=list(ins),
                          output_names=["image_rows"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in [*ins, "image_rows"]})
    m = onnx.load_from_string(buf.getvalue())
    m.ir_version = IR_VERSION
    nbytes = sum(int(np.prod(t.dims)) * 4 for t in m.graph.initializer)
    if fp16:
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


def input_examples(cfg, gen) -> dict:
    """Random inputs of the input stage: {"pixels": [1, 3, S, S]}, or Libra's {"codes": [1, N, codebooks]
    (+ "signal": [1, N, signal_size])}, N = the image rows (boi, patches, eoi)."""
    import torch
    v, a = cfg.vision, cfg.adapter
    if cfg.input_stage == "vision":
        return {"pixels": torch.randn(1, 3, v.image_size, v.image_size, generator=gen)}
    out = {"codes": torch.randint(0, a.vision_vocab, (1, cfg.n_image_rows, a.codebooks), generator=gen)}
    if a.signal_size:
        out["signal"] = torch.randn(1, cfg.n_image_rows, a.signal_size, generator=gen)
    return out


def _save(m, path: Path, weight_bytes: int) -> list[str]:
    """Save one stage; weights go to `<file>.data` when the graph would pass protobuf's 2 GB limit."""
    import onnx
    if weight_bytes > EXTERNAL_DATA_BYTES:
        data = path.name + ".data"
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [data]
    onnx.save_model(m, str(path))
    return []


def _io_spec(m) -> tuple[list, list]:
    from onnx import helper

    def one(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "shape": shape, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type))}
    inits = {i.name for i in m.graph.initializer}
    return [one(v) for v in m.graph.input if v.name not in inits], [one(v) for v in m.graph.output]


# --------------------------------------------------------------------------- source model
def _state_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _load_source(model):
    """--model spec, or a (model, tokenizer) pair -> (model, tokenizer, source dict)."""
    from edgemm.checkpoint import checkpoint_digest, load_model, resolve_model
    if isinstance(model, tuple):
        m, tok = model
        return m.eval(), tok, {"model": getattr(m.cfg, "name", "in-memory"), "kind": "in-memory",
                               "digest": "sha256-state:" + _state_digest(m)}
    kind, path = resolve_model(model)
    m, tok = load_model(model)
    if kind == "dir":
        return m, tok, {"model": str(Path(path).resolve()), "kind": "checkpoint",
                        "digest": checkpoint_digest(path)}
    return m, tok, {"model": model, "kind": "preset", "seed": 0, "digest": "sha256-state:" + _state_digest(m)}


# Variants the ONNX graphs compute (and the trt graphs, which share decoder_layers): the input stage is traced
# from the reference (any tower/projector, Libra's image-token input), the decoder graphs read `layer.vision`
# (the text branch for single-branch LLaVA models), dense or low-rank, with per-modality norms and Libra's
# bridge; an eoi row routed through the text branch runs in decoder_text (its `input_rows` input).
ONNX_VARIANTS = ("grouped-query attention", "qkv bias", "collapsed image positions (cogvlm position rule)",
                 "eoi through the text branch", "low-rank vision branches", "per-modality norms",
                 "cross-modal K/V bridge", "single branch (llava)", "clip vision tower", "mlp projector",
                 "libra image tokens")
NO_TARGET = "none yet (the torch reference backend runs it)"
QUANTIZED = ("int8", "int8-wo", "int4", "fp8")


INPUTS = {"vision": "pixels", "image_tokens": "image tokens and continuous signal (Libra)"}


def stage_notes(cfg, stage: str) -> dict:
    """Manifest fields that say how a stage computes the model's variants (onnx and trt bundles)."""
    c, out = cfg.decoder, {}
    if stage == "image_tokens":
        out["input"] = ("Libra image tokens: codes [batch, rows, codebooks] (+ signal [batch, rows, signal_size]) "
                        "-> image rows (LibraImageInput); Libra's VQ image tokenizer and CLIP signal encoder are "
                        "not imported, so there is no pixel stage")
    if stage == "decoder_text" and c.eoi_branch == "text":
        out["eoi_row"] = ("the image segment's eoi row runs here (CogVLM's original routing): input_ids empty, "
                          "input_rows = the eoi row; text segments feed input_rows with 0 rows")
    if stage == "decoder_image" and c.eoi_branch == "text":
        out["eoi_row"] = "not here: all image rows but the last (eoi) one, which decoder_text takes as input_rows"
    if stage.startswith("decoder") and c.cross_modal_bridge:
        out["bridge"] = ("Libra's cross-modal K/V bridge: the cache holds 2 * kv_heads heads per layer, [0, K) as "
                         "text queries read the rows, [K, 2K) as vision queries do; every segment writes both "
                         "versions of its rows and attends over its own modality's half")
    return out


def check_variants(cfg, where: str, precision: dict) -> None:
    """Refuse what the onnx / trt graphs cannot compute, naming the variant (and who can)."""
    for v in cfg.variants():
        if v not in ONNX_VARIANTS:
            raise UnsupportedVariant(v, where, NO_TARGET)
    if cfg.input_stage == "image_tokens" and set(precision.values()) & set(QUANTIZED):
        raise EdgemmError(f"{where}: quantized precisions calibrate on images through the pixel path, which a "
                          "Libra import does not have (its VQ image tokenizer is not imported); export fp32 or "
                          "fp16 (trt: fp16)")


def _precisions(precision, allowed=PRECISIONS, default: str = "fp32", target: str = "onnx") -> dict:
    """None | "p" | {"vision": p, "decoder": p} -> {"vision": p, "decoder": p}, each one of `allowed`."""
    if precision is None:
        precision = default
    if isinstance(precision, str):
        precision = {"vision": precision, "decoder": precision}
    out = {"vision": precision.get("vision", default), "decoder": precision.get("decoder", default)}
    for stage, p in out.items():
        if p not in allowed:
            raise EdgemmError(f"--precision {p} ({stage}) is not available for --target {target}; choose one of "
                              f"{', '.join(allowed)}")
    return out


# --------------------------------------------------------------------------- validation
def _compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    ref, got = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    err = float(np.abs(ref - got).max())
    cos = float(ref @ got / max(np.linalg.norm(ref) * np.linalg.norm(got), 1e-30))
    return err, cos, float(np.abs(ref).max())


def group(stage: str) -> str:
    """The --precision group of a stage: `decoder` for the decoder stages, `vision` for the input stage."""
    return "decoder" if stage.startswith("decoder") else "vision"


def run_input_stage(model, b, ins: dict):
    """The input stage (see input_examples) on the reference and on backend b -> (reference rows, b's rows)."""
    arrs = [t.numpy() for t in ins.values()]
    if model.cfg.input_stage == "vision":
        return model.encode_image(*ins.values()), b.vision(*arrs)
    return model.encode_image_tokens(*ins.values()), b.image_tokens(*arrs)


def validate_bundle(model, bundle: Path, precision: dict, seed: int | None = None, threads: int | None = None,
                    decode_steps: int = 8) -> dict:
    """Run each stage of `bundle` in ONNX Runtime (CPU) against the reference on fresh random inputs.

    -> {stage: {max_abs_err, cosine, ref_max_abs, compared, tolerance, ok}}; the decoder runs a
    text + image + text prompt, then greedy decode steps, comparing the logits after every segment/step.
    """
    import torch
    from edgemm.model import KVCache
    from edgemm.runtimes.ort_backend import OrtBackend
    cfg = model.cfg
    seed = int(time.time_ns() % 2**31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    b = OrtBackend.open(bundle=str(bundle), device="cpu", threads=threads, verify=False)
    res: dict[str, list] = {s: [] for s in cfg.stages}
    with torch.inference_mode():
        ref_rows, got_rows = run_input_stage(model, b, input_examples(cfg, gen))
        res[cfg.input_stage].append(_compare(_np(ref_rows), got_rows))
        n_text = 6
        need = 2 * n_text + cfg.n_image_rows + decode_steps + 2
        st = b.new_state(max_len=need)
        cache = KVCache.empty(cfg.decoder, 1, need)
        pos = 0
        img = torch.randn(1, cfg.n_image_rows, cfg.decoder.d_model, generator=gen) * ref_rows.std() + ref_rows
        for kind in ("text", "image", "text"):
            if kind == "text":
                ids = torch.randint(0, cfg.decoder.vocab_size, (1, n_text), generator=gen)
                got = b.text(st, ids[0].tolist())
                ref, pos = model.forward_segment("text", ids, cache, pos)
            else:
                got = b.image(st, _np(img))
                ref, pos = model.forward_segment("image", img, cache, pos)
            res["decoder_" + kind].append(_compare(_np(ref[0, -1]), got))
        for _ in range(decode_steps):
            t = int(ref[0, -1].argmax())
            got = b.text(st, [t])
            ref, pos = model.forward_segment("text", torch.tensor([[t]]), cache, pos)
            res["decoder_text"].append(_compare(_np(ref[0, -1]), got))
    out = {}
    for stage, rows in res.items():
        err = max(r[0] for r in rows)
        cos = min(r[1] for r in rows)
        scale = max(r[2] for r in rows)
        p = precision[group(stage)]
        if p == "fp32":
            tol, ok = f"max abs <= {FP32_TOL:g}", err <= FP32_TOL
        elif p in ("int8", "int8-wo", "int4", "fp8"):
            from edgemm.calib.apply import VALIDATION_COS
            tol, ok = f"cosine >= {VALIDATION_COS[p]}", cos >= VALIDATION_COS[p]
        else:
            lim = FP16_REL * max(1.0, scale)
            tol, ok = f"max abs <= {lim:.3g}, cosine >= {FP16_COS}", err <= lim and cos >= FP16_COS
        out[stage] = {"max_abs_err": err, "cosine": cos, "ref_max_abs": scale, "compared": len(rows),
                      "precision": p, "tolerance": tol, "ok": bool(ok)}
    out["_seed"] = seed
    return out


def format_validation(figures: dict, title: str = "onnxruntime CPU vs the reference") -> str:
    """The per-stage validation table the exporters print (onnx, trt graphs, trt engines)."""
    lines = [f"{'stage':<14} {'precision':<9} {'max abs err':>12} {'cosine':>10} {'|ref| max':>10} {'top-1':>6}  "
             f"check ({title})", "-" * 86]
    for stage, f in figures.items():
        if stage.startswith("_"):
            continue
        top1 = f"{f['top1_agree']:>6.2f}" if "top1_agree" in f else f"{'-':>6}"
        lines.append(f"{stage:<14} {f['precision']:<9} {f['max_abs_err']:>12.3e} {f['cosine']:>10.7f} "
                     f"{f.get('ref_max_abs', float('nan')):>10.3g} {top1}  {'ok' if f['ok'] else 'FAIL'} "
                     f"({f['tolerance']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the exporter
def export_onnx(model=None, out=None, precision=None, force: bool = False, calib=None, no_build: bool = False,
                log=print, threads: int | None = None, seed: int | None = None, keep_sensitive: float | None = None,
                stats=None, recipes: dict | None = None) -> dict:
    """Export `model` (a --model spec, or a (model, tokenizer) pair) to an ONNX bundle at `out`.

    Returns the manifest. Raises EdgemmError (and leaves no bundle) when validation fails.
    """
    import onnx
    import torch
    from edgemm.bundle import bundle_writer, tool_versions, write_manifest
    log = log or (lambda s: None)
    if not out:
        raise EdgemmError("-o OUT is required: the bundle directory to write")
    out = Path(out)
    if out.exists() and not force:
        raise EdgemmError(f"{out} already exists; choose another -o or pass --force to replace it")
    prec = _precisions(precision)
    if calib is not None and not set(prec.values()) & {"int8", "int8-wo", "int4", "fp8"}:
        log("note: --calib is not used by fp32/fp16 onnx exports")
    m, tok, source = _load_source(model)
    m = m.float().cpu().eval()
    cfg = m.cfg
    check_variants(cfg, "the onnx exporter", prec)
    t0 = time.time()
    with bundle_writer(out, force) as tmp, torch.inference_mode():
        stages = {}
        vm, vbytes = _vision_graph(m, prec["vision"] == "fp16")
        graphs = {cfg.input_stage: (vm, vbytes, GRAPH_STANDARD, prec["vision"], None)}
        for branch in ("text", "image"):
            dm, dbytes = _decoder_graph(m, "text" if branch == "text" else "vision", prec["decoder"] == "fp16")
            graphs[f"decoder_{branch}"] = (dm, dbytes, GRAPH_GQA, prec["decoder"],
                                           "text" if branch == "text" else "vision")
        heads = "2 * kv_heads" if cfg.decoder.cross_modal_bridge else "kv_heads"
        for stage, (g, nbytes, flavour, p, branch) in graphs.items():
            fname = f"{stage}.onnx"
            extra = _save(g, tmp / fname, nbytes)
            onnx.checker.check_model(str(tmp / fname))           # path form: works with external data
            ins, outs = _io_spec(g)
            st = {"file": fname, "graph": flavour, "precision": p, "inputs": ins, "outputs": outs,
                  "weights": "fp16 matrices, cast to fp32 in the graph; fp32 compute" if p == "fp16"
                  else "fp32"}
            if extra:
                st["extra_files"] = extra
            if branch:
                st["branch"] = branch
                st["kv_cache"] = {"layout": f"BNSH [1, {heads}, cache_len, head_dim] per layer",
                                  "dtype": "float32", "shared_past_present": True,
                                  "inputs": "past_key.i / past_value.i", "outputs": "present_key.i / present_value.i",
                                  "seqlens_k": "rows filled after this call - 1",
                                  "total_sequence_length": "rows filled after this call"}
            stages[stage] = {**st, **stage_notes(cfg, stage)}
            del g
        graphs.clear()
        from edgemm.calib.apply import quantize_bundle_stages     # quantized precisions (no-op for fp32/fp16)
        calibration = quantize_bundle_stages(tmp, stages, prec, m, tok, calib=calib, stats=stats, log=log,
                                             keep_sensitive=keep_sensitive, model_digest=source["digest"],
                                             recipes=recipes)
        tok.save(tmp / "tokenizer.json")
        from edgemm.tokenizer import CHAT_TEMPLATE
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        manifest = {"target": "onnx", "model": cfg.to_dict(), "source": source, "variants": cfg.variants(),
                    "reference": {"model": source["model"], "digest": source["digest"],
                                  "backend": "torch (edgemm.model)"},
                    "precision": prec, "stages": stages, "tokenizer": "tokenizer.json",
                    "chat_template": "chat_template.jinja",
                    "tools": tool_versions("onnx", "onnxruntime"), "opset": {"": OPSET, "com.microsoft": 1}}
        if calibration:
            manifest["calibration"] = calibration
        write_manifest(tmp, manifest)
        log(f"exported {', '.join(stages)} in {time.time() - t0:.1f}s; validating against the reference ...")
        figures = validate_bundle(m, tmp, prec, seed=seed, threads=threads)
        log(format_validation(figures))
        bad = [s for s, f in figures.items() if not s.startswith("_") and not f["ok"]]
        if bad:
            raise EdgemmError(f"validation failed for {', '.join(bad)} (see the table above); no bundle written")
        manifest["validation"] = {"reference": f"edgemm.model (PyTorch {torch.__version__}, fp32, CPU)",
                                  "source_digest": source["digest"], "inputs": f"random {INPUTS[cfg.input_stage]}; "
                                  "random text + image rows + text, then greedy decode steps",
                                  "seed": figures.pop("_seed"),
                                  "stages": figures}
        result = write_manifest(tmp, manifest)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB)")
    return result

