"""Vision towers (role "vision"), registered under the config's `vision.arch`.

Shapes: B batch, S image side, P patches, N rows (patches + CLS), W tower width.
Each tower is built by `from_config(cfg)` and maps pixels [B, 3, S, S] -> tower rows [B, rows, W].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig
from .ops import gelu, grid_pos
from .registry import register


class Tower(nn.Module):
    """Base of the registered towers: built from the model config's `vision` part."""

    @classmethod
    def from_config(cls, cfg) -> "Tower":
        return cls(cfg.vision)

    def init_norm_gains(self) -> None:
        """EdgeMM.init_weights' last word on this tower's norm gains (after every norm is set to one)."""


class VitBlock(nn.Module):
    """Post-norm block: x + LN(attn(x)), then x + LN(mlp(x)); fused QKV with bias. [B, N, W] -> [B, N, W]."""

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


@register("vision", "eva")
class VisionTower(Tower):
    """EVA-style ViT (edgemm's own family, CogVLM): patch conv with bias, CLS after the patches, one position
    table, post-norm VitBlocks, CLS dropped. pixels [B, 3, S, S] -> [B, P, W]."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, c.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos = nn.Parameter(torch.zeros(1, c.n_patches + 1, c.width))
        self.blocks = nn.ModuleList(VitBlock(c) for _ in range(c.layers))
        self.n_patches = c.n_patches

    def init_norm_gains(self) -> None:
        """Post-norm blocks start close to identity: small post-norm gains (random init, training)."""
        for blk in self.blocks:
            blk.ln1.weight.fill_(0.1)
            blk.ln2.weight.fill_(0.1)

    def forward(self, pixels):                              # pixels: [B, 3, S, S]
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)            # [B, P, W]
        x = torch.cat([x, self.cls.expand(x.shape[0], -1, -1)], 1)         # CLS after the patches
        x = x + self.pos
        for blk in self.blocks:
            x = blk(x)
        return x[:, : self.n_patches]                                      # drop CLS


class ClipBlock(nn.Module):
    """CLIP pre-norm block (LLaVA's tower): x + attn(LN1(x)), then x + mlp(LN2(x)); fused QKV with bias.
    [B, N, W] -> [B, N, W]."""

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


@register("vision", "clip")
class ClipVisionTower(Tower):
    """CLIP ViT as LLaVA uses it: CLS first, one position table, pre-LayerNorm, the first `feature_layer`
    blocks (LLaVA's vision_feature_layer), CLS dropped unless keep_cls. Output [B, P (+1), W].
    LLaVA-UHD's slices (tiling "uhd", its AdaptCLIPVisionEmbeddings): pixels [B, 3, H, W] of any size in whole
    patches, the patch rows of the position table interpolated bicubically to the H / p x W / p grid.
    BLIP's tower (arch "blip", BLIP-2 / InstructBLIP, transformers' Blip2VisionModel) is the same with a patch conv
    bias, no pre-LayerNorm, a post_layernorm after every block and every row kept (BlipVisionTower)."""

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
        self.any_size = c.tiling == "uhd"

    def forward(self, pixels):                              # pixels: [B, 3, S, S] (any_size: [B, 3, H, W])
        x = self.patch_embed(pixels)                        # [B, W, h, w]
        pos = self.pos
        if self.any_size:                                   # (traced as sizes: any height and width)
            pos = torch.cat([pos[:, :1], grid_pos(pos[0, 1:], x.shape[2], x.shape[3])[None]], 1)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + pos
        if hasattr(self, "pre_norm"):
            x = self.pre_norm(x)
        for blk in self.blocks:
            x = blk(x)
        if hasattr(self, "post_norm"):
            x = self.post_norm(x)
        return x if self.keep_cls else x[:, 1:]


@register("vision", "blip")
class BlipVisionTower(ClipVisionTower):
    """BLIP-2 / InstructBLIP's ViT (goes with the Q-Former connector, edgemm.blocks.qformer): ClipVisionTower's
    BLIP form (built from a config whose arch is "blip"): pixels [B, 3, S, S] -> every row [B, 1 + P, W]."""


@register("vision", "siglip")
class SiglipVisionTower(Tower):
    """SigLIP ViT (transformers' SiglipVisionModel: LLaVA-OneVision; SmolVLM / Idefics3 and Gemma 3 take the same
    tower): patch conv with bias, one learned position row per patch, no CLS, no pre-LayerNorm, pre-norm ClipBlocks
    (the same layer: LayerNorm, attention with biases, fc1/fc2; gelu tanh), the first `feature_layer` of them, then
    post_layernorm when `post_norm` (the last_hidden_state SmolVLM and Gemma 3 take; LLaVA-OneVision takes
    hidden_states[-1], the last block's output before it). pixels [B, 3, S, S] -> [B, P, W]."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, c.patch_size)
        self.pos = nn.Parameter(torch.zeros(1, c.n_patches, c.width))
        n = c.layers if c.feature_layer is None else c.feature_layer
        self.blocks = nn.ModuleList(ClipBlock(c) for _ in range(n))
        if c.post_norm:
            self.post_norm = nn.LayerNorm(c.width, eps=c.eps)

    def forward(self, pixels):                              # pixels: [B, 3, S, S]
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.pos                # [B, P, W]
        for blk in self.blocks:
            x = blk(x)
        return self.post_norm(x) if hasattr(self, "post_norm") else x


@register("vision", "none")
class NoPixelTower(Tower):
    """Libra: pixels become image tokens in Libra's own VQ image tokenizer (+ a CLIP continuous signal),
    neither of which is part of the decoder checkpoint; edgemm takes the tokens (encode_image_tokens).
    No parameters; forward refuses pixels."""

    def __init__(self, c: VisionConfig | None = None):
        super().__init__()

    def forward(self, pixels):
        from ..errors import EdgemmError
        raise EdgemmError("this model (Libra) takes image tokens, not pixels: its VQ image tokenizer and CLIP "
                          "signal encoder are not imported; use EdgeMM.encode_image_tokens(codes, signal)")


@register("vision", "patch_linear")
class PatchLinear(Tower):
    """Fuyu: no tower. An image of any size in whole patches is cut into patch_size x patch_size patches,
    row-major, each flattened (row, column, channel) as FuyuImageProcessor.patchify_image does, and each goes
    through one Linear with bias (vision_embed_tokens) to d_model. pixels [B, 3, H, W] -> [B, H / p, W / p, D]
    (the grid kept: the newline_rows connector appends a row after each row of patches)."""

    def __init__(self, c: VisionConfig, d_model: int):
        super().__init__()
        self.p = c.patch_size
        self.patch_embed = nn.Linear(3 * c.patch_size ** 2, d_model)

    @classmethod
    def from_config(cls, cfg) -> "PatchLinear":
        return cls(cfg.vision, cfg.decoder.d_model)

    def forward(self, pixels):                              # pixels: [B, 3, H, W]
        B, C, H, W = pixels.shape                           # (traced as sizes: any height and width)
        x = pixels.reshape(B, C, H // self.p, self.p, W // self.p, self.p)   # [B, 3, h, p, w, p]
        return self.patch_embed(x.permute(0, 2, 4, 3, 5, 1).flatten(3))     # [B, h, w, D]
