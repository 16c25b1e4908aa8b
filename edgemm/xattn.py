"""Gated cross-attention (Flamingo / Idefics): image rows never enter the sequence.

The blocks are registered in edgemm.blocks (re-exported here): the resampler (connector kind "perceiver",
edgemm.blocks.connectors.PerceiverResampler: tower rows [B, N, W] -> perceiver_latents rows [B, n, W], the `vision`
stage's output) and the gated cross-attention layer (layer kind "gated-cross-attention",
edgemm.blocks.cross.GatedCrossAttnLayer, before decoder layer i when i % cross_attn_every == 0). This module is
the model's segments around them:

- K and V come from the image's resampled rows, once per image (`cross_kv`, the `cross_kv` stage), and are kept
  beside the KV cache.
- Which image a token reads (Idefics' processor, image_attention_mask_for_packed_input_ids): the most recent
  image, from its `<image>` token on; a token after `cross_attn_reset_token` (Idefics: </s>) reads none until the
  next image; a token that reads no image has gate 0 (its cross-attention output is zeroed, the gated MLP still
  applies), as do tokens before the first image.
- An image segment is the image's tokens through the text path (Idefics' processor: <fake_token_around_image>
  <image> <fake_token_around_image>; config.cross_image_ids), the first still reading the previous image (as the
  processor's mask has it), the others the new image's K/V: 3 rows of context per image, however many latents.
  (The processor writes two adjacent images as fake, image, fake, image, fake; edgemm feeds each image's three.)
"""
from __future__ import annotations

import torch

from .blocks.connectors import PerceiverBlock, PerceiverResampler
from .blocks.cross import GatedCrossAttnLayer, cross_layer_at, n_cross_layers
from .blocks.decoder import KVCache
from .config import cross_gates, cross_image_ids

__all__ = ["PerceiverBlock", "PerceiverResampler", "GatedCrossAttnLayer", "cross_layer_at", "n_cross_layers",
           "cross_kv", "forward_segment", "forward_full"]


# --------------------------------------------------------------------------- the model's segments
def cross_kv(model, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage `cross_kv`: an image's resampled rows [B, n, W] -> K, V [Lx, B, H, n, E], once per image."""
    kvs = [layer.kv(rows) for layer in model.decoder.cross_layers]
    return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])


def forward_segment(model, kind: str, data: torch.Tensor, cache, pos: int, last_only: bool = True):
    """EdgeMM.forward_segment for a cross-attention model: text ids [B, T], or an image's resampled rows [B, n, W]
    (its K/V become the cache's cross state; its tokens, cross_image_ids, run through the decoder). The gates follow
    batch row 0's tokens (the runtimes run batch 1)."""
    c, lead = model.cfg.decoder, None
    if kind == "image":                                     # (fake, as the previous image's reader) <image> fake
        ids, kv = cross_image_ids(c), cross_kv(model, data)
        B, dev = data.shape[0], data.device
        if len(ids) > 1:
            lead, pos = forward_segment(model, "text", torch.tensor([ids[:1]] * B, device=dev), cache, pos, last_only)
        cache.cross, cache.cross_on = kv, True
        data = torch.tensor([ids[-2:] if len(ids) > 1 else ids] * B, dtype=torch.long, device=dev)
    gate, cache.cross_on = cross_gates(data[0].tolist(), cache.cross_on, c.cross_attn_reset_token)
    k, v = cache.cross if cache.cross is not None else (None, None)
    gate = torch.tensor(gate, dtype=torch.float32, device=data.device)[None, :, None].expand(data.shape[0], -1, -1)
    positions = torch.arange(pos, pos + data.shape[1], device=data.device)
    logits = model.decoder(model.embed_tokens(data), "text", positions, cache, last_only, cross=(k, v, gate))
    if lead is not None and not last_only:
        logits = torch.cat([lead, logits], 1)
    return logits, pos + data.shape[1]


def forward_full(model, segments) -> torch.Tensor:
    """EdgeMM.forward_full for a cross-attention model: the segments one after another into one cache (the
    same computation as one pass with Idefics' image attention mask), all rows' logits."""
    n = sum(d.shape[1] if k == "text" else model.cfg.n_image_rows for k, d in segments)
    B = segments[0][1].shape[0]
    dev = segments[0][1].device
    cache, pos, out = KVCache.empty(model.cfg.decoder, B, n, device=dev), 0, []
    for kind, data in segments:
        lg, pos = forward_segment(model, kind, data, cache, pos, last_only=False)
        out.append(lg)
    return torch.cat(out, 1)
