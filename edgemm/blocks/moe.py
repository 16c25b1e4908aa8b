"""Mixture-of-experts FFN (role "layer", kind "moe"; MoE-LLaVA: Mixtral / Qwen3-MoE language models).

Router Linear -> softmax over the experts -> top-k -> (renormalised when norm_topk_prob) weights; each chosen
expert is a SwiGLU MLP. The experts are stacked weights so that exporters read them as they are:
gate, up [n_experts, F, D] and down [n_experts, D, F] (each expert's slice is an nn.Linear weight).
An MoE layer's text branch holds it as `moe` in place of its dense MLP (edgemm.blocks.layers.Branch).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DecoderConfig
from .registry import register


@register("layer", "moe")
class MoE(nn.Module):
    """x [..., D] -> the weighted sum of its top-k experts' SwiGLU outputs [..., D]."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        n, D, Fe = c.n_experts, c.d_model, c.moe_ffn_dim
        self.top_k, self.norm_topk_prob = c.experts_top_k, c.norm_topk_prob
        self.router = nn.Linear(D, n, bias=False)
        self.gate = nn.Parameter(torch.empty(n, Fe, D))
        self.up = nn.Parameter(torch.empty(n, Fe, D))
        self.down = nn.Parameter(torch.empty(n, D, Fe))

    def route(self, x):                                     # x [N, D] -> weights [N, k], experts [N, k]
        p = torch.softmax(self.router(x).float(), -1)
        w, idx = torch.topk(p, self.top_k, -1)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return w.to(x.dtype), idx

    def forward(self, x):                                   # x [..., D]
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():                     # only the chosen experts are computed
            rows, slot = (idx == e).nonzero(as_tuple=True)
            h = x[rows]
            y = F.linear(F.silu(F.linear(h, self.gate[e])) * F.linear(h, self.up[e]), self.down[e])
            out.index_add_(0, rows, y * w[rows, slot, None])
        return out.reshape(shape)

    def init_weights(self, g: torch.Generator, std: float, resid_std: float) -> None:
        """The stacked experts (the router is an nn.Linear: EdgeMM.init_weights initialises it)."""
        with torch.no_grad():
            for p, s in ((self.gate, std), (self.up, std), (self.down, resid_std)):
                p.copy_(torch.randn(p.shape, generator=g) * s)


