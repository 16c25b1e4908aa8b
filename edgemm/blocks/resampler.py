"""Qwen-VL's visual module (the released `visual.py`): its ViT (role "vision", kind "qwen") and its single
cross-attention resampler with the final LayerNorm and projection (role "connector", kind "resampler").

Shapes: B batch, S image side, P patches (G x G grid), W tower width, Q queries (a square grid), D d_model (the
resampler's width: Qwen-VL's output_dim is the LM's hidden size), h resampler heads (output_dim // 128).

- QwenVisionTower: conv1 (no bias) patch embedding, one position row per patch (the released 256-row table
  interpolated bicubically to the image's grid at import, `abs_pos`), ln_pre, pre-norm blocks (ClipBlock: fused QKV
  with bias, out_proj, GELU MLP c_fc/c_proj); no CLS, no post-norm. pixels [B, 3, S, S] -> [B, P, W].
- QwenResampler (`attn_pool` + `ln_post` + `proj`): Q learned queries (`query`) read the tower rows in one
  multi-head cross-attention (nn.MultiheadAttention's parameters: packed in_proj with bias, out_proj with bias):
      kv = ln_kv(kv_proj(x));  q = ln_q(query) + pos_embed;  k = kv + key_pos;  v = kv
      rows = ln_post(out_proj(softmax(q_h k_h^T / sqrt(D / h)) v_h)) @ proj
  pos_embed [Q, D] is the 2-D sin-cos table over the query grid; key_pos [P, D] the same table interpolated
  bicubically to the tower's grid (get_abs_pos in the release; a constant of the weights at a fixed image size,
  computed at import). Output [B, Q, D]: the rows between <img> and </img>, read by the decoder's single branch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register
from .vision import ClipBlock, Tower


def abs_pos(table: torch.Tensor, n: int) -> torch.Tensor:
    """The release's get_abs_pos: a square position table [L, C] -> [n, C], interpolated bicubically (align_corners
    False, in fp32) to a sqrt(n) x sqrt(n) grid when the sides differ."""
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(n))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """The 2-D sin-cos table over a grid x grid square (MAE's, as the release builds `pos_embed`): [grid^2, dim], the
    first half encodes the column index (w), the second the row index (h), each [sin | cos] at 1 / 10000^(2i / half)."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))
    w, h = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="xy")

    def one(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)
    return torch.cat([one(w), one(h)], 1).float()


@register("vision", "qwen")
class QwenVisionTower(Tower):
    """Qwen-VL's ViT (see the module docstring). pixels [B, 3, S, S] -> [B, P, W]."""

    def __init__(self, c):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, c.patch_size, bias=False)
        self.pos = nn.Parameter(torch.zeros(1, c.n_patches, c.width))
        self.pre_norm = nn.LayerNorm(c.width, eps=c.eps)
        self.blocks = nn.ModuleList(ClipBlock(c) for _ in range(c.layers))

    def forward(self, pixels):                              # pixels: [B, 3, S, S]
        x = self.pre_norm(self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.pos)   # [B, P, W]
        for blk in self.blocks:
            x = blk(x)
        return x


class _MhaParams(nn.Module):
    """nn.MultiheadAttention's parameters under its names (in_proj_weight [3D, D], in_proj_bias, out_proj)."""

    def __init__(self, d: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)


@register("connector", "resampler")
class QwenResampler(nn.Module):
    """Qwen-VL's attn_pool + ln_post + proj (see the module docstring). feats [B, P, W] -> [B, Q, D]."""

    def __init__(self, a, width: int, n_patches: int, d_model: int):
        super().__init__()
        Q, self.heads = a.query_tokens, a.resampler_heads
        self.query = nn.Parameter(torch.zeros(Q, d_model))
        self.pos_embed = nn.Parameter(sincos_2d(d_model, int(math.isqrt(Q))))
        self.key_pos = nn.Parameter(abs_pos(self.pos_embed.detach(), n_patches).clone())
        if width != d_model:                                # the release: an identity when the widths agree
            self.kv_proj = nn.Linear(width, d_model, bias=False)
        self.ln_q = nn.LayerNorm(d_model, eps=a.eps)
        self.ln_kv = nn.LayerNorm(d_model, eps=a.eps)
        self.attn = _MhaParams(d_model)
        self.ln_post = nn.LayerNorm(d_model, eps=a.eps)
        self.proj = nn.Linear(d_model, d_model, bias=False)  # the release's x @ proj: weight = proj^T

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width, cfg.vision.n_patches, cfg.decoder.d_model)

    def forward(self, feats):                               # feats [B, P, W] -> [B, Q, D]
        B, P = feats.shape[:2]
        kv = self.ln_kv(self.kv_proj(feats) if "kv_proj" in self._modules else feats)          # [B, P, D]
        q = (self.ln_q(self.query) + self.pos_embed).expand(B, -1, -1)                          # [B, Q, D]
        wq, wk, wv = self.attn.in_proj_weight.chunk(3)
        bq, bk, bv = self.attn.in_proj_bias.chunk(3)
        h, D = self.heads, q.shape[-1]

        def heads(t):
            return t.reshape(B, t.shape[1], h, D // h).transpose(1, 2)
        a = F.scaled_dot_product_attention(heads(F.linear(q, wq, bq)), heads(F.linear(kv + self.key_pos, wk, bk)),
                                           heads(F.linear(kv, wv, bv)))                        # [B, h, Q, D/h]
        out = self.attn.out_proj(a.transpose(1, 2).reshape(B, -1, D))
        return self.proj(self.ln_post(out))
