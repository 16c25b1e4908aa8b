"""Idefics (transformers IdeficsForVisionText2Text, resampler on) -> edgemm gated cross-attention (edgemm.xattn).

The vision tower (IdeficsVisionTransformer) is a CLIP ViT read at its last hidden state, CLS kept, before
post_layernorm (which only the pooled output passes): edgemm's "clip" tower with keep_cls. The decoupled
embedding and lm_head (additional_vocab_size) are concatenated: ids >= vocab_size read the additional rows and
the logits end with the additional features, exactly what IdeficsDecoupledEmbedding / IdeficsDecoupledLinear do.
"""
from __future__ import annotations

import json

from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig, cross_image_ids
from ..errors import EdgemmError

from . import Family, register
from .base import CLIP_MEAN, CLIP_STD, Plan, _act, _cat, _clip_vision, _llama_layer, _req, _rope_theta
from ..importers.shards import Source


def _token(src: Source, name: str, required: bool = True) -> int | None:
    f = src.path / "tokenizer.json"
    if f.is_file():
        tj = json.loads(f.read_text())
        vocab = tj.get("model", {}).get("vocab", {})
        added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        tid = added.get(name, vocab.get(name) if isinstance(vocab, dict) else None)
        if tid is not None:
            return int(tid)
    if required:
        raise EdgemmError(f"{f}: no {name} token; an Idefics checkpoint's tokenizer.json names the image token the "
                          "image segments use")
    return None


def map_idefics(hf: dict, src: Source, rules: str = "original") -> Plan:
    w, wv, wp = "config.json", "config.json vision_config", "config.json perceiver_config"
    vc, pc = _req(hf, "vision_config", w), hf.get("perceiver_config") or {}
    if not hf.get("use_resampler", False):
        raise EdgemmError(f"{w}: use_resampler is false; edgemm imports Idefics with the Perceiver resampler on")
    if hf.get("hidden_act", "silu") != "silu":
        raise EdgemmError(f"{w}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    alpha = hf.get("alpha_type", "float")
    if alpha not in ("float", "vector"):
        raise EdgemmError(f"{w}: alpha_type {alpha!r} is not supported (float, vector)")
    D, H, L = _req(hf, "hidden_size", w), _req(hf, "num_attention_heads", w), _req(hf, "num_hidden_layers", w)
    every = int(hf.get("cross_layer_interval", 1))
    if L // every < 1:
        raise EdgemmError(f"{w}: cross_layer_interval {every} leaves no cross-attention layer in {L} layers")
    extra = int(hf.get("additional_vocab_size", 0) or 0)
    V = _req(hf, "vocab_size", w)
    W, vl = _req(vc, "embed_dim", wv), _req(vc, "num_hidden_layers", wv)
    tie = bool(hf.get("tie_word_embeddings", False))
    eos = hf.get("eos_token_id")
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=_req(vc, "image_size", wv), patch_size=_req(vc, "patch_size", wv), width=W,
                            layers=vl, heads=_req(vc, "num_attention_heads", wv),
                            mlp_dim=_req(vc, "intermediate_size", wv), eps=vc.get("layer_norm_eps", 1e-5),
                            gelu=_act(vc.get("hidden_act", "gelu"), wv), image_mean=CLIP_MEAN, image_std=CLIP_STD,
                            arch="clip", keep_cls=True),
        adapter=AdapterConfig(kind="perceiver", eps=1e-5, perceiver_latents=_req(pc, "resampler_n_latents", wp),
                              perceiver_depth=_req(pc, "resampler_depth", wp),
                              perceiver_heads=_req(pc, "resampler_n_heads", wp),
                              perceiver_head_dim=_req(pc, "resampler_head_dim", wp),
                              perceiver_qk_norms=bool(pc.get("qk_layer_norms_perceiver", False)),
                              perceiver_ffn=4 * W),
        decoder=DecoderConfig(vocab_size=V + extra, d_model=D, n_layers=L, n_heads=H,
                              ffn_dim=_req(hf, "intermediate_size", w), rope_theta=_rope_theta(hf, w),
                              rms_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 2048),
                              tie_embeddings=tie, single_branch=True, cross_attn_every=every, cross_attn_kv_dim=W,
                              cross_attn_qk_norms=bool(hf.get("qk_layer_norms", False)), cross_attn_alpha=alpha,
                              cross_attn_image_token=_token(src, "<image>"),
                              cross_attn_image_wrap=_token(src, "<fake_token_around_image>", required=False),
                              cross_attn_reset_token=eos if isinstance(eos, int) else None))
    plan = Plan(cfg)
    m = "model."

    def vocab(name, base, add):
        if extra:
            plan.add(name, base, add, fn=_cat)
        else:
            plan.add(name, base)
    vocab("decoder.tok_embeddings.weight", m + "embed_tokens.weight", m + "embed_tokens.additional_embedding.weight")
    plan.add("decoder.norm.weight", m + "norm.weight")
    if tie:
        for k in ("lm_head.weight", "lm_head.additional_fc.weight"):
            plan.ignore(k, "tied to the token embedding")
    else:
        vocab("decoder.lm_head.weight", "lm_head.weight", "lm_head.additional_fc.weight")
    for i in range(L):
        _llama_layer(plan, m, i, False)
    for j in range(L // every):
        e, s = f"decoder.cross_layers.{j}.", f"{m}gated_cross_attn_layers.{j}."
        plan.add(e + "attn_norm.weight", s + "input_layernorm.weight")
        plan.add(e + "ffn_norm.weight", s + "post_attention_layernorm.weight")
        for n in "qkvo":
            plan.add(e + f"{n}.weight", s + f"cross_attn.{n}_proj.weight")
        if cfg.decoder.cross_attn_qk_norms:
            plan.add(e + "q_norm.weight", s + "cross_attn.q_layer_norm.weight")
            plan.add(e + "k_norm.weight", s + "cross_attn.k_layer_norm.weight")
        for n in ("gate", "up", "down"):
            plan.add(e + f"{n}.weight", s + f"mlp.{n}_proj.weight")
        plan.add(e + "alpha_attn", s + "alpha_cross_attn", fn=lambda t: t[0].reshape(-1))
        plan.add(e + "alpha_dense", s + "alpha_dense", fn=lambda t: t[0].reshape(-1))
        plan.ignore(s + "cross_attn.rotary_emb.inv_freq", "RoPE frequencies (cross-attention uses none)")
    _clip_vision(plan, m + "vision_model.", vl, "the vision tower's pooled-output norm: Idefics reads the last "
                                                "hidden state before it")
    r = m + "perceiver_resampler."
    plan.add("adapter.latents", r + "latents")
    for n in ("weight", "bias"):
        plan.add(f"adapter.norm.{n}", r + f"layer_norm.{n}")
    for b in range(cfg.adapter.perceiver_depth):
        e, s = f"adapter.blocks.{b}.", f"{r}blocks.{b}."
        norms = [("context_norm", "0.context_layer_norm"), ("latents_norm", "0.latents_layer_norm"), ("ln", "1.ln")]
        if cfg.adapter.perceiver_qk_norms:
            norms += [("q_norm", "0.q_layer_norm"), ("k_norm", "0.k_layer_norm")]
        for ours, theirs in norms:
            for n in ("weight", "bias"):
                plan.add(e + f"{ours}.{n}", s + f"{theirs}.{n}")
        for ours, theirs in (("q", "0.q_proj"), ("k", "0.k_proj"), ("v", "0.v_proj"), ("o", "0.output_proj"),
                             ("fc", "1.fc"), ("c_proj", "1.c_proj")):
            plan.add(e + f"{ours}.weight", s + f"{theirs}.weight")
    plan.notes.append(f"gated cross-attention before every {every} layer(s) ({L // every} layers) over "
                      f"{cfg.adapter.perceiver_latents} resampled rows per image; an image segment is "
                      f"tokens {cross_image_ids(cfg.decoder)}" + (f", {extra} additional vocab rows appended" if extra
                                                                 else ""))
    return plan


@register
class Idefics(Family):
    name = "idefics"
    model_types = ("idefics",)
    architectures = ("ideficsforvisiontext2text",)
    source = "`IdeficsForVisionText2Text` (resampler on)"
    computes = "gated cross-attention: images never enter the context"
    blocks = ("vision:clip", "connector:perceiver", "layer:single", "layer:gated-cross-attention")
    core = ("single branch (llava)", "clip vision tower", "gated cross-attention")

    def plan(self, hf, src, rules="original"):
        return map_idefics(hf, src, rules)
