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


# --------------------------------------------------------------------------- decoder
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Branch(nn.Module):
    """The routed sub-modules of one modality in one layer: fused QKV, attention output, SwiGLU MLP."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.qkv = nn.Linear(c.d_model, (c.n_heads + 2 * c.kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.o = nn.Linear(c.d_model, c.d_model, bias=False)
        self.gate = nn.Linear(c.d_model, c.ffn_dim, bias=False)
        self.up = nn.Linear(c.d_model, c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, c.d_model, bias=False)

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

    @classmethod
    def empty(cls, c: DecoderConfig, batch: int = 1, max_len: int | None = None, device=None, dtype=torch.float32):
        shape = (c.n_layers, batch, c.kv_heads, max_len or c.max_seq_len, c.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


class DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.c = c
        self.attn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.ffn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.text = Branch(c)
        self.vision = Branch(c)

    def forward(self, x, route, cos, sin, cache: KVCache | None, layer: int, start: int):
        c = self.c
        B, T, D = x.shape
        H, K, E = c.n_heads, c.kv_heads, c.head_dim
        qkv = routed(self.attn_norm(x), route, self.text.qkv, self.vision.qkv)      # [B, T, (H+2K)E]
        q = qkv[..., : H * E].view(B, T, H, E).transpose(1, 2)
        k = qkv[..., H * E: (H + K) * E].view(B, T, K, E).transpose(1, 2)
        v = qkv[..., (H + K) * E:].view(B, T, K, E).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[layer, :B, :, start:start + T] = k
            cache.v[layer, :B, :, start:start + T] = v
            k, v = cache.k[layer, :B, :, : start + T], cache.v[layer, :B, :, : start + T]
        S = k.shape[2]
        if K != H:
            k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
        # causal over all rows: new row i sees cached rows and new rows <= i
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T) if T > 1 else None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                 # [B, H, T, E]
        a = a.transpose(1, 2).reshape(B, T, D)
        x = x + routed(a, route, self.text.o, self.vision.o)
        return x + routed(self.ffn_norm(x), route, self.text.mlp, self.vision.mlp)


class Decoder(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.c = c
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.rms_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    def forward(self, x, route, positions, cache: KVCache | None = None, last_only: bool = False):
        """x: [B, T, D] input rows; positions: [T] RoPE positions; appends to cache at cache.length."""
        start = cache.length if cache is not None else 0
        if cache is not None and start + x.shape[1] > cache.capacity:
            raise ValueError(f"KV cache full: {start} + {x.shape[1]} rows > capacity {cache.capacity}")
        cos, sin = rope_cos_sin(positions, self.c.head_dim, self.c.rope_theta)
        for i, layer in enumerate(self.layers):
            x = layer(x, route, cos, sin, cache, i, start)
        if cache is not None:
            cache.length = start + x.shape[1]
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))                                            # [B, T, vocab]


class EdgeMM(nn.Module):
    """The whole model. Prompts are sequences of modality segments, each one batch through its branch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        check_reference_supports(cfg)
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.adapter = Adapter(cfg.adapter, cfg.vision.width, cfg.decoder.d_model)
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
            for p in (self.vision.cls, self.vision.pos, self.adapter.boi, self.adapter.eoi):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            # Post-norm ViT blocks start close to identity (small post-norm gains), and the patch embedding at
            # unit fan-in scale, so patch-specific features are not swamped by the shared attention output.
            for blk in self.vision.blocks:
                blk.ln1.weight.fill_(0.1)
                blk.ln2.weight.fill_(0.1)
            w = self.vision.patch_embed.weight
            w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w[0].numel()))
        return self

    # ---- stages ------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Stage `vision`: pixels [B, 3, S, S] -> image rows [B, P + 2, D] (boi, patches, eoi)."""
        return self.adapter(self.vision(pixels))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.tok_embeddings(ids)

    def image_positions(self, start_pos: int) -> torch.Tensor:
        """RoPE positions of the image rows starting at start_pos; returns [P + 2]."""
        n = self.cfg.n_image_rows
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
        if kind == "text":
            positions = torch.arange(pos, pos + data.shape[1])
            logits = self.decoder(self.embed_tokens(data), "text", positions.to(data.device), cache, last_only)
            return logits, pos + data.shape[1]
        positions = self.image_positions(pos).to(data.device)
        if self.cfg.decoder.eoi_branch == "text":
            self.decoder(data[:, :-1], "vision", positions[:-1], cache, True)
            logits = self.decoder(data[:, -1:], "text", positions[-1:], cache, last_only)
        else:
            logits = self.decoder(data, "vision", positions, cache, last_only)
        return logits, self.next_position(positions)

    def forward_full(self, segments: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """The whole sequence in one pass, routed per row by a mask (no cache): the reference for checks
        and the training forward. segments: [("text", ids [B, T]) | ("image", rows [B, P+2, D])]."""
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
                p = self.image_positions(pos)
                pos = self.next_position(p)
            poss.append(p)
        x = torch.cat(xs, 1)
        mask = torch.cat(masks).to(x.device)
        return self.decoder(x, mask, torch.cat(poss).to(x.device))

    def param_counts(self) -> dict[str, int]:
        """Parameters per part: vision tower, adapter, shared decoder, text branch, vision branch."""
        out = {"vision_tower": 0, "adapter": 0, "decoder_shared": 0, "text_branch": 0, "vision_branch": 0}
        seen = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.startswith("vision."):
                out["vision_tower"] += p.numel()
            elif name.startswith("adapter."):
                out["adapter"] += p.numel()
            elif ".text." in name:
                out["text_branch"] += p.numel()
            elif ".vision." in name:
                out["vision_branch"] += p.numel()
            else:
                out["decoder_shared"] += p.numel()
        return out
