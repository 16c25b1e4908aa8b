"""The gated cross-attention layer (role "layer", kind "gated-cross-attention"; Flamingo / Idefics).

Image rows never enter the sequence: before decoder layer i when i % cross_attn_every == 0 (Idefics' placement),
x + tanh(alpha_attn) * gate * o(attn(q(RMSNorm(x)), K, V)), then x + tanh(alpha_dense) * mlp(RMSNorm(x)).
K and V come from the image's resampled rows (edgemm.blocks.connectors.PerceiverResampler), once per image. No RoPE
in cross-attention; optional RMSNorm of q and k per head (qk_layer_norms). The model's segments around it (which
image a token reads, the cross_kv stage) are edgemm.xattn.

Shapes: B batch, T rows, D d_model, H heads, E head dim, N image rows, W their width.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DecoderConfig
from .ops import RMSNorm
from .registry import register


def n_cross_layers(c: DecoderConfig) -> int:
    return c.n_layers // c.cross_attn_every if c.cross_attn_every else 0


def cross_layer_at(c: DecoderConfig, i: int) -> int | None:
    """The index of the cross-attention layer that runs before decoder layer i (Idefics' placement), or None."""
    if c.cross_attn_every and i % c.cross_attn_every == 0 and i // c.cross_attn_every < n_cross_layers(c):
        return i // c.cross_attn_every
    return None


@register("layer", "gated-cross-attention")
class GatedCrossAttnLayer(nn.Module):
    """IdeficsGatedCrossAttentionLayer: x [B, T, D], the image's K, V [B, H, N, E], gate [B, T, 1] -> [B, T, D].
    q, o [D -> D], k, v [W -> D] (W = cross_attn_kv_dim or D), SwiGLU gate/up/down, alpha_attn / alpha_dense
    [1] or [D]."""

    def __init__(self, c: DecoderConfig):
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
