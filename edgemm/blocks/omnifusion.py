"""OmniFusion's adapters (arXiv 2404.06212; AIRI-Institute/OmniFusion), registered as connectors, each wrapping the
image rows in the trainable begin/end-of-image rows `boi`, `eoi` (the release's SOI / EOI special embeddings: rows
outside the vocabulary).

Shapes: B batch, P patches, W tower width, F the adapter's hidden width (adapter.ffn_dim), D d_model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig
from .ops import gelu
from .registry import register


class _Wrapped(nn.Module):
    """boi [1, 1, D] and eoi [1, 1, D] around the adapter's rows."""

    def __init__(self, d_model: int):
        super().__init__()
        self.boi = nn.Parameter(torch.zeros(1, 1, d_model))
        self.eoi = nn.Parameter(torch.zeros(1, 1, d_model))

    def wrap(self, h):                                      # [B, P, D] -> [B, P + 2, D]
        B = h.shape[0]
        return torch.cat([self.boi.expand(B, -1, -1), h, self.eoi.expand(B, -1, -1)], 1)


@register("connector", "omni_mlp")
class OmniFusionMlp(_Wrapped):
    """The MLP adapter: out_proj(GELU(sum_e in_proj[e](feats_e))). One tower: a two-layer MLP; the merged encoders
    (vision arch clip+dinov2): the first layer is per encoder, their outputs summed, the output layer shared.
    feats: one [B, P, W] per tower (EdgeMM.encode_image splats a tower's tuple) -> [B, P + 2, D]."""

    def __init__(self, c: AdapterConfig, widths: list, d_model: int):
        super().__init__(d_model)
        self.gelu = c.gelu
        self.in_proj = nn.ModuleList(nn.Linear(w, c.ffn_dim) for w in widths)
        self.out_proj = nn.Linear(c.ffn_dim, d_model)

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, tower_widths(cfg.vision), cfg.decoder.d_model)

    def forward(self, *feats):
        h = sum(p(f) for p, f in zip(self.in_proj, feats))                   # [B, P, F]
        return self.wrap(self.out_proj(gelu(h, self.gelu)))


@register("connector", "omni_transformer")
class OmniFusionTransformer(_Wrapped):
    """The transformer adapter of the released OmniFusion (its VisualToGPTMapping): one post-norm encoder layer at the
    tower width (torch's TransformerEncoderLayer: `attn_heads` heads, ReLU FFN of ffn_dim, LayerNorm eps 1e-5)
    then `linear` to d_model. feats [B, P, W] -> [B, P + 2, D]."""

    def __init__(self, c: AdapterConfig, width: int, d_model: int):
        super().__init__(d_model)
        self.heads = c.attn_heads
        self.qkv = nn.Linear(width, 3 * width)              # in_proj_weight / in_proj_bias
        self.o = nn.Linear(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=c.eps), nn.LayerNorm(width, eps=c.eps)
        self.linear1 = nn.Linear(width, c.ffn_dim)
        self.linear2 = nn.Linear(c.ffn_dim, width)
        self.linear = nn.Linear(width, d_model)

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width, cfg.decoder.d_model)

    def forward(self, x):                                   # x: [B, P, W]
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        x = self.norm1(x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W)))
        x = self.norm2(x + self.linear2(F.relu(self.linear1(x))))
        return self.wrap(self.linear(x))


def tower_widths(v) -> list:
    """The widths of the tower rows the adapter reads: one tower, or CLIP's and the second tower's."""
    return [v.width] + ([v.second["width"]] if v.arch == "clip+dinov2" else [])
