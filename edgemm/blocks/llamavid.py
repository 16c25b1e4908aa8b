"""LLaMA-VID (dvlab-research/LLaMA-VID, arXiv 2311.17043): every frame of a clip (an image: one frame) becomes a
context token, read from the frame by queries that the question conditions, and content tokens, the frame pooled.

Shapes: B frames, P patches, N = 1 + P tower rows (CLS first), W tower width (the release's mm_hidden_size),
Q learned queries, T question tokens (the Q-Former's BERT tokenizer), K content rows, D d_model.

- LavisEvaTower (vision "eva_lavis"): LAVIS's EVA ViT-g as the release's EVAVisionTowerLavis runs it
  (llamavid/model/multimodal_encoder/eva_vit.py): patch conv with bias, CLS first, one position table, pre-norm
  blocks (fused QKV: q_bias, no k bias, v_bias; erf GELU), no norm after the last block; every row kept.
  pixels [B, 3, S, S] -> [B, N, W]. BLIP's tower (edgemm.blocks.vision, arch "blip") without its post_layernorm
  (LAVIS's ln_vision, which LLaMA-VID holds as vlm_att_ln and applies only to the Q-Former's input).
- LlamaVidTokens (connector "llamavid"): llamavid_arch.py's vlm_attention + token_generation, bert_type
  "qformer_pretrain":
    text_q  = vlm_att_projector(Q-Former(queries + question ids; cross-attending vlm_att_ln(all N rows))[:, :Q])
                                                                                          [B, Q, W]
    x       = the patch rows (CLS dropped: the release drops row 0 when N is odd, 'patch' features)  [B, P, W]
    context = vlm_att_val_projector(mean over the Q queries of softmax(text_q @ key_projector(x)^T / sqrt(W)) @ x)
                                                                                          [B, 1, D]
    content = mm_projector(x average-pooled: 'mean' K = 1 row; 'grid:g' K = g^2 rows)     [B, K, D]
  -> [B, 1 + K, D] (the context row, then the content rows). The Q-Former is edgemm.blocks.qformer's (InstructBLIP's
  BERT layers: the question's tokens join the queries), its projection being vlm_att_projector (to W, not D).
  A clip is a batch of frames with the question repeated; the host joins their rows in frame order (edgemm.video).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .connectors import MlpProjector
from .qformer import QFormerAdapter
from .registry import register
from .vision import ClipVisionTower

LN_EPS = 1e-5                   # vlm_att_ln: torch.nn.LayerNorm(att_feat_size), torch's default eps


@register("vision", "eva_lavis")
class LavisEvaTower(ClipVisionTower):
    """LAVIS's EVA ViT-g (LLaMA-VID): ClipVisionTower's BLIP form without the final norm. [B, 3, S, S] -> [B, N, W]."""

    def __init__(self, c):
        import dataclasses
        super().__init__(dataclasses.replace(c, arch="blip"))
        del self.post_norm


@register("connector", "llamavid")
class LlamaVidTokens(nn.Module):
    """A frame's context token (question-conditioned queries attending to its patches) and its pooled content rows:
    feats [B, N, W] (+ question ids [B, T], mask [B, T]) -> [B, 1 + K, D]."""

    def __init__(self, cfg):
        super().__init__()
        a, W, D = cfg.adapter, cfg.vision.width, cfg.decoder.d_model
        self.qformer = QFormerAdapter(a, W, W)             # its proj: vlm_att_projector (Q-Former width -> W)
        self.ln = nn.LayerNorm(W, eps=LN_EPS)              # vlm_att_ln
        self.key = nn.Linear(W, W)                         # vlm_att_key_projector
        self.val = nn.Linear(W, D)                         # vlm_att_val_projector
        self.mm = MlpProjector(a, W, D)                    # mm_projector 'mlp2x_gelu': Linear, GELU, Linear
        self.side = cfg.vision.image_size // cfg.vision.patch_size
        self.k = self.side // math.isqrt(a.pool_tokens)    # the content pooling's kernel and stride

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg)

    def forward(self, feats, instruction=None, instruction_mask=None):
        q = self.qformer(self.ln(feats), instruction, instruction_mask)                # [B, Q, W]
        x = feats[:, 1:]                                                                # [B, P, W] (CLS dropped)
        att = torch.softmax(q @ self.key(x).transpose(1, 2) / math.sqrt(x.shape[-1]), -1)   # [B, Q, P]
        ctx = self.val((att @ x).mean(1, keepdim=True))                                # [B, 1, D]
        B, P, W = x.shape
        if self.k == self.side:                                                         # 'mean': one row
            pooled = x.mean(1, keepdim=True)
        else:                                                                           # 'grid:g': g x g rows
            g = x.transpose(1, 2).reshape(B, W, self.side, self.side)
            pooled = F.avg_pool2d(g, self.k, self.k).flatten(2).transpose(1, 2)
        return torch.cat([ctx, self.mm(pooled)], 1)                                     # [B, 1 + K, D]
