"""Spec of edgemm.blocks.moe (the decoder option group "moe"): MoE-LLaVA's mixture of experts (Mixtral /
Qwen3-MoE language models). A layer i is an MoE layer when n_experts > 0, (i + 1) % moe_every == 0 (Qwen3-MoE's
decoder_sparse_step) and i is not in moe_dense_layers (its mlp_only_layers); the router's top-k softmax weights are
renormalised to sum to one when norm_topk_prob (Mixtral always; Qwen3-MoE by its flag)."""
from __future__ import annotations

from ...errors import EdgemmError
from ..spec import declare


def check(cfg) -> None:
    d = cfg.decoder
    if d.n_experts and not (d.single_branch and 1 <= d.experts_top_k <= d.n_experts and d.moe_every >= 1):
        raise EdgemmError("mixture of experts needs single_branch (MoE-LLaVA; routed-expert + MoE models are not "
                          "supported) and 1 <= experts_top_k <= n_experts, moe_every >= 1")


declare("decoder", "moe", fields={"n_experts": 0, "experts_top_k": 2, "expert_ffn_dim": None, "moe_every": 1,
                                  "moe_dense_layers": [], "norm_topk_prob": True}, check=check)
