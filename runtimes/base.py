"""The backend protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class State:
    """One KV cache: `length` rows filled, `pos` the next RoPE position (they differ under the cogvlm rule).

    `cache` is the backend's own, one type per backend: torch `edgemm.model.KVCache`; ort and trt a dict
    {"k": [per layer], "v": [per layer], "capacity": rows} of OrtValues / arrays; llamacpp the int id of the
    llama context's sequence that holds it. Setting `length` (and `pos`) lower rewinds the cache. `busy`: a prefill
    runs on it on another thread (edgemm serve's side worker: Backend.prefill_beside_why), so a batched step of other
    states must not write its rows (ort's KV pool then treats its row as full)."""
    cache: Any = None
    length: int = 0
    pos: int = 0
    extra: dict = field(default_factory=dict)
    busy: bool = False


class Backend:
    """Base class. Subclasses implement open/vision/text/image/new_state; `cfg` and `tokenizer` are set."""
    name = "base"
    device = "cpu"
    cfg = None          # edgemm.config.ModelConfig
    tokenizer = None    # edgemm.tokenizer.Tokenizer
    source = ""         # what was opened (path or preset)

    @classmethod
    def open(cls, model=None, bundle=None, device="auto", threads=None, log=None) -> "Backend":
        raise NotImplementedError(f"{cls.__name__}.open")

    @classmethod
    def available(cls, manifest: dict, device: str) -> tuple[bool, str]:
        """Whether this backend can run the bundle on this machine, and why (for `--backend auto`)."""
        return False, "not implemented"

    context_limit: int | None = None     # a shorter context than the model's (edgemm serve --context)

    @property
    def context_length(self) -> int:
        return min(self.cfg.decoder.max_seq_len, self.context_limit or 1 << 62)

    def new_state(self, max_len: int | None = None) -> State:
        """An empty KV cache of `max_len` rows (default: the whole context). torch, ort and a single-sequence
        llamacpp backend grow it (a copy into a bigger buffer: edgemm.blocks.decoder.kv_rows) when a segment
        needs more, up to the context; so callers size it to what they expect to need."""
        raise NotImplementedError

    kv_grows = False        # whether a state's KV cache grows past its max_len when a segment needs it (reserve)

    def reserve(self, state: State, rows: int) -> None:
        """Let the state's KV cache hold at least `rows` rows (up to the context) before they are written, so
        a server grows a slot's cache once, at admission, not mid-answer. Default: nothing (its cache is fixed)."""

    def vision(self, pixels: np.ndarray, *instruction) -> np.ndarray:
        """float32 [1, 3, S, S] -> image rows float32 [1, P + 2, D]. InstructBLIP: + the question's Q-Former ids
        and mask int64 [1, T] (edgemm.qformer.instruction); none is an empty instruction."""
        raise NotImplementedError

    def image_newline(self) -> np.ndarray:
        """Any-resolution tiling (edgemm.anyres): the float32 newline row [D] the host packs between tile rows."""
        raise NotImplementedError

    def video(self, frames: np.ndarray) -> np.ndarray:
        """The video stage (ModelConfig.video_stage): LLaVA-NeXT-Video's frames float32 [F, 3, S, S] -> rows
        [1, F * R, D], each frame's patch grid pooled between the tower and the connector; Qwen2-VL's [F, 3, h, w]
        -> [1, F / T * R, D], T frames a temporal patch."""
        from edgemm.errors import EdgemmError
        raise EdgemmError(f"the {self.name} backend has no video stage for this model; run it with --model DIR (torch) "
                          "or an onnx bundle")

    def text(self, state: State, ids: list[int]) -> np.ndarray:
        """Append a text segment (text branch); -> float32 logits [vocab] of its last row."""
        raise NotImplementedError

    def image(self, state: State, rows: np.ndarray) -> np.ndarray:
        """Append an image segment (vision branch); -> float32 logits [vocab] of its last row."""
        raise NotImplementedError

    def prefill(self, state: State, kind: str, data, chunk: int | None = None):
        """Append a segment ("text" ids or "image" rows) in pieces of at most `chunk` rows (None: one piece; a
        callable: asked for each piece's rows just before it runs), so a server can step other streams between
        them (edgemm serve --prefill-chunk): a generator that runs one piece
        per next() and yields None after each but the last, which yields the segment's last-row logits. The
        KV cache after the last piece is the one text() / image() leave. Text splits anywhere; an image where
        the backend can append its rows at their own positions (chunked_image_why)."""
        if kind != "text":                      # (chunked_image_why: the rows must go in one piece)
            yield from self._image_pieces(state, data, None if self.chunked_image_why() else chunk)
            return
        ids = list(data)
        yield from _pieces(lambda a, b: self.text(state, ids[a:b]), len(ids), chunk)

    def _image_pieces(self, state: State, rows, chunk: int | None):
        yield self.image(state, rows)            # one piece unless a backend splits its rows

    def chunked_image_why(self) -> str | None:
        """Why prefill() appends an image in one piece whatever the chunk (None: its rows split too)."""
        if self.cfg.decoder.cross_attn_every:
            return "gated cross-attention: an image is its K/V and a few tokens, not decoder rows"
        if self.cfg.decoder.image_bidirectional:
            return "an image's rows attend to each other both ways (Gemma 3): one piece"
        if type(self)._image_pieces is Backend._image_pieces:
            return f"the {self.name} backend appends an image's rows in one piece"
        return None

    def prefill_beside_why(self) -> str | None:
        """Why a state's prefill cannot run on another thread while decode_batch steps other states (None: it can;
        edgemm serve then prefills newcomers on its side worker). vision() always can: every backend encodes
        with resources of its own (a torch module, an ONNX Runtime session, mtmd's clip context, a TensorRT
        execution context)."""
        return f"the {self.name} backend runs one call at a time"

    def on_side_thread(self, threads: int) -> None:
        """Called once on edgemm serve's side worker (image encodes, and prefills where prefill_beside_why is
        None) before its first call: give that thread's own compute `threads` threads where the backend sets
        them per thread (torch); the others size their vision stage when they open (load_backend's
        vision_threads)."""

    def decode_batch(self, states: list, tokens: list[int]) -> list[np.ndarray]:
        """One decode step for several states (token i appended to state i) -> logits per state. Backends that
        can batch sequences (llamacpp) do it in one call; the default runs them one after another."""
        return [self.text(st, [t]) for st, t in zip(states, tokens)]

    # Riding (edgemm serve's chunked prefill): a backend with `rides` can run a text prefill piece in the same
    # forward as the next decode_batch (llama.cpp: one llama_decode holds the streams' tokens and the piece's, as
    # llama-server batches its slots), so the piece costs the running streams a wider step, not a step of its own.
    # Within riding(), text() appends nothing yet: it records the piece (the state's length and position move on)
    # and returns a Ridden whose value the next decode_batch fills; flush_ride() runs a recorded piece alone
    # (nothing to decode after all). At most one piece rides a step; ride_rows: the rows the last step carried.
    rides = False
    ride_rows = 0

    def riding(self):
        import contextlib
        return contextlib.nullcontext()

    def flush_ride(self) -> None:
        """Run a recorded piece alone (no decode step follows); nothing when none waits."""

    def ride_pending(self) -> bool:
        """Whether a recorded piece waits for the next decode_batch."""
        return False

    def unbatched_why(self) -> str | None:
        """Why decode_batch steps the states one after another (None: one call steps them all); `edgemm serve
        --parallel N` says it at start-up."""
        return f"the {self.name} backend decodes one state at a time"

    def release(self, state: State) -> None:
        """Return a state's resources early (a finished server request); by default nothing to do."""

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


def spans(n: int, chunk):
    """[0, n) in pieces -> (a, b) each: at most `chunk` rows (None or 0: one piece), or `chunk` a callable asked
    for the next piece's rows just before it runs (edgemm serve sizes pieces by their measured time). n == 0 is
    one empty piece."""
    a = 0
    while True:
        step = (chunk() if callable(chunk) else chunk) or n or 1
        b = min(a + max(1, int(step)), n)
        yield a, b
        if b >= n:
            return
        a = b


def image_spans(n: int, eoi_text: bool, chunk):
    """An image's n rows in pieces -> (a, b, branch, last): the rows through the vision branch in spans (sized
    lazily), and with eoi_text the last row alone through the text branch (CogVLM's eoi row)."""
    k = n - eoi_text
    for a, b in (spans(k, chunk) if k else ()):
        yield a, b, "vision", b == n
    if eoi_text:
        yield k, n, "text", True


class Ridden:
    """A text piece's last-row logits, known once the decode step it rides has run (Backend.riding)."""
    value: np.ndarray | None = None


def _pieces(run, n: int, chunk):
    """run(a, b) over spans(n, chunk), yielding None after each but the last, which yields its result (prefill's
    protocol). n == 0 still runs once (the backend's error for an empty segment)."""
    for a, b in spans(n, chunk):
        out = run(a, b)
        yield out if b >= n else None


def last(pieces):
    """Run a prefill generator to its end -> its logits."""
    out = None
    for out in pieces:
        pass
    return out


def bundle_stages(cfg, stages: dict) -> tuple:
    """The stages an onnx / trt bundle's backend opens: the model's (cfg.stages), and LLaVA-NeXT-Video's `video`
    stage where the manifest lists one (ModelConfig.video_stage; bundles exported before it have none)."""
    return tuple(cfg.stages) + (("video",) if cfg.video_stage and "video" in stages else ())


def vision_feeds(cfg, pixels, instruction=()) -> dict:
    """The exported vision stage's inputs (Backend.vision's arguments): pixels, and InstructBLIP's Q-Former ids and
    mask (none: an empty instruction)."""
    from edgemm.errors import EdgemmError
    feeds = {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)}
    if cfg.reads_question:             # InstructBLIP: the question's Q-Former ids (none: an empty one)
        B = feeds["pixels"].shape[0]
        ids = np.zeros((B, 0), np.int64) if not instruction else np.asarray(instruction[0], np.int64)
        mask = np.ones_like(ids) if len(instruction) < 2 else np.asarray(instruction[1], np.int64)
        feeds.update(qformer_input_ids=np.ascontiguousarray(ids), qformer_attention_mask=np.ascontiguousarray(mask))
    elif cfg.adapter.kind == "uhd_resampler":     # LLaVA-UHD: the RoIAlign weights of the regions (uhd_slices)
        if len(instruction) != 2:
            raise EdgemmError("LLaVA-UHD's vision stage takes pixels, pool_rows and pool_cols (edgemm.uhd_slices)")
        feeds.update({k: np.ascontiguousarray(x, dtype=np.float32) for k, x in zip(UHD_INPUTS, instruction)})
    elif instruction:
        raise EdgemmError("only InstructBLIP's vision stage takes an instruction")
    return feeds


UHD_INPUTS = ("pool_rows", "pool_cols")


class SegmentRunner(Backend):
    """Segments over exported decoder graphs (the ort and trt backends): subclasses implement
    `_run(stage, state, feeds, positions) -> logits` and `_encode(stage, feeds) -> image rows`.

    Model variants handled here, once: the cogvlm position rule, CogVLM's original routing (the image segment's
    eoi row runs through decoder_text's `input_rows` input) and Libra's `image_tokens` input stage."""

    kv_dtype = np.float32           # the KV cache's (and cross K/V's) element type; fp16 compute bundles: float16

    def _room(self, state: State, T: int) -> int:
        """-> the rows filled after appending T (the cache grown to take them where the backend can: reserve);
        an error when the KV cache cannot take them."""
        from edgemm.errors import EdgemmError
        if state.length + T > state.cache["capacity"]:
            self.reserve(state, state.length + T)
        cap = state.cache["capacity"]
        if state.length + T > cap:
            raise EdgemmError(f"KV cache full: {state.length} + {T} rows > capacity {cap}")
        return state.length + T

    def _eoi_text(self) -> bool:
        return self.cfg.decoder.eoi_branch == "text"

    def _text_feeds(self, ids: np.ndarray, rows: np.ndarray | None = None) -> dict:
        feeds = {"input_ids": ids}
        if self._eoi_text():      # that model's decoder_text also takes rows (0 of them for a text segment)
            d = self.cfg.decoder.d_model
            feeds["input_rows"] = np.zeros((1, 0, d), np.float32) if rows is None else rows
        return feeds

    def text(self, state: State, ids) -> np.ndarray:
        ids = np.asarray([list(ids)], np.int64)
        positions = np.arange(state.pos, state.pos + ids.shape[1])
        feeds = self._text_feeds(ids)
        if self.cfg.decoder.cross_attn_every:
            feeds.update(self._cross_feeds(state, ids[0]))
        logits = self._run("decoder_text", state, feeds, positions)
        state.pos += ids.shape[1]
        return logits

    # ---- gated cross-attention (edgemm.xattn): the image's K/V beside the KV cache, in state.extra
    def _outputs(self, stage: str, feeds: dict) -> dict:
        """All outputs of a non-decoder stage -> {name: the backend's own value (kept on its device)}."""
        raise NotImplementedError

    def _cross_values(self, rows) -> dict:
        from edgemm.errors import EdgemmError
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        W = self.cfg.decoder.cross_attn_kv_dim or self.cfg.decoder.d_model
        if rows.ndim != 3 or rows.shape[0] != 1 or rows.shape[2] != W:
            raise EdgemmError(f"image rows must be [1, n, {W}], got {list(rows.shape)}")
        return self._outputs("cross_kv", {"image_rows": rows})

    def cross_kv(self, rows) -> np.ndarray:
        """An image's K then V of every cross-attention layer, flattened (validation)."""
        vals = self._cross_values(rows)
        n = len(vals) // 2
        arr = [vals[f"cross_{kv}.{j}"] for kv in ("key", "value") for j in range(n)]
        host = [a.cpu() if hasattr(a, "cpu") else a.numpy() if hasattr(a, "numpy") else a for a in arr]
        return np.concatenate([np.asarray(a, np.float32).ravel() for a in host])   # torch / OrtValue / numpy

    def _cross_feeds(self, state: State, ids) -> dict:
        """decoder_text's cross inputs for ids: the current image's K/V (zeros before the first image: the
        rows' gates are 0 then) and cross_gate."""
        from edgemm.config import cross_gates
        c = self.cfg.decoder
        gate, state.extra["cross_on"] = cross_gates(ids, state.extra.get("cross_on", False), c.cross_attn_reset_token)
        kv = state.extra.get("cross")
        if kv is None:
            z = np.zeros((1, c.n_heads, 1, c.head_dim), self.kv_dtype)
            kv = {f"cross_{n}.{j}": z for j in range(c.n_layers // c.cross_attn_every)
                  for n in ("key", "value")}
        return {"cross_gate": np.asarray(gate, np.float32).reshape(1, -1, 1), **kv}

    def image_newline(self) -> np.ndarray:
        from edgemm.errors import EdgemmError
        row = (getattr(self, "manifest", None) or {}).get("anyres", {}).get("image_newline")
        if row is None or len(row) != self.cfg.decoder.d_model:
            raise EdgemmError(f"bundle {self.source}: the manifest has no image_newline row of width "
                              f"{self.cfg.decoder.d_model} for any-resolution tiling; re-export it")
        return np.asarray(row, np.float32)

    def image_positions(self, start: int, n: int | None = None) -> np.ndarray:
        n = self.cfg.n_image_rows if n is None else n
        if self.cfg.decoder.position_rule == "cogvlm":       # boi p, every patch p+1, eoi p+2
            pos = np.full(n, start + 1)
            pos[0], pos[-1] = start, start + 2
            return pos
        return np.arange(start, start + n)

    def image(self, state: State, rows) -> np.ndarray:
        return last(self._image_pieces(state, rows, None))

    def _image_pieces(self, state: State, rows, chunk: int | None):
        from edgemm.errors import EdgemmError
        if self.cfg.decoder.cross_attn_every:       # the image's K/V once, then its tokens (fake, <image>, fake)
            from edgemm.config import cross_image_ids
            ids, kv = cross_image_ids(self.cfg.decoder), self._cross_values(rows)
            if len(ids) > 1:                        # the leading fake token still reads the previous image
                self.text(state, ids[:1])
            state.extra["cross"], state.extra["cross_on"] = kv, True
            yield self.text(state, ids[-2:] if len(ids) > 1 else ids)
            return
        src, rows = rows, np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 3 or rows.shape[0] != 1 or rows.shape[2] != self.cfg.decoder.d_model:
            raise EdgemmError(f"image rows must be [1, n, {self.cfg.decoder.d_model}], got {list(rows.shape)}")
        mrope = None
        if self.cfg.decoder.mrope_section:        # M-RoPE: the rows' 3-D positions, an input of decoder_image
            from edgemm.qwen2vl_pixels import image_positions
            mrope = image_positions(state.pos, src)                        # [3, n] (from the rows' grid)
        positions = self.image_positions(state.pos, max(rows.shape[1], self.cfg.n_image_rows))[: rows.shape[1]]
        eoi = self._eoi_text() and rows.shape[1] == self.cfg.n_image_rows     # the eoi row through decoder_text
        # (the rows' positions are fixed up front, so pieces at p, p + chunk, ... append what one run would)
        for a, b, branch, end in image_spans(rows.shape[1], bool(eoi), chunk):
            if branch == "text":
                logits = self._run("decoder_text", state, self._text_feeds(np.zeros((1, 0), np.int64), rows[:, a:b]),
                                   positions[a:b])
            else:
                logits = self._run("decoder_image", state, {"image_rows": np.ascontiguousarray(rows[:, a:b]), **(
                    {} if mrope is None else {"mrope_positions": np.ascontiguousarray(mrope[:, a:b])})}, positions[a:b])
            if not end:
                yield None
        state.pos = int(positions[-1] if mrope is None else mrope.max()) + 1
        yield logits

    def vision(self, pixels, *instruction) -> np.ndarray:
        from edgemm.errors import EdgemmError
        if self.cfg.input_stage != "vision":
            raise EdgemmError("this bundle (Libra) takes image tokens, not pixels: its VQ image tokenizer and CLIP "
                              "signal encoder are not imported; use image_tokens(codes, signal)")
        return self._encode("vision", vision_feeds(self.cfg, pixels, instruction))

    def video(self, frames) -> np.ndarray:
        from edgemm.errors import EdgemmError
        if "video" not in getattr(self, "manifest", {}).get("stages", {}):
            raise EdgemmError(f"bundle {self.source} has no video stage (LLaVA-NeXT-Video's pooled frames, "
                              "Qwen2-VL's temporal patches: onnx and trt bundles exported by this edgemm have it); "
                              "re-export it, or run --model DIR")
        return self._encode("video", {"pixels": np.ascontiguousarray(frames, dtype=np.float32)})

    def image_tokens(self, codes, signal=None) -> np.ndarray:
        """Libra: image tokens [1, rows, codebooks] (+ continuous signal [1, rows, signal_size]) -> image rows."""
        from edgemm.errors import EdgemmError
        if self.cfg.input_stage != "image_tokens":
            raise EdgemmError("this bundle takes pixels (vision stage), not image tokens")
        feeds = {"codes": np.ascontiguousarray(codes, dtype=np.int64)}
        a = self.cfg.adapter
        if a.signal_size:          # no signal: zeros (what the reference does)
            feeds["signal"] = np.ascontiguousarray(np.zeros(feeds["codes"].shape[:2] + (a.signal_size,))
                                                   if signal is None else signal, dtype=np.float32)
        return self._encode("image_tokens", feeds)
