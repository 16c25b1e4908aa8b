"""Scales of an int8 KV cache for the ort backend (`--kv-cache int8` on onnx bundles; runtimes/ort_kv.py).

ONNX Runtime's GroupQueryAttention stores K and V as int8 when given k_scale / v_scale (k_quant_type /
v_quant_type, kv_cache_bit_width 8): a stored value is round(x / scale) clamped to [-128, 127], read back as
value * scale. The scales are fitted here, at export, on the calibration set: each image and question runs through
the reference model (ChatSession on the torch backend, a short greedy answer included) and the absolute maximum of
what its KV cache holds (K after RoPE, V) is taken per layer and cache head; scale = HEADROOM x that maximum / 127
(the op clamps to [-127, 127]: a prompt past the calibration's largest value saturates, and the example image's
layer-2 V reached 1.1x the maximum of 8 items). The manifest records them (`kv_cache_int8`); the backend writes
them into the decoder graphs it loads.
"""
from __future__ import annotations

import numpy as np

SAMPLES = 16                # calibration items run (the cache of each: its image, question and answer rows)
HEADROOM = 1.25
ANSWER_TOKENS = 16


def fit_kv_scales(model, tokenizer, calib=None, n: int = SAMPLES) -> dict | None:
    """-> the manifest's `kv_cache_int8` record ({"granularity": "per_head", "k": [layer][cache head], "v": ...,
    "calibration": what ran}), or None where int8_kv_why says no."""
    import torch
    from edgemm.calib.sets import resolve_calib
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes.ort_kv import int8_kv_why
    from edgemm.runtimes.torch_backend import TorchBackend
    if int8_kv_why(model.cfg) or model.cfg.input_stage != "vision":     # (Libra: image tokens, not pixels)
        return None
    cset = resolve_calib(calib)
    b = TorchBackend(model, tokenizer)
    amax = {"k": 0.0, "v": 0.0}
    samples = list(cset.samples)[:n]
    for s in samples:
        chat = ChatSession(b, GenerationConfig(max_new_tokens=ANSWER_TOKENS))
        chat.set_image(s.image)
        chat.ask(s.prompt)
        cache, n_rows = chat.state.cache, chat.state.length
        for kv in ("k", "v"):
            t = getattr(cache, kv)[:, 0, :, :n_rows].abs().amax(dim=(2, 3))       # [layers, cache heads]
            amax[kv] = np.maximum(amax[kv], t.float().numpy())
        del chat
    scale = {kv: HEADROOM * np.maximum(a, torch.finfo(torch.float32).tiny) / 127.0 for kv, a in amax.items()}
    return {"granularity": "per_head", "bits": 8,
            "k": [[float(f"{x:.7g}") for x in row] for row in scale["k"]],
            "v": [[float(f"{x:.7g}") for x in row] for row in scale["v"]],
            "calibration": f"{cset.describe()}: the first {len(samples)}, their KV absolute maximum per layer and "
                           f"cache head x {HEADROOM} / 127"}
