"""Spec of edgemm.blocks.qformer (BLIP-2 / InstructBLIP): query_tokens learned queries through a Q-Former of
qformer_layers BERT-style layers (cross-attention to the tower rows every cross_attention_frequency layers;
LayerNorm eps `eps`, activation `gelu`), then a projection to d_model (bias: `bias`); qformer_text: InstructBLIP's
instruction tokens (vocab qformer_vocab, qformer_positions position rows) join the queries."""
from __future__ import annotations

from ...errors import EdgemmError
from ..spec import declare


def params(cfg) -> int:
    """Parameters of a QFormerAdapter, from the config alone."""
    c, kv_width, d_model = cfg.adapter, cfg.vision.width, cfg.decoder.d_model
    W, F_ = c.qformer_width, c.qformer_ffn
    attn = 2 * (W * W + W) + 2 * W
    ffn = W * F_ + F_ + F_ * W + W + 2 * W
    n_cross = len(range(0, c.qformer_layers, c.cross_attention_frequency))
    n = c.query_tokens * W + 2 * W + (W * d_model + (d_model if c.bias else 0))
    n += c.qformer_layers * (attn + 2 * (W * W + W) + ffn * (2 if c.qformer_text else 1))
    n += n_cross * (attn + 2 * (kv_width * W + W))
    if c.qformer_text:
        n += (c.qformer_vocab + c.qformer_positions) * W
    return n


def describe(cfg) -> str:
    """`edgemm info`'s vision line for a Q-Former model: tower rows in, query rows per image out."""
    v, a = cfg.vision, cfg.adapter
    n = v.n_patches + 1
    return (f"vision: {v.arch.upper()} ViT {v.image_size}px/{v.patch_size} width {v.width} x {v.layers} layers -> "
            f"{n} tower rows (CLS + {v.n_patches} patches) -> Q-Former ({a.qformer_layers} layers, width "
            f"{a.qformer_width}, cross-attention every {a.cross_attention_frequency}"
            f"{', + instruction tokens' if a.qformer_text else ''}) -> {cfg.n_image_rows} image rows per image "
            f"(learned queries: {n / cfg.n_image_rows:.1f}x fewer prefill and KV-cache rows than the tower rows)")


def check(cfg) -> None:
    a = cfg.adapter
    if min(a.query_tokens, a.qformer_width, a.qformer_layers, a.qformer_heads, a.qformer_ffn,
           a.cross_attention_frequency) < 1 or a.qformer_width % a.qformer_heads:
        raise EdgemmError("a qformer adapter needs query_tokens, qformer_width (a multiple of qformer_heads), "
                          "qformer_layers, qformer_heads, qformer_ffn and cross_attention_frequency >= 1")
    if a.qformer_text and min(a.qformer_vocab, a.qformer_positions) < 1:
        raise EdgemmError("qformer_text (InstructBLIP) needs qformer_vocab and qformer_positions >= 1")


FIELDS = {"query_tokens": 0, "qformer_width": 0, "qformer_layers": 0, "qformer_heads": 0, "qformer_ffn": 0,
          "cross_attention_frequency": 1, "qformer_text": False, "qformer_vocab": 0, "qformer_positions": 0}
declare("connector", "qformer", fields=FIELDS, check=check, rows=lambda cfg: cfg.adapter.query_tokens, params=params, describe=describe)
