"""TensorRT export: explicit-quantization (Q/DQ) ONNX per stage, optimization profiles, engines on the device.

`edgemm export --target trt --precision int8|fp8|fp16` writes a portable bundle:

- `vision.onnx`: the vision stage traced from the reference (standard ops), opset 19.
- `decoder_text.onnx`, `decoder_image.onnx`: the decoder branches written op by op in *standard* ONNX ops
  (graph flavour `onnx-standard-kv-window`; the ONNX Runtime bundles use com.microsoft GroupQueryAttention, which
  TensorRT cannot parse). Per layer the KV cache is an input `cache_key.i` / `cache_value.i` [1, W, K, E]
  (BSNH: the first W rows of the runtime's [1, capacity, K, E] buffer, one contiguous block), the T new rows are
  written at `past_len` with ScatterElements, attention is a masked softmax (row i sees cache rows
  <= past_len + i), and the new rows come out as `new_key.i` / `new_value.i` [1, T, K, E] for the runtime to
  store. RoPE (NEOX) is computed from an explicit `positions` input, so the cogvlm position rule works. The
  layers are edgemm.export.onnx.decoder_layers (low-rank branches, per-modality norms, Libra's bridge: the cache
  then has 2 * kv_heads heads and each branch's attention slices its half; eoi through the text branch:
  decoder_text's `input_rows`), with this file's standard-op attention.
- int8 / fp8: Q/DQ inserted by edgemm.calib.quantize.quantize_stage when that module is installed, else by the
  built-in quantizer below: per-output-channel symmetric weights (int8 stored as int8 + DequantizeLinear; fp8
  as fp32 + QuantizeLinear/DequantizeLinear, which TensorRT folds), per-tensor symmetric activations at every
  weight MatMul / Conv input, scales from activation maxima on the calibration set, collected per stage (so the
  text branch and the vision branch each get their own scales). No implicit INT8 calibrator is involved.
- fp16: the fp32 graphs; TensorRT applies fp16 at build time.

The manifest holds the optimization profiles for a Jetson Orin and for a workstation (batch, sequence and cache
lengths, min/opt/max), the build settings, and, once engines exist, the TensorRT version, GPU and compute
capability they were built for. Every export validates its graphs in ONNX Runtime's CPU provider against the
PyTorch reference before the bundle is renamed into place. Engines are built at export time when TensorRT and a
CUDA GPU are present (and --no-build is not given); otherwise `edgemm build-engines BUNDLE` builds them on the
target device.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError
from edgemm.export.onnx import group

OPSET = 19                      # FP8 QuantizeLinear needs 19; TensorRT 10's parser reads 9..20+
IR_VERSION = 9
PRECISIONS = ("fp16", "int8", "fp8")
GRAPH_STANDARD = "onnx-standard"
GRAPH_KV = "onnx-standard-kv-window"
STAGES = ("vision", "decoder_text", "decoder_image")      # Libra: image_tokens instead of vision (cfg.stages)
MIN_TRT_MAJOR = 10
FP8_MIN_CC = (8, 9)
NEG = -1e9                      # masked attention score (-inf in fp16 after TensorRT's cast: still correct)

# Build defaults per device class; --max-context / --max-batch override them.
DEVICE_CLASSES = {
    "orin": {"description": "Jetson Orin (AGX / NX / Nano; JetPack 6, TensorRT 10; shared CPU/GPU memory)",
             "max_context": 2048, "opt_context": 512, "max_batch": 1, "workspace_mib": 1024,
             "builder_optimization_level": 3},
    "workstation": {"description": "workstation / server with a discrete CUDA GPU",
                    "max_context": 8192, "opt_context": 1024, "max_batch": 8, "workspace_mib": 8192,
                    "builder_optimization_level": 3},
}
# Validation tolerances on the CPU (ONNX Runtime) against the fp32 reference.
FP32_TOL = 1e-4                 # fp16 bundles: the graphs are fp32 (fp16 is applied by TensorRT)
QDQ_COS = {"int8": 0.99, "fp8": 0.98}    # cosine similarity per compared vector (logits, image rows)
QDQ_COS_REAL = {"int8": 0.95, "fp8": 0.95}   # decoder_text on a calibration prompt, with top-1 agreement
# The image segment's own logits (at eoi) are never sampled: a text segment always follows, and the image
# branch's error reaches the answer through the KV cache, which the decoder_text rows after it measure. Its
# check is a looser cosine (top-1 is reported; random-weight models have near-ties) (trained tiny-shapes, fp8: eoi-row cosine 0.959, text 0.99993).
QDQ_COS_IMAGE = {"int8": 0.98, "fp8": 0.95}
ENGINE_COS = 0.99               # engine vs its Q/DQ graph (build-engines)


# --------------------------------------------------------------------------- graph building
class _G:
    """A small op-by-op builder over onnx.helper (opset 19 forms: axes as inputs)."""

    def __init__(self):
        from onnx import helper
        self.h = helper
        self.nodes, self.inits, self.n = [], [], 0
        self._consts: dict = {}

    def op(self, op_type, inputs, n_out=1, name=None, out=None, **attrs):
        self.n += 1
        outs = [out] if out else [f"{op_type}_{self.n}_{i}" for i in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, inputs, outs, name=name or f"{op_type}_{self.n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name, arr):
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.asarray(arr, order="C"), name))
        return name

    weight = init                   # the name edgemm.export.onnx's shared decoder code uses

    def i64(self, vals):
        key = ("i64", tuple(np.atleast_1d(vals).tolist()), np.ndim(vals))
        if key not in self._consts:
            self._consts[key] = self.init(f"const.i64.{len(self._consts)}", np.array(vals, np.int64))
        return self._consts[key]

    def f32(self, v):
        key = ("f32", float(v))
        if key not in self._consts:
            self._consts[key] = self.init(f"const.f32.{len(self._consts)}", np.array(v, np.float32))
        return self._consts[key]


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _rms(g, x, w, eps):
    ms = g.op("ReduceMean", [g.op("Mul", [x, x]), g.i64([-1])], keepdims=1)
    return g.op("Mul", [g.op("Div", [x, g.op("Sqrt", [g.op("Add", [ms, g.f32(eps)])])]), w])


def _rope(g, x4, cos, sin, E):
    """NEOX RoPE on x4 [1, T, n, E] with cos/sin [1, T, 1, E]."""
    x1, x2 = g.op("Split", [x4, g.i64([E // 2, E // 2])], n_out=2, axis=3)
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=3)
    return g.op("Add", [g.op("Mul", [x4, cos]), g.op("Mul", [rot, sin])])


def decoder_graph(model, branch: str):
    """One decoder branch ('text' or 'vision') in standard ONNX ops with a fixed-size KV-cache window."""
    import torch
    from onnx import TensorProto, helper
    from edgemm.export.onnx import decoder_input, decoder_layers, final_norm
    c, dec = model.cfg.decoder, model.decoder
    D, H, K, E, L = c.d_model, c.n_heads, c.kv_heads, c.head_dim, c.n_layers
    NK = c.cache_heads                  # Libra's bridge: K heads as text queries read them, K as vision ones do
    g = _G()
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    vi = helper.make_tensor_value_info
    inputs, x = decoder_input(g, model, branch)
    inputs += [vi("positions", i64, ["seq"]), vi("past_len", i64, [1])]
    for i in range(L):
        inputs += [vi(f"cache_{kv}.{i}", f32, [1, "cache_len", NK, E]) for kv in ("key", "value")]

    # rows written by this call (past_len + 0..T-1) and the mask over the cache window [T, W]
    zero, one = g.i64(0), g.i64(1)
    T = g.op("Squeeze", [g.op("Shape", ["positions"]), g.i64([0])])
    W = g.op("Gather", [g.op("Shape", ["cache_key.0"]), one], axis=0)
    rows = g.op("Add", [g.op("Range", [zero, T, one]), "past_len"], name="write_rows")         # [T]
    cols = g.op("Range", [zero, W, one])                                                      # [W]
    allowed = g.op("LessOrEqual", [g.op("Unsqueeze", [cols, g.i64([0])]),
                                   g.op("Unsqueeze", [rows, g.i64([1])])], name="causal_mask")  # [T, W]
    scatter_shape = g.op("Concat", [g.i64([1]), g.op("Unsqueeze", [T, g.i64([0])]), g.i64([NK, E])], axis=0)
    scatter_idx = g.op("Expand", [g.op("Reshape", [rows, g.i64([1, -1, 1, 1])]), scatter_shape])  # [1, T, NK, E]

    inv = (1.0 / c.rope_theta ** (torch.arange(0, E, 2, dtype=torch.float32) / E)).numpy()
    f = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", ["positions"], to=f32), g.i64([1])]), g.init("rope.inv_freq", inv)])
    f = g.op("Concat", [f, f], axis=-1)                                                        # [T, E]
    cos = g.op("Unsqueeze", [g.op("Cos", [f]), g.i64([0, 2])])                                # [1, T, 1, E]
    sin = g.op("Unsqueeze", [g.op("Sin", [f]), g.i64([0, 2])])
    scale = g.f32(1.0 / math.sqrt(E))

    def attend(i, q, k, v, read):
        q4 = _rope(g, g.op("Reshape", [q, g.i64([1, -1, H, E])]), cos, sin, E)               # [1, T, H, E]
        k4 = _rope(g, g.op("Reshape", [k, g.i64([1, -1, NK, E])]), cos, sin, E)              # [1, T, NK, E]
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
        return g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), g.i64([1, -1, D])])

    x = decoder_layers(g, model, branch, x, lambda x, w, eps: _rms(g, x, w, eps), attend)
    last = g.op("Slice", [x, g.i64([-1]), g.i64([2**62]), g.i64([1])])                       # [1, 1, D]
    hn = _rms(g, last, g.init("norm.weight", _np(final_norm(model, branch).weight)), c.rms_eps)
    lg = g.op("MatMul", [hn, g.init("lm_head.weight.T", _np(dec.lm_head.weight).T)], name="lm_head")
    g.op("Reshape", [lg, g.i64([1, c.vocab_size])], out="logits")
    outputs = [vi("logits", f32, [1, c.vocab_size])]
    outputs += [vi(f"new_key.{i}", f32, [1, "seq", NK, E]) for i in range(L)]
    outputs += [vi(f"new_value.{i}", f32, [1, "seq", NK, E]) for i in range(L)]
    graph = helper.make_graph(g.nodes, f"edgemm_trt_decoder_{branch}", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                             producer_name="edgemm")


def vision_graph(model):
    """The vision stage traced from the reference (edgemm.export.onnx), converted to opset 19."""
    from onnx import version_converter
    from edgemm.export.onnx import _vision_graph
    m, _ = _vision_graph(model, False)
    m = version_converter.convert_version(m, OPSET)
    m.ir_version = IR_VERSION
    return m


# --------------------------------------------------------------------------- Q/DQ (built-in quantizer)
def quantizable_nodes(m, keep_sensitive=("lm_head",)) -> list[tuple[int, str, str, int]]:
    """(node index, activation input, weight initializer, channel axis) for every MatMul/Conv with a constant
    float weight, except the nodes named in keep_sensitive (kept in fp32)."""
    from onnx import TensorProto
    inits = {t.name: t for t in m.graph.initializer}
    out = []
    for i, n in enumerate(m.graph.node):
        if n.op_type not in ("MatMul", "Conv") or any(s and s in n.name for s in (keep_sensitive or ())):
            continue
        if len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        if w.data_type != TensorProto.FLOAT or len(w.dims) < 2:
            continue
        out.append((i, n.input[0], n.input[1], 1 if n.op_type == "MatMul" else 0))
    return out


def collect_activation_amax(paths: dict, bundle_dir, calib_items, keep_sensitive=("lm_head",), threads=None,
                            percentile: float | None = None) -> dict:
    """Run the fp32 graphs of a bundle over calibration (image, prompt ids) items in ONNX Runtime and return
    {stage: {activation tensor: amax}} for the quantizable inputs (per stage: per modality branch)."""
    import onnx
    from onnx import TensorProto, helper
    from edgemm.runtimes.trt_backend import OnnxQdqBackend
    tmp = Path(tempfile.mkdtemp(prefix="edgemm-calib-"))
    try:
        aug, extra = {}, {}
        for s, p in paths.items():
            m = onnx.load(str(p))
            names = sorted({a for _, a, _, _ in quantizable_nodes(m, keep_sensitive)})
            have = {o.name for o in m.graph.output}
            for nm in names:
                if nm not in have:
                    m.graph.output.append(helper.make_tensor_value_info(nm, TensorProto.FLOAT, None))
            aug[s] = str(tmp / f"{s}.onnx")
            onnx.save_model(m, aug[s])
            extra[s] = names
        b = OnnxQdqBackend.open(bundle=str(bundle_dir), verify=False, paths=aug, extra_outputs=extra,
                                threads=threads)
        acc: dict = {s: {} for s in paths}

        def hook(stage, outs):
            for nm in extra[stage]:
                a = np.abs(outs[nm])
                v = float(np.percentile(a, percentile)) if percentile else float(a.max())
                acc[stage][nm] = max(acc[stage].get(nm, 0.0), v)
        b.on_outputs = hook
        for pixels, segments in calib_items:
            st = b.new_state(max_len=sum(len(d) if k == "text" else b.cfg.n_image_rows for k, d in segments) + 1)
            rows = b.vision(pixels)
            for kind, data in segments:
                b.image(st, rows) if kind == "image" else b.text(st, data)
        return acc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantize_stage_builtin(onnx_in, onnx_out, stage, precision, stats=None, keep_sensitive=None, log=print) -> dict:
    """Insert explicit Q/DQ into one stage graph (the interface of edgemm.calib.quantize.quantize_stage).

    stats: {activation tensor: amax}. Weights: per output channel, symmetric. Activations: per tensor,
    symmetric (zero point 0, as TensorRT requires). -> {'quantized': n, 'kept': [...], 'recipe': ...}.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    if precision not in ("int8", "fp8"):
        raise EdgemmError(f"quantize_stage: precision {precision!r} has no Q/DQ form (int8, fp8)")
    keep = ("lm_head",) if keep_sensitive is None else tuple(keep_sensitive)
    m = onnx.load(str(onnx_in))
    stats = stats or {}
    qmax = 127.0 if precision == "int8" else 448.0
    qtype = TensorProto.INT8 if precision == "int8" else TensorProto.FLOAT8E4M3FN
    inits = {t.name: t for t in m.graph.initializer}
    targets = quantizable_nodes(m, keep)
    new_nodes: dict[int, list] = {}
    act_done: dict[str, str] = {}
    new_inits, drop = [], set()
    missing = []

    def zp(name, n):
        return helper.make_tensor(name, qtype, [n] if n else [], [0] * max(n, 1))

    for idx, act, wname, axis in targets:
        node = m.graph.node[idx]
        pre = []
        if act not in act_done:
            amax = stats.get(act)
            if amax is None or not np.isfinite(amax) or amax <= 0:
                missing.append(act)
                continue
            s = f"{act}.act_scale"
            new_inits += [numpy_helper.from_array(np.array(amax / qmax, np.float32), s), zp(f"{act}.act_zp", 0)]
            q = helper.make_node("QuantizeLinear", [act, s, f"{act}.act_zp"], [f"{act}.q"], name=f"{act}.Q")
            dq = helper.make_node("DequantizeLinear", [f"{act}.q", s, f"{act}.act_zp"], [f"{act}.dq"],
                                  name=f"{act}.DQ")
            pre += [q, dq]
            act_done[act] = f"{act}.dq"
        w = numpy_helper.to_array(inits[wname]).astype(np.float32)
        red = tuple(d for d in range(w.ndim) if d != axis)
        wmax = np.abs(w).max(axis=red)
        ws = (np.where(wmax > 0, wmax, 1.0) / qmax).astype(np.float32)
        bshape = [1] * w.ndim
        bshape[axis] = -1
        sn, zn = f"{wname}.w_scale", f"{wname}.w_zp"
        new_inits += [numpy_helper.from_array(ws, sn), zp(zn, w.shape[axis])]
        if precision == "int8":
            wq = np.clip(np.round(w / ws.reshape(bshape)), -127, 127).astype(np.int8)
            new_inits.append(numpy_helper.from_array(wq, f"{wname}.int8"))
            pre.append(helper.make_node("DequantizeLinear", [f"{wname}.int8", sn, zn], [f"{wname}.dq"],
                                        name=f"{wname}.DQ", axis=axis))
            drop.add(wname)
        else:   # fp32 weight + Q/DQ (TensorRT folds it into fp8 weights; numpy has no float8 to store)
            pre += [helper.make_node("QuantizeLinear", [wname, sn, zn], [f"{wname}.q"], name=f"{wname}.Q",
                                     axis=axis),
                    helper.make_node("DequantizeLinear", [f"{wname}.q", sn, zn], [f"{wname}.dq"],
                                     name=f"{wname}.DQ", axis=axis)]
        node.input[0] = act_done[act]
        node.input[1] = f"{wname}.dq"
        new_nodes[idx] = pre
    if missing:
        raise EdgemmError(f"quantize_stage({stage}): no calibration statistics for {len(missing)} activations "
                          f"(first: {missing[0]}); the calibration set did not reach them")
    # weights still used elsewhere stay (a tied embedding, for example)
    used = {i for n in m.graph.node for i in n.input}
    nodes = []
    for i, n in enumerate(m.graph.node):
        nodes += new_nodes.get(i, [])
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    keep_inits = [t for t in m.graph.initializer if t.name not in drop or t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep_inits + new_inits)
    onnx.save_model(m, str(onnx_out))
    kept = [m.graph.node[i].name for i in range(len(m.graph.node))
            if m.graph.node[i].op_type == "MatMul" and any(k in m.graph.node[i].name for k in keep)]
    if log:
        log(f"  {stage}: {len(targets)} weight layers -> {precision} Q/DQ, {len(act_done)} activation scales; "
            f"kept in fp32: {', '.join(kept) or 'none'}")
    return {"quantized": len(targets), "activation_scales": len(act_done), "kept": kept,
            "recipe": {"weights": f"{precision}, symmetric, per output channel (amax)",
                       "activations": f"{precision}, symmetric, per tensor (calibration amax)",
                       "quantizer": "edgemm.export.trt (built-in)"}}


def _quantizer():
    """(quantize_stage, collect_stats or None, name): the calibration package's functions when installed
    (statistics from the PyTorch reference, per stage and modality branch), else the built-in quantizer with
    activation maxima collected on the fp32 graphs here."""
    try:
        from edgemm.calib.quantize import quantize_stage
        from edgemm.calib.stats import collect_stats
        return quantize_stage, collect_stats, "edgemm.calib.quantize"
    except ImportError:
        return quantize_stage_builtin, None, "edgemm.export.trt (built-in)"


def calibration_items(model, tok, calib=None, n: int = 32):
    """(pixels, segments) for calibration: the bundled shapes calibration split, or a folder with images and
    prompts.jsonl ({"image": file, "prompt": text}). Segments: bos, the image, the user turn and the answer."""
    import json
    from edgemm.processor import preprocess
    pairs = []
    try:                                  # the calibration package's set loader, when installed
        from edgemm.calib.sets import resolve_calib
        pairs = [(x.image, x.prompt, x.answer) for x in resolve_calib(calib, n).samples]
    except ImportError:
        pass
    if pairs:
        pass
    elif calib is None:
        from edgemm import shapes
        for img, q in shapes.make_split("calib", n):
            pairs.append((img, q.question, q.answer))
    else:
        d = Path(calib)
        f = d / "prompts.jsonl"
        if not f.is_file():
            raise EdgemmError(f"--calib {calib}: expected a folder with images and prompts.jsonl "
                              '({"image": "file.png", "prompt": "..."} per line)')
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                pairs.append((d / r["image"], r.get("prompt") or r.get("question", ""), r.get("answer")))
        if not pairs:
            raise EdgemmError(f"--calib {calib}: prompts.jsonl holds no rows")
        pairs = pairs[:n]
    items = []
    for img, q, a in pairs:
        ids = tok.user_turn(q, first=True) + (tok.answer(a) if a else [])
        items.append((preprocess(img, model.cfg.vision), [("text", [tok.bos_id]), ("image", None), ("text", ids)]))
    return items


def _calib_digest(items) -> str:
    import hashlib
    h = hashlib.sha256()
    for px, segs in items:
        h.update(np.ascontiguousarray(px, np.float32).tobytes())
        for k, d in segs:
            h.update(k.encode() + (np.asarray(d, np.int64).tobytes() if d is not None else b""))
    return h.hexdigest()


# --------------------------------------------------------------------------- profiles and build plan
def make_profiles(cfg, device_class: str, max_context: int | None = None, max_batch: int | None = None) -> dict:
    """Optimization profiles {stage: {input: {min, opt, max}}} for a device class (pure)."""
    if device_class not in DEVICE_CLASSES:
        raise EdgemmError(f"unknown device class {device_class!r}; choose {', '.join(DEVICE_CLASSES)}")
    dc = DEVICE_CLASSES[device_class]
    c = cfg.decoder
    ctx = int(max_context or min(dc["max_context"], c.max_seq_len))
    if ctx > c.max_seq_len:
        raise EdgemmError(f"--max-context {ctx} exceeds the model's context length {c.max_seq_len}")
    if ctx < cfg.n_image_rows + 8:
        raise EdgemmError(f"--max-context {ctx} cannot hold an image ({cfg.n_image_rows} rows) and a prompt")
    batch = int(max_batch or dc["max_batch"])
    opt_ctx = max(1, min(dc["opt_context"], ctx))
    S, K, E, D, n_img = cfg.vision.image_size, c.cache_heads, c.head_dim, c.d_model, cfg.n_image_rows

    def cache(prof):
        return {f"cache_{kv}.{i}": prof for i in range(c.n_layers) for kv in ("key", "value")}

    def kv(lo, opt, hi):
        return {"min": [1, lo, K, E], "opt": [1, opt, K, E], "max": [1, hi, K, E]}

    def batched(*shape):
        return {"min": [1, *shape], "opt": [1, *shape], "max": [batch, *shape]}
    a, eoi = cfg.adapter, int(c.eoi_branch == "text")     # eoi through text: no ids and one row (input_rows)
    inp = {"pixels": batched(3, S, S)} if cfg.input_stage == "vision" else {"codes": batched(n_img, a.codebooks)}
    if cfg.input_stage == "image_tokens" and a.signal_size:
        inp["signal"] = batched(n_img, a.signal_size)
    rows = {"input_rows": {"min": [1, 0, D], "opt": [1, 0, D], "max": [1, 1, D]}} if eoi else {}
    return {
        cfg.input_stage: inp,
        "decoder_text": {"input_ids": {"min": [1, 1 - eoi], "opt": [1, 1], "max": [1, ctx]}, **rows,
                         "positions": {"min": [1], "opt": [1], "max": [ctx]},
                         "past_len": {"min": [1], "opt": [1], "max": [1]},
                         **cache(kv(1, opt_ctx, ctx))},
        "decoder_image": {"image_rows": {"min": [1, 1, D], "opt": [1, n_img, D], "max": [1, n_img, D]},
                          "positions": {"min": [1], "opt": [n_img], "max": [n_img]},
                          "past_len": {"min": [1], "opt": [1], "max": [1]},
                          **cache(kv(1, min(opt_ctx, ctx), ctx))},
        "_meta": {"device_class": device_class, "max_context": ctx, "max_batch": batch,
                  "workspace_mib": dc["workspace_mib"], "builder_optimization_level": dc["builder_optimization_level"]},
    }


def parse_cc(cc) -> tuple[int, int]:
    if isinstance(cc, (tuple, list)):
        return int(cc[0]), int(cc[1])
    a, _, b = str(cc).partition(".")
    return int(a), int(b or 0)


def check_precision_supported(precision: dict, compute_capability, gpu: str = "this GPU") -> None:
    """FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); refuse below with an int8 offer."""
    if "fp8" in precision.values() and parse_cc(compute_capability) < FP8_MIN_CC:
        cc = "%d.%d" % parse_cc(compute_capability)
        raise EdgemmError(f"FP8 engines need a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                          f"{gpu} has {cc}: export with --precision int8 instead (Jetson Orin is 8.7)")


def trt_flags(precision: str, strongly_typed: bool) -> list[str]:
    """BuilderFlag names for a weakly typed build; none for a strongly typed one (types come from the graph)."""
    if strongly_typed:
        return []
    return {"fp16": ["FP16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"]}[precision]


def build_plan(manifest: dict, here: dict, device_class: str | None = None) -> dict:
    """The settings the engine build passes to TensorRT, per stage (pure: tested without a GPU).

    here: {'tensorrt': version, 'gpu': name, 'compute_capability': 'X.Y'}.
    """
    trt_ver = str(here["tensorrt"])
    major = int(trt_ver.split(".")[0])
    if major < MIN_TRT_MAJOR:
        raise EdgemmError(f"TensorRT {trt_ver} is too old: trt bundles need TensorRT {MIN_TRT_MAJOR} or newer "
                          "(JetPack 6 on a Jetson; pip install 'edgemm[gpu]' on a workstation)")
    prec = manifest["precision"]
    check_precision_supported(prec, here["compute_capability"], here.get("gpu", "this GPU"))
    info = manifest["trt"]
    device_class = device_class or info.get("device_class", "workstation")
    if device_class not in info["profiles"]:
        raise EdgemmError(f"the bundle has no profiles for device class {device_class!r} "
                          f"(it has {', '.join(info['profiles'])}); re-export with --max-context/--max-batch")
    profiles = info["profiles"][device_class]
    meta = profiles["_meta"]
    # TensorRT 11 builds strongly typed networks only (BuilderFlag FP16/INT8 are gone): the types come from the
    # graph, so the Q/DQ layers run in int8/fp8 and everything else in the graph's fp32.
    strongly_typed = major >= 11
    stages = {}
    for s in (x for x in profiles if x != "_meta"):
        p = prec[group(s)]
        if strongly_typed and p == "fp16":
            raise EdgemmError(f"TensorRT {trt_ver} builds strongly typed networks only, and this bundle's {s} "
                              "graph is fp32 (fp16 was left to TensorRT 10's builder flag): use TensorRT 10, "
                              "or export with --precision int8")
        stages[s] = {"onnx": manifest["stages"][s]["file"], "engine": f"engines/{s}.engine", "precision": p,
                     "strongly_typed": strongly_typed, "flags": trt_flags(p, strongly_typed),
                     "profile": {k: v for k, v in profiles[s].items()},
                     "workspace_bytes": int(meta["workspace_mib"]) << 20,
                     "builder_optimization_level": int(meta["builder_optimization_level"])}
    return {"tensorrt": trt_ver, "gpu": here.get("gpu"), "compute_capability": str(here["compute_capability"]),
            "device_class": device_class, "max_context": meta["max_context"], "timing_cache": "engines/timing.cache",
            "stages": stages}


def default_device_class(here: dict | None) -> str:
    """orin on a Jetson (Tegra), else workstation."""
    if here and ("orin" in str(here.get("gpu", "")).lower() or Path("/etc/nv_tegra_release").exists()):
        return "orin"
    return "workstation"


# --------------------------------------------------------------------------- validation (CPU)
def _compare(ref, got):
    ref, got = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    err = float(np.abs(ref - got).max())
    cos = float(ref @ got / max(np.linalg.norm(ref) * np.linalg.norm(got), 1e-30))
    return err, cos, float(np.abs(ref).max()), int(ref.argmax() == got.argmax())


def validate_graphs(model, bundle_dir, precision: dict, seed: int | None = None, threads=None,
                    decode_steps: int = 8, calib_items=None) -> dict:
    """The bundle's graphs in ONNX Runtime (CPU) against the reference: vision rows, and the decoder logits
    after text, image and text segments then greedy decode steps; real calibration inputs when given."""
    import torch
    from edgemm.export.onnx import input_examples, run_input_stage
    from edgemm.model import KVCache
    from edgemm.runtimes.trt_backend import OnnxQdqBackend
    from edgemm.tokenizer import USER_FMT
    cfg = model.cfg
    seed = int(time.time_ns() % 2**31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    b = OnnxQdqBackend.open(bundle=str(bundle_dir), verify=False, threads=threads)
    res = {s: [] for s in cfg.stages}
    with torch.inference_mode():
        if calib_items:
            ins = {"pixels": torch.from_numpy(calib_items[seed % len(calib_items)][0])}
            ids2 = calib_items[seed % len(calib_items)][1][2][1]
            # compare where a runtime samples: the prompt up to its answer, then greedy steps up to </s> (the
            # rows after </s> are never computed, and their near-flat logits make int8 cosines meaningless)
            cue = b.tokenizer.encode(USER_FMT.split("}")[-1])                    # "\nA:"
            ends = [i + len(cue) for i in range(len(ids2) - len(cue) + 1) if ids2[i:i + len(cue)] == cue]
            ids2 = ids2[:ends[-1]] if ends else ids2
        else:
            ins = input_examples(cfg, gen)      # random pixels, or Libra's random image tokens and signal
            ids2 = torch.randint(0, cfg.decoder.vocab_size, (6,), generator=gen).tolist()
        ref_rows, got_rows = run_input_stage(model, b, ins)
        res[cfg.input_stage].append(_compare(_np(ref_rows), got_rows))
        need = 2 + len(ids2) + cfg.n_image_rows + decode_steps + 2
        st = b.new_state(max_len=need)
        cache = KVCache.empty(cfg.decoder, 1, need)
        pos = 0
        segs = [("text", [1]), ("image", ref_rows), ("text", ids2)]
        for kind, data in segs:
            if kind == "text":
                got = b.text(st, data)
                ref, pos = model.forward_segment("text", torch.tensor([data]), cache, pos)
            else:
                got = b.image(st, _np(data))
                ref, pos = model.forward_segment("image", data, cache, pos)
            res["decoder_" + kind].append(_compare(_np(ref[0, -1]), got))
        for _ in range(decode_steps):
            t = int(ref[0, -1].argmax())
            if calib_items and t == b.tokenizer.eos_id:
                break       # a real prompt's answer is complete: rows past </s> are never computed by a runtime
            got = b.text(st, [t])
            ref, pos = model.forward_segment("text", torch.tensor([[t]]), cache, pos)
            res["decoder_text"].append(_compare(_np(ref[0, -1]), got))
    out = {}
    for stage, rows in res.items():
        err, cos, scale = max(r[0] for r in rows), min(r[1] for r in rows), max(r[2] for r in rows)
        p = precision[group(stage)]
        if p == "fp16":
            tol, ok = f"graph fp32: max abs <= {FP32_TOL:g}", err <= FP32_TOL
        elif stage == "decoder_image":
            tol, ok = f"eoi-row logits: cosine >= {QDQ_COS_IMAGE[p]}", cos >= QDQ_COS_IMAGE[p]
        elif stage == "decoder_text" and calib_items:
            # a real prompt, compared where a runtime samples: low-confidence rows (count and position answers)
            # have near-tied logits whose full-vector cosine dips (trained tiny-shapes int8: 0.978 on 1 of 32
            # calibration prompts) and whose top-1 may flip on a tie (1 of 32): top-1 is reported, accuracy on the
            # test split is what `edgemm eval` measures
            tol, ok = f"cosine >= {QDQ_COS_REAL[p]} (sampled rows)", cos >= QDQ_COS_REAL[p]
        else:
            tol, ok = f"cosine >= {QDQ_COS[p]}", cos >= QDQ_COS[p]
        out[stage] = {"max_abs_err": err, "cosine": cos, "ref_max_abs": scale, "compared": len(rows),
                      "top1_agree": sum(r[3] for r in rows) / len(rows), "precision": p, "tolerance": tol,
                      "ok": bool(ok)}
    out["_seed"] = seed
    return out


def format_validation(figures: dict, title="graph (onnxruntime CPU)") -> str:
    from edgemm.export.onnx import format_validation as table
    return table(figures, title)


# --------------------------------------------------------------------------- the exporter
def _precisions(precision) -> dict:
    from edgemm.export.onnx import _precisions as parse
    return parse(precision, PRECISIONS, "int8", "trt")


def export_trt(model=None, out=None, precision=None, force: bool = False, calib=None, no_build: bool = False,
               log=print, threads: int | None = None, seed: int | None = None, device_class: str | None = None,
               max_context: int | None = None, max_batch: int | None = None, calib_size: int = 32,
               keep_sensitive=None) -> dict:
    """Export `model` (a --model spec or a (model, tokenizer) pair) to a trt bundle at `out`; -> the manifest."""
    import onnx
    import torch
    from edgemm.bundle import bundle_writer, tool_versions, write_manifest
    from edgemm.export.onnx import _load_source, check_variants, stage_notes
    from edgemm.runtimes.trt_backend import gpu_identity
    log = log or (lambda s: None)
    if not out:
        raise EdgemmError("-o OUT is required: the bundle directory to write")
    out = Path(out)
    if out.exists() and not force:
        raise EdgemmError(f"{out} already exists; choose another -o or pass --force to replace it")
    prec = _precisions(precision)
    here = gpu_identity()
    build_here = here is not None and not no_build
    if build_here:
        check_precision_supported(prec, here["compute_capability"], here["gpu"])   # fail before the work
    m, tok, source = _load_source(model)
    m = m.float().cpu().eval()
    cfg = m.cfg
    check_variants(cfg, "the trt exporter", prec)
    profiles = {dc: make_profiles(cfg, dc, max_context, max_batch) for dc in DEVICE_CLASSES}
    quantized = any(p in ("int8", "fp8") for p in prec.values())
    t0 = time.time()
    with bundle_writer(out, force) as tmp, torch.inference_mode():
        fp32_dir = Path(tempfile.mkdtemp(prefix="edgemm-trt-fp32-", dir=tmp.parent))
        try:
            graphs = {cfg.input_stage: vision_graph(m), "decoder_text": decoder_graph(m, "text"),
                      "decoder_image": decoder_graph(m, "vision")}
            for s, g in graphs.items():
                onnx.save_model(g, str(fp32_dir / f"{s}.onnx"))
            # a manifest for the fp32 graphs, so the CPU runner can calibrate on them
            tok.save(fp32_dir / "tokenizer.json")
            stages = {}
            for s, g in graphs.items():
                ins = [{"name": v.name} for v in g.graph.input]
                stages[s] = {"file": f"{s}.onnx", "graph": GRAPH_KV if s != cfg.input_stage else GRAPH_STANDARD,
                             "inputs": ins}
            base = {"target": "trt", "model": cfg.to_dict(), "stages": stages, "tokenizer": "tokenizer.json",
                    "trt": {"max_context": profiles["workstation"]["_meta"]["max_context"]}}
            write_manifest(fp32_dir, base)
            del graphs
            calib_items, recipe, calib_digest = None, {}, None
            if quantized:
                quantize_stage, collect_stats, qname = _quantizer()
                calib_items = calibration_items(m, tok, calib, calib_size)
                calib_digest = _calib_digest(calib_items)
                log(f"calibrating on {len(calib_items)} image+prompt pairs "
                    f"({'the bundled shapes calibration split' if calib is None else calib}) ...")
                if collect_stats is not None:
                    st_all = collect_stats((m, tok), calib, n=calib_size, log=log, progress=False)
                    amax = {s: st_all for s in cfg.stages}
                else:
                    paths = {s: fp32_dir / f"{s}.onnx" for s in cfg.stages if prec[group(s)] in ("int8", "fp8")}
                    amax = collect_activation_amax(paths, fp32_dir, calib_items, threads=threads)
                log(f"quantizing with {qname}:")
            for s in cfg.stages:
                p = prec[group(s)]
                src, dst = fp32_dir / f"{s}.onnx", tmp / f"{s}.onnx"
                if p in ("int8", "fp8"):
                    kw = {} if keep_sensitive is None else {"keep_sensitive": keep_sensitive}
                    recipe[s] = quantize_stage(str(src), str(dst), s, p, stats=amax[s], log=log, **kw)
                else:
                    shutil.copy(src, dst)
                    recipe[s] = {"recipe": "fp32 graph; fp16 applied by TensorRT at build time"}
                onnx.checker.check_model(str(dst), full_check=True)
        finally:
            shutil.rmtree(fp32_dir, ignore_errors=True)
        stages = {}
        heads = "2 * kv_heads" if cfg.decoder.cross_modal_bridge else "kv_heads"
        for s in cfg.stages:
            g = onnx.load(str(tmp / f"{s}.onnx"))
            ins, outs = _io_spec(g)
            st = {"file": f"{s}.onnx", "graph": GRAPH_STANDARD if s == cfg.input_stage else GRAPH_KV,
                  "precision": prec[group(s)], "inputs": ins, "outputs": outs, "quantization": recipe[s],
                  **stage_notes(cfg, s)}
            if s != cfg.input_stage:
                st["branch"] = "text" if s == "decoder_text" else "vision"
                st["kv_cache"] = {"layout": f"BSNH [1, rows, {heads}, head_dim] per layer", "dtype": "float32",
                                  "inputs": "cache_key.i / cache_value.i: the first past_len + seq rows of the "
                                            "runtime's buffer", "outputs": "new_key.i / new_value.i: the seq new "
                                            "rows, for the runtime to store at past_len",
                                  "past_len": "rows filled before this call"}
            stages[s] = st
        tok.save(tmp / "tokenizer.json")
        from edgemm.tokenizer import CHAT_TEMPLATE
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        dc_default = device_class or default_device_class(here)
        manifest = {"target": "trt", "model": cfg.to_dict(), "source": source, "variants": cfg.variants(),
                    "reference": {"model": source["model"], "digest": source["digest"],
                                  "backend": "torch (edgemm.model)"},
                    "precision": prec, "stages": stages, "tokenizer": "tokenizer.json",
                    "chat_template": "chat_template.jinja",
                    "tools": tool_versions("onnx", "onnxruntime"), "opset": {"": OPSET},
                    "trt": {"device_class": dc_default,
                            "max_context": profiles[dc_default]["_meta"]["max_context"],
                            "profiles": profiles,
                            "build": {"explicit_quantization": "Q/DQ in the ONNX graphs (no INT8 calibrator)",
                                      "network": "strongly typed on TensorRT >= 11; on TensorRT 10 weakly typed "
                                                 "with builder flags per precision",
                                      "flags_tensorrt10": {p: trt_flags(p, False) for p in PRECISIONS},
                                      "timing_cache": "engines/timing.cache",
                                      "fp8_min_compute_capability": "%d.%d" % FP8_MIN_CC},
                            "engines": {}}}
        if calib_digest:
            manifest["calibration"] = {"set": "shapes calib split" if calib is None else str(calib),
                                       "items": len(calib_items), "digest": calib_digest,
                                       "statistics": "activation amax per stage (per modality branch)"}
        write_manifest(tmp, manifest)
        log(f"exported {', '.join(cfg.stages)} ({'/'.join(sorted(set(prec.values())))}) in {time.time() - t0:.1f}s; "
            "validating in onnxruntime (CPU) against the reference ...")
        figures = validate_graphs(m, tmp, prec, seed=seed, threads=threads, calib_items=calib_items)
        log(format_validation(figures))
        bad = [s for s, f in figures.items() if not s.startswith("_") and not f["ok"]]
        if bad:
            raise EdgemmError(f"validation failed for {', '.join(bad)} (see the table above); no bundle written")
        manifest["validation"] = {"reference": f"edgemm.model (PyTorch {torch.__version__}, fp32, CPU)",
                                  "runtime": "onnxruntime CPU provider (Q/DQ emulated)",
                                  "source_digest": source["digest"], "seed": figures.pop("_seed"),
                                  "stages": figures}
        result = write_manifest(tmp, manifest)
        if build_here:
            result = build_engines(tmp, device_class=device_class, log=log, threads=threads)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB)")
    if not build_here:
        why = "--no-build given" if no_build and here else "no TensorRT with a CUDA GPU here"
        log(f"engines not built ({why}): run `edgemm build-engines {out}` on the target device")
    return result


def _io_spec(m):
    from edgemm.export.onnx import _io_spec as spec
    return spec(m)


# --------------------------------------------------------------------------- engines (TensorRT + GPU)
NO_GPU_MESSAGE = ("building TensorRT engines needs TensorRT and a CUDA GPU, and this machine has {what}: "
                  "copy the bundle to the target device (Jetson or GPU workstation) and run "
                  "`edgemm build-engines {bundle}` there")


def _missing_what() -> str:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "no tensorrt Python package"
    return "no usable CUDA GPU"


def _progress_monitor(trt, log):
    """A trt.IProgressMonitor that logs the top-level phases of the build."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.t0 = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.t0[phase_name] = time.time()
            if parent_phase is None:
                log(f"    [{phase_name}] {num_steps} steps")

        def step_complete(self, phase_name, step):
            return True                     # False would cancel the build

        def phase_finish(self, phase_name):
            dt = time.time() - self.t0.pop(phase_name, time.time())
            if dt > 2:
                log(f"    [{phase_name}] done in {dt:.1f}s")
    return Monitor()


def build_engine(onnx_path, stage_plan: dict, timing_cache: bytes | None, log=print):
    """Parse one Q/DQ graph and build its engine with the settings of build_plan; -> (engine, timing cache)."""
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if stage_plan["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgemmError(f"TensorRT could not parse {Path(onnx_path).name}: {errs[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, stage_plan["workspace_bytes"])
    config.builder_optimization_level = stage_plan["builder_optimization_level"]
    for f in stage_plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, f))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):                 # shapes for the inputs with dynamic dimensions
        t = network.get_input(i)
        if all(d >= 0 for d in t.shape):
            continue
        if t.name not in stage_plan["profile"]:
            raise EdgemmError(f"the build plan has no profile for input {t.name} of {Path(onnx_path).name}; "
                              "re-export the bundle")
        s = stage_plan["profile"][t.name]
        profile.set_shape(t.name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, log)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgemmError(f"TensorRT failed to build the engine for {Path(onnx_path).name} (see its log above)")
    return bytes(serialized), bytes(memoryview(config.get_timing_cache().serialize()))


def validate_engines(bundle, decode_steps: int = 8, seed: int = 0, threads=None) -> dict:
    """Engines (trt backend) against their Q/DQ graphs (onnxruntime CPU) on the same random prompt."""
    from edgemm.runtimes.trt_backend import OnnxQdqBackend, TrtBackend
    ref = OnnxQdqBackend.open(bundle=str(bundle), verify=False, threads=threads)
    eng = TrtBackend.open(bundle=str(bundle), device="cuda", verify=False)
    import torch
    from edgemm.export.onnx import input_examples
    cfg = ref.cfg
    rng = np.random.default_rng(seed)
    ins = [t.numpy() for t in input_examples(cfg, torch.Generator().manual_seed(seed)).values()]
    encode = "vision" if cfg.input_stage == "vision" else "image_tokens"
    res = {s: [] for s in cfg.stages}
    rr, re_ = getattr(ref, encode)(*ins), getattr(eng, encode)(*ins)
    res[cfg.input_stage].append(_compare(rr, re_))
    ids = rng.integers(0, cfg.decoder.vocab_size, 6).tolist()
    sr, se = ref.new_state(max_len=64 + cfg.n_image_rows), eng.new_state(max_len=64 + cfg.n_image_rows)
    for kind in ("text", "image", "text"):
        if kind == "text":
            a, b = ref.text(sr, ids), eng.text(se, ids)
        else:
            a, b = ref.image(sr, rr), eng.image(se, rr)
        res["decoder_" + kind].append(_compare(a, b))
    for _ in range(decode_steps):
        t = int(np.argmax(a))
        a, b = ref.text(sr, [t]), eng.text(se, [t])
        res["decoder_text"].append(_compare(a, b))
    out = {}
    for s, rows in res.items():
        cos = min(r[1] for r in rows)
        out[s] = {"max_abs_err": max(r[0] for r in rows), "cosine": cos, "ref_max_abs": max(r[2] for r in rows),
                  "top1_agree": sum(r[3] for r in rows) / len(rows), "compared": len(rows),
                  "precision": ref.manifest["stages"][s].get("precision"),
                  "tolerance": f"engine vs Q/DQ graph: cosine >= {ENGINE_COS}", "ok": cos >= ENGINE_COS}
    return out


def build_engines(bundle, device_class: str | None = None, force: bool = False, log=print, threads=None) -> dict:
    """Build the engines of a trt bundle on this machine, validate them against the Q/DQ graphs, and add them
    (files, sha256, TensorRT version, GPU, compute capability, build settings) to the manifest."""
    from edgemm.bundle import bundle_path, verify_bundle, write_manifest
    from edgemm.runtimes.trt_backend import engine_mismatch, gpu_identity
    log = log or (lambda s: None)
    here = gpu_identity()
    if here is None:
        raise EdgemmError(NO_GPU_MESSAGE.format(what=_missing_what(), bundle=bundle))
    man = verify_bundle(bundle)
    if man.get("target") != "trt":
        raise EdgemmError(f"{bundle} is a {man.get('target')!r} bundle; build-engines needs a trt bundle "
                          "(edgemm export --target trt)")
    old = man["trt"].get("engines") or {}
    if old.get("files") and engine_mismatch(old, here) is None and not force:
        raise EdgemmError(f"{bundle} already holds engines for this GPU and TensorRT version; pass --force to "
                          "rebuild them")
    plan = build_plan(man, here, device_class or default_device_class(here))
    log(f"building TensorRT {here['tensorrt']} engines for {here['gpu']} (sm {here['compute_capability']}, "
        f"{plan['device_class']} profiles, context {plan['max_context']}) ...")
    d = Path(bundle)
    eng_dir = d / "engines"
    staging = Path(tempfile.mkdtemp(prefix=".engines.", dir=d))
    cache_path = eng_dir / "timing.cache"
    cache = cache_path.read_bytes() if cache_path.is_file() else None
    files, timings, sizes = {}, {}, {}
    try:
        for s, sp in plan["stages"].items():
            t0 = time.time()
            log(f"  {s} ({sp['precision']}, {'strongly typed' if sp['strongly_typed'] else 'flags ' + '+'.join(sp['flags'])})")
            data, cache = build_engine(bundle_path(bundle, sp["onnx"]), sp, cache, log)
            (staging / f"{s}.engine").write_bytes(data)
            files[s], timings[s], sizes[s] = sp["engine"], round(time.time() - t0, 2), len(data)
            log(f"  {s}: {len(data) / 1e6:.1f} MB in {timings[s]:.1f}s")
        (staging / "timing.cache").write_bytes(cache)
        if eng_dir.exists():
            shutil.rmtree(eng_dir)
        os.replace(staging, eng_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    man["trt"]["engines"] = {"tensorrt": here["tensorrt"], "gpu": here["gpu"],
                             "compute_capability": here["compute_capability"], "files": files,
                             "build_seconds": timings, "bytes": sizes, "plan": plan}
    man["trt"]["device_class"] = plan["device_class"]
    man["trt"]["max_context"] = plan["max_context"]
    man.pop("files", None)
    write_manifest(bundle, man)          # hashes the engines too, so verify_bundle checks them
    log("validating the engines against the Q/DQ graphs (onnxruntime) ...")
    figures = validate_engines(bundle, threads=threads)
    log(format_validation(figures, "engine vs graph"))
    man["trt"]["engines"]["validation"] = figures
    bad = [s for s, f in figures.items() if not f["ok"]]
    if bad:
        man["trt"]["engines"] = {}
        shutil.rmtree(eng_dir, ignore_errors=True)
        write_manifest(bundle, man)
        raise EdgemmError(f"the {', '.join(bad)} engine(s) disagree with their Q/DQ graphs (see above); "
                          "engines removed")
    return write_manifest(bundle, man)
