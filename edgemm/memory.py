"""The memory planner: what a model costs on a backend at a context and a number of slots, and the largest
context / slots that fit a budget (`edgemm serve --memory 6GiB`, `edgemm info --context N --parallel P`).

An estimate is the sum of what the backend really holds (runtimes/):

- weights: ort opens each stage's ONNX file from its bytes (runtimes/ort_backend.py: the bytes that were hashed);
  ONNX Runtime parses them and prepacks the MatMul weights, so the process holds about ORT_LOAD_FACTOR x the stage
  files (measured with VmHWM on bench-shaped fp32 bundles of 31 and 118 MiB: 2.53 x files + 16 MiB). llama.cpp maps
  the decoder GGUF (every page read once loaded) and mtmd reads the mmproj. torch holds its fp32 parameters (and
  about 96 MiB of its own allocator and kernel scratch once it has run: measured on 30 and 116 MiB checkpoints).
- KV cache at its type: ort preallocates [slots, K, context + 1, E] per layer for key and value
  (runtimes/kv_pool.py; [1, K, context, E] per state with one slot), fp32 or, for fp16-compute bundles, fp16;
  llama.cpp holds context x slots cells (not unified) x layers x kv_heads x head_dim x 2 at its KV type (f32 for
  an f32 decoder, else f16; q8_0 / q4_0 with --kv-cache); torch an fp32 [layers, 1, K, context, E] per state.
- working buffers: the largest prefill chunk's activations and attention scores (ONNX Runtime's
  GroupQueryAttention writes the causal rows of [heads, chunk, context]; llama.cpp reserves a compute buffer for an
  n_ubatch of max(512, image rows) tokens over the whole context, its KQ matrix unless flash attention is on), the
  vision stage's activations for one image, the logits rows.
- runtime: the library's own (sessions, thread pools, contexts) beyond importing it, and the libraries themselves
  (`libraries`, what a process that imported them and loaded no model holds; part of the total a budget covers).

tests/test_memory.py checks the estimate against the peak RSS a process reaches with a bundle loaded and every
slot's cache filled, minus that of a process that imported the same libraries (within 15%).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgemmError
from .info import KV_TYPE_BYTES                 # bytes per stored KV value, by type name
from .blocks.kv_rows import KV_ROWS_BLOCK, kv_rows  # noqa: F401  (the sizing rule, core: blocks.decoder uses it)


MiB, GiB = 1 << 20, 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1 << 10, "mib": MiB, "gib": GiB, "tib": 1 << 40}
ORT_LOAD_FACTOR = 2.53          # resident bytes per byte of stage file, sessions opened from the bytes (measured)
# measured (VmHWM); torch: 96 MiB with dense F.linear, + 16 for oneDNN with its Linears packed (runtimes/torch_pack.py)
RUNTIME = {"ort": 16 * MiB, "trt": 16 * MiB, "llamacpp": 32 * MiB, "torch": 112 * MiB}
LIBRARIES = {"ort": 56 * MiB, "trt": 56 * MiB, "llamacpp": 44 * MiB, "torch": 220 * MiB}   # measured imports


def parse_size(text) -> int:
    """'6GiB', '6G' (decimal: 6e9), '512MiB', '6e9', '1.5 GiB' -> bytes. A bad size is an EdgemmError."""
    s = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)", s)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise EdgemmError(f"memory size {text!r}: give a number with an optional unit, e.g. 6GiB, 6G, 512MiB, 6e9 "
                          "(KiB/MiB/GiB are powers of 1024, K/M/G powers of 1000)")
    n = float(m.group(1)) * _UNITS[unit]
    if not 0 < n < float(1 << 60):
        raise EdgemmError(f"memory size {text!r} must be more than 0 bytes")
    return int(n)


def fmt_size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def kv_bytes_per_value(kv_type) -> float:
    """A KV type name (f32, f16, q8_0, q4_0, ...) or a number of bytes -> bytes per stored value."""
    if isinstance(kv_type, (int, float)):
        return float(kv_type)
    if kv_type not in KV_TYPE_BYTES:
        raise EdgemmError(f"KV cache type {kv_type!r}: one of {', '.join(KV_TYPE_BYTES)}")
    return KV_TYPE_BYTES[kv_type]


def kv_bytes(dec, context: int, slots: int = 1, kv_type="f16", rows_extra: int = 0, heads: int | None = None) -> float:
    """Bytes of the K and V caches of `slots` sequences of `context` (+ rows_extra) rows each, at kv_type (a type
    name or bytes per value): 2 x layers x heads x head_dim x rows x slots x bytes. dec: a DecoderConfig; heads:
    the cache's heads per layer (default dec.cache_heads: kv heads, twice with Libra's bridge)."""
    h = dec.cache_heads if heads is None else heads
    return 2 * dec.n_layers * h * dec.head_dim * (context + rows_extra) * slots * kv_bytes_per_value(kv_type)


@dataclass
class Estimate:
    backend: str
    context: int
    slots: int
    kv_type: str
    weights: float
    vision: float               # the vision stage's working buffers for one image (its weights are in weights)
    kv: float
    buffers: float              # prefill chunk activations and attention scores, logits rows
    runtime: float
    libraries: float

    @property
    def model(self) -> float:
        """What loading and running the model adds to a process that imported the libraries."""
        return self.weights + self.vision + self.kv + self.buffers + self.runtime

    @property
    def total(self) -> float:
        return self.model + self.libraries

    def line(self) -> str:
        return (f"weights {fmt_size(self.weights)} + KV {self.slots} slot(s) x {self.context} tokens "
                f"({self.kv_type}) {fmt_size(self.kv)} + buffers {fmt_size(self.vision + self.buffers)} + runtime "
                f"{fmt_size(self.runtime + self.libraries)} = {fmt_size(self.total)}")

    def table(self) -> list[str]:
        rows = [("weights", self.weights), (f"KV cache ({self.slots} x {self.context} tokens, {self.kv_type})",
                                            self.kv),
                ("vision buffers (one image)", self.vision), ("prefill buffers + logits", self.buffers),
                ("runtime", self.runtime), ("libraries (imported)", self.libraries), ("total", self.total)]
        return [f"  {k:<40} {fmt_size(v):>10}" for k, v in rows]


@dataclass
class ModelMemory:
    """What the planner needs of one model on one backend (memory_of builds it from a bundle or a model)."""
    cfg: object
    backend: str
    files: dict = field(default_factory=dict)     # stage -> bytes on disk (bundles)
    kv_type: str = "f16"
    params: int = 0                                # torch: parameters (fp32)
    max_context: int = 0
    flash_attn: bool = False
    chunk: int | None = None                       # prefill rows per run (None: a whole prompt at once)
    name: str = ""

    def estimate(self, context: int, slots: int) -> Estimate:
        return _ESTIMATORS[self.backend](self, int(context), int(slots))


def _vision_buffers(cfg) -> float:
    """One image through the tower: [T, width] activations, the MLP's hidden rows, the attention scores."""
    v = cfg.vision
    if v.arch == "none":
        return 0.0
    t = v.n_patches + 1
    return 4.0 * (t * (4 * v.width + v.mlp_dim) + v.heads * t * t)


def _prefill_rows(d, c: int) -> float:
    """Activations of c prompt rows through one decoder layer (hidden, Q/K/V, MLP), fp32."""
    return 4.0 * c * (2 * d.d_model + (d.n_heads + 2 * d.kv_heads) * d.head_dim + 2 * d.ffn_dim)


def _ort(m: ModelMemory, context: int, slots: int) -> Estimate:
    d = m.cfg.decoder
    c = min(m.chunk or context, context)
    scores = 4.0 * d.n_heads * c * (context - c / 2)       # the causal rows of a chunk ending the context
    kv = kv_bytes(d, context, slots, m.kv_type, rows_extra=1 if slots > 1 else 0)    # the pool's spare row
    return Estimate(m.backend, context, slots, m.kv_type, ORT_LOAD_FACTOR * sum(m.files.values()),
                    _vision_buffers(m.cfg), kv, scores + _prefill_rows(d, c) + 8.0 * d.vocab_size * slots,
                    RUNTIME[m.backend], LIBRARIES[m.backend])


def _llamacpp(m: ModelMemory, context: int, slots: int) -> Estimate:
    d = m.cfg.decoder
    ub = max(512, m.cfg.n_image_rows)                       # n_batch = n_ubatch (runtimes/llamacpp_backend.py)
    ub = min(ub, m.chunk or ub)                             # (pages of the buffer a smaller batch never touches)
    kq = 0.0 if m.flash_attn else 4.0 * d.n_heads * ub * context
    compute = kq + 4.0 * ub * (d.vocab_size + 11 * d.d_model)   # llama.cpp's reserved compute buffer (its log)
    return Estimate(m.backend, context, slots, m.kv_type, float(sum(m.files.values())), _vision_buffers(m.cfg),
                    kv_bytes(d, context, slots, m.kv_type, heads=d.kv_heads), compute + 4.0 * d.vocab_size * slots,
                    RUNTIME[m.backend], LIBRARIES[m.backend])


def _torch(m: ModelMemory, context: int, slots: int) -> Estimate:
    d = m.cfg.decoder
    c = min(m.chunk or context, context)
    return Estimate(m.backend, context, slots, "f32", 4.0 * m.params, _vision_buffers(m.cfg),
                    kv_bytes(d, context, slots, "f32"),
                    4.0 * d.n_heads * c * context + _prefill_rows(d, c) + 4.0 * d.vocab_size * c,
                    RUNTIME[m.backend], LIBRARIES[m.backend])


def _trt(m: ModelMemory, context: int, slots: int) -> Estimate:
    """Engines are deserialized into device memory (on a Jetson, the same memory): about their size; fp16 KV."""
    e = _ort(m, context, slots)
    e.weights = float(sum(m.files.values()))
    return e


_ESTIMATORS = {"ort": _ort, "llamacpp": _llamacpp, "torch": _torch, "trt": _trt}


def memory_of(bundle=None, model=None, backend: str = "auto", device: str = "auto", kv_type: str | None = None,
              chunk: int | None = None, flash_attn: bool = False) -> ModelMemory:
    """A bundle or a model (directory or preset) as the planner sees it on `backend` ('auto': the one
    edgemm.runtimes.pick_backend would pick). kv_type: llama.cpp's KV cache type, or int8 on ort (default: the
    backend's)."""
    from .config import ModelConfig
    if bundle is None:
        from .checkpoint import model_config
        from .info import checkpoint_param_counts, param_counts
        cfg, _, path = model_config(model or "tiny-shapes")
        params = sum((checkpoint_param_counts(path) if path is not None else param_counts(cfg)).values())
        return ModelMemory(cfg, "torch", params=params, max_context=cfg.decoder.max_seq_len, chunk=chunk,
                           name=str(model or "tiny-shapes"))
    from .bundle import read_manifest
    from .runtimes import pick_backend
    man = read_manifest(bundle)
    cfg = ModelConfig.from_dict(man["model"])
    if backend == "auto":
        backend = pick_backend(bundle, device)[0]
    if backend not in _ESTIMATORS or backend == "torch":
        raise EdgemmError(f"the memory planner has no estimate for backend {backend!r} with a bundle")
    stages = man.get("stages", {})
    names = list(stages) if backend == "llamacpp" else [s for s in cfg.stages if s in stages]
    if backend == "trt":
        names = [s for s in names if stages[s].get("engine")] or names
    files = {}
    for s in names:
        st = stages[s]
        f = st.get("engine") if backend == "trt" and st.get("engine") else st["file"]
        files[s] = sum((Path(bundle) / x).stat().st_size for x in [f, *st.get("extra_files", [])])
        if backend == "ort" and st.get("precision") == "fp16" and st.get("compute") != "fp16":
            files[s] *= 2                                    # ONNX Runtime turns fp16-stored weights into fp32
    dec = stages.get("decoder_text", stages.get("decoder", {}))
    if backend == "llamacpp":
        kv = kv_type or ("f32" if dec.get("precision") == "f32" else "f16")
    elif backend == "trt":
        kv = "f16"
    else:                                                    # (ort: the bundle's float type, or --kv-cache int8)
        kv = "int8" if backend == "ort" and kv_type == "int8" else "f16" if dec.get("compute") == "fp16" else "f32"
    ctx = int(man.get("trt", {}).get("max_context") or cfg.decoder.max_seq_len) if backend == "trt" \
        else cfg.decoder.max_seq_len
    flash_attn = flash_attn or kv in ("q8_0", "q4_0")       # (the backend turns it on for a quantized cache)
    return ModelMemory(cfg, backend, files, kv, max_context=ctx, flash_attn=flash_attn, chunk=chunk,
                       name=Path(str(bundle).rstrip("/")).name)


def estimate_all(models: list[ModelMemory], context: int | None, slots: int) -> list[Estimate]:
    return [m.estimate(min(context or m.max_context, m.max_context), slots) for m in models]


def _total(models, context, slots) -> float:
    return sum(e.total for e in estimate_all(models, context, slots))


def _largest(ok, lo: int, hi: int, step: int = 1) -> int | None:
    """The largest n in lo, lo+step, ..., <= hi with ok(n) (ok is monotone: true up to a point), or None."""
    if hi < lo or not ok(lo):
        return None
    a, b = 0, (hi - lo) // step                  # ok(lo + a*step) holds; search up to b
    while a < b:
        mid = (a + b + 1) // 2
        a, b = (mid, b) if ok(lo + mid * step) else (a, mid - 1)
    return lo + a * step


MAX_SLOTS = 256


def plan(budget: int, models: list[ModelMemory], context: int | None = None, slots: int | None = None):
    """Fit context and slots to a budget in bytes: -> (context, slots, [Estimate per model]).

    Given ones are checked; a missing --parallel becomes the most slots that fit at the context; a missing
    --context the model's (or, where a slot does not fit at it, the longest that does, a multiple of 256). What
    cannot fit is refused with one line saying what would."""
    if not models:
        raise EdgemmError("no model to plan memory for")
    top = min(m.max_context for m in models)
    if context is not None and not 1 <= context <= top:
        raise EdgemmError(f"--context {context}: the model's context is 1..{top} tokens")
    if slots is not None and slots < 1:
        raise EdgemmError("--parallel must be at least 1")
    step = 256 if top >= 1024 else 16

    def fits(c, s):
        return _total(models, c, s) <= budget

    def ctx_fit(s):                                # the longest context that fits s slots (the model's own first)
        if fits(top, s):
            return top
        return _largest(lambda c: fits(c, s), step, top - 1, step) or _largest(lambda c: fits(c, s), 1, step - 1)

    if slots is None:
        c = context or top
        s = _largest(lambda n: fits(c, n), 1, MAX_SLOTS)
        if s is None and context is None:
            c = ctx_fit(1)
            s = 1 if c else None
        if s is not None:
            return c, s, estimate_all(models, c, s)
        slots = 1
    c = context or ctx_fit(slots)
    if c is not None and fits(c, slots):
        return c, slots, estimate_all(models, c, slots)
    raise EdgemmError(refusal(budget, models, context or top, slots, explicit_context=context is not None))


def refusal(budget: int, models, context: int, slots: int, explicit_context: bool = True) -> str:
    """One line: what the budget holds, what the configuration needs, and the options that would fit."""
    need = _total(models, context, slots)
    s_fit = _largest(lambda n: _total(models, context, n) <= budget, 1, MAX_SLOTS)
    top = min(m.max_context for m in models)
    step = 256 if top >= 1024 else 16
    c_fit = (_largest(lambda c: _total(models, c, slots) <= budget, step, context, step)
             or _largest(lambda c: _total(models, c, slots) <= budget, 1, min(context, step - 1)))
    weights = sum(e.weights for e in estimate_all(models, 1, 1))
    asked = (f"--parallel {slots}" if slots > 1 else "one slot") + (f" at --context {context}" if explicit_context
                                                                   else f" at the model's context {context}")
    if s_fit:
        holds = f"weights {fmt_size(weights)} + KV for {s_fit} slot(s) x {context} tokens"
    elif c_fit:
        holds = f"weights {fmt_size(weights)} + KV for {slots} slot(s) x {c_fit} tokens"
    else:
        one = _total(models, 1, 1)
        return (f"{fmt_size(budget)} does not hold the model: weights {fmt_size(weights)}, {fmt_size(one)} with "
                "the runtime and one slot of one token; use a smaller precision or a larger --memory")
    use = [f"--parallel {s_fit}"] if s_fit else []
    use += [f"--context {c_fit}"] if c_fit else []
    return f"{fmt_size(budget)} holds {holds}; {asked} needs {fmt_size(need)}: use {' or '.join(use)}"


def describe_plan(model=None, bundle=None, contexts=(), parallel: int | None = None, memory=None,
                  kv_cache: str | None = None, backend: str = "auto") -> list[str]:
    """`edgemm info --context N --parallel P [--memory M]`: the estimate at each context (default the model's) and
    P slots (default 1, or with --memory the most that fit), as `edgemm serve` would hold it (its prefill chunk)."""
    chunk = serve_chunk()
    if model and bundle:
        raise EdgemmError("give either --model or --bundle, not both")
    budget = parse_size(memory) if memory is not None else None
    if parallel is not None and parallel < 1:
        raise EdgemmError("--parallel must be at least 1")
    m = memory_of(bundle=bundle, model=model, backend=backend, kv_type=kv_cache, chunk=chunk)
    lines = []
    for c in list(contexts) or [None]:
        if c is not None and not 1 <= c <= m.max_context:
            raise EdgemmError(f"--context {c}: the model's context is 1..{m.max_context} tokens")
        if budget is not None:
            c, s, (e,) = plan(budget, [m], c, parallel)
            head = f"--memory {fmt_size(budget)} fits {s} slot(s) x {c} tokens"
        else:
            e = m.estimate(c or m.max_context, parallel or 1)
            head = f"{e.slots} slot(s) x {e.context} tokens"
        lines += ["", f"memory plan on {m.backend} ({head}; prefill chunk {chunk or 'the whole prompt'}):",
                  *e.table()]
    return lines


def serve_chunk(prefill_chunk: int | None = None) -> int | None:
    """The prompt rows serve prefills at once: --prefill-chunk, else its engine's default (None: whole prompts)."""
    from .serve import engine
    c = getattr(engine, "PREFILL_CHUNK", None) if prefill_chunk is None else prefill_chunk
    return c or None


def served(models=(), bundles=(), backend="auto", device="auto", kv_cache=None, prefill_chunk=None,
           log=None) -> list[ModelMemory]:
    """The planner's view of what `edgemm serve` would load (the same defaults: tiny-shapes as the shipped bundle
    where `auto` runs it; serve's prefill chunk)."""
    chunk = serve_chunk(prefill_chunk)
    if not models and not bundles:
        models = ("tiny-shapes",)
    out = []
    for m in models:
        shipped = None
        if backend == "auto" and m == "tiny-shapes":
            from .runtimes import shipped_bundle
            shipped = shipped_bundle(log)
        out.append(memory_of(bundle=shipped, model=None if shipped else m, backend=backend, device=device,
                             chunk=chunk))
    return out + [memory_of(bundle=b, backend=backend, device=device, kv_type=kv_cache, chunk=chunk)
                  for b in bundles]


def serve_plan(budget: int | None, models: list[ModelMemory], context: int | None, slots: int | None,
               log=None) -> tuple[int | None, int]:
    """`edgemm serve`: -> (context, parallel) to open the models with; without a budget, the given ones."""
    if context is not None and context < 1:
        raise EdgemmError(f"--context {context}: give a number of tokens >= 1")
    if budget is None:
        return context, slots or 1
    c, s, ests = plan(budget, models, context, slots)
    if log:
        for e, m in zip(ests, models):
            log(f"memory: {m.name or m.backend}: {e.line()}")
        log(f"memory: {fmt_size(budget)} fits {s} slot(s) x {c} tokens"
            + ("" if slots and context else " (chosen: " + ", ".join(
                [f"--parallel {s}"] * (slots is None) + [f"--context {c}"] * (context is None)) + ")"))
    return c, s


__all__ = ["parse_size", "fmt_size", "kv_bytes", "kv_bytes_per_value", "Estimate", "ModelMemory", "memory_of",
           "plan", "refusal", "describe_plan", "serve_chunk", "served", "serve_plan", "estimate_all", "KV_TYPE_BYTES"]
