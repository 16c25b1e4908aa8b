"""Libra's image tokenizer as a vision tower (role "vision", arch "libra_vq"): pixels -> (image tokens, signal).

Libra (YifanXu74/Libra, libra/models/libra/image_tokenizer.py + taming/models/vqgan.py VQModel.encode) tokenizes an
image with a frozen CLIP ViT: the hidden states of its `select_layer` layers, concatenated along the channels
(CLS dropped, the patch grid kept), are both the continuous signal the decoder's input embedding reads and the input
of a 1 x 1 convolution (`quant_conv`) into lookup-free quantization (LFQ, arXiv 2310.05737; its `project_in` when
the conv's width is not codebooks x bits): each of the `codebooks` groups of `bits` values becomes one code, the
bits (value > 0) read most significant first. The tokens of one image are boi, the codes, eoi (boi and eoi the
vision vocabulary's last two ids), and the signal is zero at boi and eoi, as Libra's tokenizer pads it.

Shapes: B batch, P patches, W CLIP width, k selected layers, E quant_conv width, C codebooks, b bits.
pixels [B, 3, S, S] -> codes [B, P + 2, C] (int64), signal [B, P + 2, k * W]; the libra connector
(edgemm.blocks.connectors.LibraImageInput) turns them into image rows.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register
from .vision import ClipVisionTower, Tower


def hidden_indices(c) -> list[int]:
    """The selected layers as indices into transformers' CLIP hidden_states (0: the embeddings after the
    pre-LayerNorm, i: the output of block i; negative counts from the end, -1 the last block)."""
    return [n if n >= 0 else c.layers + 1 + n for n in c.tokenizer["feature_layers"]]


def code_bits(a) -> int:
    """Bits per code: the vision vocabulary is the codebook (2^bits codes) + boi + eoi."""
    return int(math.log2(a.vision_vocab - 2))


@register("vision", "libra_vq")
class LibraImageTokenizer(Tower):
    """CLIP tower (its first max(selected layer) blocks) + quant_conv + LFQ. Parameters: `clip.*` (edgemm's clip
    tower), `quant_conv` (the 1 x 1 conv as a Linear), `project_in` (LFQ's, when present)."""

    def __init__(self, cfg):
        super().__init__()
        v, a, t = cfg.vision, cfg.adapter, cfg.vision.tokenizer
        self.layers = hidden_indices(v)
        self.clip = ClipVisionTower(dataclasses.replace(v, arch="clip", feature_layer=max(self.layers),
                                                         keep_cls=True))
        self.codebooks, self.bits, self.vocab = a.codebooks, code_bits(a), a.vision_vocab
        self.quant_conv = nn.Linear(v.width * len(self.layers), t["embed_dim"])
        if t["embed_dim"] != self.codebooks * self.bits:
            self.project_in = nn.Linear(t["embed_dim"], self.codebooks * self.bits)

    @classmethod
    def from_config(cls, cfg) -> "LibraImageTokenizer":
        return cls(cfg)

    def features(self, pixels):                              # pixels [B, 3, S, S] -> signal rows [B, P, k * W]
        c = self.clip
        x = c.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = c.pre_norm(torch.cat([c.cls.expand(x.shape[0], -1, -1), x], 1) + c.pos)
        hidden = [x]
        for blk in c.blocks:
            hidden.append(blk(hidden[-1]))
        return torch.cat([hidden[i] for i in self.layers], -1)[:, 1:]

    def codes(self, feats):                                  # [B, P, k * W] -> codes [B, P, C] (int64)
        h = self.quant_conv(feats)
        if hasattr(self, "project_in"):
            h = self.project_in(h)
        bits = (h.unflatten(-1, (self.codebooks, self.bits)) > 0).long()
        return (bits * 2 ** torch.arange(self.bits - 1, -1, -1, device=h.device)).sum(-1)   # first bit: the MSB

    def forward(self, pixels):
        feats = self.features(pixels)
        codes = self.codes(feats)
        boi = codes[:, :1] * 0 + (self.vocab - 2)          # from codes: a traced batch stays dynamic
        codes = torch.cat([boi, codes, boi + 1], 1)
        return codes, F.pad(feats, (0, 0, 1, 1))
