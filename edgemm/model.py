"""The reference model: EVA-style ViT + GLU adapter + routed-expert LLaMA-style decoder.

Shapes in comments: B batch, T rows in a segment, S cached rows, D d_model, H heads, K kv heads, E head dim.
Every exported stage is checked against this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig, check_reference_supports


def gelu(x: torch.Tensor, form: str) -> torch.Tensor:
    if form == "quick":                                     # CLIP's quick_gelu
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if form == "tanh" else "none")


# --------------------------------------------------------------------------- vision tower
class VitBlock(nn.Module):
    """Post-norm block: x + LN(attn(x)), then x + LN(mlp(x)); fused QKV with bias."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.heads
        self.gelu = c.gelu
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.ln1 = nn.LayerNorm(c.width, eps=c.eps)
        self.fc1 = nn.Linear(c.width, c.mlp_dim)
        self.fc2 = nn.Linear(c.mlp_dim, c.width)
        self.ln2 = nn.LayerNorm(c.width, eps=c.eps)

    def forward(self, x):                                   # x: [B, N, W]
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)         # [B, h, N, W/h]
        x = x + self.ln1(self.proj(a.transpose(1, 2).reshape(B, N, W)))
        return x + self.ln2(self.fc2(gelu(self.fc1(x), self.gelu)))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, c.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos = nn.Parameter(torch.zeros(1, c.n_patches + 1, c.width))
        self.blocks = nn.ModuleList(VitBlock(c) for _ in range(c.layers))
        self.n_patches = c.n_patches

    def forward(self, pixels):                              # pixels: [B, 3, S, S]
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)            # [B, P, W]
        x = torch.cat([x, self.cls.expand(x.shape[0], -1, -1)], 1)         # CLS after the patches
        x = x + self.pos
        for blk in self.blocks:
            x = blk(x)
        return x[:, : self.n_patches]                                      # drop CLS


class Adapter(nn.Module):
    """linear_proj -> LayerNorm -> GELU -> down(silu(gate(h)) * up(h)), wrapped in boi/eoi rows."""

    def __init__(self, c: AdapterConfig, width: int, d_model: int):
        super().__init__()
        self.gelu = c.gelu
        self.linear_proj = nn.Linear(width, d_model, bias=False)
        self.norm = nn.LayerNorm(d_model, eps=c.eps)
        self.gate = nn.Linear(d_model, c.ffn_dim, bias=False)
        self.up = nn.Linear(d_model, c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, d_model, bias=False)
        self.boi = nn.Parameter(torch.zeros(1, 1, d_model))
        self.eoi = nn.Parameter(torch.zeros(1, 1, d_model))

    def forward(self, feats):                               # feats: [B, P, W] -> [B, P + 2, D]
        h = gelu(self.norm(self.linear_proj(feats)), self.gelu)
        h = self.down(F.silu(self.gate(h)) * self.up(h))
        B = h.shape[0]
        return torch.cat([self.boi.expand(B, -1, -1), h, self.eoi.expand(B, -1, -1)], 1)


# --------------------------------------------------------------------------- imported vision inputs
class ClipBlock(nn.Module):
    """CLIP pre-norm block (LLaVA's tower): x + attn(LN1(x)), then x + mlp(LN2(x)); fused QKV with bias."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads, self.gelu = c.heads, c.gelu
        self.ln1 = nn.LayerNorm(c.width, eps=c.eps)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.ln2 = nn.LayerNorm(c.width, eps=c.eps)
        self.fc1 = nn.Linear(c.width, c.mlp_dim)
        self.fc2 = nn.Linear(c.mlp_dim, c.width)

    def forward(self, x):                                   # x: [B, N, W]
        B, N, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W))
        return x + self.fc2(gelu(self.fc1(self.ln2(x)), self.gelu))


class ClipVisionTower(nn.Module):
    """CLIP ViT as LLaVA uses it: CLS first, one position table, pre-LayerNorm, the first `feature_layer`
    blocks (LLaVA's vision_feature_layer), CLS dropped unless keep_cls. Output [B, P (+1), W].
    BLIP's tower (arch "blip", BLIP-2 / InstructBLIP, transformers' Blip2VisionModel) is the same with a patch conv
    bias, no pre-LayerNorm, a post_layernorm after every block and every row kept (edgemm.qformer)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        blip = c.arch == "blip"
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, c.patch_size, bias=blip)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos = nn.Parameter(torch.zeros(1, c.n_patches + 1, c.width))
        if blip:
            self.post_norm = nn.LayerNorm(c.width, eps=c.eps)
        else:
            self.pre_norm = nn.LayerNorm(c.width, eps=c.eps)
        n = c.layers if c.feature_layer is None else c.feature_layer
        self.blocks = nn.ModuleList(ClipBlock(c) for _ in range(n))
        self.keep_cls = c.keep_cls or blip

    def forward(self, pixels):                              # pixels: [B, 3, S, S]
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        if hasattr(self, "pre_norm"):
            x = self.pre_norm(x)
        for blk in self.blocks:
            x = blk(x)
        if hasattr(self, "post_norm"):
            x = self.post_norm(x)
        return x if self.keep_cls else x[:, 1:]


class MlpProjector(nn.Module):
    """LLaVA's multi-modal projector: linear_1 -> GELU -> linear_2 (no boi/eoi rows)."""

    def __init__(self, c: AdapterConfig, width: int, d_model: int):
        super().__init__()
        self.gelu = c.gelu
        self.linear_1 = nn.Linear(width, d_model, bias=c.bias)
        self.linear_2 = nn.Linear(d_model, d_model, bias=c.bias)
        if c.image_newline:                                 # LLaVA-NeXT: ends each row of tiles (edgemm.anyres)
            self.image_newline = nn.Parameter(torch.zeros(d_model))

    def forward(self, feats):                               # [B, P, W] -> [B, P, D]
        return self.linear_2(gelu(self.linear_1(feats), self.gelu))


class NoPixelTower(nn.Module):
    """Libra: pixels become image tokens in Libra's own VQ image tokenizer (+ a CLIP continuous signal),
    neither of which is part of the decoder checkpoint; edgemm takes the tokens (encode_image_tokens)."""

    def forward(self, pixels):
        from .errors import EdgemmError
        raise EdgemmError("this model (Libra) takes image tokens, not pixels: its VQ image tokenizer and CLIP "
                          "signal encoder are not imported; use EdgeMM.encode_image_tokens(codes, signal)")


class LibraImageInput(nn.Module):
    """Libra's input rows for image tokens: concat of per-codebook embeddings (+ position embedding), then
    processor(RMSNorm(concat(embeddings, signal))) (concat mode) or embeddings + processor(signal)."""

    def __init__(self, c: AdapterConfig, d: DecoderConfig):
        super().__init__()
        self.c = c
        self.embed = nn.ModuleList(nn.Embedding(c.vision_vocab, d.d_model // c.codebooks)
                                   for _ in range(c.codebooks))
        if c.position_embedding:
            self.pos = nn.Embedding(c.position_embedding, d.d_model)
        if c.signal_size:
            n_in = c.signal_size + (d.d_model if c.concat_signals else 0)
            if c.concat_signals and c.norm_signals:
                self.signal_norm = RMSNorm(n_in, d.rms_eps)
            self.processor = nn.Linear(n_in, d.d_model, bias=False)

    def forward(self, codes, signal=None, indices=None):    # codes [B, N, codebooks], signal [B, N, S]
        x = torch.cat([e(codes[..., i]) for i, e in enumerate(self.embed)], -1)
        if self.c.position_embedding:
            idx = torch.arange(codes.shape[1], device=codes.device) if indices is None else indices
            x = x + self.pos(idx)
        if not self.c.signal_size:
            return x
        if self.c.concat_signals:
            if signal is None:
                signal = x.new_zeros(x.shape[:-1] + (self.c.signal_size,))
            h = torch.cat([x, signal], -1)
            return self.processor(self.signal_norm(h) if self.c.norm_signals else h)
        return x if signal is None else x + self.processor(signal)


# --------------------------------------------------------------------------- decoder
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Branch(nn.Module):
    """The routed sub-modules of one modality in one layer: fused QKV, attention output, SwiGLU MLP (or, in an
    MoE layer, `moe`: router + stacked experts, edgemm.moe)."""

    def __init__(self, c: DecoderConfig, moe: bool = False):
        super().__init__()
        self.qkv = nn.Linear(c.d_model, (c.n_heads + 2 * c.kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.o = nn.Linear(c.attn_width, c.d_model, bias=False)
        if c.qk_norm:                                       # Qwen3: RMSNorm over each head's Q and K
            self.q_norm, self.k_norm = RMSNorm(c.head_dim, c.rms_eps), RMSNorm(c.head_dim, c.rms_eps)
        if moe:
            from .moe import MoE
            self.moe = MoE(c)
            return
        self.gate = nn.Linear(c.d_model, c.ffn_dim, bias=False)
        self.up = nn.Linear(c.d_model, c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, c.d_model, bias=False)

    def mlp(self, x):
        if "moe" in self._modules:
            return self.moe(x)
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


class KVBranch(nn.Module):
    """mPLUG-Owl2's modality-adaptive module, vision side: its own K and V projections; Q, the attention output
    and the MLP are the text branch's (shared, not copied: only k and v are parameters of this module)."""

    def __init__(self, c: DecoderConfig, text: Branch):
        super().__init__()
        E = c.head_dim
        self.k = nn.Linear(c.d_model, c.kv_heads * E, bias=c.qkv_bias)
        self.v = nn.Linear(c.d_model, c.kv_heads * E, bias=c.qkv_bias)
        self.__dict__["_text"] = text                       # a plain reference: not a submodule, no duplicate
        self.__dict__["q"] = _QRows(text.qkv, c.n_heads * E)

    o = property(lambda self: self._text.o)
    gate = property(lambda self: self._text.gate)
    up = property(lambda self: self._text.up)
    down = property(lambda self: self._text.down)

    def qkv(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)

    def mlp(self, x):
        return self._text.mlp(x)


class LowRankLinear(nn.Module):
    """Libra's LibraLinear: y = B (A x), A [rank, in], B [out, rank], no bias."""

    def __init__(self, n_in: int, n_out: int, rank: int):
        super().__init__()
        self.weight_A = nn.Parameter(torch.empty(rank, n_in))
        self.weight_B = nn.Parameter(torch.empty(n_out, rank))

    def forward(self, x):
        return F.linear(F.linear(x, self.weight_A), self.weight_B)


def _add_bridge(branch: nn.Module, c: DecoderConfig) -> None:
    """Libra's cross-modal K/V bridge of one modality: rank-r K and V added to this modality's rows when
    the other modality's queries read them."""
    if c.cross_modal_bridge:
        branch.k_bridge = LowRankLinear(c.d_model, c.kv_heads * c.head_dim, c.cross_modal_bridge)
        branch.v_bridge = LowRankLinear(c.d_model, c.kv_heads * c.head_dim, c.cross_modal_bridge)


class LowRankBranch(nn.Module):
    """Libra's vision branch: every routed projection low-rank (rank = vision_rank or out // down_ratio)."""

    def __init__(self, c: DecoderConfig):
        super().__init__()

        def lr(n_in, n_out):
            return LowRankLinear(n_in, n_out, c.vision_rank or n_out // c.vision_down_ratio)
        E = c.head_dim
        self.q, self.k, self.v = lr(c.d_model, c.n_heads * E), lr(c.d_model, c.kv_heads * E), lr(c.d_model, c.kv_heads * E)
        self.o = lr(c.attn_width, c.d_model)
        self.gate, self.up, self.down = lr(c.d_model, c.ffn_dim), lr(c.d_model, c.ffn_dim), lr(c.ffn_dim, c.d_model)

    def qkv(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)

    def mlp(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


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


@dataclass
class KVCache:
    """Preallocated per-layer K/V buffers; `length` rows are filled."""
    k: torch.Tensor                                         # [L, B, K, S_max, E]
    v: torch.Tensor
    length: int = 0
    cross: tuple | None = None              # gated cross-attention: the current image's K, V (edgemm.xattn)
    cross_on: bool = False                  # whether the next token reads that image

    @classmethod
    def empty(cls, c: DecoderConfig, batch: int = 1, max_len: int | None = None, device=None, dtype=torch.float32):
        heads = c.kv_heads * (2 if c.cross_modal_bridge else 1)    # bridge: K/V as read by each modality
        shape = (c.n_layers, batch, heads, max_len or c.max_seq_len, c.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


class DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig, index: int = 0):
        super().__init__()
        self.c = c
        self.attn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.ffn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.text = Branch(c, moe=c.is_moe_layer(index))
        if c.per_modality_kv:
            self.vision = KVBranch(c, self.text)
        elif c.vision_rank or c.vision_down_ratio:
            self.vision = LowRankBranch(c)
        elif not c.single_branch:
            self.vision = Branch(c)
        if c.per_modality_norms:
            self.vision_attn_norm = RMSNorm(c.d_model, c.rms_eps)
            self.vision_ffn_norm = RMSNorm(c.d_model, c.rms_eps)
        if c.cross_modal_bridge:
            _add_bridge(self.text, c)
            _add_bridge(self.vision, c)

    @property
    def vision(self):
        """The vision branch; with single_branch (LLaVA) the text branch serves image rows too."""
        m = self._modules.get("vision")
        return self._modules["text"] if m is None else m

    def _norm(self, x, route, which: str):
        n = self.attn_norm if which == "attn" else self.ffn_norm
        if not self.c.per_modality_norms:
            return n(x)
        return routed(x, route, n, self.vision_attn_norm if which == "attn" else self.vision_ffn_norm)

    def forward(self, x, route, cos, sin, cache: KVCache | None, layer: int, start: int):
        """One layer over rows x [B, T, D] routed per row (`route`: "text", "vision" or a bool mask of vision
        rows). Per-modality norms pick the norm per row; with cross_modal_bridge (Libra) a row's K/V as read by
        queries of the other modality get the row's own-modality rank-r bridge added, and the cache holds both
        versions: heads [0, K) for text queries, [K, 2K) for vision queries."""
        c = self.c
        B, T, _ = x.shape
        H, K, E = c.n_heads, c.kv_heads, c.head_dim
        h = self._norm(x, route, "attn")
        qkv = routed(h, route, self.text.qkv, self.vision.qkv)                       # [B, T, (H+2K)E]
        qn, kn = (getattr(self.text, n, None) or (lambda t: t) for n in ("q_norm", "k_norm"))   # (qk_norm)
        q = apply_rope(qn(qkv[..., : H * E].view(B, T, H, E)).transpose(1, 2), cos, sin)
        k, v = qkv[..., H * E: (H + K) * E], qkv[..., (H + K) * E:]                 # [B, T, K*E]
        if c.cross_modal_bridge:
            vis = route if not isinstance(route, str) else torch.full((T,), route == "vision", device=x.device)
            kb = routed(h, route, self.text.k_bridge, self.vision.k_bridge)
            vb = routed(h, route, self.text.v_bridge, self.vision.v_bridge)
            sel = vis[None, :, None]
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            ks = (k + torch.where(sel, kb, zero), k + torch.where(sel, zero, kb))  # (for text q, for vision q)
            vs = (v + torch.where(sel, vb, zero), v + torch.where(sel, zero, vb))
        else:
            ks, vs = (k,), (v,)
        ks = [apply_rope(kn(t.view(B, T, K, E)).transpose(1, 2), cos, sin) for t in ks]
        vs = [t.view(B, T, K, E).transpose(1, 2) for t in vs]
        if cache is not None:
            for j, (kj, vj) in enumerate(zip(ks, vs)):
                cache.k[layer, :B, j * K:(j + 1) * K, start:start + T] = kj
                cache.v[layer, :B, j * K:(j + 1) * K, start:start + T] = vj
            n = len(ks)
            ks = [cache.k[layer, :B, j * K:(j + 1) * K, : start + T] for j in range(n)]
            vs = [cache.v[layer, :B, j * K:(j + 1) * K, : start + T] for j in range(n)]
        S = ks[0].shape[2]
        # causal over all rows: new row i sees cached rows and new rows <= i
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T) if T > 1 else None

        def attend(kk, vv):
            if K != H:
                kk, vv = kk.repeat_interleave(H // K, 1), vv.repeat_interleave(H // K, 1)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)      # [B, H, T, E]
        if len(ks) == 1:
            a = attend(ks[0], vs[0])
        elif isinstance(route, str):
            j = 1 if route == "vision" else 0
            a = attend(ks[j], vs[j])
        else:
            a = torch.where(vis[None, None, :, None], attend(ks[1], vs[1]), attend(ks[0], vs[0]))
        a = a.transpose(1, 2).reshape(B, T, H * E)
        x = x + routed(a, route, self.text.o, self.vision.o)
        return x + routed(self._norm(x, route, "ffn"), route, self.text.mlp, self.vision.mlp)


class Decoder(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.c = c
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.rms_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        if c.per_modality_norms:
            self.vision_norm = RMSNorm(c.d_model, c.rms_eps)           # Libra: final norm per modality
        if c.cross_attn_every:                                          # Flamingo / Idefics (edgemm.xattn)
            from .xattn import GatedCrossAttnLayer, cross_layer_at, n_cross_layers
            self.cross_layers = nn.ModuleList(GatedCrossAttnLayer(c) for _ in range(n_cross_layers(c)))
        self.cross_at = [cross_layer_at(c, i) if c.cross_attn_every else None for i in range(c.n_layers)]

    def forward(self, x, route, positions, cache: KVCache | None = None, last_only: bool = False, cross=None):
        """x: [B, T, D] input rows; positions: [T] RoPE positions; appends to cache at cache.length.
        cross: (K, V [Lx, B, H, n, E] or None, gate [B, T, 1]) for the gated cross-attention layers."""
        start = cache.length if cache is not None else 0
        if cache is not None and start + x.shape[1] > cache.capacity:
            raise ValueError(f"KV cache full: {start} + {x.shape[1]} rows > capacity {cache.capacity}")
        cos, sin = rope_cos_sin(positions, self.c.head_dim, self.c.rope_theta)
        for i, layer in enumerate(self.layers):
            if cross is not None:
                j = self.cross_at[i]
                if j is not None:
                    k, v, gate = cross
                    x = self.cross_layers[j](x, None if k is None else k[j], None if v is None else v[j], gate)
            x = layer(x, route, cos, sin, cache, i, start)
        if cache is not None:
            cache.length = start + x.shape[1]
        if last_only:
            x = x[:, -1:]
            if not isinstance(route, str):
                route = route[-1:]
        if self.c.per_modality_norms:
            return self.lm_head(routed(x, route, self.norm, self.vision_norm))
        return self.lm_head(self.norm(x))                                            # [B, T, vocab]


class EdgeMM(nn.Module):
    """The whole model. Prompts are sequences of modality segments, each one batch through its branch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        check_reference_supports(cfg)
        self.cfg = cfg
        v, a = cfg.vision, cfg.adapter
        if v.arch == "blip" or a.kind == "qformer":         # BLIP-2 / InstructBLIP (edgemm.qformer)
            from .qformer import QFormerAdapter
        towers = {"eva": VisionTower, "clip": ClipVisionTower, "blip": ClipVisionTower,
                  "none": lambda _: NoPixelTower()}
        self.vision = towers[v.arch](v)
        if a.kind == "glu":
            self.adapter = Adapter(a, v.width, cfg.decoder.d_model)
        elif a.kind == "mlp":
            self.adapter = MlpProjector(a, v.width, cfg.decoder.d_model)
        elif a.kind == "qformer":
            self.adapter = QFormerAdapter(a, v.width, cfg.decoder.d_model)
        elif a.kind == "perceiver":                         # Idefics (edgemm.xattn)
            from .xattn import PerceiverResampler
            self.adapter = PerceiverResampler(a, v.width)
        else:
            self.adapter = LibraImageInput(a, cfg.decoder)
        self.decoder = Decoder(cfg.decoder)

    def init_weights(self, seed: int = 0) -> "EdgeMM":
        """Random init (normal 0.02, residual outputs scaled down, norms at one): training and bench-0.5b."""
        g = torch.Generator().manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.decoder.n_layers)
        with torch.no_grad():
            for mod_name, mod in self.named_modules():
                if isinstance(mod, (nn.LayerNorm, RMSNorm)):
                    mod.weight.fill_(1.0)
                    if getattr(mod, "bias", None) is not None:
                        mod.bias.zero_()
                elif isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    std = resid_std if mod_name.endswith((".o", ".down")) else 0.02
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                    if getattr(mod, "bias", None) is not None:
                        mod.bias.zero_()
                elif hasattr(mod, "init_weights") and mod_name.endswith(".moe"):    # stacked MoE experts
                    mod.init_weights(g, 0.02, resid_std)
                elif isinstance(mod, LowRankLinear):                # imported-family variants only
                    for p in (mod.weight_A, mod.weight_B):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            for p in (getattr(self.vision, "cls", None), getattr(self.vision, "pos", None),
                      getattr(self.adapter, "boi", None), getattr(self.adapter, "eoi", None),
                      getattr(self.adapter, "query", None), getattr(self.adapter, "image_newline", None),
                      getattr(self.adapter, "latents", None)):
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            if self.cfg.vision.arch == "eva":
                # Post-norm ViT blocks start close to identity (small post-norm gains), and the patch embedding
                # at unit fan-in scale, so patch-specific features are not swamped by the shared attention output.
                for blk in self.vision.blocks:
                    blk.ln1.weight.fill_(0.1)
                    blk.ln2.weight.fill_(0.1)
            if hasattr(self.vision, "patch_embed"):
                w = self.vision.patch_embed.weight
                w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w[0].numel()))
        return self

    # ---- stages ------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor, *instruction) -> torch.Tensor:
        """Stage `vision`: pixels [B, 3, S, S] -> image rows [B, P + 2, D] (boi, patches, eoi). InstructBLIP's
        Q-Former also takes the instruction: ids [B, T] (its own tokenizer) and optionally a mask [B, T]."""
        return self.adapter(self.vision(pixels), *instruction)

    def encode_image_tiled(self, pixels: torch.Tensor, height: int, width: int, max_tiles="config"):
        """Any-resolution tiling (edgemm.anyres): the tiles of one height x width image [N, 3, S, S] (overview
        first) -> packed image rows [1, rows, D] (overview, unpadded tile rows each ended by the newline row)."""
        from .anyres import pack, row_index
        return pack(self.encode_image(pixels), self.adapter.image_newline,
                    row_index(self.cfg.vision, height, width, max_tiles))

    def encode_image_tokens(self, codes: torch.Tensor, signal: torch.Tensor | None = None) -> torch.Tensor:
        """Libra: image tokens [B, P + 2, codebooks] (boi, patches, eoi; ids within the vision vocab) and the
        continuous signal [B, P + 2, signal_size] -> image rows [B, P + 2, D]."""
        return self.adapter(codes, signal)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.tok_embeddings(ids)

    def image_positions(self, start_pos: int, n: int | None = None) -> torch.Tensor:
        """RoPE positions of the n image rows (default n_image_rows) starting at start_pos; returns [n]."""
        n = self.cfg.n_image_rows if n is None else n
        if self.cfg.decoder.position_rule == "cogvlm":       # boi p, every patch p+1, eoi p+2
            pos = torch.full((n,), start_pos + 1)
            pos[0], pos[-1] = start_pos, start_pos + 2
            return pos
        return torch.arange(start_pos, start_pos + n)

    def next_position(self, positions: torch.Tensor) -> int:
        return int(positions[-1]) + 1

    def forward_segment(self, kind: str, data: torch.Tensor, cache: KVCache, pos: int, last_only=True):
        """One modality segment through its branch. kind 'text': data = ids [B, T]; 'image': rows [B, P+2, D].

        Returns (logits, next_pos). Stages `decoder_text` / `decoder_image`.
        """
        if self.cfg.decoder.cross_attn_every:               # gated cross-attention (edgemm.xattn)
            from .xattn import forward_segment
            return forward_segment(self, kind, data, cache, pos, last_only)
        if kind == "text":
            positions = torch.arange(pos, pos + data.shape[1])
            logits = self.decoder(self.embed_tokens(data), "text", positions.to(data.device), cache, last_only)
            return logits, pos + data.shape[1]
        positions = self.image_positions(pos, data.shape[1]).to(data.device)
        if self.cfg.decoder.eoi_branch == "text":
            self.decoder(data[:, :-1], "vision", positions[:-1], cache, True)
            logits = self.decoder(data[:, -1:], "text", positions[-1:], cache, last_only)
        else:
            logits = self.decoder(data, "vision", positions, cache, last_only)
        return logits, self.next_position(positions)

    def forward_full(self, segments: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """The whole sequence in one pass, routed per row by a mask (no cache): the reference for checks
        and the training forward. segments: [("text", ids [B, T]) | ("image", rows [B, P+2, D])]."""
        if self.cfg.decoder.cross_attn_every:               # gated cross-attention (edgemm.xattn)
            from .xattn import forward_full
            return forward_full(self, segments)
        xs, masks, poss, pos = [], [], [], 0
        for kind, data in segments:
            if kind == "text":
                xs.append(self.embed_tokens(data))
                masks.append(torch.zeros(data.shape[1], dtype=torch.bool))
                p = torch.arange(pos, pos + data.shape[1])
                pos += data.shape[1]
            else:
                xs.append(data)
                m = torch.ones(data.shape[1], dtype=torch.bool)
                if self.cfg.decoder.eoi_branch == "text":
                    m[-1] = False
                masks.append(m)
                p = self.image_positions(pos, data.shape[1])
                pos = self.next_position(p)
            poss.append(p)
        x = torch.cat(xs, 1)
        mask = torch.cat(masks).to(x.device)
        return self.decoder(x, mask, torch.cat(poss).to(x.device))

    def param_counts(self) -> dict[str, int]:
        """Parameters per part: vision tower, adapter, shared decoder, text branch, vision branch."""
        from .info import PARTS, param_part
        out = dict.fromkeys(PARTS, 0)
        seen = set()
        for name, p in self.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[param_part(name)] += p.numel()
        return out
