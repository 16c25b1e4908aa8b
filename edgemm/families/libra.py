"""Libra -> edgemm (low-rank vision branches, per-modality norms, cross-modal K/V bridge)."""
from __future__ import annotations


from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError, UnsupportedVariant

from . import Family, register
from .base import Plan, _llama_layer, _lm_ends, _req, _rope_theta
from ..importers.shards import Source


def map_libra(hf: dict, src: Source, rules: str = "original") -> Plan:
    """YifanXu74/Libra's LibraForCausalLM: LLaMA text branch, low-rank vision branches (LibraLinear weight_A /
    weight_B), per-modality norms (input, post-attention, final), the rank-r cross-modal K/V bridge, and the
    image-token input embeddings. Libra's VQ image tokenizer and CLIP signal encoder are separate models."""
    w = "config.json"
    for key, bad in (("use_2d_rope", True), ("addition_mode", True)):
        if hf.get(key, False) == bad:
            raise UnsupportedVariant(f"libra {key}", "edgemm's reference model",
                                     "none (edgemm implements Libra's released setting: 1-D RoPE, routed branches)")
    D, H, L = _req(hf, "hidden_size", w), _req(hf, "num_attention_heads", w), _req(hf, "num_hidden_layers", w)
    if hf.get("num_key_value_heads", H) != H:
        raise EdgemmError(f"{w}: Libra's vision branches are multi-head; num_key_value_heads != num_attention_heads")
    res = _req(hf, "image_feature_resolution", w)
    mvt = hf.get("max_vision_token_length", res * res + 2)
    if mvt != res * res + 2:
        raise EdgemmError(f"{w}: max_vision_token_length {mvt} != image_feature_resolution^2 + 2")
    ratio = hf.get("vision_down_ratio", 4)
    bridge = hf.get("bridge_rank", 8) if hf.get("use_bridge", True) else None
    ncb = hf.get("vision_codebook_num", 2)
    if hf.get("hidden_act", "silu") != "silu":
        raise EdgemmError(f"{w}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=res, patch_size=1, width=D, layers=0, heads=1, mlp_dim=1, arch="none"),
        adapter=AdapterConfig(kind="libra", codebooks=ncb, vision_vocab=hf.get("vision_vocab_size", 514),
                              signal_size=hf.get("contiguous_signal_size", 2048),
                              concat_signals=hf.get("concat_signals", True), norm_signals=hf.get("norm_signals", True),
                              position_embedding=mvt if hf.get("use_vision_position_embedding") else 0),
        decoder=DecoderConfig(vocab_size=_req(hf, "vocab_size", w), d_model=D, n_layers=L, n_heads=H,
                              ffn_dim=_req(hf, "intermediate_size", w), rope_theta=_rope_theta(hf, w),
                              rms_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 2048),
                              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), vision_down_ratio=ratio,
                              per_modality_norms=True, cross_modal_bridge=bridge))
    plan = Plan(cfg)
    m = "model."
    _lm_ends(plan, m, "lm_head.weight", cfg.decoder.tie_embeddings)
    plan.add("decoder.vision_norm.weight", m + "vision_norm.weight")
    for i in range(L):
        _llama_layer(plan, m, i, False)
        e, s = f"decoder.layers.{i}.", f"{m}layers.{i}."
        plan.add(e + "vision_attn_norm.weight", s + "vision_input_layernorm.weight")
        plan.add(e + "vision_ffn_norm.weight", s + "vision_post_attention_layernorm.weight")
        for n in ("q", "k", "v", "o"):
            for ab in ("A", "B"):
                plan.add(e + f"vision.{n}.weight_{ab}", s + f"self_attn.vision_{n}_proj.weight_{ab}")
        for n in ("gate", "up", "down"):
            for ab in ("A", "B"):
                plan.add(e + f"vision.{n}.weight_{ab}", s + f"mlp.vision_{n}_proj.weight_{ab}")
        if bridge:
            for kv in ("k", "v"):
                for br, on in (("text", "language"), ("vision", "vision")):
                    for ab in ("A", "B"):
                        plan.add(e + f"{br}.{kv}_bridge.weight_{ab}",
                                 s + f"self_attn.vision_{kv}_bridge_on_{on}.weight_{ab}")
    for i in range(ncb):
        plan.add(f"adapter.embed.{i}.weight", m + f"vision_embed_tokens.{i}.weight")
    if cfg.adapter.position_embedding:
        plan.add("adapter.pos.weight", m + "vision_position_embedding.weight")
    if cfg.adapter.signal_size:
        if cfg.adapter.concat_signals and cfg.adapter.norm_signals:
            plan.add("adapter.signal_norm.weight", m + "vision_signal_norm.weight")
        plan.add("adapter.processor.weight", m + "vision_contiguous_signal_processor.weight")
    why = "image-token prediction head (edgemm generates text; image generation is not imported)"
    for k in src.where:
        if k.startswith("vision_lm_head.") or k == "vision_hidden_placeholder":
            plan.ignore(k, why)
    for k in ("naive_placeholder", "vision_logits_placeholder", "language_logits_placeholder",
              "eoi_to_newline_logits_placeholder", m + "pos_offset"):
        plan.ignore(k, "constant buffer")
    plan.notes.append("Libra's pixel path (its VQ image tokenizer and CLIP continuous-signal encoder, separate "
                      "models) is not imported: image rows come from EdgeMM.encode_image_tokens(codes, signal)")
    return plan


@register
class Libra(Family):
    name = "libra"
    model_types = ("libra",)
    architectures = ("libraforcausallm",)
    source = "Libra"
    computes = "low-rank vision branches, cross-modal K/V bridge"
    blocks = ("connector:libra", "layer:low-rank", "layer:bridge")
    core = ("libra image tokens", "low-rank vision branches", "per-modality norms")
    optional = ("cross-modal K/V bridge", "grouped-query attention")

    def plan(self, hf, src, rules="original"):
        return map_libra(hf, src, rules)
