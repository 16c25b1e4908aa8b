"""BLIP-2 / InstructBLIP's Q-Former connector (role "connector", kind "qformer"): learned queries read the tower.

Shapes: B batch, N tower rows (CLS + patches), Q query tokens, T instruction tokens, W Q-Former width, D d_model.

- The BLIP tower it reads (vision arch "blip", transformers' Blip2VisionModel) is edgemm.blocks.vision's
  BlipVisionTower: patch conv with bias, CLS first, one position table over CLS+patches, no pre-LayerNorm, pre-norm
  blocks (ClipBlock: fused QKV with bias; BLIP-2 stores q_bias, a zero k bias and v_bias), post_layernorm on the
  last hidden state; every row (CLS included) is kept: the Q-Former cross-attends to all of them. [B, N, Wv].
- QFormerAdapter: Q learned query rows (InstructBLIP: followed by the instruction's token + position embeddings)
  -> LayerNorm -> BERT-style post-norm layers: self-attention over all rows, cross-attention of the query rows to
  the tower rows every `cross_attention_frequency` layers (layer i has one when i % frequency == 0), then a
  feed-forward block (query rows and instruction rows have their own) -> the query rows -> language projection
  (Linear with bias) to d_model. Output [B, Q, D]: the decoder takes them as image rows through its (single) text
  branch, as LLaVA does.

The Q-Former's own tokenizer (InstructBLIP's instruction input), its parameter count and `edgemm info`'s line are
in edgemm.qformer, above the core.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig
from .ops import gelu
from .registry import register


class QFormerAttention(nn.Module):
    """BERT attention: q/k/v with bias (k, v from `kv_width` rows), then LayerNorm(dense(a) + x)."""

    def __init__(self, width: int, kv_width: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(kv_width, width)
        self.v = nn.Linear(kv_width, width)
        self.o = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x, kv, mask=None):                    # x [B, T, W], kv [B, N, *], mask [B, 1, 1, N] bool
        B, T, W = x.shape
        h, E = self.heads, W // self.heads
        q = self.q(x).view(B, T, h, E).transpose(1, 2)
        k = self.k(kv).view(B, -1, h, E).transpose(1, 2)
        v = self.v(kv).view(B, -1, h, E).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.norm(self.o(a.transpose(1, 2).reshape(B, T, W)) + x)


class QFormerFFN(nn.Module):
    """LayerNorm(fc2(gelu(fc1(x))) + x)."""

    def __init__(self, width: int, ffn: int, eps: float, form: str):
        super().__init__()
        self.gelu = form
        self.fc1 = nn.Linear(width, ffn)
        self.fc2 = nn.Linear(ffn, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x):
        return self.norm(self.fc2(gelu(self.fc1(x), self.gelu)) + x)


class QFormerLayer(nn.Module):
    """Self-attention over all rows, cross-attention of the query rows (when `cross`), the rows' own FFNs.
    x [B, Q (+T), W], feats [B, N, Wv] -> [B, Q (+T), W]."""

    def __init__(self, c: AdapterConfig, kv_width: int, cross: bool):
        super().__init__()
        W = c.qformer_width
        self.self_attn = QFormerAttention(W, W, c.qformer_heads, c.eps)
        if cross:
            self.cross_attn = QFormerAttention(W, kv_width, c.qformer_heads, c.eps)
        self.ffn = QFormerFFN(W, c.qformer_ffn, c.eps, c.gelu)              # the query rows'
        if c.qformer_text:
            self.ffn_text = QFormerFFN(W, c.qformer_ffn, c.eps, c.gelu)     # the instruction rows'

    def forward(self, x, n_query: int, feats, mask=None):
        h = self.self_attn(x, x, mask)
        q = h[:, :n_query]
        if hasattr(self, "cross_attn"):
            q = self.cross_attn(q, feats)
        q = self.ffn(q)
        if h.shape[1] == n_query:
            return q
        return torch.cat([q, self.ffn_text(h[:, n_query:])], 1)


@register("connector", "qformer")
class QFormerAdapter(nn.Module):
    """Learned queries (+ InstructBLIP's instruction) through the Q-Former, projected to d_model:
    feats [B, N, Wv] (+ instruction ids [B, T], mask [B, T]) -> [B, Q, D]."""

    def __init__(self, c: AdapterConfig, kv_width: int, d_model: int):
        super().__init__()
        W = c.qformer_width
        self.query = nn.Parameter(torch.zeros(1, c.query_tokens, W))
        if c.qformer_text:
            self.word_embed = nn.Embedding(c.qformer_vocab, W)
            self.pos_embed = nn.Embedding(c.qformer_positions, W)
        self.norm = nn.LayerNorm(W, eps=c.eps)
        self.layers = nn.ModuleList(QFormerLayer(c, kv_width, i % c.cross_attention_frequency == 0)
                                    for i in range(c.qformer_layers))
        self.proj = nn.Linear(W, d_model, bias=c.bias)

    @classmethod
    def from_config(cls, cfg) -> nn.Module:
        return cls(cfg.adapter, cfg.vision.width, cfg.decoder.d_model)

    def forward(self, feats, instruction=None, instruction_mask=None):
        """feats [B, N, Wv] tower rows; instruction [B, T] Q-Former token ids (InstructBLIP; its own tokenizer),
        instruction_mask [B, T] (1 = token, 0 = padding) -> [B, Q, D]. No instruction is an empty one (transformers
        computes the same with zero qformer_input_ids); the runtimes feed the question (edgemm.qformer.instruction)."""
        B, Q = feats.shape[0], self.query.shape[1]
        x, mask = self.query.expand(B, -1, -1), None
        if instruction is None and hasattr(self, "word_embed"):
            import warnings
            warnings.warn("a Q-Former that reads the question (InstructBLIP, LLaMA-VID) without an instruction: its "
                          "queries read the image alone (EdgeMM.encode_image(pixels, ids[, mask]) takes the "
                          "question's Q-Former ids)")
        if instruction is not None and instruction.shape[1]:
            if not hasattr(self, "word_embed"):
                from ..errors import EdgemmError
                raise EdgemmError("this Q-Former (BLIP-2) takes no instruction tokens; InstructBLIP's does")
            T = instruction.shape[1]
            t = self.word_embed(instruction) + self.pos_embed(torch.arange(T, device=instruction.device))
            x = torch.cat([x, t], 1)
            if instruction_mask is not None:
                keep = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=x.device), instruction_mask.bool()], 1)
                # additive, in the rows' type: a bool mask traces to fp32 ops in an fp16 graph (export --device cuda)
                mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, float("-inf"))
                mask = mask[:, None, None, :]
        x = self.norm(x)
        for layer in self.layers:
            x = layer(x, Q, feats, mask)
        return self.proj(x[:, :Q])
