"""Apply a quantization recipe to one exported ONNX stage: the one entry point, `quantize_stage`.

Every MatMul/Gemm whose right-hand side is a constant weight (an initializer, possibly behind the fp16 export's
Cast or a Transpose) is a candidate; activation-by-activation MatMuls (attention scores) stay float.

- int8 / fp8 (W8A8): the weight becomes an int8 (or FLOAT8E4M3FN) initializer with one scale per output
  channel and a DequantizeLinear; the activation gets QuantizeLinear -> DequantizeLinear with one calibrated
  scale (symmetric). Standard ONNX ops: ONNX Runtime runs them on the CPU, TensorRT 10 builds
  explicit-quantization engines from them. Two storages of the same numbers (`int8_storage`):
  `s8s8` (int8, zero point 0: the form TensorRT consumes, and the faster one for ONNX Runtime on CPUs with VNNI)
  and `u8u8` (uint8, zero point 128: ONNX Runtime's U8U8 kernels, exact on every x86 CPU; its u8s8 kernels, which
  s8s8 graphs run on, add pairs of products in saturating 16-bit lanes on x86 CPUs without VNNI and lose up to
  ~0.5 on a 64-wide MatMul). Bundles store s8s8; `to_u8u8` converts a graph at load where the CPU needs it. fp8 raises the graph to opset 19 (Reduce* axes become inputs).
  SmoothQuant (recipe option) divides the activation by s_j = max|X_j|^a / max|W_j|^(1-a) per input channel
  (a Mul before the Q) and multiplies the weight rows by s_j before quantizing them.
- int8-dyn: com.microsoft DynamicQuantizeMatMul: int8 weights per output channel (7 bits), the activations
  quantized per tensor (uint8, asymmetric) at run time; no calibration (recipes.PREFILL_RECIPE).
- int8-wo / int4: com.microsoft MatMulNBits, block-wise symmetric along the input dimension.
  AWQ (recipe option, int4-awq): activation-aware scaling (Lin et al. 2023): the weight rows are multiplied by
  s_j = m_j^a per input channel (normalised) before the block-wise rounding (m_j: the calibration inputs' max |x_j|
  of the layer's own modality branch), a from a grid minimising the output error on the layer's sampled inputs, and
  the activation is divided by s_j (a Mul before MatMulNBits: the RMSNorm in front is shared by both branches).
  GPTQ (recipe option, int4-gptq; Frantar et al. 2022): the rounding of each input row's weights corrects the
  error of the rows before it through the inverse Hessian of the layer's own branch's calibration inputs
  (gptq_blockwise; the statistics must be collected with hessian=True).

The layer behind each ONNX weight is found by content (the statistics keep each layer's first two weight
rows), so any graph made from the same model works, whatever its initializer names. With keep_sensitive=t,
a layer whose relative output error on its sampled calibration inputs exceeds t stays at its original
precision. The returned record says what every weight MatMul/Gemm got.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError
from edgemm.calib.stats import XTX_MAX_IN

STAGES = ("vision", "decoder_text", "decoder_image", "video")     # video: LLaVA-NeXT-Video's pooled frames
from .recipes import QUANTIZED as PRECISIONS  # noqa: E402
INT8_STORAGES = ("s8s8", "u8u8")
FP8_MAX = 448.0
EXTERNAL_DATA_BYTES = 1_800_000_000


# --------------------------------------------------------------------------- numerics
def fp8_e4m3_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest E4M3FN value (saturating at +-448), as float32."""
    import ml_dtypes
    return np.clip(np.asarray(x, np.float32), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def quant_weight_per_channel(W: np.ndarray, kind: str, axis: int = 1, qmax: float | None = None):
    """W [in, out] (axis=1: one scale per column) -> (q values as float32, scales [out], dequantized W).
    qmax: the largest int8 level (default 127; 63: the dynamic form's 7 bits)."""
    red = tuple(i for i in range(W.ndim) if i != axis)
    amax = np.abs(W).max(axis=red)
    qmax = qmax or (127.0 if kind == "int8" else FP8_MAX)
    s = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * W.ndim
    shape[axis] = -1
    v = W / s.reshape(shape)
    q = np.clip(np.round(v), -qmax, qmax) if kind == "int8" else fp8_e4m3_round(v)
    return q.astype(np.float32), s, (q * s.reshape(shape)).astype(np.float32)


# the dynamic form's weights: 7 bits, so ONNX Runtime's u8 x s8 kernels (u8 activations) cannot saturate their
# 16-bit pair sums (255 * 63 * 2 < 32767) on x86 CPUs without VNNI
DYNAMIC_QMAX = 63.0


def dynamic_fake_quant(x: np.ndarray) -> np.ndarray:
    """DynamicQuantizeMatMul's activation rounding: per tensor, asymmetric uint8 over [min(x, 0), max(x, 0)]."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / 255 or 1.0
    zp = np.clip(np.round(-lo / s), 0, 255)
    return ((np.clip(np.round(x / s) + zp, 0, 255) - zp) * s).astype(np.float32)


def fake_quant_act(x: np.ndarray, amax: float, kind: str) -> np.ndarray:
    s = max(amax, 1e-12) / (127.0 if kind == "int8" else FP8_MAX)
    if kind == "int8":
        return (np.clip(np.round(x / s), -128, 127) * s).astype(np.float32)
    return (fp8_e4m3_round(x / s) * s).astype(np.float32)


def quant_blockwise(W: np.ndarray, bits: int, block: int):
    """W [K, N] -> (packed uint8 [N, n_blocks, block*bits/8], scales float32 [N*n_blocks], dequantized W)."""
    K, N = W.shape
    nb = -(-K // block)
    Wt = np.zeros((N, nb * block), np.float32)
    Wt[:, :K] = W.T
    blocks = Wt.reshape(N, nb, block)
    s = block_scale(np.abs(blocks).max(-1), bits)
    q = np.clip(np.round(blocks / s[..., None]), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return pack_blockwise(q, s, bits, K)


def block_scale(amax: np.ndarray, bits: int, full_range: bool = False) -> np.ndarray:
    """A block's scale from its max |w|: amax / (2^(b-1) - 1) (RTN's: +-amax on the grid), or with full_range
    2 amax / (2^b - 1) (ONNX Runtime GPTQ's symmetric grid, levels -2^(b-1) .. 2^(b-1) - 1 spanning amax)."""
    s = amax * 2 / (2 ** bits - 1) if full_range else amax / (2 ** (bits - 1) - 1)
    return np.where(s > 0, s, 1.0).astype(np.float32)


def pack_blockwise(q: np.ndarray, s: np.ndarray, bits: int, K: int):
    """Integer codes q [N, n_blocks, block] (in -2^(b-1) .. 2^(b-1)-1) and scales s [N, n_blocks] -> MatMulNBits'
    (packed uint8 [N, n_blocks, block*bits/8], scales [N*n_blocks], dequantized W [K, N]); zero point 2^(b-1)."""
    N, nb, block = q.shape
    deq = (q * s[..., None]).reshape(N, nb * block)[:, :K].T.astype(np.float32)
    u = (q + 2 ** (bits - 1)).astype(np.uint8)                       # default zero point 2^(bits-1)
    if bits == 4:
        u = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(u), np.asarray(s, np.float32).reshape(-1), deq


def gptq_blockwise(W: np.ndarray, H: np.ndarray, bits: int, block: int, percdamp: float = 0.01,
                   full_range: bool = False, act_order: bool = False):
    """GPTQ (Frantar et al. 2022, Algorithm 1) for W [K in, N out] with the layer's Hessian H = 2/n X^T X [K, K]:
    input rows are rounded one at a time on the block-wise grid (a scale per `block` inputs per output), each
    rounding error fed into the rows not yet rounded through the Cholesky factor of H^-1 (lazy batch updates per
    `block` rows). In input order, a block's scales are taken at its start from the weights as updated so far;
    with act_order the rows go in order of decreasing H_jj (the largest activations first, GPTQ's "act-order") and
    the scales are fixed up front from the original weights (the MatMulNBits blocks stay in input order: "static
    groups"). H gets percdamp x its mean diagonal added; inputs never active (H_jj = 0) get weight 0.
    Written here rather than taken from ONNX Runtime: onnxruntime 1.32's GPTQ (quantization.neural_compressor.
    weight_only.gptq, behind GPTQWeightOnlyQuantConfig) feeds the errors through the lower triangle of its upper
    Cholesky factor (Hinv1[i:, i], Hinv[i2:, i1:i2]: zeros), so its result is round-to-nearest's (same error, to
    ties); its pipeline also needs the whole graph run per calibration item. tests/test_outliers.py checks this one
    against the paper's unbatched recurrence. -> quant_blockwise's (packed, scales, dequantized W)."""
    K, N = W.shape
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[dead] = 0
    nb = -(-K // block)
    s = np.zeros((N, nb), np.float32)
    if act_order:
        for b in range(nb):
            s[:, b] = block_scale(np.abs(W[b * block:(b + 1) * block]).max(0), bits, full_range)
        perm = np.argsort(-np.diag(H), kind="stable")
    else:
        perm = np.arange(K)
    W, H = W[perm], H[perm][:, perm]
    H[np.diag_indices(K)] += percdamp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T                       # upper Cholesky factor of H^-1
    q = np.zeros((K, N))                                             # integer codes, in processing order
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    for i1 in range(0, K, block):
        i2 = min(K, i1 + block)
        W1, E = W[i1:i2].copy(), np.zeros((i2 - i1, N))
        if not act_order:
            s[:, i1 // block] = block_scale(np.abs(W1).max(0), bits, full_range)
        for i in range(i2 - i1):
            sc = s[:, perm[i1 + i] // block].astype(np.float64)
            q[i1 + i] = np.clip(np.round(W1[i] / sc), lo, hi)
            E[i] = (W1[i] - q[i1 + i] * sc) / U[i1 + i, i1 + i]
            W1[i:] -= np.outer(U[i1 + i, i1 + i:i2], E[i])
        W[i2:] -= U[i1:i2, i2:].T @ E
    codes = np.zeros((N, nb * block))
    codes[:, perm] = q.T
    return pack_blockwise(codes.reshape(N, nb, block), s, bits, K)


def awq_scales(W: np.ndarray, X: np.ndarray, chan_absmax, bits: int, block: int, grid: int = 20):
    """AWQ's per-input-channel scales for W [in, out] from the activation magnitudes (chan_absmax [in]) and sampled
    inputs X [n, in]: s = m^a (normalised), a in 0, 1/grid .. 1 minimising ||X W - X diag(1/s) Q(diag(s) W)||.
    -> scales [in] (float32). a = 0 is plain round-to-nearest."""
    m = np.maximum(np.asarray(chan_absmax, np.float64), 1e-8)
    ref = X @ W
    best = None
    for a in np.linspace(0, 1, grid + 1):
        sc = m ** a
        sc = (sc / np.sqrt(sc.max() * sc.min())).astype(np.float32)
        deq = quant_blockwise(W * sc[:, None], bits, block)[2] / sc[:, None]
        err = rel_err(ref, X @ deq)
        if best is None or err < best[0]:
            best = (err, sc)
    return best[1]


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


# --------------------------------------------------------------------------- matching ONNX weights to layers
class _Matcher:
    """Find the stats layer whose weight the ONNX weight [in, out] is (or a column slice / concatenation of)."""

    def __init__(self, layers: dict):
        self.by_in: dict[int, list] = {}
        for v in layers.values():
            if v.wsig is not None:
                self.by_in.setdefault(int(v.in_features), []).append(v)

    def find(self, W: np.ndarray):
        K, N = W.shape
        sig = W[:2].astype(np.float32)
        for v in self.by_in.get(K, []):
            S = np.asarray(v.wsig, np.float32)                          # [2, out]
            scale = float(np.abs(S).max()) or 1.0
            tol = 2e-3 * scale
            n = min(N, S.shape[1])
            cands = np.nonzero(np.abs(S[0] - sig[0, 0]) <= tol)[0]
            for j in cands[:64]:
                m = min(n, S.shape[1] - j)
                if m >= min(N, 8) and np.allclose(S[:, j:j + m], sig[:, :m], atol=tol, rtol=0):
                    return v
        return None


# --------------------------------------------------------------------------- graph surgery
class _Surgery:
    def __init__(self, model):
        from onnx import numpy_helper
        self.m = model
        self.g = model.graph
        self.nh = numpy_helper
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.n = 0
        self.new_inits, self.new_nodes_before = [], {}

    def uniq(self, base: str) -> str:
        self.n += 1
        return f"{base}.q{self.n}"

    def const_weight(self, name: str):
        """-> (float32 array, how) for a constant weight input, or (None, None)."""
        if name in self.inits:
            return self.nh.to_array(self.inits[name]).astype(np.float32), "initializer"
        p = self.producer.get(name)
        if p is not None and p.op_type == "Cast" and p.input[0] in self.inits:
            return self.nh.to_array(self.inits[p.input[0]]).astype(np.float32), "cast"
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return self.nh.to_array(a.t).astype(np.float32), "constant"
        if p is not None and p.op_type == "Transpose" and p.input[0] in self.inits:
            perm = [a.ints for a in p.attribute if a.name == "perm"]
            arr = self.nh.to_array(self.inits[p.input[0]]).astype(np.float32)
            if arr.ndim == 2 and (not perm or list(perm[0]) == [1, 0]):
                return arr.T.copy(), "transpose"
        return None, None

    def add_init(self, arr, name: str, dtype=None) -> str:
        if dtype == "fp8":
            import ml_dtypes
            arr = np.asarray(arr, np.float32).astype(ml_dtypes.float8_e4m3fn)
        t = self.nh.from_array(np.asarray(arr), name)
        self.new_inits.append(t)
        return name

    def insert_before(self, node, new_nodes: list) -> None:
        self.new_nodes_before.setdefault(id(node), []).extend(new_nodes)

    def finish(self) -> None:
        nodes = []
        for n in self.g.node:
            nodes.extend(self.new_nodes_before.get(id(n), []))
            nodes.append(n)
        del self.g.node[:]
        self.g.node.extend(nodes)
        self.g.initializer.extend(self.new_inits)
        self.prune()

    def prune(self) -> None:
        """Drop nodes whose outputs nobody uses, then unused initializers."""
        outputs = {o.name for o in self.g.output}
        while True:
            used = set(outputs)
            for n in self.g.node:
                used.update(n.input)
            keep = [n for n in self.g.node if any(o in used for o in n.output)]
            if len(keep) == len(self.g.node):
                break
            del self.g.node[:]
            self.g.node.extend(keep)
        used = {i for n in self.g.node for i in n.input} | outputs
        inits = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(inits)


def _upgrade_opset(model, target: int = 19) -> None:
    """Raise the default-domain opset to `target`; Reduce* ops (axes attribute until 18) get an axes input."""
    from onnx import helper, numpy_helper
    cur = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if cur and cur[0].version >= target:
        return
    reduce_ops = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                  "ReduceLogSumExp", "ReduceSumSquare"}
    for i, n in enumerate(model.graph.node):
        if n.op_type in reduce_ops and n.domain in ("", "ai.onnx"):
            axes = [a for a in n.attribute if a.name == "axes"]
            if axes:
                name = f"{n.name or n.op_type}_{i}.axes"
                model.graph.initializer.append(numpy_helper.from_array(np.array(list(axes[0].ints), np.int64), name))
                n.input.append(name)
                n.attribute.remove(axes[0])
        if n.op_type == "Split" and n.domain in ("", "ai.onnx"):
            pass                                  # opset 18 Split still takes a `split` input
    for o in cur:
        o.version = target
    if not cur:
        model.opset_import.append(helper.make_opsetid("", target))
    model.ir_version = max(model.ir_version, 9)


def _ensure_ms_domain(model) -> None:
    from onnx import helper
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def to_u8u8(model) -> int:
    """Rewrite, in place, a graph's int8 Q/DQ from the s8s8 storage to u8u8: the same numbers (x + 128 with zero
    point 128), which ONNX Runtime's x86 kernels compute exactly without VNNI. -> how many zero points changed."""
    from onnx import TensorProto, numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    changed = 0
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3:
            continue
        zp = inits.get(n.input[2])
        if zp is None or zp.data_type != TensorProto.INT8:
            continue
        z = numpy_helper.to_array(zp).astype(np.int16)
        zp.CopyFrom(numpy_helper.from_array((z + 128).astype(np.uint8), zp.name))
        changed += 1
        src = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if src is not None and src.data_type == TensorProto.INT8:          # a weight: its int8 values too
            w = numpy_helper.to_array(src).astype(np.int16)
            src.CopyFrom(numpy_helper.from_array((w + 128).astype(np.uint8), src.name))
    return changed


def _stage_layers(stats, stage: str) -> dict:
    if stats is None:
        return {}
    layers = stats.stage(stage) if hasattr(stats, "stage") else {}
    return layers


def quantize_stage(onnx_in, onnx_out, stage: str, precision: str, stats=None, keep_sensitive: float | None = None,
                   log=print, recipe=None, method: str | None = None, smoothquant: float | None = None,
                   block_size: int | None = None, int8_storage: str = "s8s8") -> dict:
    """Quantize one ONNX stage file (see the module docstring) and write it to onnx_out.

    precision: int8 | fp8 | int8-wo | int4 (or pass recipe= a Recipe / recipe name to override the default).
    stats: calibration statistics (edgemm.calib.stats.Stats or a path to a stats file); needed for int8/fp8.
    int8_storage: "s8s8" (TensorRT) or "u8u8" (ONNX Runtime: exact on every x86 CPU); the same numbers.
    Returns {"stage", "precision", "recipe", "stats", "layers": [{node, weight, layer, shape, got, rel_err,
    act_amax?}], "quantized", "kept", "bytes_before", "bytes_after"}.
    """
    import onnx
    from onnx import helper
    from .recipes import get_recipe
    from .stats import Stats
    log = log or (lambda s: None)
    if stage not in STAGES:
        raise EdgemmError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if precision not in PRECISIONS:
        raise EdgemmError(f"quantize_stage: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if int8_storage not in INT8_STORAGES:
        raise EdgemmError(f"quantize_stage: int8_storage {int8_storage!r} is not one of {', '.join(INT8_STORAGES)}")
    r = get_recipe(recipe or precision).with_options(method=method, smoothquant=smoothquant, block_size=block_size,
                                                     keep_sensitive=keep_sensitive)
    if stats is not None and not isinstance(stats, Stats):
        stats = Stats.load(stats)
    if r.shared_scale and stats is not None:
        stats = stats.shared()              # both branches' inputs behind one scale per layer
    if r.needs_stats and stats is None:
        raise EdgemmError(f"the {r.name} recipe quantizes activations and needs calibration statistics: "
                          "run `edgemm calibrate` or pass stats= (edgemm.calib.collect_stats)")
    t0 = time.time()
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    model = onnx.load(str(onnx_in))
    bytes_before = sum(len(t.raw_data) or 0 for t in model.graph.initializer)
    sur = _Surgery(model)
    matcher = _Matcher(_stage_layers(stats, stage))
    wkind = r.weights
    akind = r.activations
    records, wide = [], []            # wide: GPTQ layers past XTX_MAX_IN inputs (AWQ / round-to-nearest)
    if wkind == "fp8":
        _upgrade_opset(model, 19)
    if r.granularity in ("block", "dynamic"):
        _ensure_ms_domain(model)
    rng = np.random.default_rng(0)
    replace: dict[int, list] = {}       # id(node) -> replacement nodes (MatMulNBits)
    for node in list(model.graph.node):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        W, how = sur.const_weight(node.input[1])
        if W is None or W.ndim != 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        trans_b = node.op_type == "Gemm" and attrs.get("transB", 0)
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                       or attrs.get("beta", 1.0) != 1.0):
            records.append({"node": node.name, "weight": node.input[1], "got": "original (unsupported Gemm form)"})
            continue
        Wio = W.T if trans_b else W                                   # [in, out]
        layer = matcher.find(Wio)
        rec = {"node": node.name or node.output[0], "weight": node.input[1], "layer": layer.key if layer else None,
               "shape": [int(Wio.shape[0]), int(Wio.shape[1])]}
        X = np.asarray(layer.rows, np.float32) if layer is not None and layer.rows is not None \
            else rng.standard_normal((16, Wio.shape[0])).astype(np.float32)
        ref = X @ Wio
        # ---- quantize (numerically first, to measure the error) ---------------------------------
        smooth = None
        if akind is not None:
            if layer is None:
                rec.update(got="original (no calibration statistics for this layer)")
                records.append(rec)
                continue
            Wq_in = Wio
            if r.smoothquant is not None:
                a = r.smoothquant
                cmax = np.maximum(np.asarray(layer.chan_absmax, np.float32), 1e-5)
                wmax = np.maximum(np.abs(Wio).max(1), 1e-5)
                smooth = (cmax ** a / wmax ** (1 - a)).astype(np.float32)
                smooth = np.clip(smooth, 1e-2, 1e2)
                Wq_in = Wio * smooth[:, None]
                amax = float((cmax / smooth).max())                   # smoothed per-tensor max
                Xs = X / smooth
            else:
                amax = layer.amax(r.method, r.percentile, 128 if akind == "int8" else 256)
                Xs = X
            q, s, deq = quant_weight_per_channel(Wq_in, wkind, axis=1)
            got = fake_quant_act(Xs, amax, akind) @ deq
            rec["act_amax"] = amax
        elif r.granularity == "dynamic":             # int8 weights (7 bits), activations quantized at run time
            q, s, deq = quant_weight_per_channel(Wio, wkind, axis=1, qmax=DYNAMIC_QMAX)
            got = dynamic_fake_quant(X) @ deq
        else:
            bits = 8 if wkind == "int8" else 4
            H = layer.hessian if r.gptq and layer is not None else None
            if r.gptq and H is None:
                if layer is not None and Wio.shape[0] > XTX_MAX_IN:     # by design: X^T X is not kept this wide
                    rec["gptq"] = f"none ({Wio.shape[0]} inputs: X^T X is kept up to {XTX_MAX_IN})"
                    wide.append(layer.key)
                else:
                    raise EdgemmError(f"the {r.name} recipe needs each layer's Hessian: calibration statistics "
                                      "collected with hessian=True (layer "
                                      f"{layer.key if layer else rec['node']} has none)")
            if H is not None:
                sc = awq_scales(Wio, X, layer.chan_absmax, bits, r.block_size) if r.awq else np.ones(len(Wio))
                # AWQ first (W' = diag(s) W sees inputs x / s: H' = diag(1/s) H diag(1/s)), then GPTQ's rounding
                packed, s, deq = gptq_blockwise(Wio * sc[:, None], H / np.outer(sc, sc), bits, r.block_size,
                                                act_order=True)
                deq = deq / sc[:, None]
                smooth = sc.astype(np.float32) if r.awq else None
                rec.update(gptq="act-order", awq=bool(r.awq))
            elif r.awq and layer is not None:
                smooth = awq_scales(Wio, X, layer.chan_absmax, bits, r.block_size)
                packed, s, deq = quant_blockwise(Wio * smooth[:, None], bits, r.block_size)
                deq = deq / smooth[:, None]
                rec["awq"] = True
            else:
                packed, s, deq = quant_blockwise(Wio, bits, r.block_size)
            got = X @ deq
        err = rel_err(ref, got)
        rec["rel_err"] = err
        if r.keep_sensitive is not None and err > r.keep_sensitive:
            rec["got"] = f"original (kept: error {err:.3g} > {r.keep_sensitive:g})"
            records.append(rec)
            continue
        # ---- rewrite the graph ------------------------------------------------------------------------
        base = (node.name or node.output[0]).replace("/", "_")
        x_in = node.input[0]
        new = []
        if smooth is not None:                       # SmoothQuant / AWQ: the activation divided per channel
            inv = sur.add_init((1.0 / smooth).astype(np.float32), sur.uniq(base + ".smooth_inv"))
            xs = sur.uniq(base + ".smoothed")
            new.append(helper.make_node("Mul", [x_in, inv], [xs], name=sur.uniq(base + ".smooth")))
            x_in = xs
        if akind is not None:
            qmax = 127.0 if akind == "int8" else FP8_MAX
            if smooth is not None:
                rec["smoothquant"] = r.smoothquant
            a_s = sur.add_init(np.array(max(amax, 1e-12) / qmax, np.float32), sur.uniq(base + ".act_scale"))
            u8 = int8_storage == "u8u8"
            zp_arr = (np.array(128 if u8 else 0, np.uint8 if u8 else np.int8) if akind == "int8"
                      else np.array(0.0, np.float32))
            a_zp = sur.add_init(zp_arr, sur.uniq(base + ".act_zp"), dtype="fp8" if akind == "fp8" else None)
            xq, xdq = sur.uniq(base + ".act_q"), sur.uniq(base + ".act_dq")
            new += [helper.make_node("QuantizeLinear", [x_in, a_s, a_zp], [xq], name=sur.uniq(base + ".QuantizeLinear")),
                    helper.make_node("DequantizeLinear", [xq, a_s, a_zp], [xdq], name=sur.uniq(base + ".DequantizeLinear"))]
            # weight: int8 / fp8 initializer [in, out] + per-channel DequantizeLinear. A Gemm becomes MatMul (+ Add):
            # ONNX Runtime fuses Q/DQ around a MatMul into its int8 kernels (MatMulIntegerToFloat, s8s8 included),
            # not around a Gemm, which then ran in fp32 after dequantizing its weights on every call (Qwen2-VL's
            # 2-D tower: int8 vision no faster than fp32, 41% of its time in DequantizeLinear)
            wq_layout, axis = q, 1
            if wkind == "int8":
                wq_store = (wq_layout + 128).astype(np.uint8) if u8 else wq_layout.astype(np.int8)
                wzp_arr = np.full(len(s), 128, np.uint8) if u8 else np.zeros(len(s), np.int8)
            else:
                wq_store, wzp_arr = wq_layout, np.zeros(len(s), np.float32)
            w_name = sur.add_init(wq_store, sur.uniq(base + ".weight_q"), dtype="fp8" if wkind == "fp8" else None)
            w_s = sur.add_init(s, sur.uniq(base + ".weight_scale"))
            w_zp = sur.add_init(wzp_arr, sur.uniq(base + ".weight_zp"), dtype="fp8" if wkind == "fp8" else None)
            wdq = sur.uniq(base + ".weight_dq")
            new.append(helper.make_node("DequantizeLinear", [w_name, w_s, w_zp], [wdq], axis=axis,
                                        name=sur.uniq(base + ".weight_DequantizeLinear")))
            if node.op_type == "Gemm":
                out = node.output[0]
                bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
                mm = sur.uniq(base + ".mm") if bias else out
                replace[id(node)] = new + [helper.make_node("MatMul", [xdq, wdq], [mm], name=sur.uniq(base + ".MatMul"))] \
                    + ([helper.make_node("Add", [mm, bias], [out], name=sur.uniq(base + ".bias"))] if bias else [])
            else:
                sur.insert_before(node, new)
                node.input[0] = xdq
                node.input[1] = wdq
            rec["got"] = (f"{wkind} weights per channel, {akind} activations per tensor"
                          + (f" ({int8_storage})" if akind == "int8" else ""))
        elif r.granularity == "dynamic":
            w_name = sur.add_init(q.astype(np.int8), sur.uniq(base + ".weight_q"))
            w_s = sur.add_init(s, sur.uniq(base + ".weight_scale"))
            bias = [node.input[2]] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else []
            replace[id(node)] = new + [helper.make_node(
                "DynamicQuantizeMatMul", [x_in, w_name, w_s, ""] + bias if bias else [x_in, w_name, w_s],
                [node.output[0]], domain="com.microsoft", name=sur.uniq(base + ".DynamicQuantizeMatMul"))]
            rec["got"] = "int8 weights per channel (7 bits), int8 activations per tensor at run time"
        else:
            K, N = Wio.shape
            b_name = sur.add_init(packed, sur.uniq(base + ".weight_nbits"))
            s_name = sur.add_init(s, sur.uniq(base + ".weight_scales"))
            out = node.output[0]
            mm_out = out if node.op_type == "MatMul" or len(node.input) < 3 else sur.uniq(base + ".mm")
            nodes = new + [helper.make_node("MatMulNBits", [x_in, b_name, s_name], [mm_out], domain="com.microsoft",
                                      name=sur.uniq(base + ".MatMulNBits"), K=int(K), N=int(N),
                                      bits=8 if wkind == "int8" else 4, block_size=int(r.block_size),
                                      accuracy_level=int(r.accuracy_level))]
            if mm_out != out:
                nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=sur.uniq(base + ".bias")))
            replace[id(node)] = nodes
            rec["got"] = f"{wkind} weight-only, block {r.block_size} (MatMulNBits)"
        records.append(rec)
    if replace:
        nodes = []
        for n in model.graph.node:          # (the nodes inserted before a kept one go first: ids change below)
            nodes.extend(sur.new_nodes_before.pop(id(n), []))
            nodes.extend(replace.get(id(n), [n]))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    sur.finish()
    bytes_after = sum(len(t.raw_data) or 0 for t in model.graph.initializer)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    if bytes_after > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(onnx_out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=onnx_out.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(onnx_out))
    n_q = sum(1 for x in records if not x["got"].startswith("original"))
    n_k = len(records) - n_q
    errs = [x["rel_err"] for x in records if "rel_err" in x]
    if wide:
        log(f"note: {len(wide)} layer(s) of {stage} have more than {XTX_MAX_IN} inputs, where no X^T X is kept: "
            f"{'AWQ' if r.awq else 'round-to-nearest'} without GPTQ there ({wide[0]}{', ...' if len(wide) > 1 else ''})")
    log(f"quantized {stage} ({r.name}): {n_q} of {len(records)} weight MatMul/Gemm"
        + (f", {n_k} kept at original precision" if n_k else "")
        + (f"; layer error median {np.median(errs):.3g}, max {max(errs):.3g}" if errs else "")
        + f"; weights {bytes_before / 1e6:.1f} -> {bytes_after / 1e6:.1f} MB in {time.time() - t0:.1f}s")
    return {"stage": stage, "precision": precision, "recipe": r.to_dict(), "recipe_text": str(r),
            "int8_storage": int8_storage if akind == "int8" else None,
            "stats": (stats.meta if stats is not None else None), "layers": records, "quantized": n_q,
            "kept": n_k, "bytes_before": bytes_before, "bytes_after": bytes_after,
            "opset": {o.domain or "": o.version for o in model.opset_import}}
