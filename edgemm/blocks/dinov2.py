"""DINOv2 (transformers' Dinov2Model / Dinov2WithRegistersModel), registered as vision arch "dinov2", and OmniFusion's
two-tower front end (CLIP-ViT-L + DINOv2 on the same image), registered as vision arch "clip+dinov2".

Shapes: B batch, S image side, P patches, R register tokens, W tower width. The position table is the tower's own
grid (the importer interpolates a checkpoint's table to it once, as transformers' interpolate_pos_encoding does).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig
from .internvit import InternVitTower
from .registry import register
from .vision import ClipVisionTower, Tower


@register("vision", "dinov2")
class Dinov2Tower(InternVitTower):
    """DINOv2: InternViT's tower and blocks with their defaults (patch conv with bias, CLS first, one position table
    over CLS + patches; pre-norm LayerNorm blocks with biased fused QKV and LayerScale: x + ls1 * proj(attn(ln1(x))),
    x + ls2 * fc2(gelu(fc1(ln2(x))))), plus the register tokens after CLS (registers > 0: Dinov2WithRegisters, no
    positions); the final LayerNorm when final_norm (last_hidden_state); CLS and registers dropped.
    pixels [B, 3, S, S] -> [B, P, W]."""

    def __init__(self, c: VisionConfig):
        super().__init__(c)
        if c.registers:
            self.registers = nn.Parameter(torch.zeros(1, c.registers, c.width))
        self.skip = 1 + c.registers

    def forward(self, pixels):                              # pixels: [B, 3, S, S]
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)               # [B, P, W]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        if "registers" in self._parameters:                                   # CLS, registers, patches
            x = torch.cat([x[:, :1], self.registers.expand(x.shape[0], -1, -1), x[:, 1:]], 1)
        for blk in self.blocks:
            x = blk(x)
        if "final_norm" in self._modules:
            x = self.final_norm(x)
        return x[:, self.skip:]                                               # drop CLS and registers


@register("vision", "clip+dinov2")
class ClipDinov2Towers(Tower):
    """OmniFusion's merged encoders: the CLIP tower (the config's own fields, LLaVA's "clip" tower) and a DINOv2 tower
    (`vision.second`: its VisionConfig fields) on the same image. The processor normalises with CLIP's mean and std;
    the DINOv2 tower's pixels are renormalised with its own (a per-channel affine of constants).
    pixels [B, 3, S, S] -> (CLIP rows [B, P, W], DINOv2 rows [B, P, W2]); the omni_mlp connector merges them."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        d = second_config(c)
        self.clip, self.dino = ClipVisionTower(c), Dinov2Tower(d)
        # x_dino = x * s0 / s1 + (m0 - m1) / s1 per channel (constants: no state, also when built on meta)
        self.renorm = [(s0 / s1, (m0 - m1) / s1) for m0, s0, m1, s1 in
                       zip(c.image_mean, c.image_std, d.image_mean, d.image_std)]

    def init_norm_gains(self) -> None:
        self.dino.init_norm_gains()

    def forward(self, pixels):                              # pixels: [B, 3, S, S]
        scale, shift = (torch.tensor(t, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
                        for t in zip(*self.renorm))
        return self.clip(pixels), self.dino(pixels * scale + shift)


def second_config(c: VisionConfig) -> VisionConfig:
    """The second (DINOv2) tower's VisionConfig: the image and patch sizes of the first, its own fields from
    `c.second`."""
    import dataclasses
    keep = {f.name for f in dataclasses.fields(VisionConfig)} - {"image_size", "patch_size", "second"}
    return VisionConfig(image_size=c.image_size, patch_size=c.patch_size, arch="dinov2",
                        **{k: v for k, v in c.second.items() if k in keep and k != "arch"})


def interpolate_pos(table, grid: int, antialias: bool):
    """A DINOv2 position table [1, 1 + n^2, W] -> [1, 1 + grid^2, W], as transformers' Dinov2(WithRegisters)
    interpolate_pos_encoding does (bicubic, align_corners False; antialiased with registers); as is when n == grid."""
    n = round((table.shape[1] - 1) ** 0.5)
    if n == grid:
        return table
    W = table.shape[-1]
    p = table[:, 1:].reshape(1, n, n, W).permute(0, 3, 1, 2).float()
    p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([table[:, :1], p.permute(0, 2, 3, 1).reshape(1, grid * grid, W).to(table.dtype)], 1)
