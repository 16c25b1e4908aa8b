"""Gated cross-attention (Flamingo / Idefics): image rows never enter the sequence.

- `PerceiverResampler` (adapter kind "perceiver", Idefics' IdeficsPerceiverResampler): the vision tower's rows
  [B, N, W] -> `perceiver_latents` rows [B, n, W] through `perceiver_depth` blocks of attention over
  concat(context, latents) + a ReLU MLP, then a LayerNorm. This is the `vision` stage's output.
- `GatedCrossAttnLayer` (IdeficsGatedCrossAttentionLayer): before decoder layer i when i % cross_attn_every == 0,
  x + tanh(alpha_attn) * gate * o(attn(q(RMSNorm(x)), K, V)), then x + tanh(alpha_dense) * mlp(RMSNorm(x)).
  K and V come from the image's resampled rows, once per image (`cross_kv`, the `cross_kv` stage), and are kept
  beside the KV cache. No RoPE in cross-attention; optional RMSNorm of q and k per head (qk_layer_norms).
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
import torch.nn as nn
import torch.nn.functional as F

from .config import AdapterConfig, DecoderConfig, cross_gates, cross_image_ids


# --------------------------------------------------------------------------- the resampler (adapter)
class PerceiverBlock(nn.Module):
    def __init__(self, a: AdapterConfig, width: int):
        super().__init__()
        n = a.perceiver_heads * a.perceiver_head_dim
        self.heads, self.hd = a.perceiver_heads, a.perceiver_head_dim
        self.context_norm = nn.LayerNorm(width, eps=a.eps)
        self.latents_norm = nn.LayerNorm(width, eps=a.eps)
        if a.perceiver_qk_norms:
            self.q_norm = nn.LayerNorm(self.hd, eps=a.eps)
            self.k_norm = nn.LayerNorm(self.hd, eps=a.eps)
        self.q, self.k, self.v = (nn.Linear(width, n, bias=False) for _ in range(3))
        self.o = nn.Linear(n, width, bias=False)
        self.ln = nn.LayerNorm(width, eps=a.eps)
        self.fc = nn.Linear(width, a.perceiver_ffn or 4 * width, bias=False)
        self.c_proj = nn.Linear(a.perceiver_ffn or 4 * width, width, bias=False)

    def forward(self, ctx, lat):                            # ctx [B, N, W], lat [B, n, W]
        c, l = self.context_norm(ctx), self.latents_norm(lat)
        B, n = l.shape[:2]
        kv = torch.cat([c, l], 1)

        def heads(t):
            return t.view(B, t.shape[1], self.heads, self.hd).transpose(1, 2)
        q, k, v = heads(self.q(l)), heads(self.k(kv)), heads(self.v(kv))
        if "q_norm" in self._modules:
            q, k = self.q_norm(q), self.k_norm(k)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, -1)
        lat = lat + self.o(a)
        return lat + self.c_proj(F.relu(self.fc(self.ln(lat))))


class PerceiverResampler(nn.Module):
    def __init__(self, a: AdapterConfig, width: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(a.perceiver_latents, width))
        self.blocks = nn.ModuleList(PerceiverBlock(a, width) for _ in range(a.perceiver_depth))
        self.norm = nn.LayerNorm(width, eps=a.eps)

    def forward(self, feats):                               # [B, N, W] -> [B, n_latents, W]
        lat = self.latents.expand(feats.shape[0], -1, -1)
        for blk in self.blocks:
            lat = blk(feats, lat)
        return self.norm(lat)


# --------------------------------------------------------------------------- the gated cross-attention layer
def n_cross_layers(c: DecoderConfig) -> int:
    return c.n_layers // c.cross_attn_every if c.cross_attn_every else 0


def cross_layer_at(c: DecoderConfig, i: int) -> int | None:
    """The index of the cross-attention layer that runs before decoder layer i (Idefics' placement), or None."""
    if c.cross_attn_every and i % c.cross_attn_every == 0 and i // c.cross_attn_every < n_cross_layers(c):
        return i // c.cross_attn_every
    return None


class GatedCrossAttnLayer(nn.Module):
    def __init__(self, c: DecoderConfig):
        from .model import RMSNorm
        super().__init__()
        self.c = c
        D, E, W = c.d_model, c.head_dim, c.cross_attn_kv_dim or c.d_model
        self.attn_norm = RMSNorm(D, c.rms_eps)
        self.q = nn.Linear(D, D, bias=False)
        self.k = nn.Linear(W, D, bias=False)
        self.v = nn.Linear(W, D, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        if c.cross_attn_qk_norms:
            self.q_norm = RMSNorm(E, c.rms_eps)
            self.k_norm = RMSNorm(E, c.rms_eps)
        self.ffn_norm = RMSNorm(D, c.rms_eps)
        self.gate = nn.Linear(D, c.ffn_dim, bias=False)
        self.up = nn.Linear(D, c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, D, bias=False)
        n = D if c.cross_attn_alpha == "vector" else 1
        self.alpha_attn = nn.Parameter(torch.zeros(n))
        self.alpha_dense = nn.Parameter(torch.zeros(n))

    def mlp(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def kv(self, rows):                                     # rows [B, N, W] -> K, V [B, H, N, E]
        B, N = rows.shape[:2]
        H, E = self.c.n_heads, self.c.head_dim
        k = self.k(rows).view(B, N, H, E).transpose(1, 2)
        if "k_norm" in self._modules:
            k = self.k_norm(k)
        return k, self.v(rows).view(B, N, H, E).transpose(1, 2)

    def forward(self, x, k, v, gate):
        """x [B, T, D]; k, v [B, H, N, E] (None: no image yet); gate [B, T, 1]: 1 where the row reads the image."""
        if k is not None:
            B, T, D = x.shape
            H, E = self.c.n_heads, self.c.head_dim
            q = self.q(self.attn_norm(x)).view(B, T, H, E).transpose(1, 2)
            if "q_norm" in self._modules:
                q = self.q_norm(q)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
            x = x + torch.tanh(self.alpha_attn) * (self.o(a) * gate)
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.ffn_norm(x))


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
    from .model import KVCache
    n = sum(d.shape[1] if k == "text" else model.cfg.n_image_rows for k, d in segments)
    B = segments[0][1].shape[0]
    dev = segments[0][1].device
    cache, pos, out = KVCache.empty(model.cfg.decoder, B, n, device=dev), 0, []
    for kind, data in segments:
        lg, pos = forward_segment(model, kind, data, cache, pos, last_only=False)
        out.append(lg)
    return torch.cat(out, 1)
