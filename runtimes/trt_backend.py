"""The `trt` backend: TensorRT engines of a `trt` bundle, the KV cache on the GPU.

A `trt` bundle's decoder stages use the graph flavour `onnx-standard-kv-window` (standard ONNX ops only, see
edgemm.export.trt): per layer the cache is an input `cache_key.i` / `cache_value.i` of shape [1, W, K, E]
(rows, heads, head dim: BSNH, so the first W rows of a [1, capacity, K, E] buffer are one contiguous block), the
graph writes the T new rows at `past_len` with ScatterElements, attends with a causal mask over rows
<= past_len + i, and returns the new rows as `new_key.i` / `new_value.i` [1, T, K, E]. The runtime copies them
into its buffer at `past_len`: one buffer per layer, never aliased between an engine's input and output.

Two classes share that cache logic:
- TrtBackend: the engines, with torch CUDA tensors as the I/O and cache buffers (execute_async_v3 on a stream).
- OnnxQdqBackend: the same Q/DQ graphs in ONNX Runtime's CPU provider (numpy buffers). The exporter validates
  with it, tests run it, and `--backend trt --device cpu` uses it to evaluate a trt bundle on a machine
  without a GPU (slow: Q/DQ graphs are emulated in fp32).
"""
from __future__ import annotations

import sys

import numpy as np

from edgemm.cpu import threads_or_default
from edgemm.errors import EdgemmError
from .base import SegmentRunner, State

GRAPH_KV = "onnx-standard-kv-window"
REBUILD = "rebuild them on this machine: edgemm build-engines {bundle} --force"


def _io_names(cfg):
    L = cfg.decoder.n_layers
    return ([f"cache_key.{i}" for i in range(L)], [f"cache_value.{i}" for i in range(L)],
            [f"new_key.{i}" for i in range(L)], [f"new_value.{i}" for i in range(L)])


class _KVWindow(SegmentRunner):
    """Cache bookkeeping shared by the engine and the ONNX Runtime flavours of the trt graphs."""

    manifest: dict = {}

    @property
    def context_length(self) -> int:
        n = int(self.manifest.get("trt", {}).get("max_context") or self.cfg.decoder.max_seq_len)
        return min(n, self.context_limit or n)

    def _alloc(self, shape):                     # -> one zeroed cache buffer
        raise NotImplementedError

    def new_state(self, max_len: int | None = None) -> State:
        c = self.cfg.decoder
        n = int(max_len or self.context_length)
        if n > self.context_length:
            raise EdgemmError(f"a KV cache of {n} rows exceeds this bundle's maximum context "
                              f"({self.context_length}, from its optimization profile)")
        shape = (1, n, c.cache_heads, c.head_dim)
        return State(cache={"k": [self._alloc(shape) for _ in range(c.n_layers)],
                            "v": [self._alloc(shape) for _ in range(c.n_layers)], "capacity": n})

    def _decoder(self, stage, feeds, positions, past_len, window, cache):
        """Run one decoder stage -> (logits [vocab] numpy float32, new_k list, new_v list)."""
        raise NotImplementedError

    def _write(self, buf, start, rows):
        buf[:, start:start + rows.shape[1]] = rows

    def _run(self, stage, state, feeds, positions):
        window = self._room(state, len(positions))
        logits, nk, nv = self._decoder(stage, feeds, np.asarray(positions, np.int64), state.length, window,
                                       state.cache)
        for buf, rows in zip(state.cache["k"], nk):
            self._write(buf, state.length, rows)
        for buf, rows in zip(state.cache["v"], nv):
            self._write(buf, state.length, rows)
        state.length = window
        return logits



def _open_bundle(bundle, verify=True):
    from edgemm.bundle import load_tokenizer, read_manifest, verify_bundle
    from edgemm.config import ModelConfig
    man = read_manifest(bundle)
    if man.get("target") != "trt":
        raise EdgemmError(f"{bundle} is a {man.get('target')!r} bundle; the trt backend runs trt bundles "
                          "(edgemm export --target trt)")
    if verify:
        man = verify_bundle(bundle, defer_parsed=True)
    if (man.get("trt") or {}).get("plugins"):
        raise EdgemmError(f"bundle {bundle}: the manifest names TensorRT plugin libraries; edgemm loads none "
                          "(a plugin is native code run in this process), so it refuses the bundle")
    try:
        cfg = ModelConfig.from_dict(man["model"])
    except (KeyError, TypeError, AttributeError):
        raise EdgemmError(f"bundle {bundle}: the manifest has no model config; re-export it") from None
    stages = man.get("stages", {})
    missing = [s for s in cfg.stages if s not in stages]
    if missing:
        raise EdgemmError(f"bundle {bundle}: the manifest lists no stage {', '.join(missing)}; re-export it")
    for s in [n for n in cfg.stages if n.startswith("decoder")]:
        if stages[s].get("graph") != GRAPH_KV:
            raise EdgemmError(f"bundle {bundle}: stage {s} has graph flavour {stages[s].get('graph')!r}; "
                              f"the trt backend runs {GRAPH_KV!r} decoder graphs")
    tok = load_tokenizer(bundle, man, verify)
    return man, cfg, tok


# --------------------------------------------------------------------------- ONNX Runtime (CPU) flavour
class OnnxQdqBackend(_KVWindow):
    """The Q/DQ graphs of a trt bundle in ONNX Runtime's CPU provider (validation, CPU-only machines)."""
    name = "trt-onnx"
    device = "cpu"

    def __init__(self, sessions, manifest, cfg, tokenizer, source):
        self.sess, self.manifest, self.cfg, self.tokenizer, self.source = sessions, manifest, cfg, tokenizer, source
        self.names = _io_names(cfg)

    @classmethod
    def open(cls, model=None, bundle=None, device="cpu", threads=None, log=None, verify=True):
        from edgemm.bundle import stage_sources
        if model is not None or bundle is None:
            raise EdgemmError("the trt backend runs trt bundles: pass --bundle DIR")
        man, cfg, tok = _open_bundle(bundle, verify)
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise EdgemmError(f"running a trt bundle's graphs on the CPU needs onnxruntime ({e}); "
                              "pip install 'edgemm[cpu]'") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads_or_default(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # ONNX Runtime's extended CPU optimisations fuse FP8 Q/DQ into integer MatMul kernels that reject
        # float8 (MatMulIntegerToFloat); the basic level keeps the graph as written, for every precision.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        from .base import bundle_stages
        srcs = stage_sources(bundle, man, bundle_stages(cfg, man.get("stages", {})), verify)   # the hashed bytes
        sessions = {s: ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]) for s, src in srcs.items()}
        b = cls(sessions, man, cfg, tok, str(bundle))
        if log:
            log(f"trt bundle on onnxruntime {ort.__version__} CPU provider (Q/DQ graphs emulated in fp32; "
                "no TensorRT engines used)")
        return b

    @classmethod
    def available(cls, manifest, device):
        return False, "the CPU emulation of trt bundles runs only when asked for (--backend trt --device cpu)"

    def describe(self) -> str:
        return "trt bundle graphs on onnxruntime (CPU provider)"

    def _alloc(self, shape):
        return np.zeros(shape, np.float32)

    def _encode(self, stage, feeds):
        return self.sess[stage].run(["image_rows"], feeds)[0]

    def _outputs(self, stage, feeds):
        names = [o.name for o in self.sess[stage].get_outputs()]
        return dict(zip(names, self.sess[stage].run(names, feeds)))

    def _decoder(self, stage, feeds, positions, past_len, window, cache):
        ck, cv, nk, nv = self.names
        feeds = {**feeds, "positions": positions, "past_len": np.array([past_len], np.int64)}
        for i in range(len(ck)):
            feeds[ck[i]] = cache["k"][i][:, :window]       # a view: batch 1, BSNH -> contiguous
            feeds[cv[i]] = cache["v"][i][:, :window]
        outs = self.sess[stage].run(["logits", *nk, *nv], feeds)
        L = len(ck)
        return outs[0][0].astype(np.float32, copy=False), outs[1:1 + L], outs[1 + L:1 + 2 * L]


# --------------------------------------------------------------------------- TensorRT engines
def gpu_identity() -> dict | None:
    """{'tensorrt', 'gpu', 'compute_capability'} of this machine, or None without tensorrt + a CUDA GPU."""
    try:
        import tensorrt as trt
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0),
                "compute_capability": f"{major}.{minor}"}
    except Exception as e:      # a broken driver counts as no GPU, and says so (once a process)
        line = (f"edgemm: CUDA present but unusable ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}): "
                "TensorRT engines are neither built nor run; running on the CPU")
        if line not in _SAID:
            _SAID.add(line)
            print(line, file=sys.stderr)
        return None


_SAID: set = set()                  # the lines gpu_identity has printed


def engine_mismatch(engines: dict, here: dict | None) -> str | None:
    """Why the manifest's engines cannot run here (None when they can). Pure; tested on fake identities."""
    if not engines or not engines.get("files"):
        return "the bundle holds no TensorRT engines yet"
    if here is None:
        return "this machine has no TensorRT with a CUDA GPU"
    for key, what in (("gpu", "GPU"), ("compute_capability", "compute capability"),
                      ("tensorrt", "TensorRT version")):
        if str(engines.get(key)) != str(here.get(key)):
            return (f"the engines were built for {what} {engines.get(key)!r}, this machine has {here.get(key)!r} "
                    "(engines are tied to the GPU and the TensorRT version)")
    return None


class TrtBackend(_KVWindow):
    name = "trt"
    device = "cuda"

    def __init__(self, engines, manifest, cfg, tokenizer, source, trt):
        import torch
        self.manifest, self.cfg, self.tokenizer, self.source = manifest, cfg, tokenizer, source
        self.trt, self.torch = trt, torch
        self.engines = engines
        self.ctx = {s: e.create_execution_context() for s, e in engines.items()}
        self.stream = torch.cuda.Stream()
        self.vision_stream = torch.cuda.Stream()    # the vision stages' own: an encode beside the decode loop
        self.names = _io_names(cfg)

    @classmethod
    def available(cls, manifest, device):
        if manifest.get("target") != "trt":
            return False, f"the trt backend runs trt bundles, not {manifest.get('target')}"
        if device == "cpu":
            return False, "--device cpu"
        why = engine_mismatch(manifest.get("trt", {}).get("engines", {}), gpu_identity())
        if why:
            return False, why
        e = manifest["trt"]["engines"]
        return True, f"TensorRT {e['tensorrt']} engines built for this GPU ({e['gpu']}, sm {e['compute_capability']})"

    @classmethod
    def open(cls, model=None, bundle=None, device="auto", threads=None, log=None, verify=True, engines=None):
        """engines: an engines record to load instead of the manifest's (build-engines validates new engines
        before it commits them to the manifest)."""
        from edgemm.bundle import bundle_path, read_verified
        explicit = engines is not None          # build-engines validating the engines it has just written
        if device == "cpu":         # no engines on the CPU: the same graphs on onnxruntime
            return OnnxQdqBackend.open(model=model, bundle=bundle, threads=threads, log=log, verify=verify)
        if model is not None or bundle is None:
            raise EdgemmError("the trt backend runs trt bundles: pass --bundle DIR")
        man, cfg, tok = _open_bundle(bundle, verify)
        here = gpu_identity()
        engines = engines or man.get("trt", {}).get("engines", {})
        if here is None:
            raise EdgemmError("the trt backend needs TensorRT and a CUDA GPU (pip install 'edgemm[gpu]', or "
                              "JetPack's TensorRT on a Jetson); on this machine use --device cpu or --backend ort")
        why = engine_mismatch(engines, here)
        if why:
            raise EdgemmError(f"cannot load the engines of {bundle}: {why}; " + REBUILD.format(bundle=bundle))
        import tensorrt as trt
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        from .base import bundle_stages
        loaded = {}
        for s in bundle_stages(cfg, man.get("stages", {})):
            # engines are executable artefacts: only files the manifest lists and hashes, checked on the very
            # bytes TensorRT deserializes
            rel = engines["files"][s]
            if explicit:
                data = bundle_path(bundle, rel).read_bytes()
            elif rel not in man.get("files", {}):
                raise EdgemmError(f"bundle {bundle}: engine {rel} is not listed and hashed in the manifest; "
                                  "refusing it (" + REBUILD.format(bundle=bundle) + ")")
            else:
                data = read_verified(bundle, rel, man)
            eng = runtime.deserialize_cuda_engine(data)
            if eng is None:
                raise EdgemmError(f"TensorRT could not deserialize the {s} engine of {bundle}; "
                                  + REBUILD.format(bundle=bundle))
            loaded[s] = eng
        if log:
            log(f"trt: TensorRT {trt.__version__} on {here['gpu']} (sm {here['compute_capability']})")
        return cls(loaded, man, cfg, tok, str(bundle), trt)

    def describe(self) -> str:
        return f"trt (TensorRT {self.trt.__version__}) on cuda"

    # ---- buffers --------------------------------------------------------------------------
    def _alloc(self, shape):
        return self.torch.zeros(shape, dtype=self.torch.float32, device="cuda")

    def _write(self, buf, start, rows):
        buf[:, start:start + rows.shape[1]].copy_(rows)

    _DT = None

    def _torch_dtype(self, trt_dtype):
        t, trt = self.torch, self.trt
        table = {trt.float32: t.float32, trt.float16: t.float16, trt.int32: t.int32, trt.int64: t.int64,
                 trt.int8: t.int8, trt.bool: t.bool}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = t.bfloat16
        return table[trt_dtype]

    def _execute(self, stage, inputs: dict) -> dict:
        """inputs: {name: CUDA tensor}; allocates the outputs from the shapes TensorRT infers."""
        eng, ctx, t = self.engines[stage], self.ctx[stage], self.torch
        for name, x in inputs.items():
            ctx.set_input_shape(name, tuple(x.shape))
            ctx.set_tensor_address(name, x.data_ptr())
        outs = {}
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            if eng.get_tensor_mode(name) != self.trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(ctx.get_tensor_shape(name))
            outs[name] = t.empty(shape, dtype=self._torch_dtype(eng.get_tensor_dtype(name)), device="cuda")
            ctx.set_tensor_address(name, outs[name].data_ptr())
        stream = self.vision_stream if stage in ("vision", "image_tokens") else self.stream
        stream.wait_stream(t.cuda.current_stream())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise EdgemmError(f"TensorRT failed to run the {stage} engine")
        t.cuda.current_stream().wait_stream(stream)
        return outs

    def prefill_beside_why(self) -> str | None:
        return "one TensorRT execution context per decoder stage, shared by every slot"

    def _cuda(self, feeds):             # (CUDA tensors, e.g. an image's cross K/V, stay where they are)
        return {n: v if isinstance(v, self.torch.Tensor) else self.torch.from_numpy(np.ascontiguousarray(v)).cuda()
                for n, v in feeds.items()}

    def _encode(self, stage, feeds):
        from edgemm.export.trt_profiles import outside_profile
        why = outside_profile(self.manifest, stage, feeds)
        if why:
            raise EdgemmError(why)
        return self._execute(stage, self._cuda(feeds))["image_rows"].float().cpu().numpy()

    def _outputs(self, stage, feeds):
        return self._execute(stage, self._cuda(feeds))

    def _decoder(self, stage, feeds, positions, past_len, window, cache):
        ck, cv, nk, nv = self.names
        inputs = self._cuda({**feeds, "positions": positions, "past_len": np.array([past_len], np.int64)})
        for i in range(len(ck)):
            inputs[ck[i]] = cache["k"][i][:, :window]            # contiguous view (batch 1, BSNH)
            inputs[cv[i]] = cache["v"][i][:, :window]
        outs = self._execute(stage, inputs)
        logits = outs["logits"][0].float().cpu().numpy()
        return logits, [outs[n] for n in nk], [outs[n] for n in nv]
