"""Connectors (role "connector"): tower rows -> the rows the decoder reads, registered under `adapter.kind`.

Shapes: B batch, P tower rows, W tower width, D d_model, n latents. Each connector is built by
`from_config(cfg)`. The Q-Former ("qformer") is in edgemm.blocks.qformer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, DecoderConfig
from .ops import RMSNorm, gelu
from .registry import register


@register("connector", "glu")
class Adapter(nn.Module):
    """linear_proj -> LayerNorm -> GELU -> down(silu(gate(h)) * up(h)), wrapped in boi/eoi rows.
    feats [B, P, W] -> [B, P + 2, D] (edgemm's own family, CogVLM)."""

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

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width, cfg.decoder.d_model)

    def forward(self, feats):                               # feats: [B, P, W] -> [B, P + 2, D]
        h = gelu(self.norm(self.linear_proj(feats)), self.gelu)
        h = self.down(F.silu(self.gate(h)) * self.up(h))
        B = h.shape[0]
        return torch.cat([self.boi.expand(B, -1, -1), h, self.eoi.expand(B, -1, -1)], 1)


@register("connector", "mlp")
class MlpProjector(nn.Module):
    """LLaVA's multi-modal projector: linear_1 -> GELU -> linear_2 (no boi/eoi rows). feats [B, P, W] -> [B, P, D].
    LLaVA-NeXT adds `image_newline` [D], the row that ends each row of tiles (edgemm.anyres)."""

    def __init__(self, c: AdapterConfig, width: int, d_model: int):
        super().__init__()
        self.gelu = c.gelu
        self.linear_1 = nn.Linear(width, d_model, bias=c.bias)
        self.linear_2 = nn.Linear(d_model, d_model, bias=c.bias)
        if c.image_newline:                                 # LLaVA-NeXT: ends each row of tiles (edgemm.anyres)
            self.image_newline = nn.Parameter(torch.zeros(d_model))

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width, cfg.decoder.d_model)

    def forward(self, feats):                               # [B, P, W] -> [B, P, D]
        return self.linear_2(gelu(self.linear_1(feats), self.gelu))


@register("connector", "linear")
class LinearProjector(nn.Module):
    """LLaVA v1's mm_projector ('linear' in haotian-liu/LLaVA's multimodal_projector/builder.py): one Linear from
    the tower width to d_model. feats [B, P, W] -> [B, P, D]."""

    def __init__(self, c: AdapterConfig, width: int, d_model: int):
        super().__init__()
        self.linear = nn.Linear(width, d_model, bias=c.bias)

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width, cfg.decoder.d_model)

    def forward(self, feats):                               # [B, P, W] -> [B, P, D]
        return self.linear(feats)


@register("connector", "mlp_norm")
class MlpNormProjector(nn.Module):
    """Yi-VL's mm_projector ('mlp2x_gelu_Norm' in 01-ai/Yi's VL/llava/model/multimodal_projector/builder.py):
    linear_1 -> LayerNorm -> GELU -> linear_2 -> LayerNorm (LayerNorm eps `eps`). feats [B, P, W] -> [B, P, D]."""

    def __init__(self, c: AdapterConfig, width: int, d_model: int):
        super().__init__()
        self.gelu = c.gelu
        self.linear_1 = nn.Linear(width, d_model)
        self.norm_1 = nn.LayerNorm(d_model, eps=c.eps)
        self.linear_2 = nn.Linear(d_model, d_model)
        self.norm_2 = nn.LayerNorm(d_model, eps=c.eps)

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width, cfg.decoder.d_model)

    def forward(self, feats):                               # [B, P, W] -> [B, P, D]
        return self.norm_2(self.linear_2(gelu(self.norm_1(self.linear_1(feats)), self.gelu)))


@register("connector", "libra")
class LibraImageInput(nn.Module):
    """Libra's input rows for image tokens: concat of per-codebook embeddings (+ position embedding), then
    processor(RMSNorm(concat(embeddings, signal))) (concat mode) or embeddings + processor(signal).
    codes [B, N, codebooks] (+ signal [B, N, signal_size]) -> [B, N, D]; goes with the "none" tower."""

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

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.decoder)

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


# --------------------------------------------------------------------------- Idefics' Perceiver resampler
class PerceiverBlock(nn.Module):
    """lat + o(attn(q(LN(lat)), kv = concat(LN(ctx), LN(lat)))), then lat + c_proj(relu(fc(LN(lat)))).
    ctx [B, N, W], lat [B, n, W] -> [B, n, W]."""

    def __init__(self, a: AdapterConfig, width: int):
        super().__init__()
        n = a.perceiver_heads * a.perceiver_head_dim
        self.heads, self.hd = a.perceiver_heads, a.perceiver_head_dim
        self.context_norm = nn.LayerNorm(width, eps=a.eps)
        self.latents_norm = nn.LayerNorm(width, eps=a.eps)
        if a.perceiver_qk_norms:
            self.q_norm = nn.LayerNorm(self.hd, eps=a.eps)
            self.k_norm = nn.LayerNorm(self.hd, eps=a.eps)
        self.q, self.k, self.v = (nn.Linear(width, n, bias=False) for _ in range(3))
        self.o = nn.Linear(n, width, bias=False)
        self.ln = nn.LayerNorm(width, eps=a.eps)
        self.fc = nn.Linear(width, a.perceiver_ffn or 4 * width, bias=False)
        self.c_proj = nn.Linear(a.perceiver_ffn or 4 * width, width, bias=False)

    def forward(self, ctx, lat):                            # ctx [B, N, W], lat [B, n, W]
        c, l = self.context_norm(ctx), self.latents_norm(lat)
        B, n = l.shape[:2]
        kv = torch.cat([c, l], 1)

        def heads(t):
            return t.view(B, t.shape[1], self.heads, self.hd).transpose(1, 2)
        q, k, v = heads(self.q(l)), heads(self.k(kv)), heads(self.v(kv))
        if "q_norm" in self._modules:
            q, k = self.q_norm(q), self.k_norm(k)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, -1)
        lat = lat + self.o(a)
        return lat + self.c_proj(F.relu(self.fc(self.ln(lat))))


@register("connector", "perceiver")
class PerceiverResampler(nn.Module):
    """Idefics' IdeficsPerceiverResampler: the tower's rows [B, N, W] -> `perceiver_latents` rows [B, n, W] through
    `perceiver_depth` PerceiverBlocks, then a LayerNorm (the `vision` stage's output; it stays at the tower width:
    the gated cross-attention layers project it, edgemm.blocks.cross)."""

    def __init__(self, a: AdapterConfig, width: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(a.perceiver_latents, width))
        self.blocks = nn.ModuleList(PerceiverBlock(a, width) for _ in range(a.perceiver_depth))
        self.norm = nn.LayerNorm(width, eps=a.eps)

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width)

    def forward(self, feats):                               # [B, N, W] -> [B, n_latents, W]
        lat = self.latents.expand(feats.shape[0], -1, -1)
        for blk in self.blocks:
            lat = blk(feats, lat)
        return self.norm(lat)


# --------------------------------------------------------------------------- InternVL's pixel shuffle + MLP
@register("connector", "pixel_shuffle")
class PixelShuffleProjector(nn.Module):
    """InternVL's connector: each tile's feature map (side x side rows of width W) pixel-shuffled to (side * ratio)^2
    rows of width W / ratio^2 exactly as transformers' InternVLModel.pixel_shuffle reshapes and permutes it, then
    its multi_modal_projector (layer_norm -> linear_1 -> GELU -> linear_2). The tiles are one image's (the vision
    stage's batch, edgemm.internvl_tiles): their rows follow each other. feats [N, P, W] -> [1, N * P * ratio^2, D]."""

    def __init__(self, c: AdapterConfig, width: int, side: int, d_model: int):
        super().__init__()
        self.gelu, self.side, self.r = c.gelu, side, round(1 / c.downsample_ratio)
        n = width * self.r * self.r
        self.layer_norm = nn.LayerNorm(n, eps=c.eps)
        self.linear_1 = nn.Linear(n, d_model)
        self.linear_2 = nn.Linear(d_model, d_model)

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width, cfg.vision.image_size // cfg.vision.patch_size, cfg.decoder.d_model)

    def forward(self, feats):                               # [N, P, W] -> [1, N * P / r^2, D]
        x = pixel_shuffle(feats, self.side, self.r).reshape(1, -1, feats.shape[-1] * self.r * self.r)
        return self.linear_2(gelu(self.linear_1(self.layer_norm(x)), self.gelu))


def pixel_shuffle(feats, side: int, r: int):
    """Each tile's side x side feature map [N, side^2, W] -> [N, (side / r)^2, W r^2], reshaped and permuted as
    transformers' InternVLModel.pixel_shuffle and Idefics3Connector.pixel_shuffle both do (the same steps)."""
    W = feats.shape[-1]
    x = feats.reshape(-1, side, side // r, W * r)           # [N, h, w / r, W r]
    x = x.permute(0, 2, 1, 3).reshape(-1, side // r, side // r, W * r * r)
    return x.permute(0, 2, 1, 3).reshape(feats.shape[0], -1, W * r * r)


# --------------------------------------------------------------------------- Idefics3 / SmolVLM's connector
@register("connector", "pixel_shuffle_linear")
class PixelShuffleLinear(nn.Module):
    """Idefics3's / SmolVLM's connector: each tile's feature map pixel-shuffled by `scale_factor` (round(1 /
    downsample_ratio); pixel_shuffle above), then modality_projection.proj, a Linear without bias. The tiles are one
    image's (edgemm.smolvlm_tiles): their rows, then `markers` [K, D], the token embedding rows of the text the
    processor puts between them (<fake_token_around_image>, <row_i_col_j>, <global-img>, newlines; ids
    adapter.marker_ids), as one table the host gathers the image's rows from (smolvlm_tiles.row_index).
    feats [N, P, W] -> [1, N * P / r^2 + K, D]."""

    def __init__(self, c: AdapterConfig, width: int, side: int, d_model: int):
        super().__init__()
        self.side, self.r = side, round(1 / c.downsample_ratio)
        self.proj = nn.Linear(width * self.r * self.r, d_model, bias=False)
        self.markers = nn.Parameter(torch.zeros(len(c.marker_ids), d_model))

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width, cfg.vision.image_size // cfg.vision.patch_size, cfg.decoder.d_model)

    def forward(self, feats):                               # [N, P, W] -> [1, N * P / r^2 + K, D]
        x = self.proj(pixel_shuffle(feats, self.side, self.r))
        return torch.cat([x.reshape(1, -1, x.shape[-1]), self.markers[None].to(x)], 1)


@register("connector", "newline_rows")
class NewlineRows(nn.Module):
    """Fuyu: the patch grid [B, h, w, D] (edgemm.blocks.vision.PatchLinear) -> image rows [B, h (w + 1), D], the
    |NEWLINE| token's embedding row (image_newline [D], copied from the token embedding at import) after each row
    of patches, as FuyuProcessor writes the prompt (|SPEAKER| x w, |NEWLINE|, per row)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.image_newline = nn.Parameter(torch.zeros(d_model))

    @classmethod
    def from_config(cls, cfg) -> "NewlineRows":
        return cls(cfg.decoder.d_model)

    def forward(self, x):                                   # x: [B, h, w, D]
        nl = torch.zeros_like(x[:, :, :1]) + self.image_newline             # [B, h, 1, D] (traced shapes stay dynamic)
        return torch.cat([x, nl], 2).flatten(1, 2)


# --------------------------------------------------------------------------- Gemma 3's multi-modal projector
@register("connector", "gemma3")
class Gemma3Projector(nn.Module):
    """Gemma 3's Gemma3MultiModalProjector: the tower's patch grid average-pooled (kernel = stride = side /
    sqrt(pool_tokens)) to pool_tokens rows, mm_soft_emb_norm (Gemma's RMSNorm; its (1 + w) is folded into `norm`'s
    weight at import), then the matmul by mm_input_projection_weight [W, D] (stored as proj, a Linear [D, W]);
    wrapped in boi / eoi, the <start_of_image> / <end_of_image> embedding rows (times the decoder's embed_scale,
    as the language model reads them). feats [B, P, W] -> [B, pool_tokens + 2, D]."""

    def __init__(self, c: AdapterConfig, width: int, side: int, d_model: int, eps: float):
        super().__init__()
        self.side, self.k = side, side // round(c.pool_tokens ** 0.5)
        self.norm = RMSNorm(width, eps)
        self.proj = nn.Linear(width, d_model, bias=False)
        self.boi = nn.Parameter(torch.zeros(1, 1, d_model))
        self.eoi = nn.Parameter(torch.zeros(1, 1, d_model))

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        v = cfg.vision
        return cls(cfg.adapter, v.width, v.image_size // v.patch_size, cfg.decoder.d_model, v.eps)

    def forward(self, feats):                               # [B, P, W] -> [B, pool_tokens + 2, D]
        B, _, W = feats.shape
        x = feats.transpose(1, 2).reshape(B, W, self.side, self.side)
        x = F.avg_pool2d(x, self.k, self.k).flatten(2).transpose(1, 2)              # [B, pool_tokens, W]
        h = self.proj(self.norm(x))
        return torch.cat([self.boi.expand(B, -1, -1), h, self.eoi.expand(B, -1, -1)], 1)
