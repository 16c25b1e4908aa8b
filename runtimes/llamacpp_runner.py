"""llama.cpp through llama-cpp-python's low-level API: LlamaRunner (a model and one context: token and embedding
batches, rewinds, per-sequence KV for the server's slots) and MtmdVision (an mmproj through llama.cpp's mtmd), with
the rows a family puts around mtmd's (markers, image_bounds). Used by the llamacpp backend
(runtimes/llamacpp_backend.py), the GGUF exporter's validation and `edgemm doctor`."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from edgemm.cpu import threads_or_default
from edgemm.errors import EdgemmError

from edgemm.llamacpp import KV_TYPES, QUANTIZED_V_NEEDS_FA, load_llama_cpp


CTX_BLOCK = 256         # llama.cpp pads its KV cache to 256 cells: contexts sized to need are whole blocks of it


class LlamaRunner:
    """One llama model + context driven batch by batch. The context holds `n_seq` sequences (KV caches of
    `n_ctx` rows each, llama.cpp's seq ids 0..n_seq-1); every call names its sequence (default 0)."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int | None = None, n_batch: int = 512,
                 f32_kv: bool = True, flash_attn: bool = False, verbose: bool = False, n_seq: int = 1,
                 kv_type: str | None = None, n_gpu_layers: int = 0, mrope: bool = False):
        """mrope: the decoder is llama.cpp's qwen2vl (M-RoPE: an embedding batch carries 4 positions a row,
        section-major, decode_embd's `positions`; token batches one, which llama.cpp repeats over the first three
        sections).
        kv_type: f32 / f16 / q8_0 / q4_0 for both K and V (default f32, or f16 with f32_kv False); a quantized V
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
        self._cp, self.n_seq, self.kv_type, self.flash_attn = cp, n_seq, kv_type, flash_attn
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
        self.max_ctx = self.n_ctx       # rows a sequence may grow to (resize); the backend raises it
        self.mem = ll.llama_get_memory(self.ctx)
        self._tok_batch = ll.llama_batch_init(n_batch, 0, 1)
        self._emb_batch = ll.llama_batch_init(n_batch, self.n_embd, 1)
        self.lengths = [0] * n_seq   # rows in each sequence's KV cache
        self.mrope = mrope
        if mrope:       # llama_batch_init allocates one position a row: the embedding batch gets a 4-a-row array
            # (the address, not the field: a pointer read from a Structure aliases the field's storage)
            self._pos_t = type(self._emb_batch.pos)
            self._emb_pos1 = ctypes.cast(self._emb_batch.pos, ctypes.c_void_p).value
            self._emb_pos4 = (ctypes.c_int32 * (4 * n_batch))()
            self._row_pos = [[] for _ in range(n_seq)]   # each KV row's first-section position (rewinds go by it)

    @property
    def length(self) -> int:
        return self.lengths[0]

    # ---- cache ---------------------------------------------------------------------------------
    def clear(self, seq: int | None = None):
        if seq is None:
            self.ll.llama_memory_clear(self.mem, True)
            self.lengths = [0] * self.n_seq
            if self.mrope:
                self._row_pos = [[] for _ in range(self.n_seq)]
        else:
            self.rewind(0, seq)

    def rewind(self, length: int, seq: int = 0):
        if length < self.lengths[seq]:
            # M-RoPE: rows and positions part after an image (its rows share their first position, the text after
            # it goes on at p + max(rows, cols)), so the cells go by the position of the first row dropped
            p = self._row_pos[seq][length] if self.mrope else length
            if self.mrope and length and self._row_pos[seq][length - 1] >= p:
                raise EdgemmError(f"cannot rewind to row {length}: it is inside an image, whose rows share their "
                                  "first M-RoPE position")
            self.ll.llama_memory_seq_rm(self.mem, seq, p, -1)
            self.lengths[seq] = length
            if self.mrope:
                del self._row_pos[seq][length:]

    def resize(self, n_ctx: int) -> None:
        """A context of `n_ctx` rows per sequence in place of this one, every sequence's KV cache copied over
        (llama_state_seq_get_data / set_data): how a cache sized to need grows."""
        ll = self.ll
        saved = []
        for seq in range(self.n_seq):
            if self.lengths[seq]:
                n = ll.llama_state_seq_get_size(self.ctx, seq)
                buf = (ctypes.c_uint8 * n)()
                if ll.llama_state_seq_get_data(self.ctx, buf, n, seq) != n:
                    raise EdgemmError(f"llama.cpp could not save sequence {seq} to grow the context")
                saved.append((seq, buf, n))
        self._cp.n_ctx = int(n_ctx) * self.n_seq
        ctx = ll.llama_init_from_model(self.model, self._cp)
        if not ctx:
            raise EdgemmError(f"llama.cpp could not create a context of {n_ctx} rows to grow the KV cache")
        ll.llama_free(self.ctx)
        self.ctx, self.mem = ctx, ll.llama_get_memory(ctx)
        self.n_ctx = ll.llama_n_ctx(ctx) // self.n_seq
        for seq, buf, n in saved:
            if ll.llama_state_seq_set_data(ctx, buf, n, seq) != n:
                raise EdgemmError(f"llama.cpp could not restore sequence {seq} into the grown context")

    # ---- decoding ------------------------------------------------------------------------------
    def _run(self, batch, n: int, pos0: int, last: bool, seq: int = 0, positions: np.ndarray | None = None):
        """positions (M-RoPE embedding batches): int [4, n], section-major into the batch's 4-a-row array."""
        if positions is not None:
            self._emb_pos4[:4 * n] = np.ascontiguousarray(positions, np.int32).reshape(-1).tolist()
            batch.pos = ctypes.cast(self._emb_pos4, self._pos_t)
        elif self.mrope and batch is self._emb_batch:
            batch.pos = ctypes.cast(self._emb_pos1, self._pos_t)
        for i in range(n):
            if positions is None:
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
        if self.mrope:
            self._row_pos[seq] += (list(range(pos0, pos0 + n)) if positions is None
                                   else [int(x) for x in positions[0]])

    def _logits(self, i: int = -1) -> np.ndarray:
        ptr = self.ll.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def _check_room(self, n: int, seq: int = 0):
        need = self.lengths[seq] + n
        if self.n_ctx < need <= self.max_ctx:          # a context sized to need grows (a copy)
            from edgemm.blocks.kv_rows import kv_rows
            self.resize(kv_rows(need, self.max_ctx, self.n_ctx, block=CTX_BLOCK))
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

    def decode_embd(self, rows: np.ndarray, pos0: int, seq: int = 0, bidirectional: bool = False,
                    positions: np.ndarray | None = None) -> np.ndarray:
        """An embedding batch. positions: M-RoPE's [3, n] (temporal, height, width) of the rows (default: pos0 + i in
        each section, as a text row). bidirectional (Gemma 3's image segment: boi, rows, eoi): the rows between the
        first and the last attend to each other both ways, in one non-causal batch as mtmd's helper decodes an image
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
        p4 = None
        if self.mrope:                  # [4, n]: (t, h, w) + the unused fourth section (0, as mtmd's helper)
            p3 = np.tile(np.arange(pos0, pos0 + n), (3, 1)) if positions is None else np.asarray(positions)
            if p3.shape != (3, n):
                raise EdgemmError(f"M-RoPE positions {list(p3.shape)} for {n} rows; expected [3, {n}]")
            p4 = np.concatenate([p3, np.zeros((1, n), p3.dtype)]).astype(np.int32)
        elif positions is not None:
            raise EdgemmError("3-D positions given to a decoder without M-RoPE")
        b = self._emb_batch
        for s in range(0, n, self.n_batch):
            chunk = np.ascontiguousarray(rows[s:s + self.n_batch])
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            self._run(b, chunk.shape[0], pos0 + s, s + chunk.shape[0] == n, seq,
                      None if p4 is None else p4[:, s:s + chunk.shape[0]])
        return self._logits()

    def decode_step(self, items, piece=None) -> tuple[list[np.ndarray], np.ndarray | None]:
        """One token for each of several sequences in one llama_decode: items [(seq, token, pos)] -> (logits per
        item, None). piece (seq, ids, pos0): a text piece of that sequence in the same llama_decode (serve's riding
        prefill) -> its last row's logits in place of None. Every row is an output, as _run's final batches (the
        cogvlm graph selects no output rows)."""
        rows = list(items)
        if piece is not None:
            seq, ids, pos0 = piece
            rows += [(seq, t, pos0 + i) for i, t in enumerate(ids)]
            if not ids or len(rows) > self.n_batch:
                raise EdgemmError(f"a decode step with a {len(ids)}-row piece needs {len(rows)} rows; n_batch is "
                                  f"{self.n_batch}")
            self._check_room(len(ids), seq)
        for seq, _, _ in items:
            self._check_room(1, seq)
        b = self._tok_batch
        for i, (seq, t, pos) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), int(pos), 1, 1
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise EdgemmError(f"llama_decode failed (code {rc}) for a batch of {len(items)} sequences"
                              + (f" and a {len(rows) - len(items)}-row piece" if piece is not None else ""))
        for seq, _, pos in rows:
            self.lengths[seq] += 1
            if self.mrope:
                self._row_pos[seq].append(int(pos))
        return [self._logits(i) for i in range(len(items))], (self._logits(len(rows) - 1) if piece else None)

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
        if getattr(self, "mrope", False) and getattr(self, "_emb_batch", None) is not None:
            self._emb_batch.pos = ctypes.cast(self._emb_pos1, self._pos_t)     # llama_batch_free frees its own
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
                 around: tuple | None = None, max_rows: int = 0):
        """around: (first, last) rows put around mtmd's (Gemma 3's boi / eoi: image_bounds), or None. max_rows
        (dynamic-resolution towers, Qwen2-VL): mtmd's image token limits set to 1..max_rows, so an image the host
        already sized (multiples of the merged cell, within its pixel budget) is encoded at its own size, not
        rescaled to mtmd's default budget."""
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
        if max_rows:
            p.image_min_tokens, p.image_max_tokens = 1, int(max_rows)
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
