"""Qwen2-VL / Qwen2.5-VL's vision tower (vision arch "qwen2vl") and patch merger (connector "qwen2vl_merger"), as
transformers' Qwen2VisionTransformerPretrainedModel / Qwen2_5_VisionTransformerPretrainedModel compute an image.

Shapes: h, w pixels (multiples of patch_size * merge_size), gh = h / p, gw = w / p, N = gh * gw patches, W tower
width, m merge_size, D d_model. pixels [1, 3, h, w] -> tower rows [1, N, W] in the processor's merge-block order (the
m x m patches of each merged cell together, cells row-major) -> merger -> image rows [1, N / m^2, D].

- the patch embedding: Conv3d over temporal_patch_size (T) frames. An image is one frame repeated: the import sums
  the kernel over time, so an image goes through a Conv2d (no bias) over its pixels. A video (`frames`: F frames
  [F, 3, h, w], F a multiple of T) goes through the whole kernel: each group of T consecutive frames stacked on the
  channels ([F / T, T * 3, h, w], frame-major) and a Conv2d over them (`patch_embed_t`, present where the
  checkpoint's VisionConfig.video has `temporal`); every group is attended on its own (transformers' cu_seqlens: one
  sequence per temporal patch), at the same 2-D positions, as a batch;
- 2-D RoPE: head_dim / 4 frequencies (base 10000) for the patch row, as many for its column, cat, then doubled
  (NEOX halves) over the whole head;
- blocks: x + proj(attn(norm1(x))), x + mlp(norm2(x)); LayerNorm and fc1 -> QuickGELU -> fc2 (Qwen2-VL), RMSNorm and
  a SwiGLU with biases (Qwen2.5-VL); Qwen2.5-VL's window attention: a patch attends to the patches of its
  window_px square (windows of merged cells from the top-left, the last ones cut by the image's edge) except in
  full_blocks. transformers gathers each window's patches together and attends per window; a mask over the
  patches in place computes the same (attention is the same for any order of a window's rows, and every other op
  is per row);
- the merger: ln_q (LayerNorm / RMSNorm, eps 1e-6), each cell's m^2 rows concatenated, Linear -> GELU (erf) -> Linear.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig
from .ops import RMSNorm, gelu
from .registry import register
from .vision import Tower

EPS = 1e-6                      # transformers' Qwen2-VL vision norms (fixed, whatever the config says)
ROPE_THETA = 10000.0            # Qwen2VLVisionConfig's axial rope_theta


def _norm(c: VisionConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=EPS) if c.norm == "layer" else RMSNorm(dim, EPS)


def _rotate(x, cos, sin):                                   # x [N, heads, E]; cos, sin [N, 1, E]
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


class Qwen2VLBlock(nn.Module):
    """One tower block. x [G, N, W] (G images / temporal patches, each attended alone), cos / sin [N, 1, E], mask
    [N, N] bool or None -> [G, N, W]."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        W = c.width
        self.heads, self.gelu, self.swiglu = c.heads, c.gelu, c.mlp == "swiglu"
        self.norm1, self.norm2 = _norm(c, W), _norm(c, W)
        self.qkv = nn.Linear(W, 3 * W)
        self.proj = nn.Linear(W, W)
        if self.swiglu:
            self.gate, self.up, self.down = nn.Linear(W, c.mlp_dim), nn.Linear(W, c.mlp_dim), nn.Linear(c.mlp_dim, W)
        else:
            self.fc1, self.fc2 = nn.Linear(W, c.mlp_dim), nn.Linear(c.mlp_dim, W)

    def forward(self, x, cos, sin, mask):
        G, N, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(G, N, 3, self.heads, W // self.heads).unbind(2)   # [G, N, heads, E]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(G, N, W))
        h = self.norm2(x)
        h = self.down(F.silu(self.gate(h)) * self.up(h)) if self.swiglu else self.fc2(gelu(self.fc1(h), self.gelu))
        return x + h


@register("vision", "qwen2vl")
class Qwen2VLTower(Tower):
    """pixels [1, 3, h, w] -> tower rows [1, N, W] in merge-block order (module docstring); `frames`: a video."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, c.patch_size, bias=False)
        T = int(c.video.get("temporal", 0))
        if T:                             # the Conv3d's whole kernel, frame-major on the channels (a video's)
            self.patch_embed_t = nn.Conv2d(3 * T, c.width, c.patch_size, c.patch_size, bias=False)
        self.blocks = nn.ModuleList(Qwen2VLBlock(c) for _ in range(c.layers))

    def forward(self, pixels):
        return self._run(self.patch_embed(pixels))                            # [1, W, gh, gw] -> [1, N, W]

    def frames(self, frames):
        """A video's frames [F, 3, h, w] (F a multiple of T) -> rows [F / T, N, W], one temporal patch a row."""
        T = self.patch_embed_t.in_channels // 3
        return self._run(self.patch_embed_t(frames.reshape(-1, 3 * T, frames.shape[2], frames.shape[3])))

    def _run(self, x):
        c, m = self.c, self.c.merge_size
        G, W, gh, gw = x.shape[0], x.shape[1], x.shape[2], x.shape[3]

        def blocks(t):                    # [gh, gw, ...] -> [N, ...]: each merged cell's m x m patches together
            return t.reshape(gh // m, m, gw // m, m, -1).transpose(1, 2).reshape(gh * gw, -1)
        x = x.permute(0, 2, 3, 1).reshape(G, gh // m, m, gw // m, m, W).transpose(2, 3).reshape(G, gh * gw, W)
        hw = torch.stack([torch.arange(gh, device=x.device)[:, None].expand(gh, gw),
                          torch.arange(gw, device=x.device)[None, :].expand(gh, gw)], -1)
        hw = blocks(hw)                                                       # [N, 2]: patch row, column
        E2 = c.width // c.heads // 2
        inv = 1.0 / ROPE_THETA ** (torch.arange(0, E2, 2, dtype=torch.float32, device=x.device) / E2)   # [E/4]
        f = (hw[:, :, None].float() * inv).reshape(gh * gw, -1)               # [N, E/2]: rows' then columns'
        f = torch.cat([f, f], -1)[:, None]                                    # [N, 1, E]
        cos, sin = f.cos(), f.sin()
        window = None
        if c.window_px:                   # Qwen2.5-VL: windows of window_px / (p m) merged cells a side
            cells = c.window_px // (c.patch_size * m)
            wid = (hw[:, 0] // m // cells) * (gw // m // cells + 1) + hw[:, 1] // m // cells
            window = wid[:, None] == wid[None, :]                             # [N, N]
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, None if i in c.full_blocks else window)
        return x                                                              # [G, N, W]


@register("connector", "qwen2vl_merger")
class Qwen2VLMerger(nn.Module):
    """ln_q, each merged cell's m^2 rows concatenated, fc1 -> GELU (erf) -> fc2: [1, N, W] -> [1, N / m^2, D]."""

    def __init__(self, v: VisionConfig, d_model: int):
        super().__init__()
        self.ln_q = _norm(v, v.width)
        n = v.width * v.merge_size ** 2
        self.fc1, self.fc2 = nn.Linear(n, n), nn.Linear(n, d_model)

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.vision, cfg.decoder.d_model)

    def forward(self, feats):
        x = self.ln_q(feats)
        x = x.reshape(x.shape[0], -1, self.fc1.in_features)
        return self.fc2(F.gelu(self.fc1(x)))
