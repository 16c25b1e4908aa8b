"""Decoder layer kinds (role "layer"): the branches of a routed layer, chosen by a small table.

Every decoder layer (edgemm.blocks.decoder.DecoderLayer) has a text branch (`Branch`: fused QKV, attention output,
SwiGLU MLP or the MoE FFN, edgemm.blocks.moe) and a vision branch of one of these kinds:

- "routed": its own dense Branch (edgemm's own family, CogVLM);
- "low-rank": every routed projection low-rank (Libra's vision branch, LowRankBranch);
- "low-rank-delta": the text branch's projections plus a rank-r delta (XComposer2's Partial-LoRA, DeltaBranch);
- "per-modality-kv": its own K and V only, the rest shared with the text branch (mPLUG-Owl2, KVBranch);
- "single": none, image rows go through the text branch (LLaVA, BLIP-2, Idefics, MoE-LLaVA).

A branch's interface: `qkv(x)` [B, T, D] -> [B, T, (H + 2K) E], `o(a)` [B, T, H E] -> [B, T, D], `mlp(x)`
[B, T, D] -> [B, T, D]. Libra's "bridge" adds rank-r K/V bridges (`k_bridge`, `v_bridge`) to both branches.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DecoderConfig
from .moe import MoE
from .ops import norm
from .registry import get, register


@register("layer", "routed")
class Branch(nn.Module):
    """The routed sub-modules of one modality in one layer: fused QKV, attention output, SwiGLU MLP (or, in an
    MoE layer, `moe`: router + stacked experts, edgemm.blocks.moe). qkv [D -> (H + 2K) E], o [H E -> D],
    gate/up [D -> F], down [F -> D]; Qwen3's q_norm / k_norm [E]. Persimmon (mlp "relu2", linear_bias): no gate,
    down(relu(up(x))^2), biases on o, up and down, q_norm / k_norm LayerNorms."""

    def __init__(self, c: DecoderConfig, moe: bool = False):
        super().__init__()
        self.qkv = nn.Linear(c.d_model, (c.n_heads + 2 * c.kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.o = nn.Linear(c.attn_width, c.d_model, bias=c.linear_bias)
        self.geglu = c.mlp == "geglu"
        if c.qk_norm:                                       # Qwen3 (RMSNorm), Persimmon (LayerNorm): per head
            self.q_norm, self.k_norm = norm(c, c.head_dim), norm(c, c.head_dim)
        if moe:
            self.moe = MoE(c)
            return
        if c.mlp != "relu2":                                # gated: SwiGLU, or Gemma's GELU-tanh (geglu)
            self.gate = nn.Linear(c.d_model, c.ffn_dim, bias=False)
        self.up = nn.Linear(c.d_model, c.ffn_dim, bias=c.linear_bias)
        self.down = nn.Linear(c.ffn_dim, c.d_model, bias=c.linear_bias)

    @classmethod
    def vision_branch(cls, c: DecoderConfig, text: "Branch") -> nn.Module:
        return cls(c)

    def mlp(self, x):
        if "moe" in self._modules:
            return self.moe(x)
        if "gate" not in self._modules:                     # Persimmon: squared ReLU, not gated
            return self.down(F.relu(self.up(x)).square())
        if getattr(self, "geglu", False):                   # Gemma: GELU (tanh form) gate
            return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _QRows:
    """The Q rows of a fused QKV Linear, as a Linear-like view (shared Q of mPLUG-Owl2's vision branch)."""

    def __init__(self, qkv: nn.Linear, n: int):
        self._qkv, self._n = qkv, n

    @property
    def weight(self):
        return self._qkv.weight[: self._n]

    @property
    def bias(self):
        return None if self._qkv.bias is None else self._qkv.bias[: self._n]

    def __call__(self, x):
        return F.linear(x, self.weight, self.bias)


@register("layer", "per-modality-kv")
class KVBranch(nn.Module):
    """mPLUG-Owl2's modality-adaptive module, vision side: its own K and V projections [D -> K E]; Q, the attention
    output and the MLP are the text branch's (shared, not copied: only k and v are parameters of this module)."""

    def __init__(self, c: DecoderConfig, text: Branch):
        super().__init__()
        E = c.head_dim
        self.k = nn.Linear(c.d_model, c.kv_heads * E, bias=c.qkv_bias)
        self.v = nn.Linear(c.d_model, c.kv_heads * E, bias=c.qkv_bias)
        self.__dict__["_text"] = text                       # a plain reference: not a submodule, no duplicate
        self.__dict__["q"] = _QRows(text.qkv, c.n_heads * E)

    @classmethod
    def vision_branch(cls, c: DecoderConfig, text: Branch) -> nn.Module:
        return cls(c, text)

    o = property(lambda self: self._text.o)
    gate = property(lambda self: self._text.gate)
    up = property(lambda self: self._text.up)
    down = property(lambda self: self._text.down)

    def qkv(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)

    def mlp(self, x):
        return self._text.mlp(x)


@register("layer", "single")
class SharedBranch:
    """LLaVA's single branch: no vision weights; image rows go through the text branch (DecoderLayer.vision is
    the text branch). Nothing to build."""

    @classmethod
    def vision_branch(cls, c: DecoderConfig, text: Branch) -> None:
        return None


class LowRankLinear(nn.Module):
    """Libra's LibraLinear: y = B (A x), A [rank, in], B [out, rank], no bias."""

    def __init__(self, n_in: int, n_out: int, rank: int):
        super().__init__()
        self.weight_A = nn.Parameter(torch.empty(rank, n_in))
        self.weight_B = nn.Parameter(torch.empty(n_out, rank))

    def forward(self, x):
        return F.linear(F.linear(x, self.weight_A), self.weight_B)


@register("layer", "low-rank")
class LowRankBranch(nn.Module):
    """Libra's vision branch: every routed projection low-rank (rank = vision_rank or out // down_ratio):
    q [D -> H E], k, v [D -> K E], o [H E -> D], gate/up [D -> F], down [F -> D]."""

    def __init__(self, c: DecoderConfig):
        super().__init__()

        def lr(n_in, n_out):
            return LowRankLinear(n_in, n_out, c.vision_rank or n_out // c.vision_down_ratio)
        E = c.head_dim
        self.q, self.k, self.v = lr(c.d_model, c.n_heads * E), lr(c.d_model, c.kv_heads * E), lr(c.d_model, c.kv_heads * E)
        self.o = lr(c.attn_width, c.d_model)
        self.gate, self.up, self.down = lr(c.d_model, c.ffn_dim), lr(c.d_model, c.ffn_dim), lr(c.ffn_dim, c.d_model)

    @classmethod
    def vision_branch(cls, c: DecoderConfig, text: Branch) -> nn.Module:
        return cls(c)

    def qkv(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)

    def mlp(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LowRankDelta(LowRankLinear):
    """XComposer2's PLoRA as a vision row sees it: base(x) + B (A x), `base` the text branch's Linear (W0, its bias),
    shared, not a parameter here; the released lora_scaling is folded into B at import. merged(): W0 + B A."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__(base.in_features, base.out_features, rank)
        self.__dict__["base"] = base                        # a plain reference: the text branch owns W0

    def forward(self, x):
        return self.base(x) + super().forward(x)

    def merged(self) -> torch.Tensor:
        return self.base.weight + self.weight_B @ self.weight_A


@register("layer", "low-rank-delta")
class DeltaBranch(nn.Module):
    """XComposer2's Partial-LoRA vision branch: every projection of the text branch (fused qkv, o, gate, up, down)
    plus a rank-r delta (LowRankDelta): image rows see W0 + B A, text rows W0."""

    def __init__(self, c: DecoderConfig, text: Branch):
        super().__init__()
        for n, mod in text.named_children():
            if isinstance(mod, nn.Linear):
                setattr(self, n, LowRankDelta(mod, c.vision_delta_rank))

    @classmethod
    def vision_branch(cls, c: DecoderConfig, text: Branch) -> nn.Module:
        return cls(c, text)

    mlp = Branch.mlp


@register("layer", "bridge")
class CrossModalBridge:
    """Libra's cross-modal K/V bridge of one modality: rank-r K and V ([D -> K E], LowRankLinear) added to this
    modality's rows when the other modality's queries read them; attached to a branch as k_bridge / v_bridge."""

    @staticmethod
    def attach(branch: nn.Module, c: DecoderConfig) -> None:
        branch.k_bridge = LowRankLinear(c.d_model, c.kv_heads * c.head_dim, c.cross_modal_bridge)
        branch.v_bridge = LowRankLinear(c.d_model, c.kv_heads * c.head_dim, c.cross_modal_bridge)


# The vision branch of a routed layer: the first kind whose rule holds, else "routed" (a dense branch of its own).
VISION_BRANCH_RULES = (
    ("per-modality-kv", lambda c: bool(c.per_modality_kv)),
    ("low-rank-delta", lambda c: bool(c.vision_delta_rank)),
    ("low-rank", lambda c: bool(c.vision_rank or c.vision_down_ratio)),
    ("single", lambda c: bool(c.single_branch)),
)


def vision_branch_kind(c: DecoderConfig) -> str:
    return next((kind for kind, applies in VISION_BRANCH_RULES if applies(c)), "routed")


def vision_branch(c: DecoderConfig, text: Branch) -> nn.Module | None:
    """The registered vision branch for c, built beside the layer's text branch (None: single branch)."""
    return get("layer", vision_branch_kind(c)).vision_branch(c, text)
