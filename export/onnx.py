"""ONNX export, stage by stage: `vision`, `decoder_text`, `decoder_image` (DESIGN.md section 2).

- `vision` is traced from the reference with torch.onnx.export (standard ops, dynamic batch).
- The two decoder stages are written op by op with onnx.helper, one graph per branch, so routing is static:
  `decoder_text` holds the shared weights and the text branch only, `decoder_image` the shared weights and the
  vision branch only. Attention is ONNX Runtime's com.microsoft GroupQueryAttention with past and present
  sharing one preallocated buffer per layer ([1, K, cache_len, E], BNSH): the runtime binds the same OrtValue as
  `past_key.i` and `present_key.i`, the op writes the new rows in place at `seqlens_k + 1 - T` and attends over
  the first `total_sequence_length` rows, so a decode step never copies the cache. RoPE (NEOX form) is computed
  in the graph from an explicit `positions` input, so the cogvlm position rule works too.
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

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str | None = None, **attrs):
        outs = [self._name(op_type) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, inputs, outs, name=self._name(f"n_{op_type}"),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper
        arr = np.asarray(arr, order="C")              # (np.ascontiguousarray would make 0-d arrays 1-d)
        self.inits.append(numpy_helper.from_array(arr, name))
        self.weight_bytes += arr.nbytes
        return name

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
    r = g.op("Sqrt", [g.op("Add", [ms, g.c_eps(eps)])])
    return g.op("Mul", [g.op("Div", [x, r]), w])


def _rope(g: _Graph, x: str, n: int, E: int, cos: str, sin: str) -> str:
    """NEOX RoPE on x [1, T, n*E]: x * cos + cat(-x2, x1) * sin, per head."""
    x4 = g.op("Reshape", [x, g.shape_const([0, 0, n, E])])
    x1, x2 = g.op("Split", [x4, g.shape_const([E // 2, E // 2])], n_out=2, axis=3)
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=3)
    y = g.op("Add", [g.op("Mul", [x4, cos]), g.op("Mul", [rot, sin])])
    return g.op("Reshape", [y, g.shape_const([0, 0, n * E])])


def _decoder_graph(model, branch: str, fp16: bool):
    """One branch of the decoder as an ONNX model (see the module docstring for the I/O)."""
    import torch
    from onnx import TensorProto, helper
    c = model.cfg.decoder
    dec = model.decoder
    D, H, K, E, L = c.d_model, c.n_heads, c.kv_heads, c.head_dim, c.n_layers
    g = _Graph(fp16)
    consts: dict = {}

    def shape_const(vals):
        key = ("i64", tuple(vals))
        if key not in consts:
            consts[key] = g.const(f"const.i64.{len(consts)}", np.array(vals, np.int64))
        return consts[key]

    def c_eps(v):
        key = ("f32", float(v))
        if key not in consts:
            consts[key] = g.const(f"const.f32.{len(consts)}", np.array(v, np.float32))
        return consts[key]

    g.shape_const, g.c_eps = shape_const, c_eps
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    vi = helper.make_tensor_value_info
    inputs, outputs = [], []
    if branch == "text":
        inputs.append(vi("input_ids", i64, [1, "seq"]))
        emb = g.weight("tok_embeddings.weight", _np(dec.tok_embeddings.weight))
        x = g.op("Gather", [emb, "input_ids"], axis=0)                          # [1, T, D]
    else:
        inputs.append(vi("image_rows", f32, [1, "seq", D]))
        x = "image_rows"
    inputs += [vi("positions", i64, ["seq"]), vi("seqlens_k", i32, [1]), vi("total_sequence_length", i32, [])]
    for i in range(L):
        inputs += [vi(f"past_key.{i}", f32, [1, K, "cache_len", E]), vi(f"past_value.{i}", f32, [1, K, "cache_len", E])]

    # RoPE tables from the positions input, computed as edgemm.model.rope_cos_sin does
    inv = (1.0 / c.rope_theta ** (torch.arange(0, E, 2, dtype=torch.float32) / E)).numpy()
    f = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", ["positions"], to=f32), shape_const([1])]),
                     g.const("rope.inv_freq", inv)])                               # [T, E/2]
    f = g.op("Concat", [f, f], axis=-1)                                           # [T, E]
    cos = g.op("Unsqueeze", [g.op("Cos", [f]), shape_const([0, 2])])               # [1, T, 1, E]
    sin = g.op("Unsqueeze", [g.op("Sin", [f]), shape_const([0, 2])])

    for i, layer in enumerate(dec.layers):
        br = getattr(layer, branch)
        p = f"layers.{i}"
        h = _rms(g, x, g.weight(f"{p}.attn_norm.weight", _np(layer.attn_norm.weight)), c.rms_eps)
        qkv = g.op("MatMul", [h, g.weight(f"{p}.{branch}.qkv.weight.T", _np(br.qkv.weight).T)])
        if br.qkv.bias is not None:
            qkv = g.op("Add", [qkv, g.weight(f"{p}.{branch}.qkv.bias", _np(br.qkv.bias))])
        q, k, v = g.op("Split", [qkv, shape_const([H * E, K * E, K * E])], n_out=3, axis=-1)
        q, k = _rope(g, q, H, E, cos, sin), _rope(g, k, K, E, cos, sin)
        a, pk, pv = g.op("GroupQueryAttention", [q, k, v, f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                                                 "total_sequence_length"], n_out=3, domain="com.microsoft",
                         num_heads=H, kv_num_heads=K, scale=1.0 / math.sqrt(E))
        g.nodes.append(helper.make_node("Identity", [pk], [f"present_key.{i}"], name=f"present_key_id.{i}"))
        g.nodes.append(helper.make_node("Identity", [pv], [f"present_value.{i}"], name=f"present_value_id.{i}"))
        x = g.op("Add", [x, g.op("MatMul", [a, g.weight(f"{p}.{branch}.o.weight.T", _np(br.o.weight).T)])])
        h = _rms(g, x, g.weight(f"{p}.ffn_norm.weight", _np(layer.ffn_norm.weight)), c.rms_eps)
        gu = np.concatenate([_np(br.gate.weight).T, _np(br.up.weight).T], 1)   # [D, 2F]: one MatMul
        gate, up = g.op("Split", [g.op("MatMul", [h, g.weight(f"{p}.{branch}.gate_up.weight.T", gu)]),
                                  shape_const([c.ffn_dim, c.ffn_dim])], n_out=2, axis=-1)
        m = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, g.op("MatMul", [m, g.weight(f"{p}.{branch}.down.weight.T", _np(br.down.weight).T)])])
    last = g.op("Gather", [x, g.const("const.last", np.array(-1, np.int64))], axis=1)   # [1, D]
    hn = _rms(g, last, g.weight("norm.weight", _np(dec.norm.weight)), c.rms_eps)
    g.nodes.append(helper.make_node("MatMul", [hn, g.weight("lm_head.weight.T", _np(dec.lm_head.weight).T)],
                                    ["logits"], name="lm_head"))
    outputs.append(vi("logits", f32, [1, c.vocab_size]))
    for i in range(L):
        outputs += [vi(f"present_key.{i}", f32, [1, K, "cache_len", E]),
                    vi(f"present_value.{i}", f32, [1, K, "cache_len", E])]
    graph = helper.make_graph(g.nodes, f"edgemm_decoder_{branch}", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             ir_version=IR_VERSION, producer_name="edgemm"), g.weight_bytes


def _vision_graph(model, fp16: bool):
    """The vision stage traced from the reference (standard ops); fp16 casts matrices as the decoder does."""
    import io

    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    class Vision(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixels):
            return self.m.encode_image(pixels)

    v = model.cfg.vision
    buf = io.BytesIO()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Vision(model).eval(), (torch.zeros(1, 3, v.image_size, v.image_size),), buf,
                          input_names=["pixels"], output_names=["image_rows"], opset_version=OPSET,
                          dynamic_axes={"pixels": {0: "batch"}, "image_rows": {0: "batch"}}, dynamo=False)
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
    from edgemm.checkpoint import file_sha256, load_model, resolve_model
    if isinstance(model, tuple):
        m, tok = model
        return m.eval(), tok, {"model": getattr(m.cfg, "name", "in-memory"), "kind": "in-memory",
                               "digest": "sha256-state:" + _state_digest(m)}
    kind, path = resolve_model(model)
    m, tok = load_model(model)
    if kind == "dir":
        return m, tok, {"model": str(Path(path).resolve()), "kind": "checkpoint",
                        "digest": "sha256:" + file_sha256(Path(path) / "model.safetensors")}
    return m, tok, {"model": model, "kind": "preset", "seed": 0, "digest": "sha256-state:" + _state_digest(m)}


# Variants the ONNX graphs compute: the vision stage is traced from the reference (any tower/projector), the
# decoder graphs read `layer.vision`, which is the text branch for single-branch (LLaVA) models.
ONNX_VARIANTS = ("grouped-query attention", "qkv bias", "collapsed image positions (cogvlm position rule)",
                 "single branch (llava)", "clip vision tower", "mlp projector")
NO_TARGET = "none yet (the torch reference backend runs it)"


def _check_variants(cfg) -> None:
    if cfg.decoder.eoi_branch != "vision":
        raise UnsupportedVariant("eoi through the text branch", "the onnx exporter (decoder_image is one branch)",
                                 "none yet (import CogVLM with --rules llamacpp for onnx and gguf)")
    for v in cfg.variants():
        if v not in ONNX_VARIANTS:
            raise UnsupportedVariant(v, "the onnx exporter", NO_TARGET)


def _precisions(precision) -> dict:
    if precision is None:
        precision = "fp32"
    if isinstance(precision, str):
        precision = {"vision": precision, "decoder": precision}
    out = {"vision": precision.get("vision", "fp32"), "decoder": precision.get("decoder", "fp32")}
    for stage, p in out.items():
        if p not in PRECISIONS:
            raise EdgemmError(f"--precision {p} ({stage}) is not implemented by the onnx exporter yet; "
                              f"it exports {' and '.join(PRECISIONS)}")
    return out


# --------------------------------------------------------------------------- validation
def _compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    ref, got = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    err = float(np.abs(ref - got).max())
    cos = float(ref @ got / max(np.linalg.norm(ref) * np.linalg.norm(got), 1e-30))
    return err, cos, float(np.abs(ref).max())


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
    res: dict[str, list] = {"vision": [], "decoder_text": [], "decoder_image": []}
    v = cfg.vision
    with torch.inference_mode():
        px = torch.randn(1, 3, v.image_size, v.image_size, generator=gen)
        ref_rows = model.encode_image(px)
        res["vision"].append(_compare(_np(ref_rows), b.vision(px.numpy())))
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
        p = precision["vision" if stage == "vision" else "decoder"]
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


def format_validation(figures: dict) -> str:
    lines = [f"{'stage':<14} {'precision':<9} {'max abs err':>12} {'cosine':>10} {'|ref| max':>10}  check",
             "-" * 72]
    for stage, f in figures.items():
        if stage.startswith("_"):
            continue
        lines.append(f"{stage:<14} {f['precision']:<9} {f['max_abs_err']:>12.3e} {f['cosine']:>10.7f} "
                     f"{f['ref_max_abs']:>10.3g}  {'ok' if f['ok'] else 'FAIL'} ({f['tolerance']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the exporter
def export_onnx(model=None, out=None, precision=None, force: bool = False, calib=None, no_build: bool = False,
                log=print, threads: int | None = None, seed: int | None = None, keep_sensitive: float | None = None,
                stats=None, recipes: dict | None = None, **_ignored) -> dict:
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
    _check_variants(cfg)
    t0 = time.time()
    with bundle_writer(out, force) as tmp, torch.inference_mode():
        stages = {}
        vm, vbytes = _vision_graph(m, prec["vision"] == "fp16")
        graphs = {"vision": (vm, vbytes, GRAPH_STANDARD, prec["vision"], None)}
        for branch in ("text", "image"):
            dm, dbytes = _decoder_graph(m, "text" if branch == "text" else "vision", prec["decoder"] == "fp16")
            graphs[f"decoder_{branch}"] = (dm, dbytes, GRAPH_GQA, prec["decoder"],
                                           "text" if branch == "text" else "vision")
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
                st["kv_cache"] = {"layout": "BNSH [1, kv_heads, cache_len, head_dim] per layer",
                                  "dtype": "float32", "shared_past_present": True,
                                  "inputs": "past_key.i / past_value.i", "outputs": "present_key.i / present_value.i",
                                  "seqlens_k": "rows filled after this call - 1",
                                  "total_sequence_length": "rows filled after this call"}
            stages[stage] = st
            del g
        graphs.clear()
        from edgemm.calib.apply import quantize_bundle_stages     # quantized precisions (no-op for fp32/fp16)
        calibration = quantize_bundle_stages(tmp, stages, prec, m, tok, calib=calib, stats=stats, log=log,
                                             keep_sensitive=keep_sensitive, model_digest=source["digest"],
                                             recipes=recipes)
        tok.save(tmp / "tokenizer.json")
        from edgemm.tokenizer import CHAT_TEMPLATE
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        manifest = {"target": "onnx", "model": cfg.to_dict(), "source": source,
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
                                  "source_digest": source["digest"], "inputs": "random pixels; random text + "
                                  "image rows + text, then greedy decode steps", "seed": figures.pop("_seed"),
                                  "stages": figures}
        result = write_manifest(tmp, manifest)
        os.chmod(tmp, 0o755)                                  # mkdtemp makes it private
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB)")
    return result

