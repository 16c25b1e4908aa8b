"""Specs of the options edgemm.blocks.decoder's shared layer takes (decoder option groups): Qwen3's per-head Q/K
norms, Persimmon's (Fuyu's language model) LayerNorm / partial RoPE / squared ReLU / biases, Gemma 3's scaled
embeddings, sandwich norms, GeGLU, query scale, sliding window and two-way image attention."""
from __future__ import annotations

from ...errors import EdgemmError
from ..spec import declare


def check_qwen3(cfg) -> None:
    d = cfg.decoder
    if d.attn_head_dim and (d.attn_head_dim % 2 or d.cross_attn_every):
        raise EdgemmError(f"attn_head_dim {d.attn_head_dim}: must be even (RoPE) and goes without gated "
                          "cross-attention")
    if d.qk_norm and not d.single_branch:
        raise EdgemmError("qk_norm (Qwen3's per-head Q/K RMSNorm) goes with single_branch")


def check_persimmon(cfg) -> None:
    d = cfg.decoder
    if d.norm not in ("rms", "layer") or d.mlp not in ("swiglu", "relu2", "geglu") or d.rope_dims % 2 \
            or d.rope_dims > d.head_dim or ("layer" == d.norm or d.mlp == "relu2" or d.linear_bias) and (
                d.n_experts or d.cross_attn_every or not d.single_branch):
        raise EdgemmError("decoder norm is 'rms' or 'layer', mlp 'swiglu' or 'relu2', rope_dims even and at most "
                          "head_dim; LayerNorm, relu2 and linear biases (Persimmon) go with a single branch "
                          "without experts or cross-attention")


def check_gemma3(cfg) -> None:
    d = cfg.decoder
    if (d.sliding_window < 0 or any(not isinstance(i, int) or not 0 <= i < d.n_layers for i in d.sliding_layers)
            or (d.sliding_layers and not d.sliding_window) or d.rope_linear_factor <= 0):
        raise EdgemmError("sliding_layers are layer indices and need a sliding_window >= 1; rope_linear_factor "
                          "> 0")


# Qwen3: RMSNorm over each head's Q and K (before RoPE; single branch); attn_head_dim: the heads' own width (0:
# d_model // n_heads; Qwen3: 128 at 2048)
declare("decoder", "qwen3", fields={"qk_norm": False, "attn_head_dim": 0}, check=check_qwen3)
# Persimmon (Fuyu's language model): LayerNorm with bias for every norm (norm "layer": attn/ffn, final and, with
# qk_norm, the per-head Q/K norms), RoPE on the first rope_dims of each head (0: all; partial_rotary_factor), a
# squared-ReLU MLP up -> relu(x)^2 -> down (mlp "relu2"), biases on the attention output and the MLP
declare("decoder", "persimmon", fields={"norm": "rms", "rope_dims": 0, "mlp": "swiglu", "linear_bias": False},
        check=check_persimmon)
# Gemma 3 (edgemm.families.gemma3; its (1 + w) RMSNorm weights are stored with the 1 added): embeddings times
# embed_scale (0: none), post-attention / post-FFN norms (sandwich_norms), a GELU-tanh gated MLP (mlp "geglu"),
# scores times query_scale^-1/2 (0: head_dim's), sliding-window attention of sliding_window rows on the layers in
# sliding_layers (RoPE base rope_local_theta there; the others' positions divided by rope_linear_factor), image
# rows seeing each other both ways (image_bidirectional: an image segment's rows between its boi and eoi rows)
declare("decoder", "gemma3", fields={"embed_scale": 0.0, "sandwich_norms": False, "query_scale": 0.0,
                                     "sliding_window": 0, "sliding_layers": [], "rope_local_theta": 10000.0,
                                     "rope_linear_factor": 1.0, "image_bidirectional": False},
        check=check_gemma3)
