"""CogVLM (THUDM/cogvlm-chat-hf layout) -> edgemm."""
from __future__ import annotations

import json


from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError

from . import Family, register
from .base import CLIP_MEAN, CLIP_STD, Plan, _act, _cat, _lm_ends, _req, _rope_theta, _zeros
from ..importers.shards import Source


def map_cogvlm(hf: dict, src: Source, rules: str = "original") -> Plan:
    """THUDM/cogvlm-chat-hf: EVA2-CLIP-E + GLU adapter + Vicuna with visual experts."""
    w = "config.json"
    v = _req(hf, "vision_config", w)
    wv = "config.json vision_config"
    D, L = _req(hf, "hidden_size", w), _req(hf, "num_hidden_layers", w)
    vl, image, patch = _req(v, "num_hidden_layers", wv), _req(v, "image_size", wv), _req(v, "patch_size", wv)
    if hf.get("num_multi_query_heads") or hf.get("num_key_value_heads", _req(hf, "num_attention_heads", w)) \
            != hf["num_attention_heads"]:
        raise EdgemmError("this CogVLM config uses grouped-query attention, which the cogvlm-chat-hf layout "
                          "(fused language/vision expert QKV of 3*hidden_size) does not have")
    if v.get("num_positions", (image // patch) ** 2 + 1) != (image // patch) ** 2 + 1:
        raise EdgemmError(f"{wv}: num_positions {v['num_positions']} != (image_size/patch_size)^2 + 1")
    bias_names = [f"model.layers.{i}.self_attn.vision_expert_query_key_value.bias" for i in range(L)]
    present = [n for n in bias_names if n in src.where]
    qkv_bias = bool(present)
    notes = []
    if present and all(not src.read(n).any() for n in present):
        qkv_bias = False
        notes.append("the vision expert QKV bias is all zeros: imported as no bias (exact)")
    if rules not in ("original", "llamacpp"):
        raise EdgemmError(f"unknown cogvlm rules {rules!r}: 'original' or 'llamacpp'")
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=image, patch_size=patch, width=_req(v, "hidden_size", wv), layers=vl,
                            heads=_req(v, "num_heads", wv), mlp_dim=_req(v, "intermediate_size", wv),
                            eps=v.get("layer_norm_eps", 1e-6), gelu=_act(v.get("hidden_act", "gelu"), wv),
                            image_mean=CLIP_MEAN, image_std=CLIP_STD),
        adapter=AdapterConfig(ffn_dim=_req(hf, "intermediate_size", w), eps=1e-5, gelu="erf"),
        decoder=DecoderConfig(vocab_size=_req(hf, "vocab_size", w), d_model=D, n_layers=L,
                              n_heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
                              rope_theta=_rope_theta(hf, w), rms_eps=hf.get("rms_norm_eps", 1e-5),
                              max_seq_len=hf.get("max_position_embeddings", 2048),
                              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
                              position_rule="cogvlm" if rules == "original" else "sequential",
                              eoi_branch="text" if rules == "original" else "vision"))
    plan = Plan(cfg, notes=notes)
    _lm_ends(plan, "model.", "lm_head.weight", cfg.decoder.tie_embeddings)
    for i in range(L):
        e, s = f"decoder.layers.{i}.", f"model.layers.{i}."
        plan.add(e + "attn_norm.weight", s + "input_layernorm.weight")
        plan.add(e + "ffn_norm.weight", s + "post_attention_layernorm.weight")
        plan.ignore(s + "self_attn.rotary_emb.inv_freq", "RoPE frequencies (recomputed from rope_theta)")
        for br, ex in (("text", "language"), ("vision", "vision")):
            a = f"{s}self_attn.{ex}_expert_"
            plan.add(e + f"{br}.qkv.weight", a + "query_key_value.weight")
            bias = a + "query_key_value.bias"
            if qkv_bias:
                if bias in src.where:
                    plan.add(e + f"{br}.qkv.bias", bias)
                else:   # cogvlm-chat-hf: only the vision expert has a QKV bias
                    n = 3 * D
                    plan.add(e + f"{br}.qkv.bias", fn=lambda _, n=n: _zeros(n))
            elif bias in src.where:
                plan.ignore(bias, "all zeros")
            plan.add(e + f"{br}.o.weight", a + "dense.weight")
            for n in ("gate", "up", "down"):
                plan.add(e + f"{br}.{n}.weight", f"{s}mlp.{ex}_mlp.{n}_proj.weight")
    vp = "model.vision."
    pe = vp + "patch_embedding."
    plan.add("vision.patch_embed.weight", pe + "proj.weight")
    plan.add("vision.patch_embed.bias", pe + "proj.bias")
    plan.add("vision.cls", pe + "cls_embedding", fn=lambda t: t[0].reshape(1, 1, -1))
    # HF puts CLS first; edgemm (like llama.cpp) appends it after the patches: attention without a mask is
    # permutation-equivariant, so moving the CLS row of the position table to the end is exact.
    plan.add("vision.pos", pe + "position_embedding.weight",
             fn=lambda t: _cat([t[0][1:], t[0][:1]]).unsqueeze(0))
    for i in range(vl):
        e, s = f"vision.blocks.{i}.", f"{vp}transformer.layers.{i}."
        for en, sn in (("qkv", "attention.query_key_value"), ("proj", "attention.dense"), ("fc1", "mlp.fc1"),
                       ("fc2", "mlp.fc2"), ("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            plan.add(e + en + ".weight", s + sn + ".weight")
            plan.add(e + en + ".bias", s + sn + ".bias")
    g = vp + "linear_proj."
    for en, sn in (("linear_proj", "linear_proj"), ("gate", "gate_proj"), ("up", "dense_h_to_4h"),
                   ("down", "dense_4h_to_h")):
        plan.add(f"adapter.{en}.weight", g + sn + ".weight")
    plan.add("adapter.norm.weight", g + "norm1.weight")
    plan.add("adapter.norm.bias", g + "norm1.bias")
    plan.add("adapter.boi", vp + "boi")
    plan.add("adapter.eoi", vp + "eoi")
    return plan


@register
class CogVLM(Family):
    name = "cogvlm"
    model_types = ("cogvlm",)
    source = "CogVLM (`THUDM/cogvlm-chat-hf` layout)"
    computes = "routed visual experts"
    blocks = ("vision:eva", "connector:glu", "layer:routed")
    optional = ("qkv bias", "collapsed image positions (cogvlm position rule)", "eoi through the text branch")
    hints = {"gguf": "`--rules llamacpp`"}

    def detect(self, hf: dict) -> bool:       # remote-code checkpoints name it in architectures / auto_map only
        return super().detect(hf) or "cogvlm" in " ".join(hf.get("architectures") or []).lower() \
            or "cogvlm" in json.dumps(hf.get("auto_map") or {}).lower()

    def plan(self, hf, src, rules="original"):
        return map_cogvlm(hf, src, rules)
