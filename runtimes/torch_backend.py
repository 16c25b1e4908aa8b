"""The reference backend: the PyTorch model itself, on CUDA when present, else the CPU."""
from __future__ import annotations

import sys

import numpy as np

from edgemm.cpu import threads_or_default
from edgemm.errors import EdgemmError
from .base import Backend, State


def pick_torch_device(device: str, log=None) -> str:
    import torch
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        try:
            torch.zeros(1, device="cuda")
            return "cuda"
        except Exception as e:  # a broken driver: fall back, say so (asked for or not: CUDA is there)
            (log or (lambda s: print(s, file=sys.stderr)))(
                f"note: CUDA present but unusable ({str(e).splitlines()[0][:160]}): running on the CPU")
            return "cpu"
    if device == "cuda" and log:
        log("note: no CUDA GPU found; falling back to the CPU")
    return "cpu"


class TorchBackend(Backend):
    name = "torch"
    kv_grows = True

    def __init__(self, model, tokenizer, device="cpu", source=""):
        self.model, self.tokenizer, self.device, self.source = model, tokenizer, device, source
        self.cfg = model.cfg

    @classmethod
    def open(cls, model=None, bundle=None, device="auto", threads=None, log=None, pack: bool = True):
        """pack: on the CPU, hold the fp32 Linears' weights in oneDNN's layout (runtimes/torch_pack.py: a piece of
        a few rows then costs about 1.5x a one-row step, not 2-3x)."""
        import torch
        from edgemm.checkpoint import load_model
        if bundle is not None:
            raise EdgemmError("the torch backend runs model directories, not bundles: pass --model "
                              "(a bundle's source model is recorded in its edgemm.json), or use --backend ort")
        torch.set_num_threads(threads_or_default(threads))   # torch's own default ignores a cgroup quota
        dev = pick_torch_device(device, log)
        m, tok = load_model(model, device=dev)
        if pack and dev == "cpu":
            from .torch_pack import pack_linears
            pack_linears(m)
        return cls(m, tok, dev, source=str(model or "tiny-shapes"))

    @classmethod
    def available(cls, manifest, device):
        return False, "the torch backend runs model directories only"

    def new_state(self, max_len: int | None = None) -> State:
        """A cache of `max_len` rows (default the context) that grows, up to the context, when a segment needs
        more (KVCache.reserve)."""
        from edgemm.model import KVCache
        return State(cache=KVCache.empty(self.cfg.decoder, 1, max_len or self.context_length, device=self.device,
                                         limit=self.context_length))

    def reserve(self, state: State, rows: int) -> None:
        state.cache.reserve(rows)

    def prefill_beside_why(self):
        return None                 # a state is its own KVCache; the modules only read their weights

    def on_side_thread(self, threads: int) -> None:
        """torch.set_num_threads sets the calling thread's OpenMP / MKL count, and also the count threads started
        later take on first use: set this thread's, then put the process's back from a throwaway thread (so the
        engine's own thread, whose first torch call may come later, keeps --threads)."""
        import threading
        import torch
        was = torch.get_num_threads()           # (this thread's first call: it takes the process's count)
        torch.set_num_threads(max(1, int(threads)))
        t = threading.Thread(target=torch.set_num_threads, args=(was,))
        t.start()
        t.join()

    def vision(self, pixels, *instruction):
        import torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
            ins = [torch.from_numpy(np.asarray(t, np.float32 if np.asarray(t).dtype.kind == "f" else np.int64))
                   .to(self.device) for t in instruction]                # (LLaVA-UHD: its float RoIAlign weights)
            if not ins and self.cfg.adapter.qformer_text:           # InstructBLIP: none is an empty instruction
                ins = [torch.zeros(x.shape[0], 0, dtype=torch.long, device=self.device)]
            return self.model.encode_image(x, *ins).float().cpu().numpy()

    def image_newline(self):
        return self.model.adapter.image_newline.detach().float().cpu().numpy()

    def video(self, frames):
        import torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).to(self.device)
            return self.model.encode_video(x).float().cpu().numpy()

    def _segment(self, state, kind, data):
        import torch
        state.cache.length = state.length        # a state may have been rewound
        with torch.inference_mode():
            logits, state.pos = self.model.forward_segment(kind, data, state.cache, state.pos)
        state.length = state.cache.length
        return logits[0, -1].float().cpu().numpy()

    def text(self, state, ids):
        import torch
        return self._segment(state, "text", torch.tensor([list(ids)], device=self.device))

    def _rows(self, rows):
        import torch
        x = torch.from_numpy(np.asarray(rows, np.float32)).to(self.device)
        x.grid = getattr(rows, "grid", None)        # (M-RoPE: the image's grid, edgemm.qwen2vl_pixels; a clip's
        x.tstep = getattr(rows, "tstep", 1.0)       # temporal step)
        return x

    def image(self, state, rows):
        return self._segment(state, "image", self._rows(rows))

    def _image_pieces(self, state, rows, chunk):
        """The rows in pieces at the positions forward_segment gives them (the eoi row of CogVLM's rule last,
        through the text branch)."""
        import torch
        if not chunk:                           # (one block: prefill passes none where chunked_image_why says)
            yield self.image(state, rows)
            return
        m = self.model
        x = self._rows(rows)
        positions = m.image_positions(state.pos, x.shape[1], x).to(self.device)
        from .base import image_spans
        for a, b, route, end in image_spans(x.shape[1], self.cfg.decoder.eoi_branch == "text", chunk):
            state.cache.length = state.length
            with torch.inference_mode():
                logits = m.decoder(x[:, a:b], route, positions[..., a:b], state.cache, True)
            state.length = state.cache.length
            if not end:
                yield None
        state.pos = m.next_position(positions)
        yield logits[0, -1].float().cpu().numpy()
