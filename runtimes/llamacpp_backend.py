"""The llama.cpp backend: GGUF bundles through llama-cpp-python's low-level API.

Text segments go in as token batches (llama.cpp's cogvlm graph then uses the text branch), the image segment as an
embedding batch (the vision branch: llama.cpp routes per batch). One llama context holds the one KV cache;
rewinds are `llama_memory_seq_rm`. The image rows come from the bundle's mmproj through mtmd (llama.cpp's own
vision code) when the pixels are an image at the tower's size (what edgemm's preprocessing produces); other pixel
arrays run the same mmproj weights through the reference modules (`vision_source` says which ran last).

LLaVA bundles (llama.cpp's llama / qwen2 decoder, an `mlp` mmproj) run the same way, one set of weights for both
batch kinds; where the export found llama.cpp's llava graph misordering CLIP's CLS row (ggml-org/llama.cpp#25814)
the image rows come from the mmproj's weights through the reference code, as do LLaVA-NeXT's tiles (the host
packs them: edgemm.anyres, with the manifest's newline row). Gemma 3 bundles (llama.cpp's gemma3 decoder, projector
gemma3) take mtmd's pooled rows between the <start_of_image> / <end_of_image> token rows (image_bounds), the rows
between them decoded in one non-causal batch as mtmd's own helper does.

A bundle whose vision stage is an ONNX graph (stages.vision.format "onnx": a vision side llama.cpp has no graph for,
edgemm.blocks.support.gguf_vision, or one exported with vision="onnx") runs it in ONNX Runtime's CPU provider in
this process (OnnxVision: bounded threads, no spinning) and feeds its rows to llama.cpp as an embedding batch.

LlamaRunner / MtmdVision (runtimes/llamacpp_runner.py) and OnnxVision / reference_vision_from_mmproj
(runtimes/gguf_vision.py) are shared with the GGUF exporter's validation.
"""
from __future__ import annotations

import numpy as np

from edgemm.cpu import threads_or_default
from edgemm.errors import EdgemmError
from edgemm.blocks.kv_rows import kv_rows
from .base import Backend, State
from .gguf_vision import OnnxVision, pixels_to_rgb, reference_vision_from_mmproj
from .llamacpp_runner import CTX_BLOCK, LlamaRunner, MtmdVision, image_bounds, markers

from edgemm.llamacpp import KV_BLOCK, KV_TYPES, NO_GPU, gpu_offload, load_llama_cpp


FIRST_CTX = 512         # rows of a single-sequence context until a state asks for more (then sized to need)
_SAID_CPU = []          # auto on a CPU-only llama.cpp: said once per process


def use_gpu(ll, device: str, log=None) -> bool:
    """--device for the llamacpp backend -> whether to offload: cuda needs a GPU backend in the loaded llama.cpp
    (refused in one line without one), auto takes one where there is one, else runs on the CPU and says so once."""
    if gpu_offload(ll):
        return device != "cpu"
    if device == "cuda":
        raise EdgemmError(f"--device cuda: {NO_GPU}")
    if device == "auto" and log and not _SAID_CPU:
        _SAID_CPU.append(True)
        log("note: this llama.cpp build has no GPU backend: the llamacpp backend runs on the CPU")
    return False


class LlamaCppBackend(Backend):
    name = "llamacpp"
    kv_caches = tuple(KV_TYPES)             # --kv-cache

    def __init__(self, bundle, manifest, threads=None, f32_kv=None, flash_attn=False, log=None, n_seq: int = 1,
                 kv_cache: str | None = None, gpu: bool = False, mmproj_offload: bool = True,
                 context: int | None = None, vision_threads: int | None = None):
        """vision_threads: mtmd's / the ONNX vision stage's threads (default `threads`; edgemm serve encodes on its
        side worker beside llama_decode). context: rows per sequence (default the model's max_seq_len; edgemm serve --context).
        kv_cache: f16 / q8_0 / q4_0 (None: f32 for an f32 decoder, else f16); a quantized cache turns flash
        attention on (llama.cpp's quantized V needs it). gpu: all decoder layers on the GPU, and the projector
        too unless mmproj_offload is False (LlamaCppBackend.open decides it from --device)."""
        from edgemm.bundle import PinnedFile, load_tokenizer
        from edgemm.config import ModelConfig
        self.bundle, self.manifest, self.log = str(bundle), manifest, log
        self.cfg = ModelConfig.from_dict(manifest["model"])
        self.tokenizer = load_tokenizer(bundle, manifest, verified=True)
        st = manifest["stages"]
        self.threads = threads_or_default(threads)
        self.vision_threads = int(vision_threads or self.threads)
        self._onnx_vision = None
        onnx_vision = st["vision"].get("format") == "onnx"
        if onnx_vision:         # the ONNX vision stage parsed from the bytes that were hashed (edgemm.bundle)
            from edgemm.bundle import stage_sources
            self._onnx_vision = OnnxVision(stage_sources(bundle, manifest, ["vision"], True)["vision"], self.cfg,
                                           self.vision_threads, st["vision"]["file"], st["vision"])
        # the GGUF files hashed through the descriptors llama.cpp then reads (open() verified the rest)
        self._pinned = [PinnedFile(bundle, st[s]["file"], manifest)
                        for s in ("decoder",) + (() if onnx_vision else ("vision",))]
        self.decoder_path = self._pinned[0].path
        self.mmproj_path = None if onnx_vision else self._pinned[1].path
        # an f32 bundle gets an f32 KV cache (exact); quantized ones the usual f16 cache
        if f32_kv is None:
            f32_kv = st["decoder"].get("precision") == "f32"
        if kv_cache not in (None, "f32", "f16"):
            head = self.cfg.decoder.head_dim
            if head % KV_BLOCK:
                raise EdgemmError(f"--kv-cache {kv_cache}: llama.cpp stores it in blocks of {KV_BLOCK} values and "
                                  f"this model's attention heads are {head} wide; use --kv-cache f16")
            flash_attn = True                   # llama.cpp refuses a quantized V cache without flash attention
        # one sequence (run, chat, eval, bench): the context starts at FIRST_CTX rows and is sized to what each
        # new_state asks, grown (a copy: LlamaRunner.resize) when a sequence outgrows it; llama.cpp decodes
        # faster in a context sized to need (the plain loop at n_ctx 512 1.10x that at 4096 on bench-0.5b).
        # Several (edgemm serve --parallel N): every slot's sequence keeps the whole context (--context N) from
        # the start, as llama-server's slots do: growing one context re-creates it with every slot's cache
        # copied, which would stall all the streams, and the server cannot know the next request's length
        self.n_ctx_limit = min(context or 1 << 62, self.cfg.decoder.max_seq_len)
        first = self.n_ctx_limit if n_seq > 1 else min(self.n_ctx_limit, FIRST_CTX)
        self.runner = LlamaRunner(self.decoder_path, first, self.threads,
                                  n_batch=max(512, self.cfg.n_image_rows), f32_kv=f32_kv, flash_attn=flash_attn,
                                  n_seq=n_seq, kv_type=kv_cache, n_gpu_layers=-1 if gpu else 0,
                                  mrope=bool(self.cfg.decoder.mrope_section))
        self.kv_grows = n_seq == 1
        if self.kv_grows:
            self.runner.max_ctx = self.n_ctx_limit
        self.source = self.bundle
        self.device = "cuda" if gpu else "cpu"
        self.mmproj_offload = gpu and mmproj_offload
        self._mtmd = None
        self._ref_vision = None
        self._why_reference = None
        self.vision_source = None
        self._owner = [None] * n_seq        # seq id -> the id of the state that holds it
        self._next_id = 0

    @classmethod
    def open(cls, model=None, bundle=None, device="auto", threads=None, log=None, slots: int = 1,
             kv_cache: str | None = None, mmproj_offload: bool = True, context: int | None = None,
             vision_threads: int | None = None):
        """slots: how many states may be live at once (llama.cpp sequences in one context; `edgemm serve
        --parallel N`); a new_state beyond them takes over the sequence of the oldest. device: cuda / auto offload
        every layer (and the projector unless mmproj_offload is False) where the loaded llama.cpp has a GPU
        backend; cuda without one is refused, auto then runs on the CPU and says so once."""
        from edgemm.bundle import verify_bundle
        if bundle is None:
            raise EdgemmError("the llamacpp backend runs GGUF bundles: export one with "
                              "`edgemm export --target gguf` and pass --bundle")
        gpu = use_gpu(load_llama_cpp(), device, log)
        m = verify_bundle(bundle, defer_parsed=True)       # the parsed files are hashed as they are read
        if m.get("target") != "gguf":
            raise EdgemmError(f"{bundle} is a {m.get('target')} bundle; the llamacpp backend runs gguf bundles")
        return cls(bundle, m, threads=threads, log=log, n_seq=max(1, int(slots)), kv_cache=kv_cache, gpu=gpu,
                   mmproj_offload=mmproj_offload, context=context, vision_threads=vision_threads)

    @classmethod
    def available(cls, manifest, device):
        if manifest.get("target") != "gguf":
            return False, "not a gguf bundle"
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return False, "llama-cpp-python is not installed (pip install 'edgemm[gguf]')"
        return True, "a gguf bundle runs on llama.cpp (llama-cpp-python)"

    @property
    def context_length(self) -> int:
        return self.n_ctx_limit

    def describe(self) -> str:
        gpu = (f"all layers offloaded, projector on the {'GPU' if self.mmproj_offload else 'CPU (--no-mmproj-offload)'}"
               ", " if self.device == "cuda" else "")
        return (f"llamacpp on {self.device} ({gpu}{self.threads} threads, KV cache {self.runner.kv_type}"
                f"{', flash attention' if self.runner.flash_attn else ''}, "
                f"decoder {self.manifest['stages']['decoder'].get('precision')}, "
                f"vision rows from {self.vision_source or ('onnx' if self._onnx_vision else 'mtmd (mmproj)')})")

    # ---- protocol ------------------------------------------------------------------------------
    def new_state(self, max_len: int | None = None) -> State:
        """A sequence of the context: a free one, else the one held longest (its old state is then refused)."""
        self._next_id += 1
        free = [i for i, o in enumerate(self._owner) if o is None]
        seq = free[0] if free else min(range(len(self._owner)), key=lambda i: self._owner[i])
        self.runner.clear(seq)
        self._owner[seq] = self._next_id
        st = State(cache=(seq, self._next_id))
        self.reserve(st, int(max_len or self.context_length))
        return st

    def reserve(self, state: State, rows: int) -> None:
        """One sequence: a bigger context (LlamaRunner.resize, the cache copied) when `rows` exceed it; with
        several the context is fixed (see __init__)."""
        r = self.runner
        if r.n_ctx < rows <= r.max_ctx:
            r.resize(kv_rows(rows, r.max_ctx, block=CTX_BLOCK))

    def release(self, state: State) -> None:
        """Give a state's sequence back (serving: a finished request frees its slot)."""
        seq, sid = state.cache
        if self._owner[seq] == sid:
            self.runner.clear(seq)
            self._owner[seq] = None

    def _sync(self, state: State) -> int:
        seq, sid = state.cache
        if self._owner[seq] != sid:
            raise EdgemmError("this llamacpp state's KV cache was taken over by a newer new_state() (more live "
                              "states than the backend's slots); replay the conversation into a new state")
        if state.length > self.runner.lengths[seq]:
            raise EdgemmError(f"state length {state.length} is past the KV cache ({self.runner.lengths[seq]} rows)")
        self.runner.rewind(state.length, seq)
        return seq

    rides = True            # (Backend.riding: a text piece in the decode step's llama_decode)
    _riding = False         # inside riding(): text() records its piece
    _ride = None            # the recorded piece: (seq, ids, pos, Ridden)

    def riding(self):
        import contextlib

        @contextlib.contextmanager
        def on():
            self._riding = True
            try:
                yield
            finally:
                self._riding = False
        return on()

    def ride_pending(self) -> bool:
        return self._ride is not None

    def flush_ride(self) -> None:
        ride, self._ride = self._ride, None
        if ride is not None:
            seq, ids, pos, out = ride
            out.value = self.runner.decode_tokens(ids, pos, seq)

    def text(self, state: State, ids) -> np.ndarray:
        seq = self._sync(state)
        ids = list(ids)
        if (self._riding and self._ride is None and ids
                and len(ids) + len(self._owner) <= self.runner.n_batch):
            from .base import Ridden
            out = Ridden()
            self._ride = (seq, ids, state.pos, out)     # (run by the next decode_batch, or flush_ride)
            state.length += len(ids)
            state.pos += len(ids)
            return out
        logits = self.runner.decode_tokens(ids, state.pos, seq)
        state.length += len(ids)
        state.pos += len(ids)
        return logits

    def unbatched_why(self) -> str | None:
        return None                 # decode_batch: every sequence in one llama_decode

    def prefill_beside_why(self) -> str | None:
        return "one llama context holds every slot's sequence, and it runs one llama_decode at a time"

    def decode_batch(self, states, tokens) -> list[np.ndarray]:
        """One token per state, all in one llama_decode (the weights are read once for every sequence)."""
        ride, self._ride = self._ride, None     # a prefill piece riding this step (Backend.riding)
        items = [(self._sync(st), t, st.pos) for st, t in zip(states, tokens)]
        out, last = self.runner.decode_step(items, None if ride is None else ride[:3])
        self.ride_rows = 0 if ride is None else len(ride[1])
        if ride is not None:
            ride[3].value = last
        for st in states:
            st.length += 1
            st.pos += 1
        return out

    def image(self, state: State, rows) -> np.ndarray:
        from .base import last
        return last(self._image_pieces(state, rows, None))

    def _put_rows(self, state: State, rows, positions=None) -> np.ndarray:
        seq = self._sync(state)
        rows = np.asarray(rows, np.float32)
        rows = rows.reshape(-1, rows.shape[-1])
        logits = self.runner.decode_embd(rows, state.pos, seq, self.cfg.decoder.image_bidirectional, positions)
        state.length += rows.shape[0]
        state.pos += rows.shape[0]
        return logits

    def _image_pieces(self, state: State, rows, chunk):
        """An image appends in pieces as text does (prefill). Its rows sit at sequential positions, or with M-RoPE
        (Qwen2-VL) at (p, p + i, p + j) over their grid, the text after the image at p + max(rows, cols)."""
        from .base import _pieces
        mrope = None
        if self.cfg.decoder.mrope_section:
            from edgemm.qwen2vl_pixels import image_positions
            mrope = image_positions(state.pos, rows)        # [3, n] from the rows' grid (qwen2vl_pixels.GridRows)
        rows = np.asarray(rows, np.float32).reshape(1, -1, np.shape(rows)[-1])
        if mrope is None:
            yield from _pieces(lambda a, b: self._put_rows(state, rows[:, a:b]), rows.shape[1], chunk)
            return

        def piece(a, b):
            out = self._put_rows(state, rows[:, a:b], mrope[:, a:b])
            state.pos = int(mrope[:, :b].max()) + 1
            return out
        yield from _pieces(piece, rows.shape[1], chunk)

    def vision(self, pixels, *instruction) -> np.ndarray:
        if self._onnx_vision is not None:            # the bundle's ONNX vision stage (OnnxVision)
            self.vision_source = f"onnx ({self.manifest['stages']['vision']['file']})"
            return self._onnx_vision.rows(pixels, *instruction)
        if instruction:
            raise EdgemmError("only InstructBLIP's vision stage takes an instruction")
        rgb = pixels_to_rgb(pixels, self.cfg.vision)
        # a LLaVA bundle exported where llama.cpp's llava graph had the CLS-order defect (ggml-org/llama.cpp#25814)
        # gets its rows from the mmproj's weights through the reference code instead of mtmd
        if self.manifest.get("validation", {}).get("mtmd_cls_order_defect"):
            rgb = None
            self._why_reference = "llama.cpp's llava graph misorders CLIP's CLS row (ggml-org/llama.cpp#25814)"
        elif self.cfg.vision.grid_pinpoints:        # tiles: the host tiles and packs (edgemm.anyres), not mtmd
            rgb = None
            self._why_reference = "any-resolution tiles are packed on the host"
        elif self.cfg.vision.tiling == "smolvlm":   # mtmd takes whole images and tiles them itself
            rgb = None
            self._why_reference = "SmolVLM's tiles are cut on the host (mtmd tiles a whole image by its own rules)"
        if rgb is not None:
            qwen = self.cfg.vision.tiling == "qwen2vl"      # any size: mtmd keeps the size the host gave it
            if self._mtmd is None:
                from edgemm.qwen2vl_pixels import max_rows
                self._mtmd = MtmdVision(self.mmproj_path, self.runner, self.vision_threads,
                                        use_gpu=self.mmproj_offload,
                                        around=image_bounds(self.cfg, self.tokenizer, self.runner),
                                        max_rows=max_rows(self.cfg) if qwen else 0)
            self.vision_source = "mtmd (mmproj)"
            rows = self._mtmd.encode_rgb(rgb)[None]
            if qwen and rows.shape[1] != (want := rgb.shape[0] * rgb.shape[1] // (self.cfg.vision.patch_size
                                                                                  * self.cfg.vision.merge_size) ** 2):
                raise EdgemmError(f"mtmd encoded the {rgb.shape[1]}x{rgb.shape[0]} image into {rows.shape[1]} rows, "
                                  f"not the {want} of its grid")
            return rows
        import torch
        if self._ref_vision is None:
            self._ref_vision = reference_vision_from_mmproj(self.mmproj_path, self.cfg,
                                                            markers(self.cfg, self.runner))
            if self.log:
                why = self._why_reference or "these pixels are not an 8-bit image, which mtmd needs"
                self.log(f"note: {why}; computing the image rows from the mmproj's weights with the reference "
                         "vision code")
        tower, adapter = self._ref_vision
        self.vision_source = "reference code with the mmproj weights"
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
            return adapter(tower(x)).float().numpy()

    def image_newline(self) -> np.ndarray:
        from .base import SegmentRunner
        return SegmentRunner.image_newline(self)         # the manifest's `anyres` row, as the onnx / trt bundles

    def close(self):
        if self._mtmd is not None:
            self._mtmd.close()
            self._mtmd = None
        self._onnx_vision = None
        self.runner.close()
