"""Functional pieces several blocks share: GELU forms, RMSNorm, per-row routing, NEOX RoPE.

Shapes: B batch, T rows, H heads, E head dim.
"""
from __future__ import annotations

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


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """NEOX-style RoPE tables for positions [T] -> cos, sin [T, E]."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    f = positions.float()[:, None] * inv[None]
    f = torch.cat([f, f], -1)
    return f.cos(), f.sin()


def apply_rope(x, cos, sin):                                # x: [B, H, T, E]
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin
