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
- LLaVA-UHD (thunlp/LLaVA-UHD, adapt_spatial_resampler.py: connector "uhd_resampler", UhdResampler) is this resampler
  with three differences: key_pos is pos_embed interpolated to each slice's own h x w patch grid at run time (the
  slices vary in size); each query reads only its region of the feature map: the g x g regions (g^2 = Q) RoIAligned
  to oh x ow points (torchvision's roi_align, aligned False), so one query attends to oh * ow keys; and the output
  is one table, the slices' rows then the separator rows (edgemm.uhd_slices packs them).
- Monkey (Yuliang-Liu/Monkey, vision `window`): the image's windows, each through the tower with its own LoRA
  (QwenWindowBlock), and the whole image resized to one window (the base tower) -> the resampler per tile -> the
  tiles' rows one after the other [B, T Q, D] (its 1280 rows between <img> and </img>: 4 windows + the global view).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import gelu, grid_pos
from .registry import register
from .vision import ClipBlock, Tower


def abs_pos(table: torch.Tensor, n: int) -> torch.Tensor:
    """The release's get_abs_pos: a square position table [L, C] -> [n, C], interpolated bicubically (align_corners
    False, in fp32) to a sqrt(n) x sqrt(n) grid when the sides differ."""
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(n))
    return table if src == tgt else grid_pos(table, tgt, tgt)


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


def window_tiles(pixels, w: int):
    """Monkey's tiles: each image [B, 3, S, S] cut into (S / w)^2 windows of w px (row-major, as its sliding_window
    with stride w), then the whole image resized bicubically to w (F.interpolate, align_corners False, on the
    normalised pixels) -> [B * ((S / w)^2 + 1), 3, w, w]."""
    B, C, S = pixels.shape[0], pixels.shape[1], pixels.shape[-1]
    n = S // w
    win = pixels.reshape(B, C, n, w, n, w).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, C, w, w)
    whole = F.interpolate(pixels, size=(w, w), mode="bicubic", align_corners=False)[:, None]
    return torch.cat([win, whole], 1).reshape(-1, C, w, w)


class WindowLoRA(nn.Module):
    """Monkey's per-window LoRA on one projection: K stacked pairs (lora_scale folded into b at import) applied to
    the first K tiles of each image's K + 1 (the last, the global view, has none). x [N, L, I] -> [N, L, O]."""

    def __init__(self, k: int, rank: int, n_in: int, n_out: int):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(k, rank, n_in))
        self.b = nn.Parameter(torch.zeros(k, n_out, rank))

    def forward(self, x):
        k, L = self.a.shape[0], x.shape[1]
        t = x.reshape(-1, k + 1, L, x.shape[-1])[:, :k]                                   # [B, K, L, I]
        d = (t @ self.a.transpose(1, 2)) @ self.b.transpose(1, 2)                         # [B, K, L, O]
        return torch.cat([d, d[:, :1] * 0], 1).reshape(x.shape[0], L, -1)


class QwenWindowBlock(ClipBlock):
    """ClipBlock + Monkey's per-window LoRA: on the fused QKV and out_proj (W + s B A), and a low-rank term of the
    attention output added beside the MLP (its mlp_lora: x + mlp(ln_2(x)) + s B A x). [N, L, W] -> [N, L, W]."""

    def __init__(self, c, k: int):
        super().__init__(c)
        (r, r_mlp), W = c.window_lora, c.width
        self.lora_qkv, self.lora_proj = WindowLoRA(k, r, W, 3 * W), WindowLoRA(k, r, W, W)
        self.lora_mlp = WindowLoRA(k, r_mlp, W, W)

    def forward(self, x):                                   # x: [N, L, W]
        N, L, W = x.shape
        h = self.ln1(x)
        q, k, v = (self.qkv(h) + self.lora_qkv(h)).view(N, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, W)
        x = x + self.proj(a) + self.lora_proj(a)
        return x + self.fc2(gelu(self.fc1(self.ln2(x)), self.gelu)) + self.lora_mlp(x)


@register("vision", "qwen")
class QwenVisionTower(Tower):
    """Qwen-VL's ViT (see the module docstring). pixels [B, 3, S, S] -> [B, P, W]. Monkey (`window`): the image's
    windows (with their LoRA) and its global view, each a tile of P rows -> [B * tower_passes, P, W]."""

    def __init__(self, c):
        super().__init__()
        self.window = c.window
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, c.patch_size, bias=False)
        self.pos = nn.Parameter(torch.zeros(1, c.n_patches, c.width))
        self.pre_norm = nn.LayerNorm(c.width, eps=c.eps)
        k = c.tower_passes - 1
        self.blocks = nn.ModuleList(QwenWindowBlock(c, k) if k else ClipBlock(c) for _ in range(c.layers))

    def forward(self, pixels):                              # pixels: [B, 3, S, S]
        if self.window:
            pixels = window_tiles(pixels, self.window)
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

    def __init__(self, a, width: int, n_patches: int, d_model: int, passes: int = 1):
        super().__init__()
        self.passes = passes                                # Monkey: an image's tiles, whose rows follow each other
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
        return cls(cfg.adapter, cfg.vision.width, cfg.vision.n_patches, cfg.decoder.d_model, cfg.vision.tower_passes)

    def forward(self, feats):                               # feats [B, P, W] -> [B, Q, D] (Monkey: [B / T, T Q, D])
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
        out = self.proj(self.ln_post(out))
        return out.reshape(-1, self.passes * out.shape[1], D) if self.passes > 1 else out


@register("connector", "uhd_resampler")
class UhdResampler(QwenResampler):
    """LLaVA-UHD's spatially constrained resampler (see the module docstring): Qwen-VL's parameters (no key_pos: it
    depends on the slice) + `separators` [K, D], the token embedding rows of the slice separators (adapter.marker_ids:
    ',' and '\n'). feats [B, h * w, W] of B same-size slices, pool_rows [g * oh, h], pool_cols [g * ow, w] (the
    RoIAlign weights, edgemm.uhd_slices.pool_matrices) -> [1, B * Q + K, D]."""

    def __init__(self, a, width: int, d_model: int):
        super().__init__(a, width, a.query_tokens, d_model)
        del self.key_pos
        self.side = math.isqrt(a.query_tokens)
        self.separators = nn.Parameter(torch.zeros(len(a.marker_ids), d_model))

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width, cfg.decoder.d_model)

    def forward(self, feats, pool_rows, pool_cols):         # feats [B, h w, W] -> [1, B Q + K, D]
        B, g, D = feats.shape[0], self.side, self.query.shape[1]
        h, w = pool_rows.shape[1], pool_cols.shape[1]
        kv = self.ln_kv(self.kv_proj(feats) if "kv_proj" in self._modules else feats)           # [B, h w, D]
        key = kv + grid_pos(self.pos_embed, h, w)

        def regions(t):             # [B, h w, D] -> RoIAlign of the g x g regions -> [B g g, oh ow, D]
            t = pool_rows @ t.transpose(1, 2).reshape(B, D, h, w) @ pool_cols.t()              # [B, D, g oh, g ow]
            t = t.reshape(B, D, g, pool_rows.shape[0] // g, g, pool_cols.shape[0] // g)
            return t.permute(0, 2, 4, 3, 5, 1).reshape(B * g * g, -1, D)
        q = (self.ln_q(self.query) + self.pos_embed).repeat(B, 1)[:, None]                       # [B Q, 1, D]
        wq, wk, wv = self.attn.in_proj_weight.chunk(3)
        bq, bk, bv = self.attn.in_proj_bias.chunk(3)
        h_ = self.heads

        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], h_, D // h_).transpose(1, 2)
        a = F.scaled_dot_product_attention(heads(F.linear(q, wq, bq)), heads(F.linear(regions(key), wk, bk)),
                                           heads(F.linear(regions(kv), wv, bv)))                 # [B Q, h, 1, D/h]
        out = self.proj(self.ln_post(self.attn.out_proj(a.reshape(-1, D))))                       # [B Q, D]
        return torch.cat([out, self.separators.to(out)], 0)[None]
