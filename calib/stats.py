"""Activation statistics per stage, per layer and per modality branch (docs/architecture.md, section 5).

`collect_stats` runs the PyTorch reference over a calibration set the way the exported stages see it:
the vision stage on the pixels, then the prompt as modality segments (text [bos], image rows, text question +
answer), each segment one batch through its branch. A forward pre-hook on every nn.Linear records the layer's
input: image rows reach only vision-branch layers, text rows only text-branch layers, so every branch gets its
own statistics. Keys are "<stage>/<module>", e.g. "decoder_image/decoder.layers.0.vision.qkv"; the shared LM
head appears once per decoder stage.

Per layer: the absolute max, the max per input channel (SmoothQuant), a histogram of |x| (2048 bins over a
range that doubles as needed, merging bin pairs, so it stays exact), a few sampled input rows (to measure each
layer's quantization error for --keep-sensitive), and a signature of the weight (its first two input rows),
which lets a quantizer find the layer behind any ONNX MatMul/Gemm whatever the graph names it. Also the sum of
squares per input channel over every row (`sum2`), the same of the rows as ggml's CPU k-quant kernels round them
(`sum2_q8k`, q8k_round: llama.cpp's importance matrix, edgemm.export.gguf_imatrix) and, with
collect_stats(hessian=True), the second moment X^T X of layers up to XTX_MAX_IN inputs (GPTQ's Hessian).

The clipping threshold (amax) of a layer's activations comes from one of three methods: `max`, `percentile`
(of |x|, default 99.99) and `entropy` (TensorRT's KL-divergence search over the histogram, 128 levels).

Statistics are cached in `<cache>/<digest>.npz`, keyed by the digests of the set and of the model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError

NBINS = 2048
KEEP_ROWS = 32
XTX_MAX_IN = 4096                 # hessian=True: X^T X kept for layers with at most this many inputs
METHODS = ("max", "percentile", "entropy")
STATS_VERSION = 4                 # 2: sum2 (and xtx); 3: sum2_q8k; 4: the video stage; older files load without them
QK_K = 256                        # ggml's k-quant super-block: Q4_K..Q6_K weights multiply Q8_K activations
DEFAULT_PERCENTILE = 99.99


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEMM_CACHE", Path.home() / ".cache" / "edgemm")) / "calib"


@dataclass
class LayerStats:
    """Input statistics of one Linear layer in one stage."""
    key: str
    stage: str
    module: str
    branch: str                      # "text" | "vision" | "shared" (decoder), "vision-tower" (vision stage)
    in_features: int
    absmax: float = 0.0
    chan_absmax: np.ndarray = None   # [in]
    hist: np.ndarray = None          # [NBINS] counts of |x|
    hist_range: float = 0.0          # the histogram covers [0, hist_range)
    count: int = 0                   # rows seen
    rows: np.ndarray = None          # [<= KEEP_ROWS, in] float16 sample of inputs
    wsig: np.ndarray = None          # [2, out]: W.T[:2] (first two input rows of the weight, [in, out] layout)
    weight_absmax: np.ndarray = None # [in]: max |W| per input channel (SmoothQuant)
    sum2: np.ndarray = None          # [in] float64: sum of x_j^2 over every row (llama.cpp's imatrix in_sum2)
    xtx: np.ndarray = None           # [in, in] float64: sum of x x^T over every row (GPTQ's Hessian), if asked
    sum2_q8k: np.ndarray = None      # [in] float64: sum of q8k_round(x)_j^2 (in_features a multiple of QK_K)

    @property
    def hessian(self) -> np.ndarray | None:
        """GPTQ's H = 2/n X^T X over every calibration row (None without hessian=True statistics)."""
        return None if self.xtx is None or not self.count else (2.0 / self.count) * np.asarray(self.xtx, np.float64)

    # ---- accumulation ---------------------------------------------------------------
    def add(self, x: np.ndarray, rng: np.random.Generator) -> None:
        x = np.asarray(x, np.float32).reshape(-1, self.in_features)
        a = np.abs(x)
        m = float(a.max()) if a.size else 0.0
        cm = a.max(0) if a.size else np.zeros(self.in_features, np.float32)
        self.chan_absmax = cm if self.chan_absmax is None else np.maximum(self.chan_absmax, cm)
        if self.hist is None:
            self.hist = np.zeros(NBINS, np.int64)
            self.hist_range = max(m, 1e-8) * 1.0001
        while m >= self.hist_range:       # double the range: bins merge pairwise, the histogram stays exact
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(1), np.zeros(NBINS // 2, np.int64)])
            self.hist_range *= 2
        self.hist += np.histogram(a, bins=NBINS, range=(0, self.hist_range))[0]
        self.absmax = max(self.absmax, m)
        x64 = x.astype(np.float64)
        self.sum2 = (0 if self.sum2 is None else self.sum2) + (x64 * x64).sum(0)
        if self.in_features % QK_K == 0:
            xq = q8k_round(x).astype(np.float64)
            self.sum2_q8k = (0 if self.sum2_q8k is None else self.sum2_q8k) + (xq * xq).sum(0)
        if self.xtx is not None:
            self.xtx += x64.T @ x64
        # reservoir-ish sample of rows
        take = x if len(x) <= KEEP_ROWS else x[rng.choice(len(x), KEEP_ROWS, replace=False)]
        self.rows = take.astype(np.float16) if self.rows is None else np.concatenate([self.rows, take.astype(np.float16)])
        if len(self.rows) > KEEP_ROWS:
            self.rows = self.rows[rng.choice(len(self.rows), KEEP_ROWS, replace=False)]
        self.count += len(x)

    def merged(self, other: "LayerStats", key: str | None = None) -> "LayerStats":
        """The statistics of both layers' inputs together (one shared calibration for two branches)."""
        a, b = (self, other) if self.hist_range >= other.hist_range else (other, self)
        hb = b.hist.copy()
        r = b.hist_range
        while r < a.hist_range * 0.999:
            hb = np.concatenate([hb.reshape(-1, 2).sum(1), np.zeros(NBINS // 2, np.int64)])
            r *= 2
        out = LayerStats(key or self.key, self.stage, self.module, "shared", self.in_features,
                         max(self.absmax, other.absmax), np.maximum(self.chan_absmax, other.chan_absmax),
                         a.hist + hb, a.hist_range, self.count + other.count,
                         np.concatenate([self.rows, other.rows]), self.wsig, self.weight_absmax)
        for name in ("sum2", "sum2_q8k"):
            if getattr(self, name) is not None and getattr(other, name) is not None:
                setattr(out, name, getattr(self, name) + getattr(other, name))
        if self.xtx is not None and other.xtx is not None:
            out.xtx = self.xtx + other.xtx
        return out

    # ---- thresholds -------------------------------------------------------------------
    def amax(self, method: str = "max", percentile: float = DEFAULT_PERCENTILE, levels: int = 128) -> float:
        """The clipping threshold of |x| by `method`."""
        if method == "max" or self.hist is None or self.hist.sum() == 0:
            return float(self.absmax)
        width = self.hist_range / NBINS
        if method == "percentile":
            c = np.cumsum(self.hist)
            i = int(np.searchsorted(c, c[-1] * percentile / 100.0))
            return float(min((i + 1) * width, self.absmax))
        if method == "entropy":
            return float(min(entropy_threshold(self.hist, levels) * width, self.absmax))
        raise EdgemmError(f"unknown calibration method {method!r}; methods: {', '.join(METHODS)}")


def q8k_round(x: np.ndarray) -> np.ndarray:
    """Rows [..., n] (n a multiple of QK_K) as ggml's CPU kernels multiply them with Q4_K / Q5_K / Q6_K weights:
    each run of 256 inputs rounded to int8 with one scale, -127 / (the run's value of largest |x|)
    (ggml-quants.c quantize_row_q8_K_ref), then back to floats. With an activation outlier in a run, the run's
    other inputs keep few levels (tests/test_gguf_imatrix.py checks this against ggml's own functions)."""
    x = np.asarray(x, np.float32)
    b = x.reshape(*x.shape[:-1], -1, QK_K)
    mx = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0)).astype(np.float32)
        q = np.minimum(np.rint(iscale * b), 127)
        return np.where(mx != 0, q * (np.float32(1) / iscale), np.float32(0)).astype(np.float32).reshape(x.shape)


def entropy_threshold(hist: np.ndarray, levels: int = 128) -> float:
    """TensorRT's entropy calibration: the threshold (in bins) whose `levels`-level quantization of the
    clipped histogram has the least KL divergence from it."""
    hist = np.asarray(hist, np.float64)
    nz = np.nonzero(hist)[0]
    if len(nz) == 0:
        return float(len(hist))
    last = int(nz[-1]) + 1
    if last <= levels:
        return float(last)
    best, best_i = np.inf, last
    stride = max(1, (last - levels) // 128)            # at most ~128 candidates
    for i in range(levels, last + 1, stride):
        h = hist[:i]
        p = h.copy()
        p[-1] += hist[i:].sum()                        # reference: outliers clipped into the last bin
        nz = (h > 0).astype(np.float64)                # candidate: the `levels`-level quantization of hist[:i]
        edges = np.linspace(0, i, levels + 1).astype(int)[:-1]
        sums, cnt = np.add.reduceat(h, edges), np.add.reduceat(nz, edges)
        lens = np.diff(np.append(edges, i))
        q = np.repeat(np.where(cnt > 0, sums / np.maximum(cnt, 1), 0.0), lens) * nz
        pn, qn = p / p.sum(), q / q.sum()
        m = pn > 0
        kl = float(np.sum(pn[m] * np.log(pn[m] / np.maximum(qn[m], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return float(best_i)


@dataclass
class Stats:
    """Statistics of one model over one calibration set."""
    layers: dict = field(default_factory=dict)      # key -> LayerStats
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def stage(self, stage: str) -> dict:
        return {k: v for k, v in self.layers.items() if v.stage == stage}

    @classmethod
    def of_matrix(cls, W, x, rng, digest: str = "t", hessian: bool = False) -> "Stats":
        """Statistics of one decoder_text layer (text branch) of a MatMul weight W [in, out] over inputs x [..., in]
        (hessian: + X^T X): what a quantizer reads for a one-MatMul graph (tests, benchmarks/bench_int8_storage.py)."""
        K = W.shape[0]
        ls = LayerStats("decoder_text/l", "decoder_text", "l", "text", K, wsig=W[:2].copy(),
                        weight_absmax=np.abs(W).max(1))
        if hessian:
            ls.xtx = np.zeros((K, K))
        ls.add(x, rng)
        return cls({"decoder_text/l": ls}, {"digest": digest})

    def shared(self) -> "Stats":
        """One shared calibration: every routed layer gets the statistics of both branches' inputs together
        (what a quantizer unaware of the modality routing would compute). For comparisons."""
        out = {}
        for k, v in self.layers.items():
            if v.branch in ("text", "vision"):
                other_mod = v.module.replace(f".{v.branch}.", ".vision." if v.branch == "text" else ".text.")
                other = [o for o in self.layers.values() if o.module == other_mod]
                out[k] = v.merged(other[0], k) if other else v
            elif v.stage.startswith("decoder") and v.branch == "shared":
                other = [o for o in self.layers.values() if o.module == v.module and o.key != k]
                out[k] = v.merged(other[0], k) if other else v
            else:
                out[k] = v
        return Stats(out, dict(self.meta, mode="shared"), None)

    def summary(self) -> list[dict]:
        return [{"key": k, "branch": v.branch, "rows": v.count, "max": v.absmax, "p99.99": v.amax("percentile"),
                 "entropy": v.amax("entropy")} for k, v in self.layers.items()]

    # ---- file ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays, index = {}, []
        for i, (k, v) in enumerate(self.layers.items()):
            index.append({"key": k, "stage": v.stage, "module": v.module, "branch": v.branch,
                          "in_features": v.in_features, "absmax": v.absmax, "hist_range": v.hist_range,
                          "count": v.count})
            for name in ("chan_absmax", "hist", "rows", "wsig", "weight_absmax", "sum2", "sum2_q8k", "xtx"):
                if getattr(v, name) is not None:
                    arrays[f"{i}.{name}"] = getattr(v, name)
        meta = json.dumps({"meta": self.meta, "index": index, "version": STATS_VERSION})
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(tmp, __meta__=np.frombuffer(meta.encode(), np.uint8), **arrays)
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Stats":
        path = Path(path)
        try:
            z = np.load(path, allow_pickle=False)
            info = json.loads(bytes(z["__meta__"]).decode())
        except Exception as e:
            raise EdgemmError(f"calibration statistics {path} are unreadable ({e}); delete the file and "
                              "run `edgemm calibrate` again") from None
        if info.get("version") not in (1, 2, 3, STATS_VERSION):
            raise EdgemmError(f"{path} has statistics version {info.get('version')}, expected {STATS_VERSION}")
        layers = {}
        for i, row in enumerate(info["index"]):
            v = LayerStats(row["key"], row["stage"], row["module"], row["branch"], row["in_features"],
                           row["absmax"], hist_range=row["hist_range"], count=row["count"])
            for name in ("chan_absmax", "hist", "rows", "wsig", "weight_absmax", "sum2", "sum2_q8k", "xtx"):
                if f"{i}.{name}" in z:
                    setattr(v, name, z[f"{i}.{name}"])
            layers[row["key"]] = v
        return cls(layers, info["meta"], path)


# --------------------------------------------------------------------------- collection
def _branch_of(module: str, stage: str) -> str:
    if stage in ("vision", "video"):
        return "vision-tower"
    if ".text." in module:
        return "text"
    if ".vision." in module:
        return "vision"
    return "shared"


def _load(model_spec_or_model, tokenizer=None, model_digest=None):
    """-> (model, tokenizer, model digest)."""
    from edgemm.model import EdgeMM
    if isinstance(model_spec_or_model, tuple) and model_digest:
        m, tok = model_spec_or_model
        return m.float().cpu().eval(), tok, model_digest
    if isinstance(model_spec_or_model, EdgeMM):
        if tokenizer is None:
            raise EdgemmError("collect_stats(model, ...) needs tokenizer= with an in-memory model")
        model_spec_or_model = (model_spec_or_model, tokenizer)
    from edgemm.checkpoint import load_source
    m, tok, source = load_source(model_spec_or_model)
    return m.float().cpu().eval(), tok, source["digest"]


def stats_digest(model_digest: str, set_digest: str, hessian: bool = False) -> str:
    return hashlib.sha256(f"edgemm-stats-v{STATS_VERSION}{'h' if hessian else ''}\0{model_digest}\0{set_digest}"
                          .encode()).hexdigest()


def collect_stats(model_spec_or_model, calib_set=None, *, tokenizer=None, cache: str | Path | None = None,
                  refresh: bool = False, n: int | None = None, progress: bool = True, log=print,
                  seed: int = 0, model_digest: str | None = None, hessian: bool = False) -> Stats:
    """Run the reference over `calib_set` (None: the bundled shapes calib split; a folder; a CalibSet) and
    record input statistics of every Linear layer per stage and modality branch. Cached: a second call with
    the same model and set loads `<cache>/<digest>.npz` (cache=False: no cache). hessian=True also keeps each
    layer's X^T X (GPTQ; layers up to XTX_MAX_IN inputs)."""
    import torch
    from tqdm import tqdm
    from edgemm.model import EdgeMM, KVCache
    from edgemm.anyres import Tiles
    from edgemm.tilings import preprocess_image
    from edgemm.qformer import instruction
    from .sets import resolve_calib
    log = log or (lambda s: None)
    cset = resolve_calib(calib_set, n)
    if isinstance(model_spec_or_model, EdgeMM) and model_digest:
        model_spec_or_model = (model_spec_or_model, tokenizer)
    m, tok, mdigest = _load(model_spec_or_model, tokenizer, model_digest)
    sdigest = cset.digest()
    key = stats_digest(mdigest, sdigest, hessian)
    path = None
    if cache is not False:
        path = Path(cache or cache_dir()) / f"{key[:32]}.npz"
        if path.is_file() and not refresh:
            st = Stats.load(path)
            log(f"calibration statistics: reusing {path} ({cset.describe()})")
            return st
    cfg = m.cfg
    rng = np.random.default_rng(seed)
    layers: dict[str, LayerStats] = {}
    current = {"stage": None}
    handles = []
    linears = {}
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[0] in ("vision", "adapter", "decoder"):
            linears[name] = mod

    def make_hook(name, mod):
        def hook(_mod, inputs):
            stage = current["stage"]
            k = f"{stage}/{name}"
            st = layers.get(k)
            if st is None:
                w = mod.weight.detach().float()
                st = layers[k] = LayerStats(k, stage, name, _branch_of(name, stage), mod.in_features,
                                            wsig=w[:, :2].T.numpy().copy(),
                                            weight_absmax=w.abs().amax(0).numpy().copy())
                if hessian and mod.in_features <= XTX_MAX_IN:
                    st.xtx = np.zeros((mod.in_features, mod.in_features), np.float64)
            st.add(inputs[0].detach().float().numpy(), rng)
        return hook

    for name, mod in linears.items():
        handles.append(mod.register_forward_pre_hook(make_hook(name, mod)))
    try:
        with torch.inference_mode():
            for s in tqdm(cset.samples, desc="calibrate", unit="sample", disable=not progress, leave=False):
                px = preprocess_image(s.image, cfg.vision)       # any-resolution models: the image's tiles
                t = torch.from_numpy(np.asarray(px))
                current["stage"] = "vision"
                ins = [torch.from_numpy(x) for x in instruction(tok, cfg, s.prompt)]   # InstructBLIP: Q-Former ids
                rows = (m.encode_image_tiled(t, *px.hw, px.max_tiles) if isinstance(px, Tiles)
                        else px.encode_with(lambda *a: m.encode_image(*map(torch.from_numpy, a)), cfg)
                        if hasattr(px, "encode_with") else m.encode_image(t, *ins))    # (LLaVA-UHD: per size)
                if hasattr(px, "pack_rows"):                     # SmolVLM: its tiles' rows between their markers
                    rows = px.pack_rows(rows, cfg)
                if cfg.video_stage:       # LLaVA-NeXT-Video: the image as a one-frame clip (its pooled video stage)
                    from edgemm.video import still_frames
                    current["stage"] = "video"
                    m.encode_video(torch.from_numpy(still_frames([s.image], cfg)))
                ids = tok.user_turn(s.prompt, first=True) + (tok.answer(s.answer) if s.answer else [])
                cache_ = KVCache.empty(cfg.decoder, 1, 1 + rows.shape[1] + len(ids) + 2)
                current["stage"] = "decoder_text"
                pos = 0
                if tok.add_bos:
                    _, pos = m.forward_segment("text", torch.tensor([tok.prefix_ids()]), cache_, 0, last_only=False)
                current["stage"] = "decoder_image"
                _, pos = m.forward_segment("image", rows, cache_, pos, last_only=False)
                current["stage"] = "decoder_text"
                m.forward_segment("text", torch.tensor([ids]), cache_, pos, last_only=False)
    finally:
        for h in handles:
            h.remove()
    meta = {"model_digest": mdigest, "set": cset.name, "set_digest": sdigest, "samples": len(cset),
            "model": cfg.name, "mode": "per-modality", "digest": key, "hessian": bool(hessian)}
    st = Stats(layers, meta)
    if path is not None:
        st.save(path)
        log(f"calibration statistics: {len(layers)} layers over {cset.describe()} -> {path}")
    return st


def resolve_stats(stats, model=None, calib=None, log=print) -> Stats | None:
    """Stats, a path to a stats file, or None (collected now from `model` and `calib` when model is given)."""
    if stats is None:
        return collect_stats(model, calib, log=log) if model is not None else None
    if isinstance(stats, Stats):
        return stats
    return Stats.load(stats)
