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

The helpers LlamaRunner / MtmdVision / OnnxVision are shared with the GGUF exporter's validation.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from edgemm.cpu import threads_or_default
from edgemm.errors import EdgemmError
from .base import Backend, State

from edgemm.llamacpp import (GGML_CPU, KV_BLOCK, KV_TYPES, NO_GPU, QUANTIZED_V_NEEDS_FA, gpu_offload,  # noqa: F401
                             import_llama_cpp, load_llama_cpp)                                  # (GGML_CPU: doctor)


class LlamaRunner:
    """One llama model + context driven batch by batch. The context holds `n_seq` sequences (KV caches of
    `n_ctx` rows each, llama.cpp's seq ids 0..n_seq-1); every call names its sequence (default 0)."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int | None = None, n_batch: int = 512,
                 f32_kv: bool = True, flash_attn: bool = False, verbose: bool = False, n_seq: int = 1,
                 kv_type: str | None = None, n_gpu_layers: int = 0):
        """kv_type: f32 / f16 / q8_0 / q4_0 for both K and V (default f32, or f16 with f32_kv False); a quantized V
        needs flash_attn (llama.cpp refuses the context otherwise: said in one line). n_gpu_layers: decoder layers
        on the GPU (-1: all; 0, the default, keeps everything on the CPU where an offloading build would
        otherwise take all layers)."""
        from edgemm.safety import check_gguf
        check_gguf(path)                       # bounded header checks before llama.cpp's loader sees the file
        self.ll = ll = load_llama_cpp(verbose)
        self.path = str(path)
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model = ll.llama_model_load_from_file(self.path.encode(), mp)
        if not self.model:
            raise EdgemmError(f"llama.cpp could not load {path}; is it a GGUF decoder of this llama.cpp version?")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_embd = ll.llama_model_n_embd(self.model)
        self.threads = threads_or_default(threads)
        self.n_batch = n_batch
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq            # not unified: each sequence gets n_ctx cells of its own
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        cp.kv_unified = False
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        kv_type = kv_type or ("f32" if f32_kv else "f16")
        if kv_type not in KV_TYPES:
            raise EdgemmError(f"KV cache type {kv_type!r}: choose one of {', '.join(KV_TYPES)}")
        cp.type_k = cp.type_v = KV_TYPES[kv_type][0]
        cp.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            ll.llama_model_free(self.model)
            self.model = None
            if kv_type.startswith("q") and not flash_attn:
                raise EdgemmError(f"KV cache {kv_type}: {QUANTIZED_V_NEEDS_FA} (llama_init_from_model refused "
                                  "the context); enable flash attention or use an f16 KV cache")
            raise EdgemmError(f"llama.cpp could not create a context for {path} (n_ctx {n_ctx}, KV cache {kv_type}, "
                              f"flash attention {'on' if flash_attn else 'off'})")
        self.n_ctx = ll.llama_n_ctx(self.ctx) // n_seq
        self.n_seq = n_seq
        self.mem = ll.llama_get_memory(self.ctx)
        self.kv_type = kv_type
        self.flash_attn = flash_attn
        self._tok_batch = ll.llama_batch_init(n_batch, 0, 1)
        self._emb_batch = ll.llama_batch_init(n_batch, self.n_embd, 1)
        self.lengths = [0] * n_seq   # rows in each sequence's KV cache

    @property
    def length(self) -> int:
        return self.lengths[0]

    # ---- cache ---------------------------------------------------------------------------------
    def clear(self, seq: int | None = None):
        if seq is None:
            self.ll.llama_memory_clear(self.mem, True)
            self.lengths = [0] * self.n_seq
        else:
            self.rewind(0, seq)

    def rewind(self, length: int, seq: int = 0):
        if length < self.lengths[seq]:
            self.ll.llama_memory_seq_rm(self.mem, seq, length, -1)
            self.lengths[seq] = length

    # ---- decoding ------------------------------------------------------------------------------
    def _run(self, batch, n: int, pos0: int, last: bool, seq: int = 0):
        for i in range(n):
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            # every row of the final batch is an output: llama.cpp's cogvlm graph does not select the output rows
            # (no inp_out_ids), so it hands back the *first* n_outputs rows of the batch
            batch.logits[i] = 1 if last else 0
        batch.n_tokens = n
        rc = self.ll.llama_decode(self.ctx, batch)
        if rc != 0:
            raise EdgemmError(f"llama_decode failed (code {rc}) at cache length {self.lengths[seq]}, {n} rows")
        self.lengths[seq] += n

    def _logits(self, i: int = -1) -> np.ndarray:
        ptr = self.ll.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def _check_room(self, n: int, seq: int = 0):
        if self.lengths[seq] + n > self.n_ctx:
            raise EdgemmError(f"the llama.cpp context is full: {self.lengths[seq]} + {n} rows > {self.n_ctx}")

    def decode_tokens(self, ids, pos0: int, seq: int = 0) -> np.ndarray:
        ids = list(ids)
        if not ids:
            raise EdgemmError("empty text segment")
        self._check_room(len(ids), seq)
        b = self._tok_batch
        for s in range(0, len(ids), self.n_batch):
            chunk = ids[s:s + self.n_batch]
            for i, t in enumerate(chunk):
                b.token[i] = int(t)
            self._run(b, len(chunk), pos0 + s, s + len(chunk) == len(ids), seq)
        return self._logits()

    def decode_embd(self, rows: np.ndarray, pos0: int, seq: int = 0, bidirectional: bool = False) -> np.ndarray:
        """An embedding batch. bidirectional (Gemma 3's image segment: boi, rows, eoi): the rows between the first and
        the last attend to each other both ways, in one non-causal batch as mtmd's helper decodes an image
        (mtmd_decode_use_non_causal), boi and eoi causally as the tokens llama.cpp puts around it."""
        rows = np.ascontiguousarray(np.asarray(rows, np.float32).reshape(-1, self.n_embd))
        n = rows.shape[0]
        if bidirectional and n > 2:
            if n - 2 > self.n_batch:
                raise EdgemmError(f"an image of {n - 2} rows attending both ways needs one batch; n_batch is "
                                  f"{self.n_batch}")
            self.decode_embd(rows[:1], pos0, seq)
            self.ll.llama_set_causal_attn(self.ctx, False)
            try:
                self.decode_embd(rows[1:-1], pos0 + 1, seq)
            finally:
                self.ll.llama_set_causal_attn(self.ctx, True)
            return self.decode_embd(rows[-1:], pos0 + n - 1, seq)
        self._check_room(n, seq)
        b = self._emb_batch
        for s in range(0, n, self.n_batch):
            chunk = np.ascontiguousarray(rows[s:s + self.n_batch])
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            self._run(b, chunk.shape[0], pos0 + s, s + chunk.shape[0] == n, seq)
        return self._logits()

    def decode_step(self, items) -> list[np.ndarray]:
        """One token for each of several sequences in one llama_decode: items [(seq, token, pos)] -> logits."""
        b = self._tok_batch
        for i, (seq, t, pos) in enumerate(items):
            self._check_room(1, seq)
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), int(pos), 1, 1
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise EdgemmError(f"llama_decode failed (code {rc}) for a batch of {len(items)} sequences")
        for seq, _, _ in items:
            self.lengths[seq] += 1
        return [self._logits(i) for i in range(len(items))]

    def token_rows(self, ids) -> np.ndarray:
        """The decoder file's token_embd rows of `ids` (dequantized as llama.cpp's get_rows reads them) -> [n, D]."""
        from gguf import GGUFReader
        from gguf.quants import dequantize
        t = next(t for t in GGUFReader(self.path).tensors if t.name == "token_embd.weight")
        return np.stack([dequantize(np.asarray(t.data[int(i)]), t.tensor_type).reshape(-1) for i in ids]).astype(
            np.float32)

    # ---- tokenizer -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self.ll.llama_token * cap)()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise EdgemmError(f"llama_tokenize needs {-n} tokens")
        return list(buf[:n])

    def close(self):
        ll = getattr(self, "ll", None)
        if ll is None:
            return
        for attr in ("_tok_batch", "_emb_batch"):
            if getattr(self, attr, None) is not None:
                ll.llama_batch_free(getattr(self, attr))
                setattr(self, attr, None)
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            ll.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class MtmdVision:
    """The mmproj through llama.cpp's mtmd: an RGB image at the tower's size -> image rows [P + 2, D]."""

    def __init__(self, mmproj: str | Path, runner: LlamaRunner, threads: int | None = None, use_gpu: bool = False,
                 around: tuple | None = None):
        """around: (first, last) rows put around mtmd's (Gemma 3's boi / eoi: image_bounds), or None."""
        from llama_cpp import mtmd_cpp
        self.around = around
        from edgemm.safety import check_gguf
        check_gguf(mmproj)
        self.m = mtmd_cpp
        self.runner = runner          # mtmd keeps a pointer to the text model: keep it alive
        p = mtmd_cpp.mtmd_context_params_default()
        p.use_gpu = use_gpu             # the projector on the GPU (llama-server: on unless --no-mmproj-offload)
        p.print_timings = False
        p.n_threads = threads or runner.threads
        p.flash_attn_type = runner.ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.warmup = False
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), runner.model, p)
        if not self.ctx:
            raise EdgemmError(f"llama.cpp's mtmd could not load the mmproj {mmproj}")
        self.marker = mtmd_cpp.mtmd_default_marker()

    def encode_rgb(self, rgb: np.ndarray) -> np.ndarray:
        m = self.m
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w, _ = rgb.shape
        bmp = m.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        try:
            txt = m.mtmd_input_text()
            txt.text = self.marker
            txt.text_len = len(self.marker)
            txt.add_special = False
            txt.parse_special = False
            arr = (m.mtmd_bitmap_p_ctypes * 1)(bmp)
            rc = m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(txt), arr, 1)
            if rc != 0:
                raise EdgemmError(f"mtmd_tokenize failed (code {rc})")
            for i in range(m.mtmd_input_chunks_size(chunks)):
                ch = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(ch) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n = m.mtmd_input_chunk_get_n_tokens(ch)
                    rc = m.mtmd_encode_chunk(self.ctx, ch)
                    if rc != 0:
                        raise EdgemmError(f"mtmd_encode_chunk failed (code {rc})")
                    ptr = m.mtmd_get_output_embd(self.ctx)
                    rows = np.ctypeslib.as_array(ptr, shape=(n * self.runner.n_embd,)).reshape(
                        n, self.runner.n_embd).astype(np.float32, copy=True)
                    return rows if self.around is None else np.concatenate(
                        [self.around[0][None], rows, self.around[1][None]])
            raise EdgemmError("mtmd produced no image chunk")
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bmp)

    def close(self):
        if getattr(self, "ctx", None):
            self.m.mtmd_free(self.ctx)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def markers(cfg, runner: LlamaRunner):
    """SmolVLM's connector marker rows (adapter.marker_ids) from the decoder's token_embd, or None."""
    return runner.token_rows(cfg.adapter.marker_ids) if cfg.adapter.kind == "pixel_shuffle_linear" else None


def image_bounds(cfg, tok, runner: LlamaRunner) -> tuple | None:
    """Gemma 3 (adapter gemma3): the boi / eoi rows of its image segment, the <start_of_image> / <end_of_image>
    token rows of the decoder file times embed_scale (llama.cpp's gemma3 graph scales token batches by
    sqrt(n_embd), not embedding batches). None for other models (their mtmd rows are the whole segment)."""
    if cfg.adapter.kind != "gemma3":
        return None
    from edgemm.families.gemma3 import BOI, EOI
    ids = [tok.tok.token_to_id(t) for t in (BOI, EOI)]
    if None in ids:
        raise EdgemmError(f"the tokenizer has no {BOI} / {EOI} token")
    boi, eoi = runner.token_rows(ids) * np.float32(cfg.decoder.embed_scale)
    return boi, eoi


class OnnxVision:
    """A gguf bundle's ONNX vision stage on ONNX Runtime's CPU provider, beside llama.cpp in one process: intra-op
    threads bounded to the backend's, one inter-op thread, and spinning off (session.intra_op.allow_spinning 0):
    after an image ONNX Runtime's workers sleep instead of spinning on the cores llama.cpp's threads decode on."""

    def __init__(self, source, cfg, threads: int, name: str = "vision.onnx", spec: dict | None = None):
        """source: the graph's bytes (hashed as read: edgemm.bundle.stage_sources) or path."""
        import onnxruntime as ort
        self.cfg = cfg
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.options = so
        try:
            self.sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        except Exception as e:               # a graph ONNX Runtime cannot parse or run: one line, no traceback
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise EdgemmError(f"ONNX Runtime could not load the vision stage {name} ({why}); re-export the bundle") \
                from None
        if spec is not None:
            from .ort_backend import OrtBackend
            OrtBackend._check_io(name, "vision", spec, self.sess)

    def rows(self, pixels, *instruction) -> np.ndarray:
        from .base import vision_feeds
        return self.sess.run(["image_rows"], vision_feeds(self.cfg, pixels, instruction))[0]


def pixels_to_rgb(pixels: np.ndarray, vision_cfg) -> np.ndarray | None:
    """Invert edgemm's normalisation: pixels [1, 3, S, S] -> uint8 [S, S, 3], or None when the pixels are not
    exactly an 8-bit image (then mtmd, which takes 8-bit images, cannot reproduce them)."""
    x = np.asarray(pixels, np.float32)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        return None
    mean = np.asarray(vision_cfg.image_mean, np.float32)[:, None, None]
    std = np.asarray(vision_cfg.image_std, np.float32)[:, None, None]
    v = (x[0] * std + mean) * 255.0
    u8 = np.clip(np.rint(v), 0, 255).astype(np.uint8)
    back = (u8.astype(np.float32) / 255.0 - mean) / std
    if np.max(np.abs(back - x[0])) > 1e-5:
        return None
    return np.ascontiguousarray(u8.transpose(1, 2, 0))


def _llava_vision_from_tensors(t: dict, cfg):
    """edgemm's ClipVisionTower + LLaVA projector from the tensors of an mlp-projector mmproj (export/gguf_tensors.py's
    write_llava_mmproj_gguf)."""
    import torch
    from edgemm.blocks import registry
    from edgemm.model import ClipVisionTower
    v = cfg.vision
    tower, proj = ClipVisionTower(v), registry.get("connector", cfg.adapter.kind).from_config(cfg)
    sd = {"patch_embed.weight": t["v.patch_embd.weight"].reshape(v.width, 3, v.patch_size, v.patch_size),
          "cls": t["v.class_embd"].reshape(1, 1, v.width),
          "pos": t["v.position_embd.weight"].reshape(1, v.n_patches + 1, v.width),
          "pre_norm.weight": t["v.pre_ln.weight"], "pre_norm.bias": t["v.pre_ln.bias"]}
    up, down = ("ffn_down", "ffn_up") if v.mlp_dim == v.width else ("ffn_up", "ffn_down")   # as written
    for i in range(len(tower.blocks)):
        b = f"v.blk.{i}."
        for kind in ("weight", "bias"):
            sd[f"blocks.{i}.qkv.{kind}"] = torch.cat([t[f"{b}attn_{n}.{kind}"] for n in "qkv"])
            for ours, theirs in (("proj", "attn_out"), ("ln1", "ln1"), ("ln2", "ln2"), ("fc1", up), ("fc2", down)):
                sd[f"blocks.{i}.{ours}.{kind}"] = t[f"{b}{theirs}.{kind}"]
    tower.load_state_dict(sd)
    from edgemm.export.gguf_tensors import llava_projector_state
    psd = llava_projector_state(cfg.adapter.kind, t, cfg.adapter.bias)
    if cfg.adapter.image_newline:
        psd["image_newline"] = t["model.image_newline"]
    proj.load_state_dict(psd)
    return tower.eval(), proj.eval()


def _idefics3_vision_from_tensors(t: dict, cfg, markers):
    """edgemm's SigLIP tower + pixel_shuffle_linear connector from an idefics3 mmproj (export/gguf_mtmd.py), the
    connector's marker rows from the decoder's token_embd."""
    import torch
    from edgemm.blocks import registry
    v = cfg.vision
    tower = registry.get("vision", "siglip").from_config(cfg)
    proj = registry.get("connector", "pixel_shuffle_linear").from_config(cfg)
    sd = {"patch_embed.weight": t["v.patch_embd.weight"].reshape(v.width, 3, v.patch_size, v.patch_size),
          "patch_embed.bias": t["v.patch_embd.bias"], "pos": t["v.position_embd.weight"].reshape(1, v.n_patches, -1),
          "post_norm.weight": t["v.post_ln.weight"], "post_norm.bias": t["v.post_ln.bias"]}
    for i in range(len(tower.blocks)):
        b = f"v.blk.{i}."
        for kind in ("weight", "bias"):
            sd[f"blocks.{i}.qkv.{kind}"] = torch.cat([t[f"{b}attn_{n}.{kind}"] for n in "qkv"])
            for ours, theirs in (("proj", "attn_out"), ("ln1", "ln1"), ("ln2", "ln2"), ("fc1", "ffn_up"),
                                 ("fc2", "ffn_down")):
                sd[f"blocks.{i}.{ours}.{kind}"] = t[f"{b}{theirs}.{kind}"]
    tower.load_state_dict(sd)
    proj.load_state_dict({"proj.weight": t["mm.model.fc.weight"], "markers": torch.from_numpy(np.asarray(markers))})
    return tower.eval(), proj.eval()


def reference_vision_from_mmproj(mmproj: str | Path, cfg, markers=None):
    """The reference ViT + adapter (edgemm.model) loaded with the mmproj's own weights (dequantized). markers: the
    decoder's token rows of adapter.marker_ids (SmolVLM's connector table; LlamaRunner.token_rows)."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from edgemm.model import Adapter, VisionTower
    from edgemm.blocks.support import mtmd_graph
    graph = mtmd_graph(cfg.variants())
    if graph not in (None, "idefics3"):
        raise EdgemmError(f"this bundle's vision stage runs in llama.cpp's mtmd only (projector {graph}), which "
                          "takes 8-bit RGB images; these pixels are not one")
    v, d = cfg.vision, cfg.decoder
    r = GGUFReader(str(mmproj))
    t = {}
    for ten in r.tensors:
        a = dequantize(ten.data, ten.tensor_type).astype(np.float32)
        t[ten.name] = torch.from_numpy(np.ascontiguousarray(a.reshape([int(s) for s in reversed(ten.shape)])))
    if cfg.adapter.kind in ("mlp", "linear", "mlp_norm"):     # LLaVA's projectors (gguf_tensors.py)
        return _llava_vision_from_tensors(t, cfg)
    if graph == "idefics3":
        return _idefics3_vision_from_tensors(t, cfg, markers)
    tower, adapter = VisionTower(v), Adapter(cfg.adapter, v.width, d.d_model)
    sd = {"patch_embed.weight": t["v.patch_embd.weight"].reshape(v.width, 3, v.patch_size, v.patch_size),
          "patch_embed.bias": t["v.patch_embd.bias"],
          "cls": t["v.class_embd"].reshape(1, 1, v.width),
          "pos": t["v.position_embd.weight"].reshape(1, v.n_patches + 1, v.width)}
    names = {"qkv": "attn_qkv", "proj": "attn_out", "ln1": "ln1", "fc1": "ffn_up", "fc2": "ffn_down", "ln2": "ln2"}
    for i in range(v.layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                sd[f"blocks.{i}.{ours}.{kind}"] = t[f"v.blk.{i}.{theirs}.{kind}"]
    tower.load_state_dict(sd)
    adapter.load_state_dict({"linear_proj.weight": t["mm.model.fc.weight"],
                             "norm.weight": t["mm.post_fc_norm.weight"], "norm.bias": t["mm.post_fc_norm.bias"],
                             "gate.weight": t["mm.gate.weight"], "up.weight": t["mm.up.weight"],
                             "down.weight": t["mm.down.weight"],
                             "boi": t["v.boi"].reshape(1, 1, -1), "eoi": t["v.eoi"].reshape(1, 1, -1)})
    return tower.eval(), adapter.eval()


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
        n_ctx = min(context or 1 << 62, self.cfg.decoder.max_seq_len)
        self.runner = LlamaRunner(self.decoder_path, n_ctx, self.threads,
                                  n_batch=max(512, self.cfg.n_image_rows), f32_kv=f32_kv, flash_attn=flash_attn,
                                  n_seq=n_seq, kv_type=kv_cache, n_gpu_layers=-1 if gpu else 0)
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
        return min(self.runner.n_ctx, self.cfg.decoder.max_seq_len)

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
        return State(cache=(seq, self._next_id))

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

    def text(self, state: State, ids) -> np.ndarray:
        seq = self._sync(state)
        ids = list(ids)
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
        items = [(self._sync(st), t, st.pos) for st, t in zip(states, tokens)]
        out = self.runner.decode_step(items)
        for st in states:
            st.length += 1
            st.pos += 1
        return out

    def image(self, state: State, rows) -> np.ndarray:
        seq = self._sync(state)
        rows = np.asarray(rows, np.float32)
        rows = rows.reshape(-1, rows.shape[-1])
        logits = self.runner.decode_embd(rows, state.pos, seq, self.cfg.decoder.image_bidirectional)
        state.length += rows.shape[0]
        state.pos += rows.shape[0]
        return logits

    def _image_pieces(self, state: State, rows, chunk):
        """Image rows sit at sequential positions here: an image appends in pieces as text does (prefill)."""
        from .base import _pieces
        rows = np.asarray(rows, np.float32).reshape(1, -1, np.shape(rows)[-1])
        yield from _pieces(lambda a, b: self.image(state, rows[:, a:b]), rows.shape[1], chunk)

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
            if self._mtmd is None:
                self._mtmd = MtmdVision(self.mmproj_path, self.runner, self.vision_threads,
                                        use_gpu=self.mmproj_offload,
                                        around=image_bounds(self.cfg, self.tokenizer, self.runner))
            self.vision_source = "mtmd (mmproj)"
            return self._mtmd.encode_rgb(rgb)[None]
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
