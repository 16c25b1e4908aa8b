"""The import plan (edgemm tensor <- source tensors) and the helpers every family mapper shares."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..config import ModelConfig
from ..errors import EdgemmError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- plan
@dataclass
class Entry:
    name: str                                   # edgemm state-dict name
    sources: tuple[str, ...]                    # source tensor names (empty: synthesized)
    fn: Callable | None = None                  # list of source tensors -> tensor; None: the one source as is

    def build(self, tensors):
        return tensors[0] if self.fn is None else self.fn(tensors)


@dataclass
class Plan:
    cfg: ModelConfig
    entries: list[Entry] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)      # source name -> why it is not imported
    notes: list[str] = field(default_factory=list)

    def add(self, name, *sources, fn=None):
        self.entries.append(Entry(name, tuple(sources), fn))

    def ignore(self, name, reason):
        self.ignored[name] = reason


def _cat(ts):
    import torch
    return torch.cat(list(ts), 0)



def _req(d: dict, key: str, where: str):
    if key not in d:
        raise EdgemmError(f"{where} lacks the key {key!r}")
    return d[key]


def _act(name: str, where: str) -> str:
    forms = {"gelu": "erf", "gelu_python": "erf", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh",
             "gelu_fast": "tanh", "quick_gelu": "quick"}
    if name not in forms:
        raise EdgemmError(f"{where}: activation {name!r} is not supported (edgemm computes gelu, "
                          "its tanh form and quick_gelu)")
    return forms[name]


def _rope_theta(tc: dict, where: str) -> float:
    rp = tc.get("rope_parameters") or {}
    scaling = tc.get("rope_scaling")
    rtype = rp.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rtype != "default":
        raise EdgemmError(f"{where}: RoPE scaling {rtype!r} is not supported (plain RoPE only)")
    return float(rp.get("rope_theta", tc.get("rope_theta", 10000.0)))


def _lm_ends(plan: Plan, lm: str, head: str, tie: bool) -> None:
    """A LLaMA-style language model's token embedding, final norm and LM head (ignored when tied)."""
    plan.add("decoder.tok_embeddings.weight", lm + "embed_tokens.weight")
    plan.add("decoder.norm.weight", lm + "norm.weight")
    if tie:
        plan.ignore(head, "tied to the token embedding")
    else:
        plan.add("decoder.lm_head.weight", head)


def _llama_layer(plan: Plan, pre: str, i: int, qkv_bias: bool, synth_qkv_bias=None, mlp: bool = True):
    e, s = f"decoder.layers.{i}.", f"{pre}layers.{i}."
    plan.add(e + "attn_norm.weight", s + "input_layernorm.weight")
    plan.add(e + "ffn_norm.weight", s + "post_attention_layernorm.weight")
    a = s + "self_attn."
    plan.add(e + "text.qkv.weight", a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight", fn=_cat)
    if qkv_bias:
        plan.add(e + "text.qkv.bias", a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias", fn=_cat)
    plan.add(e + "text.o.weight", a + "o_proj.weight")
    for n in ("gate", "up", "down") if mlp else ():        # (mlp=False: the caller maps an MoE block)
        plan.add(e + f"text.{n}.weight", s + f"mlp.{n}_proj.weight")
    plan.ignore(a + "rotary_emb.inv_freq", "RoPE frequencies (recomputed from the config's rope_theta)")


def _clip_vision(plan: Plan, vt: str, n_blocks: int, post_norm_why: str, dst: str = "vision.") -> None:
    """A CLIP ViT in transformers' layout under `vt` -> edgemm's "clip" tower under `dst`: embeddings, pre-LayerNorm
    and the first n_blocks encoder layers (fused QKV); post_layernorm (the pooled output's) is not imported."""
    em = vt + "embeddings."
    plan.add(dst + "patch_embed.weight", em + "patch_embedding.weight")
    plan.add(dst + "cls", em + "class_embedding", fn=lambda t: t[0].reshape(1, 1, -1))
    plan.add(dst + "pos", em + "position_embedding.weight", fn=lambda t: t[0].unsqueeze(0))
    plan.ignore(em + "position_ids", "position index buffer")
    for n in ("weight", "bias"):
        plan.add(dst + f"pre_norm.{n}", vt + f"pre_layrnorm.{n}")
        plan.ignore(vt + f"post_layernorm.{n}", post_norm_why)
    _vit_layers(plan, vt, n_blocks, dst)


def _siglip_vision(plan: Plan, vt: str, n_blocks: int, post_norm: bool, names) -> None:
    """A SigLIP ViT in transformers' layout under `vt` (SiglipVisionModel's vision_model) -> edgemm's "siglip"
    tower: patch conv with bias, the position table, the first n_blocks encoder layers (fused QKV), post_layernorm
    when the family takes the last_hidden_state (post_norm); the pooling head (vision_use_head) is not imported.
    `names`: the source's tensor names (the layers after n_blocks and the head are listed as ignored)."""
    em = vt + "embeddings."
    for n in ("weight", "bias"):
        plan.add(f"vision.patch_embed.{n}", em + f"patch_embedding.{n}")
        if post_norm:
            plan.add(f"vision.post_norm.{n}", vt + f"post_layernorm.{n}")
        else:
            plan.ignore(vt + f"post_layernorm.{n}", "the family takes the hidden states before SigLIP's post_layernorm")
    plan.add("vision.pos", em + "position_embedding.weight", fn=lambda t: t[0].unsqueeze(0))
    plan.ignore(em + "position_ids", "position index buffer")
    _vit_layers(plan, vt, n_blocks)
    layers = vt + "encoder.layers."
    for k in names:
        if k.startswith(vt + "head."):
            plan.ignore(k, "SigLIP's attention-pooling head: not used by the family")
        elif k.startswith(layers) and int(k[len(layers):].split(".")[0]) >= n_blocks:
            plan.ignore(k, f"SigLIP layer after the feature layer (the first {n_blocks} are used)")


def _vit_layers(plan: Plan, vt: str, n_blocks: int, dst: str = "vision.") -> None:
    """The first n_blocks pre-norm encoder layers of a CLIP / SigLIP ViT under `vt` -> {dst}blocks.i (ClipBlock)."""
    for i in range(n_blocks):
        s, e = f"{vt}encoder.layers.{i}.", f"{dst}blocks.{i}."
        a = s + "self_attn."
        for n in ("weight", "bias"):
            plan.add(e + f"qkv.{n}", a + f"q_proj.{n}", a + f"k_proj.{n}", a + f"v_proj.{n}", fn=_cat)
            for ours, theirs in (("proj", "self_attn.out_proj"), ("ln1", "layer_norm1"), ("ln2", "layer_norm2"),
                                 ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
                plan.add(e + f"{ours}.{n}", s + f"{theirs}.{n}")


def _zeros(n):
    import torch
    return torch.zeros(n)


