"""Functional pieces several blocks share: GELU forms, RMSNorm, per-row routing, NEOX RoPE, position-table
interpolation.

Shapes: B batch, T rows, H heads, E head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gelu(x: torch.Tensor, form: str) -> torch.Tensor:
    if form == "quick":                                     # CLIP's quick_gelu
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if form == "tanh" else "none")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim; x [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def routed(x: torch.Tensor, route, fn_text, fn_vision) -> torch.Tensor:
    """Apply fn_text / fn_vision to the rows of x by modality.

    route is "text" or "vision" (a whole segment through one branch: static routing, what exports use)
    or a bool mask [T] of vision rows shared by the batch (mixed sequences: training, reference checks).
    """
    if isinstance(route, str):
        return fn_vision(x) if route == "vision" else fn_text(x)
    if not route.any():
        return fn_text(x)
    if route.all():
        return fn_vision(x)
    yt, yv = fn_text(x[:, ~route]), fn_vision(x[:, route])
    out = x.new_empty(x.shape[:-1] + yt.shape[-1:])
    out[:, ~route], out[:, route] = yt, yv
    return out


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, factor: float = 1.0, sections=()):
    """NEOX-style RoPE tables for positions [T] -> cos, sin [T, E] (factor: linear scaling, frequencies / factor).
    M-RoPE (Qwen2-VL): positions [3, T] (temporal, height, width) and `sections` splitting the E/2 frequencies
    between them, in that order ([T] positions: the three rows equal, plain RoPE)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    inv = inv / factor if factor != 1.0 else inv
    if positions.dim() == 2:                                # [3, T]: each frequency from its section's row
        row = torch.repeat_interleave(torch.arange(3, device=positions.device), torch.tensor(list(sections)).to(
            positions.device))
        f = positions.float()[row].t() * inv[None]          # [T, E/2]
        return torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
    f = positions.float()[:, None] * inv[None]
    f = torch.cat([f, f], -1)
    return f.cos(), f.sin()


def norm(c, dim: int) -> nn.Module:
    """The decoder's norm of width dim: RMSNorm, or LayerNorm with bias (norm "layer": Persimmon)."""
    return nn.LayerNorm(dim, eps=c.rms_eps) if c.norm == "layer" else RMSNorm(dim, c.rms_eps)


def rope_dims(c) -> int:
    """The rotated dims of each head: all, or the first rope_dims (Persimmon's partial_rotary_factor)."""
    return c.rope_dims or c.head_dim


def apply_rope(x, cos, sin):                                # x: [B, H, T, E]; cos, sin [T, R], R <= E
    if cos.shape[-1] < x.shape[-1]:                         # partial rotary: the first R dims, the rest as they are
        r = cos.shape[-1]
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], -1)
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def grid_pos(table: torch.Tensor, h, w) -> torch.Tensor:
    """A square position table [L, C] interpolated bicubically (align_corners False, in fp32) to an h x w grid ->
    [h * w, C] (h, w may be traced sizes: the ONNX graph's Resize takes them from the input's shape)."""
    src = int(math.sqrt(table.shape[0]))
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(-1, table.shape[-1]).to(table.dtype)
