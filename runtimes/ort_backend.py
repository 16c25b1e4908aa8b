"""The `ort` backend: ONNX bundles on ONNX Runtime (TensorRT EP -> CUDA EP -> CPU EP).

The KV cache lives in preallocated OrtValues, one [1, K, cache_len, E] buffer per layer for K and for V, on the
session's device. Each call binds the same buffer as `past_*` input and `present_*` output (I/O binding), and
GroupQueryAttention writes the new rows in place, so a decode step costs attention over the cache, not a copy.
"""
from __future__ import annotations

import os

import numpy as np

from edgemm.cpu import s8s8_int8_exact
from edgemm.errors import EdgemmError
from .base import SegmentRunner, State

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


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


class OrtBackend(SegmentRunner):
    name = "ort"

    def __init__(self, sessions, manifest, cfg, tokenizer, provider, bundle):
        self.sess, self.manifest, self.cfg, self.tokenizer = sessions, manifest, cfg, tokenizer
        self.provider = provider
        self.device = "cpu" if provider == "CPUExecutionProvider" else "cuda"
        self.source = str(bundle)
        self._ort = _import_ort()
        self._dev = ("cpu", 0) if self.device == "cpu" else ("cuda", 0)

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
    def open(cls, model=None, bundle=None, device="auto", threads=None, log=None, verify=True):
        from edgemm.bundle import bundle_path, read_manifest, verify_bundle
        from edgemm.config import ModelConfig
        from edgemm.tokenizer import Tokenizer
        if model is not None or bundle is None:
            raise EdgemmError("the ort backend runs bundles: export one with `edgemm export --target onnx -o DIR` "
                              "and pass --bundle DIR")
        man = verify_bundle(bundle) if verify else read_manifest(bundle)
        if man.get("target") != "onnx":
            raise EdgemmError(f"{bundle} is a {man.get('target')!r} bundle; the ort backend runs onnx bundles")
        mc = man.get("model")
        if not isinstance(mc, dict) or not {"vision", "decoder"} <= set(mc):
            raise EdgemmError(f"bundle {bundle}: the manifest has no model config; re-export it")
        cfg = ModelConfig.from_dict(mc)
        stages, names = man.get("stages", {}), cfg.stages
        missing = [s for s in names if s not in stages]
        if missing:
            raise EdgemmError(f"bundle {bundle}: the manifest lists no stage {', '.join(missing)}; re-export it")
        for s in ("decoder_text", "decoder_image"):
            if stages[s].get("graph") != "ort-contrib-gqa":
                raise EdgemmError(f"bundle {bundle}: stage {s} has graph flavour {stages[s].get('graph')!r}; "
                                  "the ort backend runs 'ort-contrib-gqa' decoder graphs")
        tok = Tokenizer.load(bundle_path(bundle, man.get("tokenizer", "tokenizer.json")))
        ort = _import_ort()
        paths = {s: str(bundle_path(bundle, stages[s]["file"])) for s in names}
        # fp8 Q/DQ: ONNX Runtime's CPU QDQ fusion would turn them into MatMulIntegerToFloat, which has no fp8
        # kernel; with the fusion off the Q/DQ ops run as written (edgemm.calib.quantize)
        fp8 = any(stages[s].get("precision") == "fp8" for s in names)
        from edgemm.safety import check_onnx_external
        for p in paths.values():                  # external data stays inside the bundle, before ORT reads it
            check_onnx_external(p, bundle)
        s8 = s8s8_stages(stages, names)
        if s8 and not s8s8_int8_exact():
            paths.update(cls._u8u8(paths, s8, log))
        sessions, provider = cls._sessions(ort, paths, device, threads, log, disable_qdq_fusion=fp8)
        for s in names:
            cls._check_io(bundle, s, stages[s], sessions[s])
        cls._check_shapes(bundle, cfg, sessions)
        return cls(sessions, man, cfg, tok, provider, bundle)

    @staticmethod
    def _u8u8(paths: dict, s8: list, log) -> dict:
        """s8s8 int8 stages as u8u8 graphs in memory (the same numbers; exact on x86 CPUs without VNNI, where
        ONNX Runtime's kernels for s8s8 saturate 16-bit pair sums) -> {stage: serialized model}."""
        import onnx
        from edgemm.calib.quantize import to_u8u8
        out = {}
        for s in s8:
            m = onnx.load(paths[s])
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
    def _sessions(ort, paths, device, threads, log, disable_qdq_fusion=False):
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if disable_qdq_fusion:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        available = ort.get_available_providers()
        cands = provider_candidates(device, available)
        errors = []
        for prov in cands:
            chain = [prov] + (["CUDAExecutionProvider"] if prov == "TensorrtExecutionProvider" and
                              "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
            chain = list(dict.fromkeys(chain))
            try:
                sessions = {s: ort.InferenceSession(p, so, providers=chain) for s, p in paths.items()}
            except Exception as e:  # a provider that fails to initialise: try the next one
                errors.append(f"{prov}: {str(e).splitlines()[0][:160]}")
                continue
            got = sessions["decoder_text"].get_providers()[0]
            if got != prov:                      # onnxruntime fell back silently
                errors.append(f"{prov}: did not initialise")
                continue
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
        for s in ("decoder_text", "decoder_image"):
            ins = {i.name: i.shape for i in sessions[s].get_inputs()}
            n_past = sum(1 for n in ins if n.startswith("past_key."))
            k = ins.get("past_key.0", [None] * 4)
            if n_past != c.n_layers or k[1] != c.cache_heads or k[3] != c.head_dim:
                raise EdgemmError(f"bundle {bundle}: stage {s} has {n_past} layers of KV [{k[1]} heads x {k[3]}], "
                                  f"the manifest's config says {c.n_layers} x [{c.cache_heads} x {c.head_dim}]; "
                                  "re-export it")
        rows = {i.name: i.shape for i in sessions["decoder_image"].get_inputs()}["image_rows"]
        if rows[-1] != c.d_model:
            raise EdgemmError(f"bundle {bundle}: decoder_image takes rows of width {rows[-1]}, the manifest's "
                              f"config says d_model {c.d_model}; re-export it")

    def describe(self) -> str:
        return f"ort ({self.provider}) on {self.device}"

    # ---- state -------------------------------------------------------------------------
    def new_state(self, max_len: int | None = None) -> State:
        c = self.cfg.decoder
        n = int(max_len or c.max_seq_len)
        shape = (1, c.cache_heads, n, c.head_dim)
        ov = self._ort.OrtValue
        if self.device == "cpu":   # numpy-backed buffers: zero-filled, readable in place
            arrays = [np.zeros(shape, np.float32) for _ in range(2 * c.n_layers)]
            vals = [ov.ortvalue_from_numpy(a) for a in arrays]
        else:
            arrays = None
            vals = [ov.ortvalue_from_shape_and_type(shape, np.float32, *self._dev) for _ in range(2 * c.n_layers)]
        return State(cache={"k": vals[0::2], "v": vals[1::2], "capacity": n, "arrays": arrays})

    @property
    def context_length(self) -> int:
        return self.cfg.decoder.max_seq_len

    # ---- stages -------------------------------------------------------------------------
    def _encode(self, stage, feeds):
        return self.sess[stage].run(["image_rows"], feeds)[0]

    def _run(self, stage, state, feeds, positions):
        total = self._room(state, len(positions))
        sess = self.sess[stage]
        io = state.extra.get(stage)
        if io is None:        # one binding per state and stage: the KV buffers are bound once, in and out
            io = state.extra[stage] = sess.io_binding()
            io.bind_output("logits", "cpu")                # first: get_outputs() follows binding order
            for i, (k, v) in enumerate(zip(state.cache["k"], state.cache["v"])):
                io.bind_ortvalue_input(f"past_key.{i}", k)
                io.bind_ortvalue_input(f"past_value.{i}", v)
                io.bind_ortvalue_output(f"present_key.{i}", k)
                io.bind_ortvalue_output(f"present_value.{i}", v)
        feeds = {**feeds, "positions": np.asarray(positions, np.int64),
                 "seqlens_k": np.array([total - 1], np.int32), "total_sequence_length": np.array(total, np.int32)}
        for name, arr in feeds.items():                    # (feeds stays alive until the run is done)
            io.bind_cpu_input(name, arr)
        sess.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()
        state.length = total
        return np.array(logits[0], dtype=np.float32)  # a copy: the bound output buffer is reused by the next call
