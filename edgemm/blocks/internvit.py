"""InternViT (InternVL's vision tower, transformers' InternVLVisionModel), registered as vision arch "internvit".

Shapes: N tiles, S tile side, P patches, W tower width. pixels [N, 3, S, S] -> tower rows [N, P, W] (CLS dropped,
InternVL's "default" feature strategy); the pixel_shuffle connector (edgemm.blocks.connectors) makes the image rows.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig
from .ops import RMSNorm, gelu
from .registry import register
from .vision import Tower

QK_NORM_EPS = 1e-6          # transformers' InternVLVisionRMSNorm default (q_norm / k_norm), whatever layer_norm_eps is


def _norm(c: VisionConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=c.eps) if c.norm == "layer" else RMSNorm(dim, c.eps)


class InternVitBlock(nn.Module):
    """Pre-norm block with LayerScale: x + ls1 * proj(attn(ln1(x))), then x + ls2 * fc2(gelu(fc1(ln2(x)))); fused QKV
    (bias per config), optionally an RMSNorm over all of q and of k (before the heads split). [N, P, W] -> [N, P, W]."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        W = c.width
        self.heads, self.gelu = c.heads, c.gelu
        self.ln1, self.ln2 = _norm(c, W), _norm(c, W)
        self.qkv = nn.Linear(W, 3 * W, bias=c.qkv_bias)
        if c.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(W, QK_NORM_EPS), RMSNorm(W, QK_NORM_EPS)
        self.proj = nn.Linear(W, W)
        self.ls1, self.ls2 = nn.Parameter(torch.ones(W)), nn.Parameter(torch.ones(W))     # lambda_1, lambda_2
        self.fc1 = nn.Linear(W, c.mlp_dim)
        self.fc2 = nn.Linear(c.mlp_dim, W)

    def forward(self, x):                                   # x: [N, P, W]
        B, T, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
        if "q_norm" in self._modules:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(B, T, self.heads, W // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, W)
        x = x + self.ls1 * self.proj(a)
        return x + self.ls2 * self.fc2(gelu(self.fc1(self.ln2(x)), self.gelu))


@register("vision", "internvit")
class InternVitTower(Tower):
    """InternViT: patch conv with bias, CLS first, one position table (tiles are always S x S: no interpolation),
    the first `feature_layer` InternVitBlocks (vision_feature_layer), a LayerNorm after them when final_norm, CLS
    dropped. pixels [N, 3, S, S] -> [N, P, W]."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, c.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos = nn.Parameter(torch.zeros(1, c.n_patches + 1, c.width))
        n = c.layers if c.feature_layer is None else c.feature_layer
        self.blocks = nn.ModuleList(InternVitBlock(c) for _ in range(n))
        if c.final_norm:
            self.final_norm = nn.LayerNorm(c.width, eps=c.eps)

    def init_norm_gains(self) -> None:
        """LayerScale starts small, as InternViT's layer_scale_init_value (0.1) does."""
        for blk in self.blocks:
            blk.ls1.fill_(0.1)
            blk.ls2.fill_(0.1)

    def forward(self, pixels):                              # pixels: [N, 3, S, S]
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)               # [N, P, W]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        if "final_norm" in self._modules:
            x = self.final_norm(x)
        return x[:, 1:]                                                       # drop CLS
