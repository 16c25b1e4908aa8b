"""The `ort` backend: ONNX bundles on ONNX Runtime (TensorRT EP -> CUDA EP -> CPU EP).

The KV cache lives in preallocated OrtValues, one [1, K, cache_len, E] buffer per layer for K and for V, on the
session's device. Each call binds the same buffer as `past_*` input and `present_*` output (I/O binding), and
GroupQueryAttention writes the new rows in place, so a decode step costs attention over the cache, not a copy.
GroupQueryAttention's CPU kernel pays for the whole buffer each step, so a state's buffers are sized to what its
caller expects (new_state's max_len) and grown (`reserve`: a copy into buffers at least twice as large, up to the
context) when a segment needs more.

Opened with `slots=N > 1` (edgemm serve --parallel N) on a bundle whose decoder_text has a batch dimension, the
states are rows of one [N, K, cache_len + 1, E] buffer per layer (runtimes/kv_pool.py) and decode_batch steps
them in one run, the weights read once for all rows; older bundles (batch 1) step the states one by one.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from edgemm.cpu import s8s8_int8_exact, threads_or_default
from edgemm.errors import EdgemmError
from edgemm.blocks.kv_rows import kv_rows
from .base import SegmentRunner, State

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
VISION_STAGES = ("vision", "image_tokens")       # pixels / image tokens -> rows (vision_threads)
# ONNX Runtime optimizers kept off for Q/DQ stages: MatMulAddFusion would fold a quantized MatMul and its bias Add
# into a Gemm before the QDQ fusion runs, and Q/DQ around a Gemm is not fused: the Gemm then ran in fp32 after
# dequantizing its weights on every call (edgemm.calib.quantize writes a quantized Gemm as MatMul + Add)
QDQ_DISABLED = ["MatMulAddFusion"]


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EdgemmError(f"the ort backend needs onnxruntime ({e}); pip install 'edgemm[cpu]' "
                          "(or 'edgemm[gpu]' on a CUDA machine)") from None
    return ort


def provider_candidates(device: str, available: list[str]) -> list[str]:
    """The providers to try, best first: `cpu` forces the CPU EP; otherwise TensorRT, CUDA, then the CPU."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    return [p for p in PROVIDER_ORDER if p in available or p == "CPUExecutionProvider"]


def s8s8_stages(stages: dict, names) -> list[str]:
    """Stages quantized W8A8 int8 in the s8s8 storage (bundles made before u8u8 record no int8_storage)."""
    out = []
    for n in names:
        q = stages[n].get("quantization") or {}
        acts = (q.get("recipe") or {}).get("activations")
        if stages[n].get("precision") == "int8" and acts == "int8" and q.get("int8_storage", "s8s8") == "s8s8":
            out.append(n)
    return out


def off_provider_nodes(assignment, provider: str) -> dict[str, int]:
    """{op type: count} of the nodes ONNX Runtime placed on another provider than `provider`, from
    InferenceSession.get_provider_graph_assignment_info() (ONNX Runtime's own placement report; needs the
    session entry session.record_ep_graph_assignment_info)."""
    out: dict[str, int] = {}
    for sub in assignment:
        if sub.ep_name != provider:
            for n in sub.get_nodes():
                key = f"{n.domain}.{n.op_type}" if n.domain else n.op_type
                out[key] = out.get(key, 0) + 1
    return out


def placement_line(stage: str, provider: str, off: dict[str, int]) -> str | None:
    """One line naming the nodes of `stage` that do not run on `provider` (None when all do)."""
    if not off:
        return None
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(off.items(), key=lambda kv: -kv[1])[:4])
    return (f"note: {sum(off.values())} node(s) of {stage} run off {provider} (on the next provider of the chain, "
            f"with copies between devices): {ops}{', ...' if len(off) > 4 else ''}")


class OrtBackend(SegmentRunner):
    name = "ort"
    kv_grows = True
    kv_caches = ("f32", "f16", "int8")      # --kv-cache: the bundle's float type (named), or int8 (runtimes/ort_kv.py)

    def __init__(self, sessions, manifest, cfg, tokenizer, provider, bundle):
        self.sess, self.manifest, self.cfg, self.tokenizer = sessions, manifest, cfg, tokenizer
        self.provider = provider
        self.device = "cpu" if provider == "CPUExecutionProvider" else "cuda"
        self.source = str(bundle)
        self._ort = _import_ort()
        self._dev = ("cpu", 0) if self.device == "cpu" else ("cuda", 0)
        ids = next((i.shape for i in sessions["decoder_text"].get_inputs() if i.name == "input_ids"), [1])
        self.batched = isinstance(ids[0], str)        # decoder_text with a batch dimension (decode_batch)
        past = next((i.type for i in sessions["decoder_text"].get_inputs() if i.name == "past_key.0"), "")
        self.kv_dtype = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}.get(past, np.float32)   # fp16
        # compute bundles; --kv-cache int8 (runtimes/ort_kv.py)
        self.slots, self._pool = 1, None

    # ---- opening -------------------------------------------------------------------
    @classmethod
    def available(cls, manifest, device):
        if manifest.get("target", "onnx") not in ("onnx",):
            return False, f"the ort backend runs onnx bundles, not {manifest.get('target')}"
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed"
        provs = [p for p in provider_candidates(device, ort.get_available_providers())]
        return True, f"onnx bundle on onnxruntime {ort.__version__} (providers to try: {', '.join(provs)})"

    @classmethod
    def open(cls, model=None, bundle=None, device="auto", threads=None, log=None, verify=True, slots: int = 1,
             vision_threads: int | None = None, kv_cache: str | None = None):
        """vision_threads: intra-op threads of the stages that turn pixels / image tokens into rows (default
        `threads`; edgemm serve runs them on its side worker beside the decode loop). kv_cache "int8": the
        decoder graphs rewritten to keep an int8 KV cache with the manifest's scales (runtimes/ort_kv.py)."""
        from edgemm.bundle import load_tokenizer, read_manifest, stage_sources, verify_bundle
        from edgemm.config import ModelConfig
        if model is not None or bundle is None:
            raise EdgemmError("the ort backend runs bundles: export one with `edgemm export --target onnx -o DIR` "
                              "and pass --bundle DIR")
        man = verify_bundle(bundle, defer_parsed=True) if verify else read_manifest(bundle)
        if man.get("target") != "onnx":
            raise EdgemmError(f"{bundle} is a {man.get('target')!r} bundle; the ort backend runs onnx bundles")
        mc = man.get("model")
        if not isinstance(mc, dict) or not {"vision", "decoder"} <= set(mc):
            raise EdgemmError(f"bundle {bundle}: the manifest has no model config; re-export it")
        cfg = ModelConfig.from_dict(mc)
        from .base import bundle_stages
        stages = man.get("stages", {})
        names = bundle_stages(cfg, stages)                       # (+ LLaVA-NeXT-Video's pooled frames)
        missing = [s for s in names if s not in stages]
        if missing:
            raise EdgemmError(f"bundle {bundle}: the manifest lists no stage {', '.join(missing)}; re-export it")
        for s in [n for n in names if n.startswith("decoder")]:
            if stages[s].get("graph") != "ort-contrib-gqa":
                raise EdgemmError(f"bundle {bundle}: stage {s} has graph flavour {stages[s].get('graph')!r}; "
                                  "the ort backend runs 'ort-contrib-gqa' decoder graphs")
        tok = load_tokenizer(bundle, man, verify)
        ort = _import_ort()
        # graphs come as the bytes that were hashed (external-data graphs as paths, their locations checked)
        paths = stage_sources(bundle, man, names, verify)
        # fp8 Q/DQ: ONNX Runtime's CPU QDQ fusion would turn them into MatMulIntegerToFloat, which has no fp8
        # kernel; with the fusion off the Q/DQ ops run as written (edgemm.calib.quantize)
        fp8 = any(stages[s].get("precision") == "fp8" for s in names)
        s8 = s8s8_stages(stages, names)
        if s8 and not s8s8_int8_exact():
            paths.update(cls._u8u8(paths, s8, log))
        if kv_cache == "int8":
            from .ort_kv import int8_sources
            paths.update(int8_sources(paths, man, cfg, bundle))
        qdq = [s for s in names if stages[s].get("precision") in ("int8", "fp8")]     # W8A8 / FP8 Q/DQ stages
        sessions, provider = cls._sessions(ort, paths, device, threads, log, disable_qdq_fusion=fp8,
                                           vision_threads=vision_threads, qdq=qdq)
        fp16 = [s for s in names if stages[s].get("precision") == "fp16" and stages[s].get("compute") != "fp16"]
        half = [s for s in names if stages[s].get("compute") == "fp16"]
        if fp16 and provider == "CPUExecutionProvider" and log:
            log(f"note: {', '.join(fp16)} stored in fp16: on the CPU provider ONNX Runtime turns those weights into "
                "fp32 when it loads them (half the file, the memory and speed of fp32); fp16 compute: export "
                "--precision fp16 --device cuda (decoders, for the CUDA provider) or --target trt")
        if half and provider == "CPUExecutionProvider" and log:
            log(f"note: {', '.join(half)} compute in fp16 for the CUDA provider (exported with --device cuda); on the "
                "CPU ONNX Runtime runs their MatMuls in fp32 behind casts (fp16 KV cache and attention): a bundle "
                "exported for the CPU decodes faster here")
        for s in names:
            cls._check_io(bundle, s, stages[s], sessions[s])
        cls._check_shapes(bundle, cfg, sessions)
        b = cls(sessions, man, cfg, tok, provider, bundle)
        own = {np.float32: "f32", np.float16: "f16"}.get(b.kv_dtype)
        if kv_cache not in (None, "int8", own):
            raise EdgemmError(f"--kv-cache {kv_cache}: this bundle's KV cache is {own}; the ort backend takes "
                              f"--kv-cache {own} (its own) or int8")
        b.slots = max(1, int(slots))      # states live at once: with a batched decoder_text, rows of one pool
        return b

    @staticmethod
    def _u8u8(paths: dict, s8: list, log) -> dict:
        """s8s8 int8 stages as u8u8 graphs in memory (the same numbers; exact on x86 CPUs without VNNI, where
        ONNX Runtime's kernels for s8s8 saturate 16-bit pair sums) -> {stage: serialized model}."""
        import onnx
        from edgemm.calib.quantize import to_u8u8
        out = {}
        for s in s8:
            m = onnx.load_from_string(paths[s]) if isinstance(paths[s], bytes) else onnx.load(paths[s])
            if m.ByteSize() > 1_800_000_000:
                raise EdgemmError(f"stage {s} is too large to convert to u8u8 in memory on this CPU (no VNNI); "
                                  "re-export it with int8 weight-only (--precision int8-wo)")
            to_u8u8(m)
            out[s] = m.SerializeToString()
        if log:
            log(f"note: this CPU has no VNNI, where ONNX Runtime's int8 kernels for the bundle's s8s8 Q/DQ saturate; "
                f"running {', '.join(s8)} as u8u8 (the same int8 numbers, computed exactly)")
        return out

    @staticmethod
    def _sessions(ort, paths, device, threads, log, disable_qdq_fusion=False, vision_threads=None, qdq=()):
        def options(n):
            so = ort.SessionOptions()
            so.intra_op_num_threads = n
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")   # placement report below
            if disable_qdq_fusion:
                so.add_session_config_entry("session.disable_quant_qdq", "1")
            return so
        so = options(threads_or_default(threads))
        opts = {s: options(int(vision_threads)) if vision_threads and s in VISION_STAGES else so for s in paths}
        available = ort.get_available_providers()
        cands = provider_candidates(device, available)
        errors = []
        for prov in cands:
            chain = [prov] + (["CUDAExecutionProvider"] if prov == "TensorrtExecutionProvider" and
                              "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
            chain = list(dict.fromkeys(chain))
            try:
                sessions = {s: ort.InferenceSession(p, opts[s], providers=chain,
                                                    **({"disabled_optimizers": QDQ_DISABLED} if s in qdq else {}))
                            for s, p in paths.items()}
            except Exception as e:  # a provider that fails to initialise: try the next one
                errors.append(f"{prov}: {str(e).splitlines()[0][:160]}")
                continue
            got = sessions["decoder_text"].get_providers()[0]
            if got != prov:                      # onnxruntime fell back silently
                errors.append(f"{prov}: did not initialise")
                continue
            if log and prov != "CPUExecutionProvider":       # nodes the chosen provider has no kernel for
                for s, sess in sessions.items():
                    line = placement_line(s, prov, off_provider_nodes(sess.get_provider_graph_assignment_info(), prov))
                    if line:
                        log(line)
            if log:
                if errors or (device == "cuda" and prov == "CPUExecutionProvider"):
                    why = "; ".join(errors) if errors else "no CUDA provider in this onnxruntime"
                    log(f"note: falling back to the CPU ({why})" if prov == "CPUExecutionProvider"
                        else f"note: {why}")
                log(f"ort: provider {prov} (onnxruntime {ort.__version__}, {so.intra_op_num_threads} threads)")
            return sessions, prov
        raise EdgemmError(f"onnxruntime could not open the bundle with any provider: {'; '.join(errors)}")

    @staticmethod
    def _check_io(bundle, stage, spec, sess):
        want_in = [i["name"] for i in spec.get("inputs", [])]
        want_out = [o["name"] for o in spec.get("outputs", [])]
        have_in = [i.name for i in sess.get_inputs()]
        have_out = [o.name for o in sess.get_outputs()]
        if sorted(want_in) != sorted(have_in) or sorted(want_out) != sorted(have_out):
            diff = sorted((set(want_in) ^ set(have_in)) | (set(want_out) ^ set(have_out)))
            raise EdgemmError(f"bundle {bundle}: stage {stage}'s graph I/O names do not match the manifest "
                              f"(differing: {', '.join(diff[:4])}); re-export it")

    @staticmethod
    def _check_shapes(bundle, cfg, sessions):
        """The graphs must have the KV layout and widths of the manifest's config."""
        c = cfg.decoder
        for s in [n for n in cfg.stages if n.startswith("decoder")]:
            ins = {i.name: i.shape for i in sessions[s].get_inputs()}
            n_past = sum(1 for n in ins if n.startswith("past_key."))
            k = ins.get("past_key.0", [None] * 4)
            if n_past != c.n_layers or k[1] != c.cache_heads or k[3] != c.head_dim:
                raise EdgemmError(f"bundle {bundle}: stage {s} has {n_past} layers of KV [{k[1]} heads x {k[3]}], "
                                  f"the manifest's config says {c.n_layers} x [{c.cache_heads} x {c.head_dim}]; "
                                  "re-export it")
        if "decoder_image" not in sessions:            # gated cross-attention: images are not decoder rows
            return
        rows = {i.name: i.shape for i in sessions["decoder_image"].get_inputs()}["image_rows"]
        if rows[-1] != c.d_model:
            raise EdgemmError(f"bundle {bundle}: decoder_image takes rows of width {rows[-1]}, the manifest's "
                              f"config says d_model {c.d_model}; re-export it")

    def describe(self) -> str:
        kv = "" if self.kv_dtype != np.int8 else ", KV cache int8"
        return f"ort ({self.provider}) on {self.device}{kv}"

    # ---- state -------------------------------------------------------------------------
    def new_state(self, max_len: int | None = None) -> State:
        """A cache of `max_len` rows (default the context), grown when a segment needs more (reserve): ONNX
        Runtime's GroupQueryAttention reads the whole buffer every step, so callers size it to need."""
        c = self.cfg.decoder
        n = int(max_len or self.context_length)
        if self.batched and self.slots > 1:        # a row of the slots' pool (sized by the first state, grown)
            if self._pool is None:
                from .kv_pool import KVPool
                self._pool = KVPool(self._ort, self._dev, self.slots, c.n_layers, c.cache_heads, n, c.head_dim,
                                    self.kv_dtype)
            elif self.context_length >= n > self._pool.capacity and self._pool.has_free():
                self._pool.grow(kv_rows(n, self.context_length, self._pool.capacity))
            st = self._pool.take(n)
            if st is not None:
                return st                          # (else a state of its own, stepped alone)
        arrays, vals = self._buffers((1, c.cache_heads, n, c.head_dim))
        return State(cache={"k": vals[0::2], "v": vals[1::2], "capacity": n, "arrays": arrays})

    def _buffers(self, shape, old=None):
        """2 x n_layers KV buffers of `shape` (K, V per layer) -> (numpy arrays on the CPU or None, OrtValues);
        old: the state's cache whose rows are copied in (a grown cache)."""
        c, ov = self.cfg.decoder, self._ort.OrtValue
        if self.device == "cpu":   # numpy-backed buffers: zero-filled, readable in place
            from .kv_pool import aligned_zeros
            arrays = [aligned_zeros(shape, self.kv_dtype) for _ in range(2 * c.n_layers)]
            if old is not None:
                for a, b in zip(arrays, old["arrays"]):
                    a[:, :, : b.shape[2]] = b
            return arrays, [ov.ortvalue_from_numpy(a) for a in arrays]
        if old is None:
            return None, [ov.ortvalue_from_shape_and_type(shape, self.kv_dtype, *self._dev)
                          for _ in range(2 * c.n_layers)]
        vals = []                   # (a grown cache on the device: its rows through the host, once)
        for v in [x for kv in zip(old["k"], old["v"]) for x in kv]:
            host = np.zeros(shape, self.kv_dtype)
            held = v.numpy()
            host[:, :, : held.shape[2]] = held
            vals.append(ov.ortvalue_from_numpy(host, *self._dev))
        return None, vals

    def reserve(self, state: State, rows: int) -> None:
        """Grow the state's cache (its own buffers, or the pool all slots' rows live in) to hold `rows`: a copy
        into buffers of kv_rows(...) rows (doubling, up to the context); its bindings are made again."""
        cap, limit = state.cache["capacity"], self.context_length
        if rows <= cap or rows > limit:
            return
        new = kv_rows(rows, limit, cap)
        pool = state.cache.get("pool")
        if pool is not None:
            pool.row(state)
            pool.grow(new)
            return
        c = self.cfg.decoder
        arrays, vals = self._buffers((1, c.cache_heads, new, c.head_dim), old=state.cache)
        state.cache.update(k=vals[0::2], v=vals[1::2], capacity=new, arrays=arrays)
        state.extra.pop("io", None)

    @property
    def context_length(self) -> int:
        return min(self.cfg.decoder.max_seq_len, self.context_limit or 1 << 62)

    # ---- stages -------------------------------------------------------------------------
    def _encode(self, stage, feeds):
        return self.sess[stage].run(["image_rows"], feeds)[0]

    def _outputs(self, stage, feeds):
        names = [o.name for o in self.sess[stage].get_outputs()]
        ov = self._ort.OrtValue
        return {n: ov.ortvalue_from_numpy(a, *self._dev) for n, a in zip(names, self.sess[stage].run(names, feeds))}

    def _run(self, stage, state, feeds, positions):
        if stage == "decoder_text" and len(positions) == 1 and len(feeds) == 1:
            return self._step(state, feeds["input_ids"], positions)
        total = self._room(state, len(positions))          # (grows the cache first, outside the pool's lock)
        sess = self.sess[stage]
        pool = state.cache.get("pool")
        with pool.using() if pool is not None else nullcontext():      # (the pool does not move meanwhile)
            row = pool.row(state) if pool is not None else None            # (a released state: an error)
            bindings = state.extra.setdefault("io", {})
            io = bindings.get(stage)
            if io is None:        # one binding per state and stage: the KV buffers are bound once, in and out
                io = bindings[stage] = sess.io_binding()
                io.bind_output("logits", "cpu")                # first: get_outputs() follows binding order
                if pool is not None:
                    pool.bind(io, row, 1)
                self._bind_cache(io, state)
            positions = np.asarray(positions, np.int64)
            feeds = {**feeds, "positions": positions[None] if self.batched and stage == "decoder_text" else positions,
                     "seqlens_k": np.array([total - 1], np.int32), "total_sequence_length": np.array(total, np.int32)}
            for name, arr in feeds.items():                    # (feeds stays alive until the run is done)
                if isinstance(arr, self._ort.OrtValue):          # e.g. an image's cross K/V, on the device
                    io.bind_ortvalue_input(name, arr)
                else:
                    io.bind_cpu_input(name, arr)
            sess.run_with_iobinding(io)
            logits = io.get_outputs()[0].numpy()
        state.length = total
        return np.array(logits[0], dtype=np.float32)  # a copy: the bound output buffer is reused by the next call

    def _bind_cache(self, io, state) -> None:
        for i, (k, v) in enumerate(zip(state.cache.get("k", ()), state.cache.get("v", ()))):
            io.bind_ortvalue_input(f"past_key.{i}", k)
            io.bind_ortvalue_input(f"past_value.{i}", v)
            io.bind_ortvalue_output(f"present_key.{i}", k)
            io.bind_ortvalue_output(f"present_value.{i}", v)

    def _step(self, state, ids, positions) -> np.ndarray:
        """One token through decoder_text (the decode loop): a binding made once per state, whose CPU inputs are
        small numpy arrays updated in place and whose logits land in one preallocated buffer, so a step allocates
        and rebinds nothing (measured 0.2-0.8 ms a step on bench-0.5b int4 with fresh bindings)."""
        total = self._room(state, 1)
        pool = state.cache.get("pool")
        with pool.using() if pool is not None else nullcontext():      # (the pool does not move meanwhile)
            row = pool.row(state) if pool is not None else None            # (a released state: an error)
            bindings = state.extra.setdefault("io", {})
            f = bindings.get("decoder_text.step")
            if f is None:
                io = self.sess["decoder_text"].io_binding()
                arrs = {"input_ids": np.zeros((1, 1), np.int64),
                        "positions": np.zeros((1, 1) if self.batched else (1,), np.int64),
                        "seqlens_k": np.zeros(1, np.int32), "total_sequence_length": np.zeros((), np.int32)}
                logits = np.zeros((1, self.cfg.decoder.vocab_size), np.float32)
                io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
                if pool is not None:                             # a row of the slots' pool (serve --parallel)
                    pool.bind(io, row, 1)
                else:
                    self._bind_cache(io, state)
                for name, a in arrs.items():                     # backed by these arrays: updated in place below
                    io.bind_cpu_input(name, a)
                f = bindings["decoder_text.step"] = (io, arrs, logits)
            io, arrs, logits = f
            arrs["input_ids"].flat[0] = int(np.asarray(ids).flat[0])
            arrs["positions"].flat[0] = int(positions[0])
            arrs["seqlens_k"][0] = total - 1
            arrs["total_sequence_length"][...] = total
            self.sess["decoder_text"].run_with_iobinding(io)
            out = logits[0].copy()
        state.length = total
        return out

    def prefill_beside_why(self):
        return None     # concurrent runs of a session are allowed; a pool row being prefilled sits steps out (busy)

    # ---- parallel slots (runtimes/kv_pool.py) ---------------------------------------------------
    def unbatched_why(self) -> str | None:
        return None if self.batched else ("the bundle's decoder_text has no batch dimension (exported without one: "
                                           "gated cross-attention, or the dense MoE form)")

    def pooled(self, state: State) -> bool:
        """Whether a state is a row of the slots' KV pool (so decode_batch steps it with the others)."""
        return self._pool is not None and state.cache.get("pool") is self._pool and state.cache.get("row") is not None

    def decode_batch(self, states, tokens) -> list[np.ndarray]:
        """One token per state: rows of the KV pool in one run of decoder_text (the weights read once for all);
        a bundle without the batch dimension, or states of their own, one after another."""
        if len(states) < 2 or not all(self.pooled(st) for st in states):
            return super().decode_batch(states, tokens)
        c = self.cfg.decoder
        for st in states:                   # a row about to outgrow the pool grows it first (reserve)
            if st.length + 1 > st.cache["capacity"]:
                self.reserve(st, st.length + 1)
        row_feeds = {"input_rows": np.zeros((1, 0, c.d_model), np.float32)} if self._eoi_text() else {}
        return self._pool.step(self.sess["decoder_text"], states, tokens, row_feeds)

    def release(self, state: State) -> None:
        """A pool row goes back to the pool (the state can no longer be used)."""
        if state.cache is not None and state.cache.get("pool") is not None:
            state.cache["pool"].release(state)
