"""The decoder: the KV cache, DecoderLayer (norms + the registered branch kinds) and Decoder (the layer stack).

Shapes: B batch, T rows in a segment, S cached rows, D d_model, H heads, K kv heads, E head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DecoderConfig
from .kv_rows import kv_rows
from .cross import GatedCrossAttnLayer, cross_layer_at, n_cross_layers
from .layers import Branch, CrossModalBridge, vision_branch
from .ops import RMSNorm, apply_rope, norm, rope_cos_sin, rope_dims, routed


@dataclass
class KVCache:
    """Preallocated per-layer K/V buffers; `length` rows are filled. k, v [L, B, K (x2 with a bridge), S_max, E].
    `limit`: the rows the cache may grow to when a segment outgrows it (grow: a copy into a bigger buffer; None:
    it never grows, a segment past its capacity is an error)."""
    k: torch.Tensor                                         # [L, B, K, S_max, E]
    v: torch.Tensor
    length: int = 0
    cross: tuple | None = None              # gated cross-attention: the current image's K, V (edgemm.xattn)
    cross_on: bool = False                  # whether the next token reads that image
    limit: int | None = None

    @classmethod
    def empty(cls, c: DecoderConfig, batch: int = 1, max_len: int | None = None, device=None, dtype=torch.float32,
              limit: int | None = None):
        heads = c.kv_heads * (2 if c.cross_modal_bridge else 1)    # bridge: K/V as read by each modality
        shape = (c.n_layers, batch, heads, max_len or c.max_seq_len, c.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   limit=limit)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, need: int) -> None:
        """Hold at least `need` rows: a bigger buffer (kv_rows: doubling, up to `limit`) with the rows copied."""
        if need <= self.capacity or self.limit is None or need > self.limit:
            return
        rows = kv_rows(need, self.limit, self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:3] + (rows,) + old.shape[4:])
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


class DecoderLayer(nn.Module):
    """One decoder layer: attn_norm, ffn_norm [D], the text branch, the vision branch of the registered kind
    (edgemm.blocks.layers), Libra's per-modality norms and bridges. Rows x [B, T, D] -> [B, T, D]."""

    def __init__(self, c: DecoderConfig, index: int = 0):
        super().__init__()
        self.c = c
        self.attn_norm = norm(c, c.d_model)                # RMSNorm, or Persimmon's LayerNorm (norm "layer")
        self.ffn_norm = norm(c, c.d_model)
        if c.sandwich_norms:                                # Gemma: norms of the attention and MLP outputs too
            self.post_attn_norm, self.post_ffn_norm = norm(c, c.d_model), norm(c, c.d_model)
        self.window = c.sliding_window if index in c.sliding_layers else 0      # Gemma 3's local layers
        self.text = Branch(c, moe=c.is_moe_layer(index))
        vision = vision_branch(c, self.text)                # the registered kind (edgemm.blocks.layers)
        if vision is not None:
            self.vision = vision
        if c.per_modality_norms:
            self.vision_attn_norm = RMSNorm(c.d_model, c.rms_eps)
            self.vision_ffn_norm = RMSNorm(c.d_model, c.rms_eps)
        if c.cross_modal_bridge:
            CrossModalBridge.attach(self.text, c)
            CrossModalBridge.attach(self.vision, c)

    @property
    def vision(self):
        """The vision branch; with single_branch (LLaVA) the text branch serves image rows too."""
        m = self._modules.get("vision")
        return self._modules["text"] if m is None else m

    def _norm(self, x, route, which: str):
        n = self.attn_norm if which == "attn" else self.ffn_norm
        if not self.c.per_modality_norms:
            return n(x)
        return routed(x, route, n, self.vision_attn_norm if which == "attn" else self.vision_ffn_norm)

    def forward(self, x, route, cos, sin, cache: KVCache | None, layer: int, start: int):
        """One layer over rows x [B, T, D] routed per row (`route`: "text", "vision" or a bool mask of vision
        rows). Per-modality norms pick the norm per row; with cross_modal_bridge (Libra) a row's K/V as read by
        queries of the other modality get the row's own-modality rank-r bridge added, and the cache holds both
        versions: heads [0, K) for text queries, [K, 2K) for vision queries."""
        c = self.c
        B, T, _ = x.shape
        H, K, E = c.n_heads, c.kv_heads, c.head_dim
        h = self._norm(x, route, "attn")
        qkv = routed(h, route, self.text.qkv, self.vision.qkv)                       # [B, T, (H+2K)E]
        qn, kn = (getattr(self.text, n, None) or (lambda t: t) for n in ("q_norm", "k_norm"))   # (qk_norm)
        q = apply_rope(qn(qkv[..., : H * E].view(B, T, H, E)).transpose(1, 2), cos, sin)
        k, v = qkv[..., H * E: (H + K) * E], qkv[..., (H + K) * E:]                 # [B, T, K*E]
        if c.cross_modal_bridge:
            vis = route if not isinstance(route, str) else torch.full((T,), route == "vision", device=x.device)
            kb = routed(h, route, self.text.k_bridge, self.vision.k_bridge)
            vb = routed(h, route, self.text.v_bridge, self.vision.v_bridge)
            sel = vis[None, :, None]
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            ks = (k + torch.where(sel, kb, zero), k + torch.where(sel, zero, kb))  # (for text q, for vision q)
            vs = (v + torch.where(sel, vb, zero), v + torch.where(sel, zero, vb))
        else:
            ks, vs = (k,), (v,)
        ks = [apply_rope(kn(t.view(B, T, K, E)).transpose(1, 2), cos, sin) for t in ks]
        vs = [t.view(B, T, K, E).transpose(1, 2) for t in vs]
        if cache is not None:
            for j, (kj, vj) in enumerate(zip(ks, vs)):
                cache.k[layer, :B, j * K:(j + 1) * K, start:start + T] = kj
                cache.v[layer, :B, j * K:(j + 1) * K, start:start + T] = vj
            n = len(ks)
            ks = [cache.k[layer, :B, j * K:(j + 1) * K, : start + T] for j in range(n)]
            vs = [cache.v[layer, :B, j * K:(j + 1) * K, : start + T] for j in range(n)]
        S = ks[0].shape[2]
        mask = attn_mask(c, T, S, route, self.window, x.device)
        scale = c.query_scale ** -0.5 if c.query_scale else None

        def attend(kk, vv):
            if K != H:
                kk, vv = kk.repeat_interleave(H // K, 1), vv.repeat_interleave(H // K, 1)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)      # [B, H, T, E]
        if len(ks) == 1:
            a = attend(ks[0], vs[0])
        elif isinstance(route, str):
            j = 1 if route == "vision" else 0
            a = attend(ks[j], vs[j])
        else:
            a = torch.where(vis[None, None, :, None], attend(ks[1], vs[1]), attend(ks[0], vs[0]))
        a = a.transpose(1, 2).reshape(B, T, H * E)
        a = routed(a, route, self.text.o, self.vision.o)
        x = x + (self.post_attn_norm(a) if self.c.sandwich_norms else a)
        h = routed(self._norm(x, route, "ffn"), route, self.text.mlp, self.vision.mlp)
        return x + (self.post_ffn_norm(h) if self.c.sandwich_norms else h)


def image_blocks(route, T: int, device):
    """Gemma 3's image blocks among T new rows: [T] ids (-1: none), the rows of an image segment between its boi and
    eoi rows (route "vision": the segment; a mask: each run of vision rows), or None (no image rows)."""
    if isinstance(route, str):
        if route != "vision" or T < 3:
            return None
        ids = torch.zeros(T, dtype=torch.long, device=device)
        ids[0] = ids[-1] = -1
        return ids
    r = route.to(device)
    first = r & ~torch.cat([r.new_zeros(1), r[:-1]])
    last = r & ~torch.cat([r[1:], r.new_zeros(1)])
    return torch.where(r & ~first & ~last, first.long().cumsum(0) - 1, -1)


def attn_mask(c: DecoderConfig, T: int, S: int, route, window: int, device):
    """[T, S] bool (None: all): new row i sees the cached rows and new rows <= i; Gemma 3: also the rows of its own
    image block (image_bidirectional, image_blocks), and on a sliding layer only keys less than `window` rows back."""
    if T == 1 and not window:
        return None
    q, k = torch.arange(S - T, S, device=device)[:, None], torch.arange(S, device=device)[None]
    mask = k <= q
    b = image_blocks(route, T, device) if c.image_bidirectional else None
    if b is not None:
        mask[:, S - T:] |= (b[:, None] == b[None]) & (b[:, None] >= 0)
    return mask & (q - k < window) if window else mask


class Decoder(nn.Module):
    """tok_embeddings [vocab, D], the layers (+ the gated cross-attention layers before some of them), the final
    RMSNorm (Libra: one per modality), lm_head [D -> vocab]. Rows [B, T, D] -> logits [B, T, vocab]."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.c = c
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.n_layers))
        self.norm = norm(c, c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        if c.per_modality_norms:
            self.vision_norm = RMSNorm(c.d_model, c.rms_eps)           # Libra: final norm per modality
        if c.cross_attn_every:                                          # Flamingo / Idefics (edgemm.blocks.cross)
            self.cross_layers = nn.ModuleList(GatedCrossAttnLayer(c) for _ in range(n_cross_layers(c)))
        self.cross_at = [cross_layer_at(c, i) if c.cross_attn_every else None for i in range(c.n_layers)]

    def forward(self, x, route, positions, cache: KVCache | None = None, last_only: bool = False, cross=None):
        """x: [B, T, D] input rows; positions: [T] RoPE positions ([3, T] with M-RoPE); appends to cache at cache.length.
        cross: (K, V [Lx, B, H, n, E] or None, gate [B, T, 1]) for the gated cross-attention layers."""
        start = cache.length if cache is not None else 0
        if cache is not None and start + x.shape[1] > cache.capacity:
            cache.reserve(start + x.shape[1])                   # (a cache sized to need grows: KVCache.limit)
        if cache is not None and start + x.shape[1] > cache.capacity:
            raise ValueError(f"KV cache full: {start} + {x.shape[1]} rows > capacity {cache.capacity}")
        c = self.c
        rope = {0: rope_cos_sin(positions, rope_dims(c), c.rope_theta, c.rope_linear_factor,  # (partial: [T, R])
                                c.mrope_section)}                  # (M-RoPE: positions [3, T])
        if c.sliding_layers:                                                         # Gemma 3's local RoPE base
            rope[c.sliding_window] = rope_cos_sin(positions, rope_dims(c), c.rope_local_theta)
        for i, layer in enumerate(self.layers):
            if cross is not None:
                j = self.cross_at[i]
                if j is not None:
                    k, v, gate = cross
                    x = self.cross_layers[j](x, None if k is None else k[j], None if v is None else v[j], gate)
            x = layer(x, route, *rope[layer.window], cache, i, start)
        if cache is not None:
            cache.length = start + x.shape[1]
        if last_only:
            x = x[:, -1:]
            if not isinstance(route, str):
                route = route[-1:]
        if self.c.per_modality_norms:
            return self.lm_head(routed(x, route, self.norm, self.vision_norm))
        return self.lm_head(self.norm(x))                                            # [B, T, vocab]
