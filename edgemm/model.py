"""The reference model: a composition of registered blocks (edgemm.blocks) picked from the config.

EdgeMM = vision tower (registry role "vision", kind cfg.vision.arch) + connector ("connector", cfg.adapter.kind)
+ decoder (edgemm.blocks.decoder: its layers' branch kinds, MoE FFNs and gated cross-attention layers are
registered "layer" blocks). Every exported stage is checked against this model.

Shapes in comments: B batch, T rows in a segment, S cached rows, D d_model, H heads, K kv heads, E head dim.
The blocks' names stay importable from here (exporters, runtimes and tests import them from edgemm.model).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import xattn
from .blocks import registry
from .blocks.connectors import Adapter, LibraImageInput, MlpProjector
from .blocks.decoder import Decoder, DecoderLayer, KVCache
from .blocks.layers import Branch, KVBranch, LowRankBranch, LowRankLinear
from .blocks.ops import RMSNorm, apply_rope, gelu, rope_cos_sin, routed
from .blocks.params import PARTS, param_part
from .blocks.qformer import QFormerAdapter
from .blocks.vision import BlipVisionTower, ClipBlock, ClipVisionTower, NoPixelTower, VisionTower, VitBlock
from .config import ModelConfig, check_reference_supports

registry.load_all()                          # every block module: their blocks registered

__all__ = ["EdgeMM", "Adapter", "LibraImageInput", "MlpProjector", "QFormerAdapter", "Decoder", "DecoderLayer",
           "KVCache", "Branch", "KVBranch", "LowRankBranch", "LowRankLinear", "RMSNorm", "apply_rope", "gelu",
           "rope_cos_sin", "routed", "BlipVisionTower", "ClipBlock", "ClipVisionTower", "NoPixelTower",
           "VisionTower", "VitBlock"]


class EdgeMM(nn.Module):
    """The whole model: `vision` (the registered tower of cfg.vision.arch), `adapter` (the registered connector of
    cfg.adapter.kind), `decoder` (edgemm.blocks.decoder.Decoder, its layers of the registered kinds). Prompts are
    sequences of modality segments, each one batch through its branch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        check_reference_supports(cfg)
        self.cfg = cfg
        self.vision = registry.get("vision", cfg.vision.arch).from_config(cfg)        # edgemm.blocks.vision
        self.adapter = registry.get("connector", cfg.adapter.kind).from_config(cfg)   # edgemm.blocks.connectors
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
            self.vision.init_norm_gains()                   # EVA: post-norm blocks start close to identity
            # The patch embedding at unit fan-in scale, so patch-specific features are not swamped by the shared
            # attention output.
            if hasattr(self.vision, "patch_embed"):
                w = self.vision.patch_embed.weight
                w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w[0].numel()))
        return self

    # ---- stages ------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor, *instruction) -> torch.Tensor:
        """Stage `vision`: pixels [B, 3, S, S] -> image rows [B, P + 2, D] (boi, patches, eoi). InstructBLIP's
        Q-Former also takes the instruction: ids [B, T] (its own tokenizer) and optionally a mask [B, T]. A tower
        that gives its connector several inputs returns them as a tuple (Libra's tokenizer: codes and signal)."""
        feats = self.vision(pixels)
        return self.adapter(*feats) if isinstance(feats, tuple) else self.adapter(feats, *instruction)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Stage `video` (LLaVA-NeXT-Video's frames, `vision.video` "pool"): frames [F, 3, S, S] -> rows [1, F * R, D]:
        each frame through the tower, its patch grid pooled (the vision_resampler: average or max, by the stride),
        then the connector. Qwen2-VL (`temporal` T): frames [F, 3, h, w] -> rows [1, F / T * R, D], each T frames
        one temporal patch through the whole Conv3d kernel (edgemm.blocks.qwen2vl)."""
        import torch.nn.functional as F
        v = self.cfg.vision.video
        if v.get("temporal"):           # Qwen2-VL: frames [F, 3, h, w], T a temporal patch -> [1, F / T * R, D]
            rows = self.adapter(self.vision.frames(frames))
            return rows.reshape(1, -1, rows.shape[-1])
        stride = int(v.get("pool", 1))
        f = self.vision(frames)                                         # [F, P, W] (CLS dropped)
        g = self.cfg.vision.image_size // self.cfg.vision.patch_size
        f = f.reshape(-1, g, g, f.shape[-1]).permute(0, 3, 1, 2)
        pool = F.max_pool2d if v.get("pool_mode") == "max" else F.avg_pool2d
        f = pool(f, stride, stride).flatten(2).transpose(1, 2)           # [F, P / stride^2, W]
        rows = self.adapter(f)
        return rows.reshape(1, -1, rows.shape[-1])

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
        e, scale = self.decoder.tok_embeddings(ids), self.cfg.decoder.embed_scale    # (Gemma: times sqrt(D))
        return e * scale if scale else e

    def image_positions(self, start_pos: int, n: int | None = None, rows=None) -> torch.Tensor:
        """RoPE positions of the n image rows (default n_image_rows) starting at start_pos; returns [n] (M-RoPE:
        [3, n] from the rows' grid, edgemm.qwen2vl_pixels)."""
        if self.cfg.decoder.mrope_section:
            from .qwen2vl_pixels import image_positions
            return torch.from_numpy(image_positions(start_pos, rows))
        n = self.cfg.n_image_rows if n is None else n
        if self.cfg.decoder.position_rule == "cogvlm":       # boi p, every patch p+1, eoi p+2
            pos = torch.full((n,), start_pos + 1)
            pos[0], pos[-1] = start_pos, start_pos + 2
            return pos
        return torch.arange(start_pos, start_pos + n)

    def next_position(self, positions: torch.Tensor) -> int:
        return int(positions.max()) + 1

    def forward_segment(self, kind: str, data: torch.Tensor, cache: KVCache, pos: int, last_only=True):
        """One modality segment through its branch. kind 'text': data = ids [B, T]; 'image': rows [B, P+2, D].

        Returns (logits, next_pos). Stages `decoder_text` / `decoder_image`.
        """
        if self.cfg.decoder.cross_attn_every:               # gated cross-attention (edgemm.xattn)
            return xattn.forward_segment(self, kind, data, cache, pos, last_only)
        if kind == "text":
            positions = torch.arange(pos, pos + data.shape[1])
            logits = self.decoder(self.embed_tokens(data), "text", positions.to(data.device), cache, last_only)
            return logits, pos + data.shape[1]
        positions = self.image_positions(pos, data.shape[1], data).to(data.device)
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
            return xattn.forward_full(self, segments)
        xs, masks, poss, pos = [], [], [], 0
        for kind, data in segments:
            if kind == "text":
                xs.append(self.embed_tokens(data))
                masks.append(torch.zeros(data.shape[1], dtype=torch.bool))
                p = torch.arange(pos, pos + data.shape[1])
                p = p.expand(3, -1) if self.cfg.decoder.mrope_section else p
                pos += data.shape[1]
            else:
                xs.append(data)
                m = torch.ones(data.shape[1], dtype=torch.bool)
                if self.cfg.decoder.eoi_branch == "text":
                    m[-1] = False
                masks.append(m)
                p = self.image_positions(pos, data.shape[1], data)
                pos = self.next_position(p)
            poss.append(p)
        x = torch.cat(xs, 1)
        mask = torch.cat(masks).to(x.device)
        return self.decoder(x, mask, torch.cat(poss, -1).to(x.device))

    def param_counts(self) -> dict[str, int]:
        """Parameters per part: vision tower, adapter, shared decoder, text branch, vision branch."""
        out = dict.fromkeys(PARTS, 0)
        seen = set()
        for name, p in self.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[param_part(name)] += p.numel()
        return out
