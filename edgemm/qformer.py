"""BLIP-2 / InstructBLIP's vision side: the BLIP ViT and the Q-Former adapter (learned queries).

Shapes: B batch, N tower rows (CLS + patches), Q query tokens, T instruction tokens, W Q-Former width, D d_model.

- The BLIP tower (VisionConfig.arch "blip", transformers' Blip2VisionModel) is edgemm.model.ClipVisionTower's
  BLIP form: patch conv with bias, CLS first, one position table over CLS+patches, no pre-LayerNorm, pre-norm
  blocks (ClipBlock: fused QKV with bias; BLIP-2 stores q_bias, a zero k bias and v_bias), post_layernorm on the
  last hidden state; every row (CLS included) is kept: the Q-Former cross-attends to all of them. [B, N, Wv].
- QFormerAdapter (AdapterConfig.kind "qformer"): Q learned query rows (InstructBLIP: followed by the
  instruction's token + position embeddings) -> LayerNorm -> BERT-style post-norm layers: self-attention over
  all rows, cross-attention of the query rows to the tower rows every `cross_attention_frequency` layers
  (layer i has one when i % frequency == 0), then a feed-forward block (query rows and instruction rows have
  their own) -> the query rows -> language projection (Linear with bias) to d_model. Output [B, Q, D]: the
  decoder takes them as image rows through its (single) text branch, as LLaVA does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AdapterConfig
from .model import gelu


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


class QFormerAdapter(nn.Module):
    """Learned queries (+ InstructBLIP's instruction) through the Q-Former, projected to d_model."""

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

    def forward(self, feats, instruction=None, instruction_mask=None):
        """feats [B, N, Wv] tower rows; instruction [B, T] Q-Former token ids (InstructBLIP; its own tokenizer),
        instruction_mask [B, T] (1 = token, 0 = padding) -> [B, Q, D]. No instruction is an empty one (transformers
        computes the same with zero qformer_input_ids); the runtimes feed the question (edgemm.qformer.instruction)."""
        B, Q = feats.shape[0], self.query.shape[1]
        x, mask = self.query.expand(B, -1, -1), None
        if instruction is None and hasattr(self, "word_embed"):
            import warnings
            warnings.warn("InstructBLIP without an instruction: the Q-Former reads the image with its queries alone "
                          "(EdgeMM.encode_image(pixels, ids[, mask]) takes the question's Q-Former ids)")
        if instruction is not None and instruction.shape[1]:
            if not hasattr(self, "word_embed"):
                from .errors import EdgemmError
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


def qformer_param_count(c: AdapterConfig, kv_width: int, d_model: int) -> int:
    """Parameters of a QFormerAdapter, from the config alone (edgemm info)."""
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


def describe_rows(cfg) -> str:
    """`edgemm info`'s vision line for a Q-Former model: tower rows in, query rows per image out."""
    v, a = cfg.vision, cfg.adapter
    n = v.n_patches + 1
    return (f"vision: {v.arch.upper()} ViT {v.image_size}px/{v.patch_size} width {v.width} x {v.layers} layers -> "
            f"{n} tower rows (CLS + {v.n_patches} patches) -> Q-Former ({a.qformer_layers} layers, width "
            f"{a.qformer_width}, cross-attention every {a.cross_attention_frequency}"
            f"{', + instruction tokens' if a.qformer_text else ''}) -> {cfg.n_image_rows} image rows per image "
            f"(learned queries: {n / cfg.n_image_rows:.1f}x fewer prefill and KV-cache rows than the tower rows)")


# --------------------------------------------------------------------------- InstructBLIP's instruction input
QFORMER_TOKENIZER = "qformer_tokenizer.json"       # in edgemm checkpoints and bundles (a bundle's manifest lists it)
SOURCE_DIR = "qformer_tokenizer"                   # InstructBlipProcessor.save_pretrained's subfolder


class QFormerTokenizer:
    """The Q-Former's own tokenizer (InstructBLIP: BERT WordPiece), as InstructBlipProcessor calls it: the text
    with its special tokens ([CLS] ... [SEP]), unpadded. Longer than the Q-Former's position table (where
    transformers' model would fail), it is truncated to `max_length` ids, special tokens kept."""

    def __init__(self, tok, max_length: int):
        self.tok, self.max_length = tok, int(max_length)
        tok.no_padding()
        tok.enable_truncation(self.max_length)

    @classmethod
    def load(cls, path, max_length: int, data: bytes | None = None) -> "QFormerTokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from .errors import EdgemmError
        try:
            tok = HFTokenizer.from_str(data.decode("utf-8")) if data is not None else HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise EdgemmError(f"cannot read the Q-Former tokenizer {path}: {str(e)[:200]}") from None
        return cls(tok, max_length)

    def save(self, path) -> None:
        self.tok.save(str(path))

    def __call__(self, text: str):
        """-> (ids, mask) int64 [1, T]: the instruction inputs of the vision stage."""
        import numpy as np
        ids = self.tok.encode(text).ids
        return np.asarray([ids], np.int64), np.ones((1, len(ids)), np.int64)


def instruction(tokenizer, cfg, text: str):
    """The question's Q-Former inputs (ids, mask) for an InstructBLIP model; () for any other model, so callers
    write vision(pixels, *instruction(...))."""
    if not cfg.reads_question:
        return ()
    q = getattr(tokenizer, "qformer", None)
    if q is None:
        from .errors import EdgemmError
        raise EdgemmError("this InstructBLIP model has no Q-Former tokenizer loaded (qformer_tokenizer.json); "
                          "re-import the model, or re-export the bundle, with this edgemm")
    return q(text)


def import_tokenizer(src, tok_dir, cfg) -> QFormerTokenizer:
    """`edgemm import` of InstructBLIP: the source's qformer_tokenizer/tokenizer.json (the processor layout), or
    --tokenizer DIR's (saved as qformer_tokenizer.json). A missing one is an error that says what to pass."""
    from pathlib import Path
    from .errors import EdgemmError
    cands = [Path(d) / SOURCE_DIR / "tokenizer.json" for d in ([tok_dir] if tok_dir else []) + [src]]
    f = next((c for c in cands if c.is_file()), None)
    if f is None:
        raise EdgemmError(f"InstructBLIP: {src} has no {SOURCE_DIR}/tokenizer.json, the Q-Former's own tokenizer "
                          f"(InstructBlipProcessor.save_pretrained writes it); save the model's processor into {src}, "
                          f"or pass --tokenizer DIR with a {SOURCE_DIR}/tokenizer.json in DIR")
    q = QFormerTokenizer.load(f, cfg.adapter.qformer_positions)
    n = q.tok.get_vocab_size()
    if n > cfg.adapter.qformer_vocab:
        raise EdgemmError(f"{f}: {n} tokens, more than the Q-Former's {cfg.adapter.qformer_vocab} word embeddings; "
                          "it is not this model's Q-Former tokenizer")
    return q


def attach_checkpoint_tokenizer(tok, path, cfg) -> None:
    """load_checkpoint: an InstructBLIP checkpoint's Q-Former tokenizer onto its Tokenizer (`tok.qformer`)."""
    from pathlib import Path
    from .errors import EdgemmError
    f = Path(path) / QFORMER_TOKENIZER
    if not f.is_file():
        raise EdgemmError(f"{path} is an InstructBLIP checkpoint without {QFORMER_TOKENIZER} (the Q-Former's "
                          "tokenizer); re-import it with `edgemm import` from a source with qformer_tokenizer/")
    tok.qformer = QFormerTokenizer.load(f, cfg.adapter.qformer_positions)


def bundle_fields(tok, out, cfg) -> dict:
    """An export of an InstructBLIP model: writes qformer_tokenizer.json into the bundle -> the manifest fields."""
    if not cfg.reads_question:
        return {}
    q = getattr(tok, "qformer", None)
    if q is None:
        from .errors import EdgemmError
        raise EdgemmError("the model has no Q-Former tokenizer (qformer_tokenizer.json) for its bundle; "
                          "re-import it with `edgemm import`")
    q.save(out / QFORMER_TOKENIZER)
    return {"qformer_tokenizer": QFORMER_TOKENIZER,
            "instruction": {"inputs": "qformer_input_ids, qformer_attention_mask [batch, instruction_len] int64",
                            "text": "the question of the turn the image comes with, tokenized by the Q-Former "
                                    "tokenizer with its special tokens (InstructBlipProcessor)",
                            "max_length": cfg.adapter.qformer_positions}}


def attach_bundle_tokenizer(tok, bundle, m: dict, verified: bool) -> None:
    """Bundle backends: the manifest's qformer_tokenizer (hashed as it is read when `verified`) onto `tok`."""
    from .bundle import bundle_path, read_verified
    from .config import ModelConfig
    cfg = ModelConfig.from_dict(m["model"])
    if not cfg.reads_question:
        return
    from .errors import EdgemmError
    rel = m.get("qformer_tokenizer")
    if not isinstance(rel, str):
        raise EdgemmError(f"bundle {bundle}: an InstructBLIP bundle without the Q-Former tokenizer in its "
                          "manifest; re-export it with this edgemm")
    p = bundle_path(bundle, rel)
    tok.qformer = QFormerTokenizer.load(p, cfg.adapter.qformer_positions,
                                        read_verified(bundle, rel, m) if verified else None)
